"""Settings: one pydantic-settings model per concern, and the layers they are read from.

Three concerns, each defined once: :class:`~markov_rsa.RSAParams` (the algorithm),
:class:`BackendSettings` (how to reach and pace the inference server) and the proxy's
``ServerSettings``. Every field has one name, one description, one environment variable
(``MARKOV_RSA_<NAME>``) and one command-line flag (``--<name>``), derived from the field.

Precedence, lowest first: field defaults < (for RSA parameters) the preset < a config file
(``--config FILE``, or the ``[tool.markov-rsa]`` table of the nearest ``pyproject.toml``)
< ``MARKOV_RSA_*`` environment variables < flags. A bad value is reported with the name it was
given under (``MARKOV_RSA_N``, ``--n`` or ``FILE: n``), and only when nothing above overrides it.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from ._errors import ConfigError
from ._params import PRESETS, RSAParams, apply_layer, resolve_params
from ._routing import split_name
from .upstream import DEFAULT_MAX_RESPONSE_BYTES

ENV_PREFIX = "MARKOV_RSA_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
PRESET_ENV = ENV_PREFIX + "PRESET"
PYPROJECT_TABLE = ("tool", "markov-rsa")


def env_name(name: str) -> str:
    """The environment variable of a setting: ``tail_tokens`` -> ``MARKOV_RSA_TAIL_TOKENS``."""
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    """The command-line flag of a setting: ``tail_tokens`` -> ``--tail-tokens``."""
    return "--" + name.replace("_", "-")


def field_extra(info: FieldInfo, key: str) -> list[str]:
    """A list kept in a field's ``json_schema_extra`` (``flag_aliases``, ``env_aliases``)."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return list(extra.get(key, ()))  # type: ignore[call-overload]


def env_names(info: FieldInfo, name: str) -> list[str]:
    """Every environment variable a field is read from, the canonical one first."""
    return [env_name(name), *field_extra(info, "env_aliases")]


def _split_list(value: Any) -> Any:
    """Lists from the environment or a single flag are comma-separated: ``a, b`` -> ``["a", "b"]``."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        return [part.strip() for item in value for part in str(item).split(",") if part.strip()]
    return value


def _json_object(value: Any) -> Any:
    """Objects from the environment or a flag are JSON text."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as err:
            raise ValueError(f"not a JSON object: {err}") from None
    return value


StrList = Annotated[list[str], NoDecode, BeforeValidator(_split_list)]
"""A list setting: repeat the flag, or give comma-separated values (environment, one flag)."""
JsonObject = Annotated[dict[str, Any], NoDecode, BeforeValidator(_json_object)]
"""An object setting: JSON text in the environment or on the command line."""


