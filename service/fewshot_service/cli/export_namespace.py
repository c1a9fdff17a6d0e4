"""``fewshot export-namespace --namespace NS --output FILE``: one namespace of a Redis (or Redis
Cluster) to one versioned file (registry/backup.py; docs/namespace-file.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fewshot_common.errors import FewshotError
from fewshot_common.settings_flags import add_arguments as add_model_arguments

from .redis_options import RedisOptions, registry_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--namespace",
        default="default",
        help="the namespace to export (default: default)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        required=True,
        metavar="FILE",
        help="the file to write (a zip)",
    )
    add_model_arguments(parser, RedisOptions)


def run(args: argparse.Namespace) -> int:
    from ..names import resolve_namespace
    from ..registry.backup import export_namespace

    opened = registry_from_args(args, "export-namespace")
    if opened is None:
        return 2
    registry, client = opened
    try:
        summary = export_namespace(registry, resolve_namespace(args.namespace), args.output)
    except (FewshotError, RuntimeError) as exc:
        print(f"fewshot export-namespace: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(
        f"exported namespace {summary.namespace!r}: {summary.classes} classes, {summary.examples} "
        f"examples, embeddings of {', '.join(summary.models) or 'no model'} -> {args.output}"
    )
    return 0
