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
from typing import Any

from pydantic import ValidationError

from .checkpoint import CHECKPOINT_NAME, load_checkpoint
from .config import TrainConfig, deep_update, load_config, parse_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="folder of images (recursive)")
    parser.add_argument("--output", type=Path, required=True, help="run folder: checkpoints, logs")
    parser.add_argument("--config", type=Path, help="YAML config (default: the arch's packaged one)")
    parser.add_argument("--arch", help="model architecture, e.g. vit_tiny_p8_64")
    parser.add_argument("--epochs", type=int, help="optimization.epochs")
    parser.add_argument(
        "--max-steps", type=int, help="stop after this many steps in all (schedules still span --epochs)"
    )
    parser.add_argument("--batch-size", type=int, help="data.batch_size, per process")
    parser.add_argument(
        "--resume", action="store_true", help=f"continue exactly from <output>/{CHECKPOINT_NAME}"
    )
    parser.add_argument("--eval-dir", type=Path, help="folder-per-class set for a per-epoch probe")
    parser.add_argument("--init", type=Path, help="start from this checkpoint's weights")
    parser.add_argument("--seed", type=int, help="seed")
    parser.add_argument(
        "--workers",
        type=_workers,
        metavar="N|auto",
        help="data.num_workers: loader processes, or auto (0 on a CPU, the spare cores on a GPU)",
    )
    parser.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast (optimization.bf16)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any config setting, e.g. --set masking.ratio=0.6 --set "
        "'data.focal_scale=[0.05, 0.3]' (value read as YAML; applied after the flags above)",
    )


def _workers(value: str) -> int | str:
    if value == "auto":
        return value
    count = int(value)
    if count < 0:
        raise argparse.ArgumentTypeError("must be >= 0 or auto")
    return count


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
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


def resolve_config(args: argparse.Namespace, resumed: dict[str, Any] | None = None) -> TrainConfig:
    """The run's config; ``resumed`` is the checkpoint of a ``--resume`` run."""
    overrides = overrides_from_args(args)
    if resumed is not None:
        # A resumed run keeps the settings it started with; only flags given now change them.
        if args.arch is not None:
            overrides = deep_update(overrides, {"model": {"arch": args.arch}})
        return TrainConfig.model_validate(deep_update(resumed["config"], overrides))
    return load_config(args.config, args.arch, overrides)


def run(args: argparse.Namespace) -> int:
    from .train import TrainOptions, train

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
        progress=not args.no_progress,
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
