"""``markov-rsa serve``: the proxy, configured from ServerConfig (its own settings), BackendSettings and RSAParams."""

from __future__ import annotations

from typing import Any

from markov_rsa import BackendSettings, ConfigError, RSAParams
from markov_rsa._settings import Layers, check_tokenizer, make_backend
from markov_rsa.server import ServerConfig, run_server
from markov_rsa.server._config import Engine

from ._exits import user_errors
from ._options import given


SERVER_NESTED = ("upstream", "defaults")
"""ServerConfig fields that are whole settings models of their own, not flags."""


def server_config(flags: dict[str, Any]) -> tuple[ServerConfig, Any]:
    """The proxy's configuration from the command's flags over environment, config file and defaults,
    and the factory of its in-process backend (None when it relays to upstream servers)."""
    layers = Layers.discover(flags.pop("config", None))
    backend = layers.settings(BackendSettings, given(BackendSettings, flags))
    params = layers.rsa_params(layers.preset(flags.pop("preset", None)), given(RSAParams, flags))
    config = layers.settings(
        ServerConfig, given(ServerConfig, flags), fixed={"upstream": backend, "defaults": params}
    )
    factory = None
    if config.engine is Engine.local or backend.backend == ["local"]:
        if not backend.is_local:
            raise ConfigError("--engine local serves the in-process model; drop --backend", param="backend")
        factory = lambda: make_backend(backend)  # noqa: E731 - created inside the server's event loop
        config = config.model_copy(update={"upstream": backend.model_copy(update={"backend": []})})
    elif backend.is_local:
        raise ConfigError(
            "give at least one --backend URL (e.g. --backend http://localhost:8000/v1) or --engine local",
            param="backend",
        )
    check_tokenizer(backend.tokenizer)
    return config, factory


def serve_command(**flags: Any) -> None:
    """Run the OpenAI-compatible Markovian RSA proxy in front of --backend URLs (or --engine local).

    Each request's 'rsa' object overrides the RSA parameters below.
    """
    with user_errors():
        config, factory = server_config(flags)
    run_server(config, backend_factory=factory)