class EnvSource(PydanticBaseSettingsSource):
    """``MARKOV_RSA_<NAME>`` variables (and each field's older spellings) as raw values.

    Parsing is left to the model's validators, so a value reads the same from the environment, a
    flag and a config file (lists are comma-separated, objects are JSON).
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str] | None = None) -> None:
        super().__init__(settings_cls)
        import os

        self.environ = os.environ if environ is None else environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """The first variable of ``field`` that is set and not empty."""
        for name in env_names(field, field_name):
            value = self.environ.get(name)
            if value not in (None, ""):
                return value, name, False
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return {name: value for name, (value, _) in read_env(self.settings_cls, self.environ).items()}


def read_env(model: type[BaseModel], environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """``{field: (raw value, variable name)}`` for every field of ``model`` set in ``environ``."""
    found = {}
    for name, info in model.model_fields.items():
        for var in env_names(info, name):
            value = environ.get(var)
            if value not in (None, ""):
                found[name] = (value, var)
                break
    return found


class Settings(BaseSettings):
    """Base of the settings models: ``MARKOV_RSA_*`` environment under keyword arguments.

    Constructed directly (``BackendSettings(backend=...)``) a model reads the environment as any
    pydantic-settings model does; the command line goes through :class:`Layers`, which adds the
    config file and flags and names the source of a bad value.
    """

    model_config = SettingsConfigDict(extra="forbid", frozen=True, validate_default=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, EnvSource(settings_cls))


class BackendSettings(Settings):
    """How to reach and pace the inference backend; shared by ``solve``, ``eval``, the Python API
    and the proxy's upstreams. Open it with :func:`make_backend`."""

    backend: StrList = Field(
        default_factory=list,
        description="OpenAI-compatible base URL, e.g. http://localhost:8000/v1 (serve: repeat for "
        "replicas). Unset or 'local': the in-process engine.",
        json_schema_extra={"flag_aliases": ["--upstream"], "env_aliases": [ENV_PREFIX + "UPSTREAMS"], "metavar": "URL"},
    )
    model: str | None = Field(
        None,
        description="Server: model name (default: its first). Local engine: a GGUF, a checkpoint dir "
        "or a cached id (default: the embedded SmolLM2-135M-Instruct).",
    )
    backend_api_key: str | None = Field(
        None,
        repr=False,
        description="Bearer key sent to the backend.",
        json_schema_extra={
            "flag_aliases": ["--upstream-api-key"],
            "env_aliases": [ENV_PREFIX + "API_KEY", ENV_PREFIX + "UPSTREAM_API_KEY"],
            "secret": True,
            "metavar": "KEY",
        },
    )
    concurrency: int = Field(64, ge=1, le=100_000, description="Requests in flight per backend URL.")
    rps: float | None = Field(
        None, gt=0, description="Requests started per second, all URLs together (fractions allowed, e.g. 1.5)."
    )
    timeout: float = Field(
        900.0, gt=0, description="Total seconds a call may take, from sending it to the last byte, before it is retried."
    )
    idle_timeout: float | None = Field(
        None, gt=0, description="Seconds a server may stay silent inside a response body (default: the --timeout)."
    )
    connect_timeout: float = Field(10.0, gt=0, description="Seconds to wait for a connection to the backend.")
    max_response_bytes: int = Field(
        DEFAULT_MAX_RESPONSE_BYTES, ge=1024, description="Largest response body read from the backend; larger fail the call."
    )
    max_retries: int = Field(4, ge=0, le=100, description="Retries of a call on 429, 5xx, timeouts and dropped connections.")
    tokenizer: str | None = Field(
        None,
        description="tokenizer.json (or its directory) of the served model, for servers without /tokenize.",
        json_schema_extra={"metavar": "PATH"},
    )
    device: str | None = Field(None, description="Local engine: cpu, cuda, cuda:1 (default: CUDA if present).")
    allow_download: bool = Field(
        False, description="Local engine: let a model id missing from the local cache be downloaded."
    )

    @field_validator("backend")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        for entry in urls:
            url = split_name(entry)[1]  # NAME=URL names an upstream in errors and metrics
            if url != "local" and not url.startswith(("http://", "https://")):
                raise ValueError(f"backend URL must start with http:// or https://, got {url!r}")
        return [url.rstrip("/") for url in urls]

    @property
    def is_local(self) -> bool:
        """True when no server is named: the run goes to the in-process engine."""
        return not self.backend or self.backend == ["local"]

    def client_kwargs(self) -> dict[str, Any]:
        """Keywords of the HTTP client (:class:`~markov_rsa.upstream.UpstreamClient`): key, deadlines, size cap."""
        return {
            "api_key": self.backend_api_key,
            "timeout": self.timeout,
            "idle_timeout": self.idle_timeout,
            "connect_timeout": self.connect_timeout,
            "max_response_bytes": self.max_response_bytes,
        }

    def call_kwargs(self) -> dict[str, Any]:
        """Keywords of :class:`~markov_rsa.OpenAIBackend` on top of its client: pacing, retries, tokenizer."""
        return {"requests_per_second": self.rps, "max_retries": self.max_retries, "tokenizer": self.tokenizer}


def make_backend(settings: BackendSettings) -> Any:
    """The backend the settings name: the OpenAI-compatible server(s) (several URLs are routed as one
    pool), or the in-process engine.

    Raises :class:`ConfigError` for a setting that cannot work (a bad URL, a tokenizer file that is
    missing or unreadable).
    """
    if settings.is_local:
        from .engine import LocalEngine

        return LocalEngine(
            settings.model,
            device=settings.device,
            allow_download=settings.allow_download,
            max_batch_size=min(settings.concurrency, 16),
        )
    from ._http import OpenAIBackend
    from ._routing import UpstreamPool

    check_tokenizer(settings.tokenizer)
    # The pool checks each URL; NAME=URL entries name their upstream.
    pool = UpstreamPool(settings.backend, per_upstream_concurrency=settings.concurrency)
    return OpenAIBackend(pool, settings.model, **settings.client_kwargs(), **settings.call_kwargs())


def check_tokenizer(path: str | None) -> None:
    """Fail at start, not at the first tail, when ``--tokenizer`` names nothing usable."""
    if path is None:
        return
    from ._tokenizers import local_tokenizer

    local_tokenizer(path)  # raises ConfigError naming the file


# -- layers --------------------------------------------------------------------------------------


