"""Dataflow scheduling: an aggregation starts when its own parents finish, with the same prompts,
outputs and result as the round-synchronous schedule; failed parents are replaced deterministically."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from markov_rsa import (
    Event,
    MarkovRSA,
    OpenAIBackend,
    RolloutFinished,
    RolloutRecord,
    RoundFinished,
    RoundStarted,
    RSAParams,
    RunLog,
    call_seed,
    draw_subsets,
    read_run_log,
)
from markov_rsa._controller import redraw_order
from test_proxy import proxy  # noqa: F401 - the fixture

PROBLEM = "What is 17 + 25 * 3?"
NO_RETRY = {"max_retries": 0, "backoff_base": 0.01, "backoff_max": 0.02}


async def run(server: Any, params: RSAParams, *, run_dir: Path | None = None, **backend_kw: Any) -> dict[str, Any]:
    """One run; its events, records by (round, slot), the result and the requests the server saw."""
    events: list[Event] = []
    server.reset_stats()

    def on_event(event: Event) -> None:
        events.append(event)

    async with OpenAIBackend(server.base_url, **backend_kw) as backend:
        if run_dir is None:
            result = await MarkovRSA(backend, params).solve(PROBLEM, on_event)
        else:
            with RunLog(run_dir) as log:
                result = await MarkovRSA(backend, params).solve(PROBLEM, lambda e: (log(e), on_event(e)))
    records = {(e.record.round, e.record.slot): e.record for e in events if isinstance(e, RolloutFinished)}
    return {"events": events, "records": records, "result": result, "requests": list(server.stats.requests_log)}


def with_(params: RSAParams, **changes: Any) -> RSAParams:
    return RSAParams.model_validate({**params.model_dump(), **changes})


def prompts(requests: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return sorted((body["seed"], json.dumps(body["messages"])) for body in requests)


def outputs(records: dict[tuple[int, int], RolloutRecord]) -> dict[tuple[int, int], tuple[Any, ...]]:
    return {
        key: (r.parents, r.shown_tails, r.trace.content if r.trace else None, r.trace.reasoning if r.trace else None)
        for key, r in records.items()
    }


async def test_dataflow_and_rounds_give_identical_prompts_outputs_and_results(fake_backend: Any) -> None:
    # Long-tailed lengths, so the two schedules really do send the calls in different orders.
    server = fake_backend(length_mean=200, length_sigma=0.6, long_tail_rate=0.1, long_tail_factor=4,
                          tokens_per_second=8000)
    base = RSAParams(n=8, k=3, t=3, tail_tokens=30, max_tokens=2000, seed=21, selection="majority")
    runs = {s: await run(server, with_(base, schedule=s)) for s in ("rounds", "dataflow")}
    rounds, dataflow = runs["rounds"], runs["dataflow"]
    tokens = [r.trace.usage.completion_tokens for r in rounds["records"].values() if r.trace]
    assert max(tokens) > 3 * min(tokens)
    assert len(rounds["records"]) == len(dataflow["records"]) == 24
    assert prompts(rounds["requests"]) == prompts(dataflow["requests"])
    assert outputs(rounds["records"]) == outputs(dataflow["records"])
    a, b = rounds["result"], dataflow["result"]
    assert (a.answer, a.final_text, a.votes, a.usage, a.calls) == (b.answer, b.final_text, b.votes, b.usage, b.calls)
    assert [s.answers for s in a.rounds] == [s.answers for s in b.rounds]
    for schedule in runs.values():
        finished = [e.summary.round for e in schedule["events"] if isinstance(e, RoundFinished)]
        assert finished == [0, 1, 2]


async def test_a_round_one_slot_starts_before_round_zero_ends(fake_backend: Any) -> None:
    # With this server seed one round-0 trace is eight times longer than the rest.
    server = fake_backend(length_mean=20, length_sigma=0.2, long_tail_rate=0.1, long_tail_factor=30,
                          tokens_per_second=300, seed=2)
    params = RSAParams(n=8, k=2, t=2, tail_tokens=20, max_tokens=4000, seed=5, selection="majority")
    flows = {s: await run(server, with_(params, schedule=s)) for s in ("dataflow", "rounds")}
    for schedule, flow in flows.items():
        events = flow["events"]
        round0 = [e for e in events if isinstance(e, RolloutFinished) and e.record.round == 0]
        tokens = sorted(e.record.trace.usage.completion_tokens for e in round0)
        assert tokens[-1] > 5 * tokens[0], tokens  # the workload has its straggler
        slowest_end = max(e.progress.elapsed_s for e in round0)
        round1_start = next(e for e in events if isinstance(e, RoundStarted) and e.round == 1).progress.elapsed_s
        if schedule == "dataflow":
            assert round1_start < slowest_end
        else:
            assert round1_start >= slowest_end


async def test_failed_parent_is_replaced_deterministically_and_resume_reproduces_it(
    fake_backend: Any, tmp_path: Path
) -> None:
    params = RSAParams(n=6, k=3, t=3, tail_tokens=30, max_tokens=400, seed=7, selection="majority",
                       min_survivors=0.5)
    subsets = draw_subsets(params.seed, 1, range(6), 6, 3)
    broken = subsets[0][1]  # a round-0 slot that round 1 draws
    server = fake_backend(length_mean=40, length_sigma=0.5, tokens_per_second=4000,
                          fail_seeds=[call_seed(params.seed, 0, broken)])
    clean = await run(server, params, run_dir=tmp_path / "clean", **NO_RETRY)
    again = await run(server, with_(params, schedule="rounds"), **NO_RETRY)
    result = clean["result"]
    assert result.failed == 1 and result.rounds[0].failed == 1
    assert clean["records"][(0, broken)].error is not None

    replaced = []
    for slot, drawn in enumerate(subsets):
        record = clean["records"][(1, slot)]
        assert broken not in record.parents and len(record.parents) == 3
        if broken in drawn:
            spare = next(s for s in redraw_order(params.seed, 1, slot, 6, drawn) if s != broken)
            assert record.parents == [spare if s == broken else s for s in drawn]
            replaced.append(slot)
        else:
            assert record.parents == drawn
    assert replaced
    # The other schedule, with other timings, made the same choices.
    assert outputs(again["records"]) == outputs(clean["records"])

    # Resume from a log cut after round 0, keeping the round-1 rollouts that used a replacement.
    log = tmp_path / "clean" / "run.jsonl"
    kept = []
    for line in log.read_text().splitlines():
        data = json.loads(line)
        if data["type"] == "config" or (data["type"] == "round_end" and data["round"] == 0):
            kept.append(line)
        elif data["type"] == "rollout" and (data["round"] == 0 or (data["round"] == 1 and data["slot"] in replaced)):
            kept.append(line)
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "run.jsonl").write_text("\n".join(kept) + "\n")
    logged = read_run_log(cut)
    server.reset_stats()
    resumed_events: list[Event] = []
    async with OpenAIBackend(server.base_url, **NO_RETRY) as backend:
        with RunLog(cut, resuming=True) as runlog:
            resumed = await MarkovRSA(backend, logged.params).solve(
                logged.messages, lambda e: (runlog(e), resumed_events.append(e)), existing=logged.records,
                seed=logged.seed,
            )
    # Only the missing rollouts ran: the rest of round 1 and all of round 2.
    assert len(server.stats.requests_log) == 6 - len(replaced) + 6
    assert all("=== Candidate 1 ===" in b["messages"][-1]["content"] for b in server.stats.requests_log)
    assert resumed.answer == result.answer and resumed.votes == result.votes
    generated = {(e.record.round, e.record.slot): e.record for e in resumed_events if isinstance(e, RolloutFinished)}
    for key, record in generated.items():
        assert record.parents == clean["records"][key].parents
        assert record.trace.content == clean["records"][key].trace.content


async def wait_for(condition: Any, timeout: float = 30.0) -> None:
    """Wait until a counter-based condition holds (the server sees disconnects on its own loop)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_early_stop_ends_the_run_and_cancels_next_round_work(fake_backend: Any) -> None:
    # Every direct solve is right, so round 0 is unanimous. Lengths vary enough that round-1
    # aggregations start (dataflow) while round 0's last rollouts are still generating.
    server = fake_backend(length_mean=200, length_sigma=0.3, error_rate=0.0, tokens_per_second=200)
    params = RSAParams(n=8, k=2, t=3, tail_tokens=30, max_tokens=2000, seed=4, selection="majority", early_stop=1.0)
    flow = await run(server, params)
    result = flow["result"]
    assert result.stopped_early == {"round": 0, "answer": "92", "share": 1.0, "threshold": 1.0, "skipped_rounds": 2}
    assert len(result.rounds) == 1 and all(r.round == 0 for r in result.population)
    assert result.answer == "92" and any("stopped after round 0" in note for note in result.notes)
    finished_later = [k for k in flow["records"] if k[0] > 0]
    aggregations = [b for b in flow["requests"] if "=== Candidate 1 ===" in b["messages"][-1]["content"]]
    # Round-1 work had started, and what was still generating was cancelled, not awaited.
    assert aggregations and len(finished_later) < len(aggregations)
    await wait_for(lambda: server.stats.served + server.stats.cancelled == server.stats.requests)
    assert server.stats.cancelled >= len(aggregations) - len(finished_later)
    assert result.usage.completion_tokens == sum(
        r.trace.usage.completion_tokens for r in flow["records"].values() if r.trace
    )


