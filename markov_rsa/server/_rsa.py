"""RSA requests: run Markovian RSA for a chat request, answer with one completion or an SSE stream."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from starlette.responses import Response

from .._backend import Backend
from .._controller import MarkovRSA
from .._errors import BackendError, ConfigError, RunError
from .._events import (
    Event,
    FinalAggregationStarted,
    FinalDelta,
    RolloutFinished,
    RoundFinished,
    RoundStarted,
)
from .._params import Verifier
from .._result import RSAResult
from ._config import ServerConfig
from ._errors import APIError, upstream_error
from ._limits import RunLimiter, RunTicket
from ._metrics import Metrics, RunMetrics
from ._requests import RSARequest
from ._responses import (
    DONE,
    HEARTBEAT,
    ChunkWriter,
    ClosingStream,
    rsa_block,
    rsa_completion,
)
from ._responses import sse as sse_frame

logger = logging.getLogger("markov_rsa.server")

_PROGRESS_EVENTS = (RoundStarted, RolloutFinished, RoundFinished, FinalAggregationStarted)


class _Finished:
    """Queue sentinel: the run task ended."""


class _StreamConsumer:
    """The SSE side of a run's events: queued for the response generator, final tokens included."""

    relay_final_deltas = True

    def __init__(self, metrics: RunMetrics) -> None:
        self.queue: asyncio.Queue[Event | _Finished] = asyncio.Queue()
        self.metrics = metrics

    def __call__(self, event: Event) -> None:
        self.metrics(event)
        self.queue.put_nowait(event)


