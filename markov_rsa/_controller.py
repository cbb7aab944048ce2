"""The controller: rounds, subset sampling, tails, aggregation prompts and selection."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._answers import VoteResult, extract_answer, vote
from ._offload import offload
from ._backend import Backend
from ._errors import BackendError, ConfigError, RunError
from ._events import (
    Event,
    EventHandler,
    FinalAggregationStarted,
    Progress,
    RolloutFinished,
    RoundFinished,
    RoundStarted,
    RunFinished,
    RunStarted,
)
from ._context import prompt_bound, prompt_tokens, shorten_tail, tails_budget
from ._dispatch import Dispatcher
from ._params import Compaction, RSAParams, Schedule, Selection, Verifier
from ._prompts import aggregation_prompt, problem_text, summary_messages
from ._result import RolloutRecord, RoundSummary, RSAResult
from ._tails import answer_section, make_tail
from ._tokenizers import Tokenizer, tiktoken_tokenizer
from ._types import GenerationRequest, Message, Trace, Usage
from ._verifier import CandidateVerifier, effective_verifier

Problem = str | Sequence[Message]


def to_messages(problem: Problem) -> list[Message]:
    """A conversation from a problem string or a message list; raises ConfigError when empty."""
    if isinstance(problem, str):
        if not problem.strip():
            raise ConfigError("the problem is empty", param="messages")
        return [{"role": "user", "content": problem}]
    messages = [dict(m) for m in problem]
    if not messages:
        raise ConfigError("messages must not be empty", param="messages")
    if not problem_text(messages).strip():
        raise ConfigError("the last user message is empty", param="messages")
    return messages


def call_seed(seed: int, round_index: int, slot: int) -> int:
    """The sampling seed of one call: distinct per (round, slot), reproducible from the run seed."""
    return (seed * 1_000_003 + round_index * 65_537 + slot) % (2**31 - 1)


def draw_subsets(seed: int, round_index: int, survivors: Iterable[int], n: int, k: int) -> list[list[int]]:
    """For each of the ``n`` slots of ``round_index``, ``k`` distinct slots drawn from ``survivors``.

    The RNG is derived from (seed, round) alone, so a resumed run redraws exactly the same subsets.
    ``k == 1`` is the report's Markovian baseline: slot ``i`` continues from its own trace (the
    ``i``-th survivor, cyclically when there are fewer survivors than slots).
    """
    pool = list(survivors)
    if k == 1 and pool:
        return [[pool[slot % len(pool)]] for slot in range(n)]
    rng = random.Random(f"markov-rsa:{seed}:{round_index}")
    # random.sample order is kept: it is the candidates' order in the prompt, so no slot is always first.
    size = min(k, len(pool))
    return [rng.sample(pool, size) for _ in range(n)]


def early_stop_share(votes: Sequence[tuple[str, int]], threshold: float) -> tuple[str, float] | None:
    """The leading answer and its share of a round's answers when that share reaches ``threshold``.

    A round with fewer than two answers never counts as a consensus.
    """
    counted = sum(count for _, count in votes)
    if counted < 2:
        return None
    answer, count = votes[0]
    share = count / counted
    # Shares are ratios of small integers: a little slack keeps 3/4 >= 0.75 exact.
    return (answer, share) if share + 1e-9 >= threshold else None


def redraw_order(seed: int, round_index: int, slot: int, n: int, drawn: Sequence[int]) -> list[int]:
    """The order in which slot ``slot`` of ``round_index`` tries replacements for a failed parent:
    the previous round's other slots, shuffled by an RNG derived from (seed, round, slot)."""
    rng = random.Random(f"markov-rsa:{seed}:{round_index}:{slot}:redraw")
    return rng.sample([index for index in range(n) if index not in drawn], n - len(set(drawn)))