async def test_early_stop_waits_for_a_real_majority(fake_backend: Any) -> None:
    server = fake_backend(length_mean=60, error_rate=0.5, seed=1)
    params = RSAParams(n=8, k=2, t=2, tail_tokens=30, max_tokens=500, seed=4, selection="majority",
                       early_stop=1.0, schedule="rounds")
    flow = await run(server, params)
    result = flow["result"]
    assert len(result.rounds[0].votes) > 1  # round 0 disagreed
    assert result.stopped_early is None and len(result.rounds) == 2


def test_eval_reports_accuracy_and_tokens_with_and_without_early_stop(fake_backend: Any, tmp_path: Path) -> None:
    from test_cli import cli

    dataset = Path(__file__).resolve().parent.parent / "datasets" / "arith.jsonl"
    server = fake_backend(length_mean=40, error_rate=0.3, follow_majority=0.9, aggregation_error_rate=0.1, seed=4)
    proc = cli("eval", str(dataset), "--backend", server.base_url, "--n", "6", "--k", "3", "--t", "3",
               "--tail-tokens", "40", "--max-tokens", "400", "--seed", "1", "-q", "--early-stop", "1.0",
               "--limit", "12", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    stop = results["early_stop"]
    # Every round ran (the counterfactual needs them), so the full run's numbers are the real ones.
    assert all(r["calls"] == 12 * 6 for r in results["rounds"])
    assert stop["tokens_without"] == results["tokens"] == server.stats.usage["total_tokens"]
    assert stop["final_acc_without"] == results["final_acc"]
    runs = [json.loads(line) for path in sorted((tmp_path / "runs").glob("*/run.jsonl"))
            for line in path.read_text().splitlines() if '"type": "result"' in line]
    unanimous = [r for r in runs if len(r["rounds"][0]["votes"]) == 1 or len(r["rounds"][1]["votes"]) == 1]
    assert stop["stopped"] == len(unanimous) > 0
    assert stop["tokens_with"] < stop["tokens_without"]
    assert f"{stop['tokens_saved_fraction']:.1%} saved" in proc.stdout


def test_the_proxy_reports_an_early_stop(fake_backend: Any, proxy: Any) -> None:
    import httpx

    upstream = fake_backend(length_mean=40, error_rate=0.0)
    running = proxy(upstream)
    body = {"model": "fake-reasoner", "messages": [{"role": "user", "content": PROBLEM}],
            "rsa": {"n": 4, "k": 2, "t": 3, "early_stop": 0.75, "selection": "majority"}}
    response = httpx.post(running.base_url + "/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    rsa = response.json()["rsa"]
    assert rsa["stopped_early"]["round"] == 0 and rsa["stopped_early"]["skipped_rounds"] == 2
    assert len(rsa["per_round"]) == 1


async def test_calls_released_together_reach_the_backend_as_one_batch(fake_backend: Any) -> None:
    # A batching backend (the local engine) must still get whole batches: everything released
    # by the same event goes out in one generate() call.
    server = fake_backend(length_mean=40)
    batches: list[int] = []

    class CountingBackend(OpenAIBackend):
        def generate(self, requests: Any) -> Any:
            batches.append(len(requests))
            return super().generate(requests)

    params = RSAParams(n=6, k=2, t=3, tail_tokens=20, max_tokens=300, seed=1, selection="majority",
                       schedule="rounds")
    async with CountingBackend(server.base_url) as backend:
        await MarkovRSA(backend, params).solve(PROBLEM)
        assert batches == [6, 6, 6]
        batches.clear()
        await MarkovRSA(backend, with_(params, schedule="dataflow")).solve(PROBLEM)
    assert batches[0] == 6 and sum(batches) == 18
