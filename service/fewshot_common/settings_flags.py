"""Command-line flags derived from a pydantic model: one way for every ``fewshot`` command.

Each field of the model is a flag (``max_batch_size`` -> ``--max-batch-size``, booleans as
``--x/--no-x``, a ``Literal`` as choices), typed and described by the field itself. A flag left
out is absent from the parsed namespace (``SUPPRESS``), so the model decides it: for a
``BaseSettings`` (``fewshot serve``) the environment, then the default; for a plain model
(``fewshot export``) the default; a required field left out is the model's error too (the help
says "required"). The model is declared once and the help follows it. Where a field's name and type do not say how it is written on the
command line (a positional argument, a flag repeated for a list, another flag name), a
:class:`Flag` in its ``Annotated`` metadata says so.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import AliasChoices, BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

_METAVARS = {int: "N", float: "X", Path: "PATH", str: "TEXT"}
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Flag:
    """How a field is written on the command line, where its name and type do not say it:
    ``name`` a flag name other than the field's (``--set`` for ``settings``); ``positional`` an
    argument without a flag (``fewshot import DIR``); ``repeat`` a list given by repeating the
    flag (``--namespace a --namespace b``) rather than comma-separated; ``metavar`` the help's
    placeholder. Put it in the field's ``Annotated`` metadata."""

    name: str | None = None
    positional: bool = False
    repeat: bool = False
    metavar: str | None = None


def flag_of(info: FieldInfo) -> Flag:
    return next((m for m in info.metadata if isinstance(m, Flag)), Flag())


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def option_strings(model: type[BaseModel]) -> dict[str, list[str]]:
    """Per field of ``model``, what names it on the command line: ``["--x"]`` or, with
    booleans, ``["--x", "--no-x"]``; ``[]`` for a positional argument."""
    names: dict[str, list[str]] = {}
    for field, info in model.model_fields.items():
        flag = flag_of(info)
        if flag.positional:
            names[field] = []
            continue
        name = "--" + (flag.name or field).replace("_", "-")
        names[field] = [name, "--no-" + name[2:]] if _value_type(info.annotation) is bool else [name]
    return names


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
    """``X | None`` -> ``X``; ``list[str]`` (a comma-separated or repeated flag) -> ``str``; a
    union of several types (``int | Literal["auto"]``) -> ``str``, which the model then parses."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) > 1:
            return str
        annotation = members[0]
    if typing.get_origin(annotation) is list:
        return str
    return annotation


def _help(model: type[BaseModel], field: str, info: FieldInfo) -> str:
    text = info.description or field.replace("_", " ")
    envs = " or ".join(env_names(model, field, info))
    default = info.get_default(call_default_factory=True)
    notes = [f"env {envs}"] if envs else []
    if info.is_required() and not flag_of(info).positional:
        notes.append("required")
    elif not (default is None or default == []):
        if isinstance(default, bool):
            default = "on" if default else "off"
        notes.append(f"default {default}")
    return f"{text} ({'; '.join(notes)})" if notes else text


def add_arguments(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One flag per field of ``model``, named, typed and described by the field itself."""
    for field, info in model.model_fields.items():
        flag, kind = flag_of(info), _value_type(info.annotation)
        options: dict[str, Any] = {"default": argparse.SUPPRESS, "help": _help(model, field, info)}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is typing.Literal:
            options["choices"] = list(typing.get_args(kind))
        else:
            options["type"] = kind
            options["metavar"] = flag.metavar or _METAVARS.get(kind, "VALUE")
        if flag.repeat:
            options["action"] = "append"
        if flag.positional:
            if not info.is_required():
                options["nargs"] = "?"
            parser.add_argument(field, **options)
            continue
        parser.add_argument(*option_strings(model)[field][:1], dest=field, **options)


def model_from_args(model: type[M], args: argparse.Namespace) -> M:
    """Flags given on the command line over the environment (settings only) over the defaults."""
    overrides = {field: getattr(args, field) for field in model.model_fields if hasattr(args, field)}
    return model(**overrides)


def options_or_exit(model: type[M], args: argparse.Namespace, prog: str) -> M:
    """:func:`model_from_args`, or exit 2 with each refused value named by its flag, as argparse
    does for a value its own type check refuses (``fewshot train: error: --workers: ...``)."""
    try:
        return model_from_args(model, args)
    except ValidationError as exc:
        names = option_strings(model)
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            where = (names.get(field) or [field.upper()])[0] if field else prog
            message = "required" if error["type"] == "missing" else error["msg"].removeprefix("Value error, ")
            print(f"{prog}: error: {where}: {message}", file=sys.stderr)
        raise SystemExit(2) from None
