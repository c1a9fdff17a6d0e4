"""Every command's flags derive from one declared model (fewshot_common.settings_flags): ``fewshot
serve`` from ``Settings`` (a BaseSettings: flags over environment over defaults), the others
(``export``, ``train``, ``keygen`` ...) from a plain model of their own (flags over defaults, no
environment)."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, Field

from fewshot_common import cli, settings_flags


class _Options(BaseModel):
    size: int = Field(3, description="how many")
    mode: Literal["a", "b"] = Field("a", description="which")
    folder: Path | None = Field(None, description="where")
    loud: bool = Field(False, description="say it")


def _parser(model: type[BaseModel]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test")
    settings_flags.add_arguments(parser, model)
    return parser


def test_a_plain_model_gets_typed_flags_its_defaults_and_no_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SIZE", "9")  # a plain model reads no environment
    parser = _parser(_Options)
    assert settings_flags.model_from_args(_Options, parser.parse_args([])) == _Options()
    given = settings_flags.model_from_args(
        _Options, parser.parse_args(["--size", "5", "--mode", "b", "--folder", "x", "--loud"])
    )
    assert given == _Options(size=5, mode="b", folder=Path("x"), loud=True)
    help_text = " ".join(parser.format_help().split())
    assert "how many (default 3)" in help_text and "where " in help_text and "env" not in help_text
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])  # a Literal is a choice
    with pytest.raises(SystemExit):
        parser.parse_args(["--size", "many"])


def test_export_flags_come_from_its_options_with_the_former_defaults() -> None:
    from fewshot_trainer import export_cli
    from fewshot_trainer.variants import CheckThresholds

    parser = argparse.ArgumentParser(prog="fewshot export")
    export_cli.add_arguments(parser)
    flags = {a.dest for a in parser._actions if a.dest != "help"}
    assert flags == set(export_cli.ExportOptions.model_fields)
    options = settings_flags.model_from_args(export_cli.ExportOptions, parser.parse_args([]))
    checks = CheckThresholds()
    assert (options.precision, options.int8_method, options.encoder, options.pool) == (
        "fp32",
        "dynamic",
        "target",
        "cls",
    )
    assert (options.min_cosine, options.mean_cosine, options.max_accuracy_drop) == (
        checks.min_cosine,
        checks.mean_cosine,
        checks.max_accuracy_drop,
    )
    assert (
        options.blocks,
        options.center_samples,
        options.whiten,
        options.whiten_shrinkage,
        options.seed,
    ) == (1, 2000, False, 0.3, 0)
    assert options.output is None and options.arch is None and options.whiten_dim is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--arch", "no_such_arch"])


@pytest.mark.parametrize("command", sorted(cli.SUBCOMMANDS))
def test_every_command_offers_exactly_the_flags_its_options_declare(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``fewshot COMMAND --help``, as a user sees it: the usage names every declared flag (and
    positional argument) and nothing else, and the help carries each field's description."""
    options = importlib.import_module(cli.SUBCOMMANDS[command][0]).OPTIONS
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    usage = out.split("\n\n", 1)[0]
    names = settings_flags.option_strings(options)
    assert set(re.findall(r"--[\w-]+", usage)) == {n for flags in names.values() for n in flags}
    squeezed = "".join(out.split())
    for field, info in options.model_fields.items():
        flag = settings_flags.flag_of(info)
        if flag.positional:
            assert (flag.metavar or field) in usage.split(), field
        assert info.description and "".join(info.description.split()) in squeezed, field


def test_flags_that_name_repeat_or_stand_alone_as_declared(capsys: pytest.CaptureFixture[str]) -> None:
    """``Flag``: another flag name, a repeated flag for a list, a positional argument; a required
    field left out, or a refused value, exits 2 naming its flag."""

    class _Command(BaseModel):
        folder: Annotated[Path, settings_flags.Flag(positional=True, metavar="DIR")] = Field(description="in")
        tags: Annotated[list[str], settings_flags.Flag(name="tag", repeat=True)] = Field(
            [], description="tags"
        )
        name: str = Field(description="who")
        count: int = Field(1, gt=0, description="how many")

    parser = _parser(_Command)
    parsed = parser.parse_args(["d", "--name", "n", "--tag", "a", "--tag", "b"])
    assert settings_flags.model_from_args(_Command, parsed) == _Command(
        folder=Path("d"), tags=["a", "b"], name="n"
    )
    for argv, message in (
        (["d"], "test: error: --name: required"),
        (["d", "--name", "n", "--count", "0"], "--count: Input should be greater than 0"),
    ):
        with pytest.raises(SystemExit) as exited:
            settings_flags.options_or_exit(_Command, parser.parse_args(argv), "test")
        assert exited.value.code == 2
        assert message in capsys.readouterr().err
