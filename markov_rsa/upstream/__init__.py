"""The upstream layer: the only code that talks to inference servers.

One client (aiohttp) over one pool of upstreams (a single URL is
a pool of one), one error family (:class:`markov_rsa.BackendError` with its
:class:`markov_rsa.ErrorKind`), one retry policy, deadlines, size limits and the servers' tokenizers.
The HTTP backend, the tokenizer calls, the health probes and the proxy's relay all use it.
"""

from .._routing import Upstream, UpstreamPool, root_url
from ._client import (
    DEFAULT_MAX_RESPONSE_BYTES,
    USER_AGENT,
    UpstreamClient,
    UpstreamResponse,
    dump_json,
    error_message,
    load_json,
    parse_json,
    status_error,
)
from ._retry import RETRY_STATUSES, RetryPolicy, retry_after
from ._tokenize import SHAPES, RemoteTokenizer, TokenizerShape, discover_tokenizer

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "RETRY_STATUSES",
    "SHAPES",
    "USER_AGENT",
    "RemoteTokenizer",
    "RetryPolicy",
    "TokenizerShape",
    "Upstream",
    "UpstreamClient",
    "UpstreamPool",
    "UpstreamResponse",
    "discover_tokenizer",
    "dump_json",
    "error_message",
    "load_json",
    "parse_json",
    "retry_after",
    "root_url",
    "status_error",
]
