"""One log format for the proxy: its own lines, uvicorn's and the access log.

``text`` is ``time level logger [request id]: message``; ``json`` is one object per line with the
same fields. Libraries that log every HTTP exchange (httpx, httpcore) are kept at WARNING, so a
health probe every few seconds does not fill the log. Each line logged while a request is being
answered carries that request's ``x-request-id``.
"""

from __future__ import annotations

import contextvars
import json
import logging
from typing import Any

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("markov_rsa_request_id", default=None)
"""The id of the request being answered (from its ``x-request-id`` header, or made up)."""

QUIET_LOGGERS = ("httpx", "httpcore", "hpack", "asyncio", "multipart")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"
# uvicorn's access records carry (client, method, path, http version, status) as arguments.
_ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (and ``request_tag``, `` [id]`` or empty) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        record.request_id = request_id
        record.request_tag = f" [{request_id}]" if request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, and the access fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", None):
            data["request_id"] = record.request_id  # type: ignore[attr-defined]
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            data.update(zip(_ACCESS_FIELDS, record.args, strict=True))
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def logging_config(level: str, log_format: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` mapping (also handed to uvicorn) for the proxy's logs."""
    formatter: dict[str, Any] = (
        {"()": f"{__name__}.JsonFormatter"} if log_format == "json" else {"format": TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": f"{__name__}.RequestIdFilter"}},
        "formatters": {"default": formatter},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
                "filters": ["request_id"],
            }
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            # uvicorn's loggers come with handlers of their own; route them through ours instead.
            **{name: {"handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
            **{name: {"level": "WARNING"} for name in QUIET_LOGGERS},
        },
    }


def request_id_from(headers: list[tuple[bytes, bytes]], make: Any) -> str:
    """The client's ``x-request-id`` when it is a sane token (1-128 visible ASCII characters), else ``make()``."""
    for name, value in headers:
        if name == b"x-request-id":
            if 0 < len(value) <= 128 and all(33 <= byte <= 126 for byte in value):
                return value.decode("ascii")
            break
    return str(make())
