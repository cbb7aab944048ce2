"""A simulated OpenAI-compatible inference server on loopback, for dry runs, tests and benchmarks.

It speaks the vLLM flavour of the OpenAI API over real HTTP (Starlette + uvicorn):

- ``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed (SSE) or not, with ``n``,
  ``seed``, ``max_tokens`` / ``max_completion_tokens``, ``return_token_ids``, ``stream_options``;
  reasoning in ``message.reasoning``, ``message.reasoning_content``, inline ``<think>`` tags, or none;
- ``POST /tokenize`` and ``/detokenize`` (also under ``/v1``), ``GET /v1/models``, ``GET /health``,
  and ``GET /stats`` (the live counters; ``?log=1`` adds the request bodies).

Generation follows a latency model (time to first token, then a fixed token rate per stream, a cap
on concurrent streams with a FIFO queue) and can inject faults: 5xx, 429, hangs, dropped
connections and malformed JSON. Tokens are tiktoken's offline ``cl100k_base``; a completion's token
ids are those of its raw output ``<think>REASONING</think>CONTENT``, so they decode to it exactly.

Answers come from a rule solver, deterministic given the config seed, the request's ``seed``
(ignored at temperature 0), the messages and the choice index. It reads the last user message:

- an aggregation prompt (lines ``=== Candidate i ===`` after a ``Problem:``, ``Task:`` or
  ``Question:`` section) is answered with the candidates' strict plurality ``\\boxed{}`` answer with
  probability ``follow_majority``; otherwise the problem is solved again, wrongly with probability
  ``aggregation_error_rate``;
- anything else is solved directly, wrongly with probability ``error_rate`` (the right value off by
  1 to 3, or an unrelated integer).

Problems it can solve (anything else gets a stable pseudo-random integer as its "right" answer):

- integer arithmetic with ``+ - * /``, ``^`` or ``**`` and parentheses anywhere in the text
  ("What is 17 + 25 * 3?", "Compute (12 - 4) * 7."); quotients are exact, e.g. ``\\frac{7}{2}``;
- "... has|had 12 apples and buys|gets|finds|receives 7 more ..." (12 + 7);
- "... had 40 marbles and gave away|lost|ate|sold|spent|used 15 ..." (40 - 15);
- "... travels 60 km|miles per hour for 3 hours ..." (60 * 3);
- "There are 6 boxes with 8 pens each ..." and "5 bags each contain 9 ..." (6 * 8, 5 * 9);
- "24 cookies are shared equally among 5 ..." (24 / 5);
- "4 notebooks at|for $3 each ..." (4 * 3).

Each trace is a few "Step i: ..." lines (a line break every 20 to 40 tokens) of lognormal length
around ``length_mean`` tokens, ending with the computation, then ``The final answer is \\boxed{X}.``
Past the request's token budget the output is cut token-exactly and ``finish_reason`` is ``length``.
With ``script`` set, the answers are the script's entries in arrival order instead.

Run it with ``markov-rsa fake-backend`` or :func:`serve`, or in-process::

    with FakeBackend(FakeBackendConfig(tokens_per_second=500, error_rate=0.2)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none")
"""

from ._app import create_app
from ._config import FakeBackendConfig
from ._server import FakeBackend, serve
from ._state import FakeBackendStats

__all__ = ["FakeBackend", "FakeBackendConfig", "FakeBackendStats", "create_app", "serve"]
