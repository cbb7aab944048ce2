"""``python -m markov_rsa.server --upstream URL [--port P] ...``: run the proxy.

The flags are derived from :class:`ServerConfig` and :class:`RSAParams`, never listed by hand:
each RSA parameter is ``--<name>`` (also ``--rsa-<name>``, as on Zyphra's proxy) and each scalar
server setting is ``--<setting>``. RSA defaults also come from ``MARKOV_RSA_<NAME>`` environment
variables, which flags override.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

from pydantic import ValidationError

from .._errors import ConfigError
from .._params import PRESETS, RSAParams, params_from_env, resolve_params
from ._app import run_server
from ._config import ServerConfig

# Server settings with flags of their own (lists, secrets) or none (nested objects).
_SPECIAL = {"upstreams", "api_keys", "upstream_api_key", "defaults", "chat_template_kwargs"}
API_KEYS_ENV = "MARKOV_RSA_SERVE_API_KEYS"
UPSTREAM_API_KEY_ENV = "MARKOV_RSA_UPSTREAM_API_KEY"
UPSTREAMS_ENV = "MARKOV_RSA_UPSTREAMS"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _choices(annotation: Any) -> list[str] | None:
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return [member.value for member in annotation]
    return None


def _metavar(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0] if args else str
    return {int: "INT", float: "FLOAT", str: "TEXT"}.get(annotation, "VALUE")


def build_parser(prog: str = "python -m markov_rsa.server") -> argparse.ArgumentParser:
    """The argument parser of the proxy."""
    parser = argparse.ArgumentParser(prog=prog, description="OpenAI-compatible Markovian RSA proxy.")
    net = parser.add_argument_group("server")
    net.add_argument(
        "--engine",
        choices=["upstream", "local"],
        default="upstream",
        help="upstream: relay to --upstream servers (default); local: run the in-process engine "
        "(--model names a GGUF, a checkpoint dir or a cached id; default the embedded SmolLM2-135M-Instruct).",
    )
    net.add_argument("--device", default=None, help="Local engine: cpu, cuda, cuda:1 (default: CUDA if present).")
    net.add_argument("--host", default="127.0.0.1", help="Interface to listen on (default: 127.0.0.1).")
    net.add_argument("--port", type=int, default=8100, help="Port to listen on (default: 8100).")
    net.add_argument(
        "--upstream",
        "--backend",
        dest="upstreams",
        action="append",
        metavar="URL",
        help=f"OpenAI base URL of an inference server; repeat for replicas (env {UPSTREAMS_ENV}, comma-separated).",
    )
    net.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        metavar="KEY",
        help=f"Key clients must send as 'Authorization: Bearer KEY'; repeatable (env {API_KEYS_ENV}, comma-separated).",
    )
    net.add_argument(
        "--upstream-api-key", metavar="KEY", help=f"Bearer key sent to the upstreams (env {UPSTREAM_API_KEY_ENV})."
    )
    net.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    for name, info in ServerConfig.model_fields.items():
        if name in _SPECIAL:
            continue
        if _is_bool(info.annotation):
            net.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=None, help=info.description)
        else:
            net.add_argument(_flag(name), default=None, metavar=_metavar(info.annotation), help=info.description)

    rsa = parser.add_argument_group("RSA defaults (a request's 'rsa' object overrides them)")
    rsa.add_argument("--preset", choices=list(PRESETS), help="Start from a preset.")
    for name, info in RSAParams.model_fields.items():
        flags = [_flag(name), "--rsa-" + name.replace("_", "-")]
        if _is_bool(info.annotation):
            rsa.add_argument(*flags, dest=f"rsa_{name}", action=argparse.BooleanOptionalAction, default=None, help=info.description)
        else:
            rsa.add_argument(
                *flags,
                dest=f"rsa_{name}",
                default=None,
                choices=_choices(info.annotation),
                metavar=None if _choices(info.annotation) else _metavar(info.annotation),
                help=info.description,
            )
    return parser


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """A :class:`ServerConfig` from parsed flags, with environment variables under them.

    Raises :class:`ConfigError` naming the offending setting.
    """
    env = os.environ if environ is None else environ
    flags = {name: getattr(args, f"rsa_{name}") for name in RSAParams.model_fields}
    overrides = {**params_from_env(env), **{name: value for name, value in flags.items() if value is not None}}
    defaults = resolve_params(args.preset, overrides)
    settings: dict[str, Any] = {
        name: getattr(args, name)
        for name in ServerConfig.model_fields
        if name not in _SPECIAL and getattr(args, name, None) is not None
    }
    settings["upstreams"] = args.upstreams or _split(env.get(UPSTREAMS_ENV))
    settings["api_keys"] = args.api_keys or _split(env.get(API_KEYS_ENV))
    settings["upstream_api_key"] = args.upstream_api_key or env.get(UPSTREAM_API_KEY_ENV) or None
    settings["defaults"] = defaults
    try:
        return ServerConfig.model_validate(settings)
    except ValidationError as err:
        first = err.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else None
        raise ConfigError(f"{field}: {first['msg']}" if field else first["msg"], param=field) from None


def main(argv: Sequence[str] | None = None, prog: str = "python -m markov_rsa.server") -> None:
    """Parse flags and serve until interrupted; a bad setting exits with a one-line message."""
    args = build_parser(prog).parse_args(argv)
    factory = None
    try:
        config = config_from_args(args)
        if args.engine == "local":
            if config.upstreams:
                raise ConfigError("--engine local serves the in-process model; drop --upstream", param="upstream")
            factory = _local_engine_factory(config.model, args.device)
        elif not config.upstreams:
            raise ConfigError(
                "give at least one --upstream URL (e.g. --upstream http://localhost:8000/v1) or --engine local",
                param="upstream",
            )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_server(config, args.host, args.port, log_level=args.log_level, backend_factory=factory)


def _local_engine_factory(model: str | None, device: str | None) -> Any:
    from ..engine import LocalEngine

    return lambda: LocalEngine(model, device=device)


if __name__ == "__main__":
    main()
