"""``fewshot import-namespace FILE [--namespace NEW] [--replace]``: restore a file written by
``fewshot export-namespace`` into a Redis (or Redis Cluster); refuses a namespace that holds
classes unless ``--replace``."""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

from fewshot_common.errors import FewshotError
from fewshot_common.settings_flags import add_arguments as add_model_arguments

from .redis_options import RedisOptions, registry_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, metavar="FILE", help="a file of fewshot export-namespace")
    parser.add_argument(
        "--namespace",
        default=None,
        help="restore under this name (default: the exported one)",
    )
    parser.add_argument(
        "--replace",
        action="store_true",
        help="overwrite the namespace if it holds classes",
    )
    add_model_arguments(parser, RedisOptions)


def run(args: argparse.Namespace) -> int:
    from ..names import resolve_namespace
    from ..registry.backup import import_namespace

    opened = registry_from_args(args, "import-namespace")
    if opened is None:
        return 2
    registry, client = opened
    target = resolve_namespace(args.namespace) if args.namespace else None
    try:
        summary = import_namespace(registry, args.file, target, replace=args.replace)
    except (FewshotError, RuntimeError, OSError, zipfile.BadZipFile) as exc:
        print(f"fewshot import-namespace: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(
        f"restored namespace {summary.namespace!r}: {summary.classes} classes, {summary.examples} "
        f"examples, embeddings of {', '.join(summary.models) or 'no model'}"
    )
    return 0
