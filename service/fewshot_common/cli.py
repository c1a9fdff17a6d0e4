"""The ``fewshot`` command. Each subcommand lives in its own module, imported only when chosen,
so ``fewshot serve`` never imports torch and ``fewshot --help`` is instant.

A subcommand module provides ``OPTIONS``, the pydantic model that declares its options (flags,
types, defaults and help derive from it: :mod:`fewshot_common.settings_flags`), and
``run(args) -> int``. No command writes argparse by hand.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from fewshot_common import __version__, settings_flags

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("fewshot_service.cli.serve", "run the gRPC + REST inference server"),
    "import": (
        "fewshot_service.cli.import_dir",
        "add a folder per class to a running server (bulk, resumable)",
    ),
    "export-namespace": ("fewshot_service.cli.export_namespace", "write one namespace of a Redis to a file"),
    "import-namespace": ("fewshot_service.cli.import_namespace", "restore a namespace file into a Redis"),
    "keygen": ("fewshot_service.cli.keygen", "make a new API key and its entry for the --api-keys file"),
    "train": ("fewshot_trainer.train_cli", "MSN-pretrain a ViT on a folder of unlabelled images"),
    "export": ("fewshot_trainer.export_cli", "export a ViT (random or from a checkpoint) to ONNX"),
    "eval": ("fewshot_common.eval_cli", "few-shot evaluation of an ONNX model on a folder-per-class set"),
    "report": ("fewshot_trainer.report", "draw a training run's metrics.jsonl as RUN_DIR/report.png"),
    "import-checkpoint": (
        "fewshot_trainer.import_cli",
        "convert official MSN or Hugging Face ViTMSN weights into a fewshot checkpoint",
    ),
}
TRAIN_ONLY = {"train", "export", "import-checkpoint"}


def _top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fewshot",
        description="Label-efficient image classification with MSN-pretrained Vision Transformers.",
    )
    parser.add_argument("--version", action="version", version=f"fewshot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text)
    return parser


def command_parser(name: str, module: ModuleType) -> argparse.ArgumentParser:
    """The parser of ``fewshot NAME``: its flags are those of the module's ``OPTIONS``."""
    parser = argparse.ArgumentParser(prog=f"fewshot {name}", description=SUBCOMMANDS[name][1])
    settings_flags.add_arguments(parser, module.OPTIONS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        _top_level_parser().parse_args(argv or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    try:
        module = importlib.import_module(SUBCOMMANDS[name][0])
    except ModuleNotFoundError as exc:
        if name in TRAIN_ONLY and exc.name in {"torch", "timm", "torchvision", "onnx"}:
            print(
                f"fewshot {name} needs the training extras: pip install 'fewshot[train]' ({exc})",
                file=sys.stderr,
            )
            return 2
        raise
    return int(module.run(command_parser(name, module).parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