def as_api_error(err: BaseException, hide: Sequence[str] = ()) -> APIError:
    """The HTTP answer to a run that failed (upstream addresses in ``hide`` kept out of it)."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, (RunError, BackendError)):
        # Messages name upstreams by name; what else they hold of an address (a redirect's
        # Location) each error lists as private.
        failures = err.failures if isinstance(err, RunError) else [err]
        return upstream_error(err, [*hide, *(part for failure in failures for part in failure.private)])
    if isinstance(err, ConfigError):
        return APIError(400, str(err), param=err.param)
    return APIError(500, f"internal error: {type(err).__name__}", code="internal_error")


class RSAHandler:
    """Runs RSA requests on one shared backend, under the server's run limits."""

    def __init__(
        self,
        config: ServerConfig,
        backend: Backend,
        limiter: RunLimiter,
        metrics: Metrics,
        *,
        model_in_extra: bool,
        hide: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.backend = backend
        self.limiter = limiter
        self.metrics = metrics
        # Upstreams get the request's model name on each call; a local engine has only its own.
        self.model_in_extra = model_in_extra
        self.hide = tuple(hide)

    def _solver(self, request: RSARequest, model: str | None) -> MarkovRSA:
        if request.params.verifier == Verifier.code and self.config.defaults.verifier != Verifier.code:
            # It executes model output on this host: only the operator may switch it on.
            raise APIError(
                400,
                "verifier 'code' runs model output on the server and is off here; the operator enables it "
                "with the server's default verifier",
                param="rsa.verifier",
            )
        extra = dict(request.request_extra)
        if self.model_in_extra and model:
            extra["model"] = model
        return MarkovRSA(
            self.backend, request.params, request_extra=extra, chat_template_kwargs=request.chat_template_kwargs
        )

    def admit(self) -> RunTicket:
        """A place to run, or 429 when the running slots and the queue are full."""
        ticket = self.limiter.admit()
        if ticket is None:
            raise APIError(
                429,
                f"server busy: {self.limiter.running} RSA runs running and {self.limiter.queued} queued; retry later",
                code="too_many_runs",
                type="rate_limit_error",
            )
        self._gauges()
        return ticket

    def _gauges(self) -> None:
        self.metrics.runs_active.set(self.limiter.running)
        self.metrics.runs_queued.set(self.limiter.queued)

    def _log(self, request: RSARequest, outcome: str, started: float, result: RSAResult | None = None) -> None:
        p = request.params
        if result is not None:
            logger.info(
                "rsa run %s: n=%d k=%d t=%d tail=%d selection=%s calls=%d failed=%d tokens=%d %.2fs",
                outcome, p.n, p.k, p.t, p.tail_tokens, result.selection, result.calls, result.failed,
                result.usage.total_tokens, time.perf_counter() - started,
            )
        else:
            logger.info("rsa run %s: n=%d k=%d t=%d %.2fs", outcome, p.n, p.k, p.t, time.perf_counter() - started)

    def _finish(self, outcome: str, started: float) -> None:
        self.metrics.runs.labels(outcome).inc()
        if outcome == "ok":
            self.metrics.run_latency.observe(time.perf_counter() - started)

    async def complete(
        self, request: RSARequest, ticket: RunTicket, upstream_model: str | None, client_model: str
    ) -> dict[str, Any]:
        """Run to the end and return the ``chat.completion`` body. Raises :class:`APIError`.

        ``upstream_model`` is the model the upstream calls ask for (None: the backend's);
        ``client_model`` is the name the response reports.
        """
        started = time.perf_counter()
        outcome = "cancelled"
        result: RSAResult | None = None
        try:
            await ticket.wait()
            self._gauges()
            result = await self._solver(request, upstream_model).solve(request.messages, RunMetrics(self.metrics))
            outcome = "ok"
            completion = rsa_completion(result, client_model)
            completion["rsa"].update(request.report())
            return completion
        except asyncio.CancelledError:
            raise
        except Exception as err:
            api_error = as_api_error(err, self.hide)
            outcome = "error"
            if api_error.status >= 500 and not isinstance(err, (RunError, BackendError)):
                logger.exception("rsa run failed")
            else:
                logger.warning("rsa run failed: %s", err)
            raise api_error from None
        finally:
            ticket.release()
            self._gauges()
            self._finish(outcome, started)
            self._log(request, outcome, started, result)

    def stream(
        self,
        request: RSARequest,
        ticket: RunTicket,
        upstream_model: str | None,
        client_model: str,
        on_done: Callable[[str], None],
    ) -> Response:
        """An SSE response that starts at once: heartbeats while the run waits and runs, progress
        chunks when asked for, the final aggregation's tokens live, then the answer, usage and
        ``[DONE]`` (after an error frame when the run failed). ``on_done`` gets the outcome."""
        writer = ChunkWriter(client_model)
        heartbeat = self.config.heartbeat_s
        solver = self._solver(request, upstream_model)

        started = time.perf_counter()
        state: dict[str, Any] = {"outcome": "cancelled", "result": None, "task": None, "closed": False}

        def close() -> None:
            # Runs once, whether the stream ended, failed, or never started because the client
            # left first: the run slot must come back in every case.
            if state["closed"]:
                return
            state["closed"] = True
            task = state["task"]
            if task is not None and not task.done():
                # The client went away: cancelling the run closes every upstream call in flight.
                task.cancel()
            ticket.release()
            self._gauges()
            self._finish(state["outcome"], started)
            self._log(request, state["outcome"], started, state["result"])
            on_done(state["outcome"])

        async def frames() -> AsyncIterator[bytes]:
            consumer = _StreamConsumer(RunMetrics(self.metrics))
            try:
                yield writer.chunk({"role": "assistant", "content": ""})
                waiting = asyncio.ensure_future(ticket.wait())
                try:
                    while not waiting.done():
                        done, _ = await asyncio.wait({waiting}, timeout=heartbeat)
                        if not done:
                            yield HEARTBEAT
                finally:
                    if not waiting.done():
                        waiting.cancel()
                self._gauges()
                task = state["task"] = asyncio.create_task(solver.solve(request.messages, consumer))
                task.add_done_callback(lambda _: consumer.queue.put_nowait(_Finished()))
                streamed = ""
                streamed_reasoning = False
                loop = asyncio.get_running_loop()
                last_sent = loop.time()
                while True:
                    # Heartbeats go by the time of the last frame written, not of the last event:
                    # events the client does not see must not hold them back.
                    try:
                        item = await asyncio.wait_for(
                            consumer.queue.get(), timeout=max(0.0, last_sent + heartbeat - loop.time())
                        )
                    except TimeoutError:
                        yield HEARTBEAT
                        last_sent = loop.time()
                        continue
                    if isinstance(item, _Finished):
                        break
                    if isinstance(item, FinalDelta):
                        delta: dict[str, Any] = {}
                        if item.reasoning:
                            delta["reasoning"] = item.reasoning
                            streamed_reasoning = True
                        if item.text:
                            delta["content"] = item.text
                            streamed += item.text
                        yield writer.chunk(delta)
                        last_sent = loop.time()
                    elif request.progress and isinstance(item, _PROGRESS_EVENTS):
                        yield writer.progress(item.type, item.progress, request.params.n)
                        last_sent = loop.time()
                try:
                    result = task.result()
                except Exception as err:
                    state["outcome"] = "error"
                    api_error = as_api_error(err, self.hide)
                    if api_error.status >= 500 and not isinstance(err, (RunError, BackendError)):
                        logger.error("rsa run failed", exc_info=err)
                    else:
                        logger.warning("rsa run failed: %s", err)
                    yield sse_frame(api_error.payload())
                    yield DONE
                    return
                state["outcome"], state["result"] = "ok", result
                for frame in _answer_frames(writer, result, streamed, streamed_reasoning):
                    yield frame
                yield writer.chunk({}, result.finish_reason or "stop", rsa={**rsa_block(result), **request.report()})
                if request.include_usage:
                    yield writer.usage(result.usage)
                yield DONE
            finally:
                close()

        return ClosingStream(frames(), close, headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


def _answer_frames(writer: ChunkWriter, result: RSAResult, streamed: str, streamed_reasoning: bool) -> list[bytes]:
    """The content the client has not seen yet.

    When the final aggregation streamed, the client already holds its text; only what differs is
    sent (a server that inlines ``<think>`` streams more than the parsed answer; a final call that
    failed part-way leaves the answer to the majority vote, sent after a blank line).
    """
    frames = []
    if result.final_reasoning and not streamed_reasoning and not streamed:
        frames.append(writer.chunk({"reasoning": result.final_reasoning}))
    text = result.final_text
    if not streamed:
        rest = text
    elif text.startswith(streamed):
        rest = text[len(streamed) :]
    elif streamed.endswith(text):
        rest = ""
    else:
        rest = "\n\n" + text
    if rest:
        frames.append(writer.chunk({"content": rest}))
    return frames
