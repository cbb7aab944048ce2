"""Orchestration: wall time against the ideal critical path, CPU per call, and what dataflow
scheduling gains over round-synchronous scheduling on long-tailed reasoning lengths.

The simulated backend runs in its own process at a fixed token rate with no concurrency limit, so
a run could take no less than its longest dependency chain: the longest path through the rollouts
it ran, each taking its actual duration, where a round-0 rollout depends on nothing, an aggregation
under ``dataflow`` on its own parents and under ``rounds`` on the whole previous round. What a run
takes beyond that is the orchestrator's overhead. Figures are ratios measured in one run. Runs go on
the event loop the CLI uses (uvloop when installed).

1. Overhead: N=16 K=4, T=2 and 4, lengths lognormal (sigma 0.3).
2. Long tails: lengths lognormal (sigma 0.6) with 5% of traces 4x longer; ``rounds`` and
   ``dataflow`` on the same seeds (so the same rollouts, prompts and lengths) at N=16 K=4 T=4 and
   N=32 K=4 T=9; prints wall(rounds) / wall(dataflow) over all seeds and dataflow's wall / ideal.

    python bench/orchestration.py [--rate 2000] [--length 400] [--seeds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from markov_rsa import MarkovRSA, OpenAIBackend, RolloutFinished, RolloutRecord, RSAParams
from markov_rsa._loop import run as run_loop

PROBLEM = "What is 17 + 25 * 3?"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_backend(*flags: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cli = str(Path(sys.executable).parent / "markov-rsa")
    proc = subprocess.Popen(
        [cli, "fake-backend", "--port", str(port), *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url + "/v1"
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the simulated backend did not start")


def ideal_wall(records: list[RolloutRecord], params: RSAParams) -> float:
    """The longest dependency chain of the run's rollouts, each at its actual duration."""
    finish: dict[tuple[int, int], float] = {}
    round_end: dict[int, float] = {}
    for record in sorted(records, key=lambda r: (r.round, r.slot)):
        duration = record.trace.latency_s if record.trace is not None else 0.0
        if record.round == 0:
            start = 0.0
        elif params.schedule.value == "rounds":
            start = round_end[record.round - 1]
        else:
            start = max(finish[(record.round - 1, parent)] for parent in record.parents or [])
        finish[(record.round, record.slot)] = start + duration
        round_end[record.round] = max(round_end.get(record.round, 0.0), start + duration)
    return max(finish.values())


async def measure(backend: OpenAIBackend, params: RSAParams) -> dict[str, Any]:
    records: list[RolloutRecord] = []

    def on_event(event: Any) -> None:
        if isinstance(event, RolloutFinished):
            records.append(event.record)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = await MarkovRSA(backend, params).solve(PROBLEM, on_event)
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    ideal = ideal_wall(records, params)
    return {
        "T": params.t,
        "calls": result.calls,
        "wall_s": wall,
        "ideal_s": ideal,
        "ratio": wall / ideal,
        "cpu_ms_per_call": 1000 * cpu / result.calls,
        "answer": result.answer,
        "tokens": result.usage.completion_tokens,
    }


async def warm_up(backend: OpenAIBackend) -> None:
    # Connections, the tokenizer probe, lazy imports of the answer checker.
    await MarkovRSA(backend, RSAParams(n=2, k=2, t=2, tail_tokens=64, max_tokens=512, seed=0)).solve(PROBLEM)


async def overhead(base_url: str) -> list[dict[str, Any]]:
    rows = []
    async with OpenAIBackend(base_url, concurrency=256) as backend:
        await warm_up(backend)
        for t in (2, 4):
            params = RSAParams(n=16, k=4, t=t, tail_tokens=256, max_tokens=4096, seed=1, selection="majority")
            rows.append(await measure(backend, params))
    return rows


