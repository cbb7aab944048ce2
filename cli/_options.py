"""CLI options derived from the settings models, so each setting is defined once (in RSAParams,
BackendSettings, ServerSettings or FakeBackendConfig) and its flag, help, default and environment
variable follow it."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from enum import Enum
from typing import Any, Optional

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from markov_rsa._settings import env_name, field_extra, flag_name

ALIAS_MARK = "__alias"


def _scalar_type(annotation: Any) -> Any:
    """The CLI type of a field: unwraps Optional and Annotated, keeps enums, bools, ints, floats, strs."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and args:
        return _scalar_type(args[0])
    if typing.get_origin(annotation) is list:
        return list[str]
    if isinstance(annotation, type) and issubclass(annotation, (Enum, bool, int, float, str)):
        return annotation
    return str


def _shown_default(info: FieldInfo) -> str | None:
    if info.json_schema_extra and isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("secret"):
        return None
    default = info.get_default(call_default_factory=True)
    if default is PydanticUndefined or default in (None, [], "", {}):
        return None
    if isinstance(default, Enum):
        return str(default.value)
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)


def help_text(name: str, info: FieldInfo, *, show_env: bool = True, show_default: bool = True) -> str:
    """A field's description, then its default and its environment variable."""
    parts = [info.description or ""]
    default = _shown_default(info) if show_default else None
    if default is not None:
        parts.append(f"[default: {default}]")
    if show_env:
        parts.append(f"[env: {env_name(name)}]")
    return " ".join(part for part in parts if part)


def _option(
    name: str, info: FieldInfo, decl: str, panel: str | None, *, hidden: bool, help: str
) -> tuple[Any, typer.models.OptionInfo]:
    kind = _scalar_type(info.annotation)
    bare = decl.removeprefix("--")
    decls = [f"{decl}/--no-{bare}"] if kind is bool else [decl]
    metavar = None
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if isinstance(extra.get("metavar"), str):
        metavar = str(extra["metavar"])
    option = typer.Option(
        None, *decls, help=help, rich_help_panel=panel, show_default=False, hidden=hidden, metavar=metavar
    )
    return Optional[kind], option


def model_options(
    model: type[BaseModel],
    panel: str | None,
    *,
    exclude: Iterable[str] = (),
    aliases: Mapping[str, Iterable[str]] | None = None,
    alias_prefix: str | None = None,
    show_env: bool = True,
    show_default: bool = True,
) -> list[inspect.Parameter]:
    """One keyword parameter with a ``typer.Option`` per field of ``model``, plus hidden aliases.

    Every option defaults to None ("not given"), so that presets, config files and environment
    variables fill in what the command line leaves out. Aliases are the field's ``flag_aliases``,
    those of ``aliases`` and ``alias_prefix + name`` (e.g. ``--rsa-n``); they are hidden from
    ``--help`` and read back by :func:`given`.
    """
    params = []
    extra_aliases = aliases or {}
    for name, info in model.model_fields.items():
        if name in exclude:
            continue
        text = help_text(name, info, show_env=show_env, show_default=show_default)
        annotation, option = _option(name, info, flag_name(name), panel, hidden=False, help=text)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
        hidden = [*field_extra(info, "flag_aliases"), *extra_aliases.get(name, ())]
        if alias_prefix:
            hidden.append(flag_name(alias_prefix + name))
        for number, decl in enumerate(hidden):
            annotation, option = _option(name, info, decl, panel, hidden=True, help=text)
            params.append(
                inspect.Parameter(
                    f"{name}{ALIAS_MARK}{number}", inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation
                )
            )
    return params


def _is_given(value: Any) -> bool:
    return value is not None and value != [] and value != ()


def given(model: type[BaseModel], flags: dict[str, Any]) -> dict[str, Any]:
    """Pop ``model``'s options (and their aliases) out of a command's keyword arguments; return the
    ones given on the command line. A canonical flag wins over its aliases; repeated list flags add up."""
    found: dict[str, Any] = {}
    for key in [k for k in flags if k.split(ALIAS_MARK)[0] in model.model_fields]:
        name = key.split(ALIAS_MARK)[0]
        value = flags.pop(key)
        if not _is_given(value):
            continue
        if isinstance(value, (list, tuple)):
            found[name] = [*found.get(name, []), *value]
        elif key == name or name not in found:
            found[name] = value
    return found


def with_signature(func: Callable[..., Any], *extra: list[inspect.Parameter]) -> Callable[..., Any]:
    """Give ``func`` (taking ``**kwargs``) the signature of its own parameters plus ``extra``."""
    own = [p for p in inspect.signature(func).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    func.__signature__ = inspect.Signature([*own, *(p for group in extra for p in group)])  # type: ignore[attr-defined]
    return func