class MarkovRSA:
    """Runs Markovian RSA on a backend.

    ``await MarkovRSA(backend, params).solve("problem")`` returns an :class:`RSAResult`. Events go
    to ``on_event`` (a plain or async callable), or iterate them with :meth:`stream`.
    """

    def __init__(
        self,
        backend: Backend,
        params: RSAParams | None = None,
        *,
        tokenizer: Tokenizer | None = None,
        prompt_dir: str | Path | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        request_extra: dict[str, Any] | None = None,
        summary_instructions: str | None = None,
        max_concurrency: int | None = None,
    ) -> None:
        if max_concurrency is not None and max_concurrency < 1:
            raise ConfigError("max_concurrency must be at least 1", param="max_concurrency")
        self.backend = backend
        self.params = params or RSAParams()
        self.tokenizer = tokenizer
        self.prompt_dir = prompt_dir
        self.chat_template_kwargs = chat_template_kwargs
        self.request_extra = dict(request_extra or {})
        self.summary_instructions = summary_instructions
        """Replaces the instructions of ``prompts/summary_instructions.txt`` (``compaction: summary``)."""
        self.max_concurrency = max_concurrency
        """Calls of one run in flight at once (None: as many as the backend takes)."""

    async def solve(
        self,
        problem: Problem,
        on_event: EventHandler | None = None,
        *,
        existing: Mapping[tuple[int, int], RolloutRecord] | None = None,
        seed: int | None = None,
    ) -> RSAResult:
        """Run the whole loop and select the answer.

        ``existing`` holds rollouts already done (a resumed run): they are not generated again.
        ``seed`` overrides ``params.seed`` (used when resuming a run whose seed was drawn).
        """
        run = _Run(self, to_messages(problem), on_event, existing or {}, seed)
        return await run.execute()

    async def stream(self, problem: Problem, **kwargs: Any) -> AsyncIterator[Event]:
        """The run's events as an async iterator; the last one is :class:`RunFinished`.

        Closing the iterator early cancels the run.
        """
        queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        task = asyncio.create_task(self.solve(problem, queue.put_nowait, **kwargs))
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or queue.put_nowait(t.exception()))  # type: ignore[arg-type]
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, RunFinished):
                    return
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