async def long_tail(base_url: str, seeds: int) -> list[dict[str, Any]]:
    rows = []
    async with OpenAIBackend(base_url, concurrency=1024) as backend:
        await warm_up(backend)
        for n, k, t in ((16, 4, 4), (32, 4, 9)):
            runs: dict[str, list[dict[str, Any]]] = {"rounds": [], "dataflow": []}
            for seed in range(1, seeds + 1):
                for schedule in ("rounds", "dataflow"):
                    params = RSAParams(n=n, k=k, t=t, tail_tokens=256, max_tokens=16384, seed=seed,
                                       selection="majority", schedule=schedule)
                    runs[schedule].append(await measure(backend, params))
                same = runs["rounds"][-1]["tokens"] == runs["dataflow"][-1]["tokens"]
                assert same, "the two schedules generated different rollouts"
            rounds_wall = sum(r["wall_s"] for r in runs["rounds"])
            dataflow_wall = sum(r["wall_s"] for r in runs["dataflow"])
            rows.append({
                "config": f"{n}/{k}/{t}",
                "rounds_s": rounds_wall,
                "dataflow_s": dataflow_wall,
                "speedup": rounds_wall / dataflow_wall,
                "per_seed": [a["wall_s"] / b["wall_s"] for a, b in zip(runs["rounds"], runs["dataflow"])],
                "rounds_vs_ideal": rounds_wall / sum(r["ideal_s"] for r in runs["rounds"]),
                "dataflow_vs_ideal": dataflow_wall / sum(r["ideal_s"] for r in runs["dataflow"]),
                "worst_vs_ideal": max(r["ratio"] for r in runs["dataflow"]),
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=2000.0, help="tokens per second per stream")
    parser.add_argument("--length", type=int, default=400, help="median reasoning length in tokens")
    parser.add_argument("--ttft", type=float, default=0.05, help="time to first token, seconds")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per long-tail configuration")
    parser.add_argument("--skip-overhead", action="store_true", help="only the long-tail comparison")
    args = parser.parse_args()
    common = ["--tokens-per-second", str(args.rate), "--ttft-s", str(args.ttft), "--length-mean", str(args.length)]

    if not args.skip_overhead:
        proc, base_url = start_backend(*common, "--length-sigma", "0.3")
        try:
            rows = run_loop(overhead(base_url))
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        print(f"Overhead: N=16 K=4, {args.rate:.0f} tok/s per stream, median length {args.length} tokens, "
              "sigma 0.3, dataflow")
        print(f"{'T':>3} {'calls':>6} {'wall s':>8} {'ideal s':>8} {'wall/ideal':>11} {'CPU ms/call':>12}")
        for row in rows:
            print(
                f"{row['T']:>3} {row['calls']:>6} {row['wall_s']:>8.3f} {row['ideal_s']:>8.3f} "
                f"{row['ratio']:>11.3f} {row['cpu_ms_per_call']:>12.2f}"
            )
        print("targets: wall/ideal <= 1.03, CPU <= 2.5 ms per call\n")

    proc, base_url = start_backend(
        *common, "--length-sigma", "0.6", "--long-tail-rate", "0.05", "--long-tail-factor", "4"
    )
    try:
        rows = run_loop(long_tail(base_url, args.seeds))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(f"Long tails: lognormal sigma 0.6, 5% of traces 4x longer, median {args.length} tokens, "
          f"{args.rate:.0f} tok/s per stream, no concurrency limit, {args.seeds} seed(s) per row")
    print(f"{'N/K/T':>7} {'rounds s':>9} {'dataflow s':>11} {'rounds/dataflow':>16} {'per seed':>20} "
          f"{'rounds/ideal':>13} {'dataflow/ideal':>15} {'worst':>6}")
    for row in rows:
        per_seed = " ".join(f"{x:.2f}" for x in row["per_seed"])
        print(
            f"{row['config']:>7} {row['rounds_s']:>9.2f} {row['dataflow_s']:>11.2f} {row['speedup']:>15.2f}x "
            f"{per_seed:>20} {row['rounds_vs_ideal']:>13.3f} {row['dataflow_vs_ideal']:>15.3f} "
            f"{row['worst_vs_ideal']:>6.3f}"
        )
    print("targets: rounds/dataflow >= 1.15x at 16/4/4 and >= 1.3x at 32/4/9; dataflow wall/ideal <= 1.03")


if __name__ == "__main__":
    main()
