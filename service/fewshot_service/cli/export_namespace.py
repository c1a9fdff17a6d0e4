"""``fewshot export-namespace --namespace NS --output FILE``: one namespace of a Redis (or Redis
Cluster) to one versioned file (registry/backup.py; docs/namespace-file.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Annotated

from pydantic import Field

from fewshot_common.errors import FewshotError
from fewshot_common.settings_flags import Flag, options_or_exit

from .redis_options import RedisOptions, registry_from_args


class ExportNamespaceOptions(RedisOptions):
    namespace: str = Field("default", description="the namespace to export")
    output: Annotated[Path, Flag(metavar="FILE")] = Field(description="the file to write (a zip)")


OPTIONS = ExportNamespaceOptions


def run(args: argparse.Namespace) -> int:
    from ..names import resolve_namespace
    from ..registry.backup import export_namespace

    opened = registry_from_args(args, "export-namespace")  # first: a missing --redis-url is its message
    if opened is None:
        return 2
    registry, client = opened
    try:
        options = options_or_exit(ExportNamespaceOptions, args, "fewshot export-namespace")
        summary = export_namespace(registry, resolve_namespace(options.namespace), options.output)
    except (FewshotError, RuntimeError) as exc:
        print(f"fewshot export-namespace: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(
        f"exported namespace {summary.namespace!r}: {summary.classes} classes, {summary.examples} "
        f"examples, embeddings of {', '.join(summary.models) or 'no model'} -> {options.output}"
    )
    return 0