def _find_pyproject(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class ConfigFile:
    """Settings read from a TOML file: flat ``name = value`` keys (flag names with ``-`` or ``_``)."""

    path: Path
    values: Mapping[str, Any]

    @classmethod
    def read(cls, path: Path, table: tuple[str, ...] = ()) -> ConfigFile:
        """Read ``path``; with ``table``, only that table (``("tool", "markov-rsa")``)."""
        try:
            data: Any = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}", param="config") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read config file {path}: {err}", param="config") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}", param="config") from None
        for key in table:
            data = data.get(key, {}) if isinstance(data, dict) else {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: [{'.'.join(table)}] must be a table", param="config")
        values = {str(key).replace("-", "_"): value for key, value in data.items()}
        known = {"preset", *RSAParams.model_fields, *_all_setting_names()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown setting {unknown[0]!r}", param="config")
        return cls(path, values)

    @classmethod
    def discover(cls, explicit: str | Path | None, start: Path | None = None) -> ConfigFile | None:
        """``explicit`` (``--config`` or ``MARKOV_RSA_CONFIG``), else ``[tool.markov-rsa]`` of the
        nearest ``pyproject.toml`` above ``start`` (the working directory), else nothing."""
        if explicit:
            path = Path(explicit)
            return cls.read(path, PYPROJECT_TABLE if path.name == "pyproject.toml" else ())
        pyproject = _find_pyproject((start or Path.cwd()).resolve())
        if pyproject is None:
            return None
        found = cls.read(pyproject, PYPROJECT_TABLE)
        return found if found.values else None


def _all_setting_names() -> set[str]:
    from .server._config import ServerConfig

    return {*BackendSettings.model_fields, *ServerConfig.model_fields} - {"upstream", "defaults"}


@dataclass(frozen=True)
class Layers:
    """The sources of a command's settings under its flags: a config file and the environment."""

    file: ConfigFile | None = None
    environ: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def discover(cls, config: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Layers:
        """The layers of a command run in the working directory (``environ`` defaults to ``os.environ``)."""
        import os

        env = os.environ if environ is None else environ
        return cls(ConfigFile.discover(config or env.get(CONFIG_ENV)), env)

    def _merged(
        self, model: type[BaseModel], flags: Mapping[str, Any], names: Iterable[str] | None = None
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """``(values, origin of each value)``: file < environment < flags, for ``model``'s fields."""
        wanted = set(model.model_fields if names is None else names)
        values: dict[str, Any] = {}
        origin: dict[str, str] = {}
        layers: list[dict[str, tuple[Any, str]]] = []
        if self.file is not None:
            layers.append({key: (value, f"{self.file.path}: {key}") for key, value in self.file.values.items()})
        layers.append({key: (value, var) for key, (value, var) in read_env(model, self.environ).items()})
        layers.append({key: (value, flag_name(key)) for key, value in flags.items() if value is not None})
        for layer in layers:
            given = {key: found for key, found in layer.items() if key in wanted}
            # One value of a linked pair (t, aggregation_rounds) replaces the other from below.
            for key in apply_layer(values, {key: value for key, (value, _) in given.items()}):
                origin.pop(key, None)
            origin.update({key: where for key, (_, where) in given.items()})
        return values, origin

    def preset(self, flag: str | None) -> str | None:
        """The preset: flag > ``MARKOV_RSA_PRESET`` > config file."""
        if flag is not None:
            return flag
        if self.environ.get(PRESET_ENV):
            return self.environ[PRESET_ENV]
        value = self.file.values.get("preset") if self.file is not None else None
        return str(value) if value is not None else None

    def rsa_params(self, preset: str | None, flags: Mapping[str, Any]) -> RSAParams:
        """Defaults < preset < file < environment < flags."""
        values, origin = self._merged(RSAParams, flags)
        if preset is not None and preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}", param="preset")
        try:
            return resolve_params(preset, values)
        except ConfigError as err:
            raise _named(err, origin) from None

    def settings(self, model: type[Settings], flags: Mapping[str, Any], fixed: Mapping[str, Any] | None = None) -> Any:
        """``model`` from file < environment < flags over its defaults; ``fixed`` fields (already
        resolved settings nested in ``model``) are taken as given and read from nowhere else."""
        fixed = fixed or {}
        values, origin = self._merged(model, flags, [name for name in model.model_fields if name not in fixed])
        values.update(fixed)
        try:
            return model.model_validate(values)
        except ValidationError as err:
            first = err.errors()[0]
            name = str(first["loc"][0]) if first["loc"] else None
            message = str(first["msg"]).removeprefix("Value error, ")
            where = origin.get(name, flag_name(name)) if name else None
            raise ConfigError(f"{where}: {message}" if where else message, param=name) from None


def _named(err: ConfigError, origin: Mapping[str, str]) -> ConfigError:
    """``err`` with its field's name replaced by where the value came from (``MARKOV_RSA_N: ...``)."""
    param = err.param
    message = str(err)
    if param is not None and param in origin and message.startswith(f"{param}: "):
        message = f"{origin[param]}: {message.removeprefix(param + ': ')}"
    return ConfigError(message, param=param)
