"""``fewshot train``: MSN-pretrain a ViT on a folder of unlabelled images.

Settings: ``--config FILE.yaml`` (else the packaged config of ``--arch``, default
``vit_tiny_p8_64``), then the flags below on top, then ``--set section.key=value`` (any setting).
The resolved config is saved as ``<output>/config.yaml``; ``torchrun --nproc_per_node N fewshot
train ...`` trains with DDP.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fewshot_common import settings_flags
from fewshot_common.settings_flags import Flag

from .checkpoint import CHECKPOINT_NAME, load_checkpoint
from .config import TrainConfig, deep_update, load_config, parse_overrides


class TrainArgs(BaseModel):
    """Every option of ``fewshot train``, declared once: its flags and help derive from it. The
    config settings among them (``--epochs`` ...) are left out of the config when not given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: Path = Field(description="folder of images (recursive)")
    output: Path = Field(description="run folder: checkpoints, logs")
    config: Path | None = Field(None, description="YAML config (default: the arch's packaged one)")
    arch: str | None = Field(None, description="model architecture, e.g. vit_tiny_p8_64")
    epochs: int | None = Field(None, description="optimization.epochs")
    max_steps: int | None = Field(
        None, description="stop after this many steps in all (schedules still span --epochs)"
    )
    batch_size: int | None = Field(None, description="data.batch_size, per process")
    resume: bool = Field(False, description=f"continue exactly from <output>/{CHECKPOINT_NAME}")
    eval_dir: Path | None = Field(None, description="folder-per-class set for a per-epoch probe")
    init: Path | None = Field(None, description="start from this checkpoint's weights")
    seed: int | None = Field(None, description="seed")
    workers: Annotated[int | Literal["auto"] | None, Flag(metavar="N|auto")] = Field(
        None,
        description="data.num_workers: loader processes, or auto (0 on a CPU, the spare cores on a GPU)",
    )
    bf16: bool | None = Field(None, description="bf16 autocast (optimization.bf16)")
    progress: bool = Field(True, description="a progress bar")
    settings: Annotated[list[str], Flag(name="set", repeat=True, metavar="SECTION.KEY=VALUE")] = Field(
        [],
        description="override any config setting, e.g. --set masking.ratio=0.6 --set "
        "'data.focal_scale=[0.05, 0.3]' (value read as YAML; applied after the flags above)",
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: object) -> object:
        if value is None or value == "auto":
            return value
        try:
            count = int(value)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            count = -1
        if count < 0:
            raise ValueError("must be >= 0 or auto")
        return count


OPTIONS = TrainArgs


def overrides_from_args(args: TrainArgs) -> dict[str, Any]:
    """The command-line flags as a nested config dict; flags not given are left out."""
    pairs = {
        ("optimization", "epochs"): args.epochs,
        ("data", "batch_size"): args.batch_size,
        ("data", "num_workers"): args.workers,
        ("optimization", "bf16"): args.bf16,
        ("seed",): args.seed,
    }
    nested: dict[str, Any] = {}
    for keys, value in pairs.items():
        if value is None:
            continue
        node = nested
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return deep_update(nested, parse_overrides(args.settings))


def resolve_config(args: TrainArgs, resumed: dict[str, Any] | None = None) -> TrainConfig:
    """The run's config; ``resumed`` is the checkpoint of a ``--resume`` run."""
    overrides = overrides_from_args(args)
    if resumed is not None:
        # A resumed run keeps the settings it started with; only flags given now change them.
        if args.arch is not None:
            overrides = deep_update(overrides, {"model": {"arch": args.arch}})
        return TrainConfig.model_validate(deep_update(resumed["config"], overrides))
    return load_config(args.config, args.arch, overrides)


def run(parsed: argparse.Namespace) -> int:
    from .train import TrainOptions, train

    args = settings_flags.options_or_exit(TrainArgs, parsed, "fewshot train")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    checkpoint_path = args.output / CHECKPOINT_NAME
    if args.resume and not checkpoint_path.is_file():
        print(f"fewshot train: --resume but no {checkpoint_path}", file=sys.stderr)
        return 2
    try:
        # Read once: the config comes from it here, the weights and state in the trainer.
        resumed = load_checkpoint(checkpoint_path) if args.resume else None
        config = resolve_config(args, resumed)
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        print(f"fewshot train: bad configuration: {exc}", file=sys.stderr)
        return 2
    options = TrainOptions(
        data=args.data,
        output=args.output,
        max_steps=args.max_steps,
        resume=args.resume,
        resume_checkpoint=resumed,
        init=args.init,
        eval_dir=args.eval_dir,
        progress=args.progress,
    )
    try:
        result = train(config, options)
    except (FileNotFoundError, ValueError) as exc:
        print(f"fewshot train: {exc}", file=sys.stderr)
        return 2
    print(
        f"trained to step {result.step} (epoch {result.epoch}); "
        f"{result.skipped_files} unreadable files skipped; checkpoint {checkpoint_path}"
    )
    _write_report(args.output)
    return 0


def _write_report(output: Path) -> None:
    """The run's curves as a PNG; a missing matplotlib costs the picture, not the trained run."""
    import os

    from fewshot_common.plotting import PlottingUnavailable

    from .report import write_training_report

    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, one process draws it
    try:
        print(f"report {write_training_report(output)}")
    except PlottingUnavailable as exc:
        print(f"fewshot train: no report.png: {exc}", file=sys.stderr)