class _Run:
    """State of one run; never shared between runs."""

    def __init__(
        self,
        owner: MarkovRSA,
        messages: list[Message],
        on_event: EventHandler | None,
        existing: Mapping[tuple[int, int], RolloutRecord],
        seed: int | None,
    ) -> None:
        self.owner = owner
        self.params = owner.params
        self.messages = messages
        self.on_event = on_event
        self.existing = existing
        self.seed = seed if seed is not None else self.params.seed
        if self.seed is None:
            self.seed = secrets.randbelow(2**31)
        self.progress = Progress(rounds=self.params.t)
        self.started = time.perf_counter()
        self.usage = Usage()
        self.retries = 0
        self.failed = 0
        self.calls = 0
        self.tokenizer: Tokenizer | None = owner.tokenizer
        self.notes: list[str] = []
        self.drawn: dict[int, list[list[int]]] = {}
        self.round_started_at: dict[int, float] = {}
        self.round_wall: dict[int, float] = {}
        self.round_closed: list[asyncio.Future[None]] = []
        self.done_by_round: Counter[int] = Counter()
        self.failed_by_round: Counter[int] = Counter()
        self.stopped_early: dict[str, Any] | None = None
        self.context_length: int | None = None
        self.fits: dict[str, list[int]] = {"max_tokens": [], "tails": []}
        self.limit = asyncio.Semaphore(owner.max_concurrency) if owner.max_concurrency else None
        self.dispatcher: Dispatcher | None = None
        self.final_prompt: list[Message] | None = None
        checks = effective_verifier(self.params.verifier, self.params.task)
        self.verifier = CandidateVerifier(checks) if checks != Verifier.off else None

    async def emit(self, event: Event) -> None:
        if self.on_event is None:
            return
        self.progress.elapsed_s = time.perf_counter() - self.started
        event.progress = Progress(**self.progress.to_dict())
        outcome = self.on_event(event)
        if inspect.isawaitable(outcome):
            await outcome

    def request(self, messages: list[Message], seed: int, final: bool = False) -> GenerationRequest:
        """A call's request; ``final`` calls take the final stage's budget and sampling."""
        return GenerationRequest(
            messages=messages,
            **self.params.sampling(final),
            seed=seed,
            chat_template_kwargs=self.owner.chat_template_kwargs,
            extra=self.owner.request_extra,
        )

    def is_final(self, round_index: int) -> bool:
        """Whether the rollouts of ``round_index`` are the final stage."""
        return round_index == self.params.t - 1 and self.params.last_round_is_final

    async def call(self, request: GenerationRequest) -> Trace | BackendError:
        """One call through the run's dispatcher (or straight to the backend once the rounds are
        over), under the run's concurrency limit."""
        async with self.limit or contextlib.nullcontext():
            if self.dispatcher is not None:
                return await self.dispatcher.submit(request)
            async for _, outcome in self.owner.backend.generate([request]):
                return outcome
        return BackendError("the backend returned no result")

    def account_failure(self, err: BackendError) -> None:
        """Count a call that failed for good."""
        self.failed += 1
        self.retries += err.attempts - 1
        self.calls += 1
        self.progress.calls = self.calls

    def account(self, trace: Trace) -> None:
        self.usage.add(trace.usage)
        self.retries += trace.attempts - 1
        self.calls += 1
        self.progress.prompt_tokens = self.usage.prompt_tokens
        self.progress.completion_tokens = self.usage.completion_tokens
        self.progress.retries = self.retries
        self.progress.calls = self.calls

    async def attach_tail(self, record: RolloutRecord) -> None:
        """What the record carries to the next round, by ``compaction``; never raises."""
        assert record.trace is not None and self.tokenizer is not None
        if record.tail is not None:
            return
        carried, kind = record.trace, "tail"
        compaction = self.params.compaction
        if compaction == Compaction.hybrid:
            answer = answer_section(record.trace)
            if answer is not None:
                carried, kind = Trace(content=answer, finish_reason=record.trace.finish_reason), "answer"
        elif compaction == Compaction.summary:
            summary = await self.summarise_trace(record)
            if summary is not None:
                carried, kind = Trace(content=summary), "summary"
        try:
            tail = await make_tail(carried, self.params.tail_tokens, self.tokenizer, self.params.align_newline)
        except BackendError as err:
            # The server's tokenizer failed even after retries: cut this tail approximately rather
            # than lose the run.
            self.notes.append(f"tail of round {record.round} slot {record.slot} cut with tiktoken: {_short_reason(err)}")
            tail = await make_tail(carried, self.params.tail_tokens, tiktoken_tokenizer(), self.params.align_newline)
        record.tail, record.tail_tokens, record.tail_kind = tail.text, tail.tokens, kind

    async def summarise_trace(self, record: RolloutRecord) -> str | None:
        """The summary call of one trace (``compaction: summary``): its answer text, or None when
        it failed for good (the trace's tail is carried instead, and a note says so). A summary
        logged by an earlier run of the same log is reused."""
        assert record.trace is not None
        if record.summary is not None and isinstance(record.summary.get("text"), str):
            summary_usage = Usage.from_dict(record.summary.get("usage"))
            self.account(Trace(content="", usage=summary_usage, attempts=int(record.summary.get("attempts") or 1)))
            return str(record.summary["text"])
        messages = summary_messages(
            self.messages, record.trace.text, self.owner.summary_instructions, prompt_dir=self.owner.prompt_dir
        )
        # A seed of its own: summary seeds live on negative rounds, never those of a rollout.
        request, _, _ = await self.fit(None, lambda _: self.request(messages, call_seed(self.seed, -1 - record.round, record.slot)))
        self.progress.in_flight += 1
        try:
            outcome = await self.call(request)
        finally:
            self.progress.in_flight -= 1
        if isinstance(outcome, BackendError):
            self.account_failure(outcome)
            record.summary = {"error": str(outcome)}
            self.notes.append(
                f"summary of round {record.round} slot {record.slot} failed ({_short_reason(outcome)}); its tail was carried"
            )
            return None
        self.account(outcome)
        text = outcome.content or outcome.text
        record.summary = {
            "text": text,
            "usage": outcome.usage.to_dict(),
            "attempts": outcome.attempts,
            "latency_s": round(outcome.latency_s, 4),
        }
        return text

    async def execute(self) -> RSAResult:
        p = self.params
        self.context_length = p.max_model_len or await self.backend_context_length()
        needs_tails = p.t > 1 or p.final_aggregation_may_run
        if self.tokenizer is None and (needs_tails or self.context_length):
            self.tokenizer = await self.owner.backend.get_tokenizer()
        await self.emit(
            RunStarted(
                {
                    "params": p.model_dump(mode="json"),
                    "seed": self.seed,
                    "tokenizer": self.tokenizer.name if self.tokenizer else None,
                    "backend": self.owner.backend.name,
                    # A resumed run must continue on the same model (remote backends name it apart).
                    "model": getattr(self.owner.backend, "model", None),
                    "messages": self.messages,
                }
            )
        )
        population, summaries = await self.run_rounds()
        return await self.select(population, summaries)

    async def run_rounds(self) -> tuple[list[RolloutRecord], list[RoundSummary]]:
        """Every slot of every round as its own task; a slot waits for what it needs (its parents
        under ``dataflow``, the whole previous round under ``rounds``), then runs.

        A round's tasks are created when the first slot of the round before it finishes (no slot
        can start earlier), so a long run holds the tasks of a few rounds, not of all of them.
        """
        p = self.params
        dispatcher = self.dispatcher = Dispatcher(self.owner.backend)
        loop = asyncio.get_running_loop()
        self.round_closed = [loop.create_future() for _ in range(p.t)]
        slots: dict[tuple[int, int], asyncio.Task[RolloutRecord]] = {}
        closed = False

        def open_round(round_index: int) -> None:
            if closed or round_index >= p.t or (round_index, 0) in slots:
                return
            for slot in range(p.n):
                task = asyncio.create_task(self.run_slot(round_index, slot, dispatcher, slots))
                task.add_done_callback(lambda _, after=round_index + 1: open_round(after))
                slots[(round_index, slot)] = task

        population: list[RolloutRecord] = []
        summaries: list[RoundSummary] = []
        try:
            for round_index in range(p.t):
                open_round(round_index)
                self.progress.round = round_index
                self.progress.done = self.done_by_round[round_index]
                self.progress.failed = self.failed_by_round[round_index]
                population = [await slots[(round_index, slot)] for slot in range(p.n)]
                self.check_survivors(round_index, population)
                self.round_wall[round_index] = time.perf_counter() - self.round_started_at.get(
                    round_index, time.perf_counter()
                )
                summaries.append(await self.summarise(round_index, population))
                self.round_closed[round_index].set_result(None)
                await self.emit(RoundFinished(summaries[-1]))
                if self.consensus_reached(summaries[-1]):
                    break
        finally:
            closed = True  # no round opens any more, not even from a cancelled task's callback
            for task in slots.values():
                task.cancel()
            self.dispatcher = None
            await dispatcher.aclose()
            await asyncio.gather(*slots.values(), return_exceptions=True)
            self.progress.in_flight = 0
        return population, summaries

    def subsets(self, round_index: int) -> list[list[int]]:
        """The subsets drawn for a round (all slots of the previous round eligible), drawn once."""
        drawn = self.drawn.get(round_index)
        if drawn is None:
            p = self.params
            drawn = self.drawn[round_index] = draw_subsets(self.seed, round_index, range(p.n), p.n, p.k)
        return drawn

    async def choose_parents(
        self, round_index: int, slot: int, slots: Mapping[tuple[int, int], asyncio.Task[RolloutRecord]]
    ) -> list[RolloutRecord]:
        """The parents of one aggregation: its drawn subset, each failed or excluded parent
        replaced by a redraw seeded by (seed, round, slot).

        Only the parents needed are waited for: the drawn ones, and for a replacement the
        candidates in redraw order until one is usable, so the choice never depends on timing.
        When fewer than K candidates of the round pass the verifier, it falls back to every
        rollout that succeeded.
        """
        drawn = self.subsets(round_index)[slot]

        async def parent(index: int) -> RolloutRecord:
            return await slots[(round_index - 1, index)]

        async def pick(usable: Callable[[RolloutRecord], bool]) -> list[RolloutRecord] | None:
            chosen: list[RolloutRecord] = []
            spares = iter(redraw_order(self.seed, round_index, slot, self.params.n, drawn))
            for index in drawn:
                record = await parent(index)
                if usable(record):
                    chosen.append(record)
                    continue
                for spare in spares:
                    candidate = await parent(spare)
                    if usable(candidate):
                        chosen.append(candidate)
                        break
                else:
                    return None
            return chosen

        verified = await pick(lambda r: r.ok and r.excluded is None)
        if verified is not None:
            return verified
        # Fewer than K passed the verifier: the whole population that succeeded is the pool.
        fallback = await pick(lambda r: r.ok)
        if fallback is not None:
            return fallback
        # Fewer than K succeeded at all (allowed by min_survivors): show every one that did.
        return [r for r in [await parent(i) for i in range(self.params.n)] if r.ok][: self.params.k]

    async def run_slot(
        self,
        round_index: int,
        slot: int,
        dispatcher: Dispatcher,
        slots: Mapping[tuple[int, int], asyncio.Task[RolloutRecord]],
    ) -> RolloutRecord:
        """Wait for what the slot needs, then reuse its logged rollout or generate it."""
        p = self.params
        seed = call_seed(self.seed, round_index, slot)
        if round_index == 0:
            record = RolloutRecord(0, slot, None, seed)
        else:
            if p.schedule == Schedule.rounds:
                await self.round_closed[round_index - 1]
            parents = await self.choose_parents(round_index, slot, slots)
            record = RolloutRecord(
                round_index,
                slot,
                [r.slot for r in parents],
                seed,
                shown_tails=[r.tail or "" for r in parents],
                shown_kinds=[r.tail_kind or "tail" for r in parents],
            )
        # The last round's tails are cut only if a final aggregation asks for them.
        need_tail = round_index + 1 < p.t
        await self.note_round_started(round_index)
        done = self.existing.get((round_index, slot))
        # A logged rollout is reused only if it aggregated the same parents this run chooses now;
        # a failure is reused only from a round that had finished (it then shaped the next draw).
        if done is not None and done.parents == record.parents:
            done.shown_kinds = record.shown_kinds
            if done.trace is not None:
                self.account(done.trace)
                await self.finish_trace(done, need_tail)
            else:
                self.failed += 1
            self.count(done)
            return done
        self.progress.in_flight += 1
        try:
            outcome = await self.call(await self.fitted_request(record))
        finally:
            self.progress.in_flight -= 1
        if isinstance(outcome, BackendError):
            record.error = str(outcome)
            record.failure = outcome
            self.account_failure(outcome)
        else:
            record.trace = outcome
            # Off the loop when long: scanning a long trace would stall other requests.
            text = outcome.content or outcome.text
            record.answer = await offload(extract_answer, text, p.task.value, size=len(text))
            self.account(outcome)
        if record.trace is not None:
            await self.finish_trace(record, need_tail)
        self.count(record)
        await self.emit(RolloutFinished(record))
        return record

    async def finish_trace(self, record: RolloutRecord, need_tail: bool) -> None:
        """Cut the tail the next round is shown, and run the verifier."""
        assert record.trace is not None
        steps = [self.attach_tail(record)] if need_tail else []  # attach_tail never raises
        if self.verifier is not None:
            steps.append(self.verify(record))
        await asyncio.gather(*steps)

    async def verify(self, record: RolloutRecord) -> None:
        assert record.trace is not None and self.verifier is not None
        record.excluded = await self.verifier.check(record.trace, record.answer)

    async def note_round_started(self, round_index: int) -> None:
        if round_index in self.round_started_at:
            return
        self.round_started_at[round_index] = time.perf_counter()
        logged = sum(1 for (r, _) in self.existing if r == round_index)
        await self.emit(RoundStarted(round_index, self.params.n - logged))

    def count(self, record: RolloutRecord) -> None:
        """Progress counters of the record's round (shown while that round is the oldest open one)."""
        if record.ok:
            self.done_by_round[record.round] += 1
        else:
            self.failed_by_round[record.round] += 1
        if record.round == self.progress.round:
            self.progress.done = self.done_by_round[record.round]
            self.progress.failed = self.failed_by_round[record.round]

    async def backend_context_length(self) -> int | None:
        """The model's context length as the backend reports it, when it can."""
        probe = getattr(self.owner.backend, "context_length", None)
        if probe is None:
            return None
        try:
            found = await probe()
        except BackendError:
            return None
        return int(found) if found else None

    async def fitted_request(self, record: RolloutRecord) -> GenerationRequest:
        """The record's request, made to fit the context (see :meth:`fit`)."""
        if record.shown_tails is None:
            request, _, note = await self.fit(None, lambda _: self.request_for(record))
            record.fitted = note
            return request

        def build(tails: list[str] | None) -> GenerationRequest:
            record.shown_tails = tails
            return self.request_for(record)

        request, _, record.fitted = await self.fit(record.shown_tails, build)
        return request

    async def fit(
        self, tails: list[str] | None, build: Callable[[list[str] | None], GenerationRequest]
    ) -> tuple[GenerationRequest, list[str] | None, str | None]:
        """A request built from ``tails`` that fits the context: the tails shortened evenly when
        the prompt leaves less than a useful completion budget, then ``max_tokens`` lowered to the
        room left. Returns the request, the tails it shows and a note of what changed."""
        request = build(tails)
        context = self.context_length
        if context is None or prompt_bound(request.messages) + request.max_tokens <= context:
            return request, tails, None
        assert self.tokenizer is not None
        tokens = await prompt_tokens(request.messages, self.tokenizer)
        notes = []
        if tails:
            counts = [len(await self.tokenizer.encode(tail)) for tail in tails]
            cut = tails_budget(context, tokens, counts, request.max_tokens)
            if cut is not None:
                tails = [
                    await shorten_tail(tail, cut.tokens_each, self.tokenizer, self.params.align_newline)
                    for tail in tails
                ]
                request = build(tails)
                tokens = await prompt_tokens(request.messages, self.tokenizer)
                notes.append(f"tails shortened to {cut.tokens_each} tokens each")
                self.fits["tails"].append(cut.tokens_each)
        room = max(1, context - tokens)
        if room < request.max_tokens:
            notes.append(f"max_tokens lowered from {request.max_tokens} to {room}")
            self.fits["max_tokens"].append(room)
            request.max_tokens = room
        note = f"to fit the {context}-token context: " + ", ".join(notes) if notes else None
        return request, tails, note

    def context_notes(self) -> list[str]:
        """One note per kind of fitting the run did."""
        notes = []
        if self.fits["max_tokens"]:
            notes.append(
                f"{len(self.fits['max_tokens'])} call(s) had max_tokens lowered to fit the {self.context_length}-token "
                f"context (lowest {min(self.fits['max_tokens'])})"
            )
        if self.fits["tails"]:
            notes.append(
                f"{len(self.fits['tails'])} aggregation prompt(s) did not fit the {self.context_length}-token context: "
                f"their tails were shortened evenly (shortest {min(self.fits['tails'])} tokens each)"
            )
        return notes

    def request_for(self, record: RolloutRecord) -> GenerationRequest:
        assert record.seed is not None
        final = self.is_final(record.round)
        if record.shown_tails is None:
            return self.request(self.messages, record.seed, final)
        messages, quoted = aggregation_prompt(
            self.messages,
            record.shown_tails,
            self.params.task,
            prompt_dir=self.owner.prompt_dir,
            kinds=self.candidate_kinds(record.shown_kinds),
        )
        record.quoted_lines = [line.to_dict() for line in quoted] or None
        if final and record.slot == 0:
            self.final_prompt = messages
        return self.request(messages, record.seed, final)

    def candidate_kinds(self, kinds: Sequence[str] | None) -> list[str] | None:
        """The kinds the prompt labels its candidates with: none under plain tails (every
        candidate is a tail, as the template says), each candidate's kind otherwise."""
        return None if self.params.compaction == Compaction.tail else list(kinds or [])

    def check_survivors(self, round_index: int, records: list[RolloutRecord]) -> None:
        failures = [(r.slot, r.failure or BackendError(r.error or "failed")) for r in records if not r.ok]
        if not failures:
            return
        survivors = sum(1 for r in records if r.ok)
        needed = max(1, int(self.params.min_survivors * len(records) + 0.999999))
        if survivors >= needed:
            return
        reasons = Counter(_short_reason(err) for _, err in failures)
        summary = "; ".join(f"{count}x {reason}" for reason, count in reasons.most_common(3))
        slots = ", ".join(str(slot) for slot, _ in sorted(failures, key=lambda f: f[0])[:16])
        raise RunError(
            f"round {round_index}: {len(failures)} of {len(records)} rollouts failed "
            f"(slots {slots}); {survivors} survived, {needed} needed: {summary}",
            failures=[err for _, err in failures],
        )

    def consensus_reached(self, summary: RoundSummary) -> bool:
        """Whether ``early_stop`` ends the run after this round (never after the last one).

        Later rounds are then skipped; under dataflow their rollouts already in flight are cancelled.
        """
        p = self.params
        if p.early_stop is None or summary.round + 1 >= p.t:
            return False
        stop = early_stop_share(summary.votes, p.early_stop)
        if stop is None:
            return False
        answer, share = stop
        skipped = p.t - 1 - summary.round
        self.stopped_early = {
            "round": summary.round,
            "answer": answer,
            "share": round(share, 4),
            "threshold": p.early_stop,
            "skipped_rounds": skipped,
        }
        self.notes.append(
            f"stopped after round {summary.round}: {share:.0%} of its answers agree on {answer} "
            f"(early_stop {p.early_stop:g}); {skipped} later round(s) skipped"
        )
        return True

    async def summarise(self, round_index: int, population: list[RolloutRecord]) -> RoundSummary:
        usage = Usage()
        retries = 0
        for record in population:
            if record.trace is not None:
                usage.add(record.trace.usage)
                retries += record.trace.attempts - 1
        answers = [r.answer for r in population]
        pool = self.candidates(population)
        tally = await _vote(pool, self.params.task.value)
        return RoundSummary(
            round=round_index,
            answers=answers,
            finish_reasons=[r.trace.finish_reason if r.trace else None for r in population],
            usage=usage,
            calls=len(population),
            failed=sum(1 for r in population if not r.ok),
            retries=retries,
            wall_s=self.round_wall[round_index],
            votes=tally.tally,
            excluded=sum(1 for r in population if r.ok and r.excluded is not None),
            verifier_fallback=any(r.excluded is not None for r in pool),
        )

    def candidates(self, population: list[RolloutRecord]) -> list[RolloutRecord]:
        """The rollouts that vote and may be aggregated: those that succeeded and passed the
        verifier, or all that succeeded when fewer than K passed."""
        alive = [r for r in population if r.ok]
        kept = [r for r in alive if r.excluded is None]
        return kept if len(kept) >= min(self.params.k, len(alive)) else alive

    async def select(self, population: list[RolloutRecord], summaries: list[RoundSummary]) -> RSAResult:
        p = self.params
        alive = self.candidates(population)
        tally = await _vote(alive, p.task.value)
        method = p.selection
        if method == Selection.auto:
            method = Selection.majority if tally.extracted >= 2 else Selection.final_agg
        chosen: RolloutRecord | None = None
        answer: str | None = None
        final_trace: Trace | None = None
        final_traces: list[Trace] = []
        final_answers: list[str | None] = []
        if method == Selection.final_agg:
            try:
                final_traces = await self.final_aggregation(alive)
                final_answers = [
                    await offload(extract_answer, text, p.task.value, size=len(text))
                    for text in (trace.content or trace.text for trace in final_traces)
                ]
                final_trace, answer = await self.pick_final(final_traces, final_answers)
            except BackendError as err:
                self.notes.append(f"final aggregation failed ({_short_reason(err)}); fell back to majority")
                method = Selection.majority
        if method == Selection.majority:
            if tally.winner is not None:
                if tally.tie_rule is not None:
                    self.notes.append(
                        f"tied vote between {', '.join(tally.tied)} ({tally.tally[0][1]} each): "
                        f"{tally.winner} won by {tally.tie_rule}"
                    )
                members = [alive[i] for i in tally.clusters[0]]
                chosen = next((r for r in members if r.trace and r.trace.finished), members[0])
                answer = tally.winner
            else:
                self.notes.append("no answer could be extracted for a majority vote; returned the first trace")
                method = Selection.sample
        if method == Selection.sample:
            chosen = alive[0]
            answer = chosen.answer
        if final_trace is None:
            assert chosen is not None and chosen.trace is not None
            final_trace = chosen.trace
        elapsed = time.perf_counter() - self.started
        result = RSAResult(
            answer=answer,
            final_text=final_trace.content or final_trace.text,
            final_reasoning=final_trace.reasoning,
            selection=method.value,
            votes=tally.tally,
            rounds=summaries,
            usage=self.usage,
            calls=self.calls,
            retries=self.retries,
            failed=self.failed,
            tokenizer=self.tokenizer.name if self.tokenizer else "none (no tails needed)",
            seed=int(self.seed),  # type: ignore[arg-type]
            params=p,
            population=population,
            finish_reason=final_trace.finish_reason,
            timings={"total_s": elapsed, **{f"round_{s.round}_s": s.wall_s for s in summaries}},
            notes=self.notes + self.context_notes(),
            stopped_early=self.stopped_early,
            tie=(
                {"answers": tally.tied, "votes": tally.tally[0][1], "winner": tally.winner, "rule": tally.tie_rule}
                if method == Selection.majority and tally.tie_rule is not None
                else None
            ),
            final_stage=final_traces or [r.trace for r in population if r.trace is not None],
            final_prompt=self.final_prompt,
            final_answers=final_answers,
        )
        await self.emit(RunFinished(result))
        return result

    async def pick_final(self, traces: list[Trace], answers: list[str | None]) -> tuple[Trace, str | None]:
        """The answer of the final aggregation calls: the one call's, or the vote among several
        (a finished trace of the winning answer; the first call when none has an answer)."""
        if len(traces) == 1:
            return traces[0], answers[0]
        tally = await asyncio.to_thread(vote, answers, self.params.task.value, [t.finished for t in traces])
        if tally.winner is None:
            return traces[0], answers[0]
        members = [traces[i] for i in tally.clusters[0]]
        return next((t for t in members if t.finished), members[0]), tally.winner

    async def final_aggregation(self, alive: list[RolloutRecord]) -> list[Trace]:
        """The ``final_n`` final aggregation calls (each over K tails of the final population,
        drawn as a round's subsets are): the traces of those that succeeded. Raises the first
        failure when none did."""
        p = self.params
        round_index = p.t
        subsets = draw_subsets(self.seed, round_index, list(range(len(alive))), p.final_n, p.k)
        # The last round's tails are cut here, for the parents drawn only.
        await asyncio.gather(*(self.attach_tail(alive[i]) for i in sorted({i for s in subsets for i in s})))
        requests = []
        for call_index, parents in enumerate(subsets):
            kinds = self.candidate_kinds([alive[i].tail_kind or "tail" for i in parents])

            def build(tails: list[str] | None, call_index: int = call_index, kinds: list[str] | None = kinds) -> GenerationRequest:
                messages = aggregation_prompt(
                    self.messages, tails or [], p.task, final=True, prompt_dir=self.owner.prompt_dir, kinds=kinds
                )[0]
                return self.request(messages, call_seed(self.seed, round_index, call_index), final=True)

            request, _, note = await self.fit([alive[i].tail or "" for i in parents], build)
            if note:
                self.notes.append(f"final aggregation {call_index + 1} {note}" if p.final_n > 1 else f"final aggregation {note}")
            requests.append(request)
        self.final_prompt = requests[0].messages
        self.progress.in_flight = len(requests)
        await self.emit(FinalAggregationStarted())
        stream = getattr(self.owner.backend, "stream_complete", None)
        if len(requests) == 1 and stream is not None and getattr(self.on_event, "relay_final_deltas", False):
            from ._events import FinalDelta

            # The final call's output is the answer itself: a consumer that shows it (an SSE
            # client) gets its tokens as they are generated instead of after the whole call.
            try:
                trace: Trace = await stream(requests[0], lambda text, reasoning: self.emit(FinalDelta(text, reasoning)))
            except BackendError as err:
                self.progress.in_flight = 0
                self.account_failure(err)
                raise
            self.progress.in_flight = 0
            self.account(trace)
            return [trace]
        outcomes = await asyncio.gather(*(self.call(request) for request in requests))
        self.progress.in_flight = 0
        traces = []
        failures = []
        for outcome in outcomes:
            if isinstance(outcome, BackendError):
                self.account_failure(outcome)
                failures.append(outcome)
            else:
                self.account(outcome)
                traces.append(outcome)
        if not traces:
            raise failures[0]
        if failures:
            self.notes.append(f"{len(failures)} of {len(requests)} final aggregation calls failed: {_short_reason(failures[0])}")
        return traces


async def _vote(records: Sequence[RolloutRecord], task: str) -> VoteResult:
    """The vote over ``records``' answers, in a worker thread: comparing answers symbolically
    (math-verify, sympy) can take far longer than a loop shared with other runs may stall."""
    return await asyncio.to_thread(vote, [r.answer for r in records], task, _finished(records))


def _finished(records: Sequence[RolloutRecord]) -> list[bool]:
    """Per record, whether its trace ended on its own (the vote's first tie-breaker)."""
    return [r.trace is not None and r.trace.finished for r in records]


def _short_reason(err: BackendError) -> str:
    text = str(err)
    return text if len(text) <= 160 else text[:157] + "..."
