"""The relay's client for upstreams: the shared keep-alive pool of ``markov_rsa._transport``.

Pass-through is the proxy's hot path: it must add well under a millisecond per request, which a
general HTTP client does not (httpcore's pool scans every connection for every queued request).
:class:`OriginPool` only builds the request head, names failures the way routing and the 502/504
mapping need them, and gives responses a plain ``headers`` dict.
"""

from .._transport import OriginPool, UpstreamConnectError, UpstreamProtocolError, UpstreamResponse, UpstreamTimeout

__all__ = ["OriginPool", "UpstreamConnectError", "UpstreamProtocolError", "UpstreamResponse", "UpstreamTimeout"]
