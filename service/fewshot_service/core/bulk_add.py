"""Bulk add: many classes in one request (``POST /v1/examples:bulk``, ``fewshot import``).

The images go through the same decode workers and limits as any upload, a chunk of the
batcher's max batch at a time (each chunk within the per-request limits), and reach the model
in full batches: the next chunk decodes while the model runs the last. Nothing is written until
every image has been embedded, so a bad file adds nothing; then every class is written in one
pipelined round trip (registry/bulk.py). An upload whose bytes (sha256) its class already holds,
or that appears twice for one class in the request, is skipped and reported, so re-sending a
folder is harmless (``fewshot import`` resumes that way).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fewshot_common.cancellation import CancellationCheck
from fewshot_common.errors import ImageError, InvalidInput, TooLarge, Unavailable

from ..classify.shot_quality import ShotWarning, add_warnings
from ..names import resolve_label, resolve_namespace
from . import metrics
from .batcher import BatchConfig
from .decode_pool import DecodePool

if TYPE_CHECKING:
    from fewshot_common.embedder import Embedder

    from ..registry.registry import Registry

log = logging.getLogger(__name__)


class BulkCore(Protocol):
    """What a bulk add uses of :class:`core.FewShotCore` (which calls this module, so it is not
    imported here: no import cycle)."""

    embedder: Embedder
    registry: Registry
    decode_pool: DecodePool
    store_images: bool
    duplicate_similarity: float

    @property
    def model_id(self) -> str: ...

    @property
    def batch_config(self) -> BatchConfig: ...

    def start_inference(
        self, pixels: np.ndarray, cancellation: CancellationCheck | None = None
    ) -> Callable[[], np.ndarray]: ...


@dataclass(frozen=True)
class SkippedExample:
    index: int  # the upload's position in the request
    example_id: str  # the example that already holds these bytes


@dataclass
class BulkClassReport:
    label: str
    count: int = 0  # the class's examples after this request
    added_example_ids: list[str] = field(default_factory=list)
    skipped: list[SkippedExample] = field(default_factory=list)
    warnings: list[ShotWarning] = field(default_factory=list)
    error: str | None = None  # this class's add was refused (over its cap): nothing of it added


@dataclass(frozen=True)
class BulkReport:
    classes: list[BulkClassReport]  # in order of first appearance in the request

    @property
    def added(self) -> int:
        return sum(len(c.added_example_ids) for c in self.classes)

    @property
    def skipped(self) -> int:
        return sum(len(c.skipped) for c in self.classes)


def add_examples_bulk(
    core: BulkCore,
    namespace: str | None,
    labels: Sequence[str],
    images: Sequence[bytes],
    max_images: int,
    cancellation: CancellationCheck | None = None,
) -> BulkReport:
    """Add ``images[i]`` as an example of ``labels[i]``, for every i (see the module's text)."""
    from ..registry.bulk import (
        ClassUpload,
        add_classes_with_hashes,
        class_counts,
        content_hash,
        known_hashes,
    )

    namespace = resolve_namespace(namespace)
    if not images:
        raise InvalidInput("a bulk add needs at least one image")
    if len(labels) != len(images):
        raise InvalidInput(f"{len(labels)} labels for {len(images)} images: give one label per image")
    if len(images) > max_images:
        raise TooLarge(f"{len(images)} images in one bulk request exceeds the limit of {max_images}")
    resolved = [resolve_label(label) for label in labels]
    hashes = [content_hash(data) for data in images]

    reports: dict[str, BulkClassReport] = {}
    wanted: dict[str, list[str]] = {}
    for label, digest in zip(resolved, hashes):
        reports.setdefault(label, BulkClassReport(label))
        wanted.setdefault(label, []).append(digest)
    held = known_hashes(core.registry, namespace, wanted)

    first_in_request: dict[tuple[str, str], int] = {}
    # (index, index of its first copy in this request)
    duplicates: list[tuple[int, int]] = []
    to_add: list[int] = []
    for index, (label, digest) in enumerate(zip(resolved, hashes)):
        if digest in held.get(label, {}):
            reports[label].skipped.append(SkippedExample(index, held[label][digest]))
        elif (label, digest) in first_in_request:
            duplicates.append((index, first_in_request[label, digest]))
        else:
            first_in_request[label, digest] = index
            to_add.append(index)

    embeddings, stored = _embed_in_batches(core, [images[i] for i in to_add], to_add, cancellation)
    uploads: list[ClassUpload] = []
    rows_of: dict[str, list[int]] = {}
    for row, index in enumerate(to_add):
        rows_of.setdefault(resolved[index], []).append(row)
    for label, rows in rows_of.items():
        uploads.append(
            ClassUpload(
                label,
                embeddings[rows],
                [stored[r] for r in rows] if stored is not None else None,
                [hashes[to_add[r]] for r in rows],
            )
        )
    outcomes = add_classes_with_hashes(core.registry, namespace, uploads, core.model_id) if uploads else []

    example_of: dict[int, str] = {}  # request index -> the example id it was given
    for upload, outcome in zip(uploads, outcomes):
        report = reports[upload.label]
        report.count, report.error = outcome.count, outcome.error
        report.added_example_ids = outcome.added_example_ids
        for row, example_id in zip(rows_of[upload.label], outcome.added_example_ids):
            example_of[to_add[row]] = example_id
    for index, first in duplicates:
        if first in example_of:  # else its class was refused, and the report says so
            reports[resolved[index]].skipped.append(SkippedExample(index, example_of[first]))
    only_skipped = [r for r in reports.values() if not r.added_example_ids and r.error is None]
    counts = class_counts(core.registry, namespace, [r.label for r in only_skipped])
    for report in reports.values():
        report.skipped.sort(key=lambda s: s.index)
    for report in only_skipped:
        report.count = counts.get(report.label, 0)
    _add_warnings(core, namespace, [r for r in reports.values() if r.added_example_ids])
    return BulkReport(list(reports.values()))


def _embed_in_batches(
    core: BulkCore,
    images: list[bytes],
    indices: list[int],
    cancellation: CancellationCheck | None,
) -> tuple[np.ndarray, list[bytes] | None]:
    """Decode up to the per-request image limit at a time (one decode-worker job, within every
    per-request limit) and queue its pixels for the model at once in batches of the batcher's
    max batch; the next chunk decodes while the model runs these."""
    pre, limits = core.embedder.meta.preprocess, core.embedder.limits
    stored: list[bytes] | None = [] if core.store_images else None
    if not images:
        return np.zeros((0, 0), dtype=np.float32), stored
    batch = core.batch_config.max_batch_size
    # Whole batches per decode job, never more images than one request may carry.
    chunk = limits.max_images // batch * batch or limits.max_images
    pending: list[Callable[[], np.ndarray]] = []
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk]
        try:
            if stored is None:
                pixels = core.decode_pool.load_batch(part, pre, limits, cancellation)
            else:
                pixels, copies = core.decode_pool.load_batch_and_copies(part, pre, limits, cancellation)
                stored.extend(copies)
        except ImageError as exc:  # name the upload by its place in the request
            raise _reindexed(exc, indices[start + exc.index]) from None
        metrics.IMAGES_TOTAL.labels("add_examples").inc(len(pixels))
        pending += [
            core.start_inference(pixels[i : i + batch], cancellation) for i in range(0, len(pixels), batch)
        ]
    # The last batch first: the model runs them in order, so this thread sleeps once, until the
    # end, instead of waking for each batch (each wake-up takes a core from a model run).
    results = [rows() for rows in reversed(pending)]
    return np.concatenate(results[::-1]), stored


