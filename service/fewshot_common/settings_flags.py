"""Command-line flags derived from a pydantic model: one way for every ``fewshot`` command.

Each field of the model is a flag (``max_batch_size`` -> ``--max-batch-size``, booleans as
``--x/--no-x``, a ``Literal`` as choices), typed and described by the field itself. A flag left
out is absent from the parsed namespace (``SUPPRESS``), so the model decides it: for a
``BaseSettings`` (``fewshot serve``) the environment, then the default; for a plain model
(``fewshot export``) the default. The model is declared once and the help follows it.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from pydantic import AliasChoices, BaseModel
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

_METAVARS = {int: "N", float: "X", Path: "PATH", str: "TEXT"}
M = TypeVar("M", bound=BaseModel)


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_names(model: type[BaseModel], field: str, info: FieldInfo) -> list[str]:
    """The environment variables that set ``field``: its explicit upper-case aliases, or
    ``<env prefix><FIELD>``; none for a model that is not a ``BaseSettings``."""
    if not issubclass(model, BaseSettings):
        return []
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        names = [c for c in alias.choices if isinstance(c, str) and c.isupper()]
        if names:
            return names
    return [f"{model.model_config.get('env_prefix', '')}{field}".upper()]


def _value_type(annotation: Any) -> Any:
    """``X | None`` -> ``X``; ``list[str]`` (a comma-separated flag) -> ``str``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        return str
    return annotation


def _help(model: type[BaseModel], field: str, info: FieldInfo) -> str:
    text = info.description or field.replace("_", " ")
    envs = " or ".join(env_names(model, field, info))
    default = info.get_default(call_default_factory=True)
    notes = [f"env {envs}"] if envs else []
    if info.is_required():
        notes.append("required")
    elif not (default is None or default == []):
        if isinstance(default, bool):
            default = "on" if default else "off"
        notes.append(f"default {default}")
    return f"{text} ({'; '.join(notes)})" if notes else text


def add_arguments(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One flag per field of ``model``, named, typed and described by the field itself."""
    for field, info in model.model_fields.items():
        kind = _value_type(info.annotation)
        options: dict[str, Any] = {
            "dest": field,
            "default": argparse.SUPPRESS,
            "help": _help(model, field, info),
        }
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is typing.Literal:
            options["choices"] = list(typing.get_args(kind))
        else:
            options["type"] = kind
            options["metavar"] = _METAVARS.get(kind, "VALUE")
        parser.add_argument(flag_name(field), **options)


def model_from_args(model: type[M], args: argparse.Namespace) -> M:
    """Flags given on the command line over the environment (settings only) over the defaults."""
    overrides = {field: getattr(args, field) for field in model.model_fields if hasattr(args, field)}
    return model(**overrides)
