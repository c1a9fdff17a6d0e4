"""``fewshot import DIR``: a folder per class into a running server, through the bulk add.

``DIR/<label>/**/<image>``, listed by the trainer's rules (fewshot_common.image_files), is sent
``--batch`` files per ``POST /v1/examples:bulk`` with a progress bar. The server skips a file
whose bytes its class already holds, so an interrupted import is resumed by running it again.
A file the server refuses is left out (its batch sent again without it) and reported at the end
with the per-class warnings; the exit status is 1 when any file or class was refused, or when the
server stopped answering (what was sent before stays).
"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import httpx
from pydantic import BaseModel, Field
from tqdm import tqdm

from fewshot_common.image_files import list_labelled_image_files
from fewshot_common.settings_flags import Flag, options_or_exit

if TYPE_CHECKING:  # the client, through the server package's one door to it (package boundaries)
    from ..client import FewShotClient


class ImportOptions(BaseModel):
    dir: Annotated[Path, Flag(positional=True, metavar="DIR")] = Field(
        description="one folder per class, named by its label"
    )
    url: str = Field(default="http://localhost:8000", description="the server's REST URL")
    namespace: str = Field(default="", description="namespace to fill (empty: default)")
    batch: int = Field(
        default=256,
        gt=0,
        description="files per bulk request (the server allows --max-bulk-images)",
    )
    api_key: str | None = Field(
        default=None,
        description="API key with the write role (default: $FEWSHOT_API_KEY)",
    )
    timeout_s: float = Field(default=300.0, gt=0, description="seconds one bulk request may take")


OPTIONS = ImportOptions


@dataclass
class Summary:
    added: int = 0
    skipped: int = 0
    refused_files: list[tuple[Path, str]] = field(default_factory=list)
    class_errors: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)


# Requests in flight at once, so the model does not wait on HTTP and Redis. The server's batcher
# runs the parts of concurrent requests in turn, so they end at about the same time and each
# writes, answers and waits for its successor while the model has nothing queued: the more in
# flight, the rarer that gap (bench/bench_import.py; the server holds each one's pixels).
IN_FLIGHT = 4


def _send(
    client: FewShotClient, pending: list[tuple[str, Path]], namespace: str
) -> tuple[object | None, list[tuple[Path, str]]]:
    """One batch, sent again without any file the server refuses: (answer or None, refused)."""
    from ..client import errors

    refused: list[tuple[Path, str]] = []
    while pending:
        try:
            return client.add_examples_bulk(pending, namespace=namespace, batch_size=len(pending)), refused
        except errors.FewshotError as exc:
            index = getattr(exc, "index", None)
            if index is None or not 0 <= index < len(pending):
                raise  # not one file's fault: stop here (a rerun resumes)
            refused.append((pending[index][1], str(exc)))
            pending = pending[:index] + pending[index + 1 :]
    return None, refused


def import_dir(client: FewShotClient, root: Path, namespace: str, batch: int, progress: tqdm) -> Summary:
    listed = list_labelled_image_files(root)
    items = [(listed.classes[int(label)], path) for path, label in zip(listed.paths, listed.labels)]
    batches = [items[start : start + batch] for start in range(0, len(items), batch)]
    summary = Summary()
    with ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="import") as pool:
        futures = deque(pool.submit(_send, client, b, namespace) for b in batches[:IN_FLIGHT])
        queued = batches[IN_FLIGHT:]
        try:
            for sent in batches:
                answer, refused = futures.popleft().result()
                if queued:
                    futures.append(pool.submit(_send, client, queued.pop(0), namespace))
                summary.refused_files += refused
                progress.update(len(sent))
                if answer is None:
                    continue
                summary.added += answer.added
                summary.skipped += answer.skipped
                for result in answer.classes:
                    if result.error:
                        summary.class_errors[result.label] = result.error
                    summary.warnings.setdefault(result.label, []).extend(
                        w["message"] for w in result.warnings
                    )
        finally:
            for future in futures:
                future.cancel()
    summary.warnings = {label: messages for label, messages in summary.warnings.items() if messages}
    return summary


def run(args: argparse.Namespace) -> int:
    from ..client import FewShotClient, errors

    options = options_or_exit(ImportOptions, args, "fewshot import")
    root = options.dir
    if not root.is_dir():
        print(f"fewshot import: {root} is not a folder", file=sys.stderr)
        return 2
    total = len(list_labelled_image_files(root).paths)
    if total == 0:
        print(f"fewshot import: no image files under {root}/<class>/", file=sys.stderr)
        return 2
    with FewShotClient(http_url=options.url, api_key=options.api_key, timeout=options.timeout_s) as client:
        with tqdm(total=total, unit="img", desc="import", file=sys.stderr) as progress:
            try:
                summary = import_dir(client, root, options.namespace, options.batch, progress)
            except (errors.FewshotError, httpx.HTTPError, OSError) as exc:
                progress.close()
                print(
                    f"fewshot import: stopped: {exc} (run again to resume)",
                    file=sys.stderr,
                )
                return 1
    for label, messages in sorted(summary.warnings.items()):
        for message in messages:
            print(f"warning: class {label!r}: {message}", file=sys.stderr)
    for path, message in summary.refused_files:
        print(f"error: {path}: {message}", file=sys.stderr)
    for label, message in sorted(summary.class_errors.items()):
        print(f"error: class {label!r}: {message}", file=sys.stderr)
    print(
        f"added {summary.added}, skipped {summary.skipped} already present, "
        f"refused {len(summary.refused_files)} files and {len(summary.class_errors)} classes"
    )
    return 1 if summary.refused_files or summary.class_errors else 0
