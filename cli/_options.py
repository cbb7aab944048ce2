"""CLI options derived from pydantic models, so each parameter is defined once (in RSAParams or
FakeBackendConfig) and the flags follow it."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any, Optional

import typer
from pydantic import BaseModel


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(annotation: Any) -> Any:
    """The CLI type of a field: unwraps Optional, keeps enums, bools, ints, floats, strs."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        annotation = args[0]
    if isinstance(annotation, type) and issubclass(annotation, (Enum, bool, int, float, str)):
        return annotation
    if typing.get_origin(annotation) is list:
        return list[str]
    return str


def model_options(
    model: type[BaseModel], panel: str, exclude: Iterable[str] = (), defaults_from_model: bool = False
) -> list[inspect.Parameter]:
    """One keyword parameter with a ``typer.Option`` per field of ``model``.

    Defaults are None ("not given") unless ``defaults_from_model``, so that presets and environment
    variables can fill in what the command line leaves out.
    """
    params = []
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        kind = _scalar_type(field.annotation)
        flag = _flag(name)
        decls = [f"{flag}/--no-{name.replace('_', '-')}"] if kind is bool else [flag]
        default = field.default if defaults_from_model else None
        help_text = field.description or ""
        if defaults_from_model and field.default not in (None, [], ""):
            shown = field.default.value if isinstance(field.default, Enum) else field.default
            help_text += f" [default: {shown}]"
        option = typer.Option(default, *decls, help=help_text, rich_help_panel=panel, show_default=False)
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[kind])
        )
    return params


def with_signature(func: Callable[..., Any], extra: list[inspect.Parameter]) -> Callable[..., Any]:
    """Give ``func`` (taking ``**kwargs``) the signature of its own parameters plus ``extra``."""
    own = [p for p in inspect.signature(func).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    func.__signature__ = inspect.Signature([*own, *extra])  # type: ignore[attr-defined]
    return func