def _reindexed(exc: ImageError, index: int) -> ImageError:
    error = type(exc)(index, exc.reason)
    error.detail = exc.detail
    return error


def _add_warnings(core: BulkCore, namespace: str, reports: list[BulkClassReport]) -> None:
    """Each class's shot warnings as a single add gives them, but judged among the classes of
    this request (one snapshot of their means): O(request), not O(namespace), as a bulk import
    of 100k classes cannot re-read the namespace per request. GET /v1/classes/{label} judges an
    example against every class."""
    # Both warnings compare an example with the other examples of its class (a mislabel: its own
    # class without it; a duplicate: an earlier one), so a class this request left with one
    # example has none to give: a catalog of one-image classes skips the re-read and the maths.
    can_warn = [r for r in reports if r.count >= 2]
    if not can_warn:
        return
    try:
        snapshot = core.registry.example_snapshot(
            namespace, only_labels=[r.label for r in reports], only_their_means=True, model_id=core.model_id
        )
    except Unavailable:  # the adds are stored: answer them (without warnings) rather than a 503
        log.warning("bulk add stored, but could not re-read its classes for warnings")
        return
    for report in can_warn:
        if report.label in snapshot.labels:  # else deleted by another request in between
            report.warnings = add_warnings(
                snapshot, report.label, report.added_example_ids, core.duplicate_similarity
            )
