"""``fewshot import-namespace FILE [--namespace NEW] [--replace]``: restore a file written by
``fewshot export-namespace`` into a Redis (or Redis Cluster); refuses a namespace that holds
classes unless ``--replace``."""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path
from typing import Annotated

from pydantic import Field

from fewshot_common.errors import FewshotError
from fewshot_common.settings_flags import Flag, options_or_exit

from .redis_options import RedisOptions, registry_from_args


class ImportNamespaceOptions(RedisOptions):
    file: Annotated[Path, Flag(positional=True, metavar="FILE")] = Field(
        description="a file of fewshot export-namespace"
    )
    namespace: str | None = Field(None, description="restore under this name (default: the exported one)")
    replace: bool = Field(False, description="overwrite the namespace if it holds classes")


OPTIONS = ImportNamespaceOptions


def run(args: argparse.Namespace) -> int:
    from ..names import resolve_namespace
    from ..registry.backup import import_namespace

    opened = registry_from_args(args, "import-namespace")  # first: a missing --redis-url is its message
    if opened is None:
        return 2
    registry, client = opened
    try:
        options = options_or_exit(ImportNamespaceOptions, args, "fewshot import-namespace")
        target = resolve_namespace(options.namespace) if options.namespace else None
        summary = import_namespace(registry, options.file, target, replace=options.replace)
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
