"""The one object both transports call: embedding, classification and the example registry.

gRPC and REST only translate; every check on a request's meaning (namespace, label, example id,
top_k; image limits through the embedder) is made here, once, so a request is refused the same way
whichever door it came through. The registry below trusts the names it is given.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fewshot_common.cancellation import CancellationCheck
from fewshot_common.embedder import Embedder
from fewshot_common.errors import (
    Cancelled,
    FailedPrecondition,
    ModelIncomplete,
    NotFound,
    Unavailable,
)

from .. import tracing
from ..classify.open_set import DEFAULT_UNKNOWN_RATE, OpenSetResult, label_images, resolve_unknown_rate
from ..classify.prototypes import Prediction, PrototypeMatrix
from ..classify.shot_quality import (
    DEFAULT_DUPLICATE_SIMILARITY,
    Confusion,
    ExampleQuality,
    ShotWarning,
    add_warnings,
    confusions,
    example_quality,
)
from ..names import resolve_example_id, resolve_label, resolve_name, resolve_namespace, resolve_top_k
from ..registry.bulk import content_hash
from ..registry.redis_client import redis_time_budget
from . import metrics
from .batcher import BatchConfig, DynamicBatcher
from .calibrator import OpenSetCalibrator
from .class_pages import decode_cursor, encode_cursor, label_matcher, resolve_limit
from .decode_pool import DecodePool
from .example_images import StoredImage, Thumbnails
from .reports import NamespaceReports

if TYPE_CHECKING:  # the registry imports redis; keep this module importable on its own
    from ..classify.report import NamespaceReport
    from ..classify.snapshot import ExampleSnapshot, PrototypeSet
    from ..registry.registry import (
        ClassInfo,
        ClassSummary,
        DeletedNamespace,
        NamespaceStatus,
        NamespaceSummary,
        Registry,
    )
    from .backfill import Backfiller
    from .bulk_add import BulkReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassReport:
    """A class as the core answers for it: what the registry stores (its ``ClassInfo``), and what
    the core judged of its examples. The core's own type, so the registry's stays a storage type."""

    label: str
    count: int
    example_ids: list[str]
    # Only set by add_examples: the ids given to this call's examples, in request order.
    added_example_ids: list[str] = field(default_factory=list)
    warnings: list[ShotWarning] = field(default_factory=list)  # add_examples' (shot_quality.py)
    examples: list[ExampleQuality] = field(default_factory=list)  # get_class's per-example fit

    @classmethod
    def of(cls, info: ClassInfo, **judged: list) -> ClassReport:
        return cls(info.label, info.count, info.example_ids, info.added_example_ids, **judged)


class FewShotCore:
    """Embedder + registry + classifier behind one thread-safe API; owns the dynamic batcher,
    so Embed, Classify and example uploads from every transport share model runs."""

    def __init__(
        self,
        embedder: Embedder,
        registry: Registry,
        *,
        batching: BatchConfig | None = None,
        decode_pool: DecodePool | None = None,
        unknown_rate: float = DEFAULT_UNKNOWN_RATE,
        duplicate_similarity: float = DEFAULT_DUPLICATE_SIMILARITY,
        store_images: bool = True,
        backfill_options: dict[str, int] | None = None,
        max_bulk_images: int = 1024,
    ) -> None:
        from ..registry.model_store import ModelStore
        from .backfill import Backfiller  # imports redis (see TYPE_CHECKING above)

        self.embedder = embedder
        self.registry = registry
        # Each added example keeps a bounded copy of its image (stored_images.py), so a replica
        # of another model can embed it later; without, a model roll needs a re-upload.
        self.store_images = store_images
        self.thumbnails = Thumbnails()  # of stored images, for GET .../examples/{id}/image
        self.max_bulk_images = max_bulk_images  # uploads one bulk add may carry (bulk_add.py)
        self.deletion_listeners: list[Callable[[], None]] = []  # called after a deletion succeeds
        self.liveness_checks: list[Callable[[], bool]] = []  # all true while the process is alive
        self.unknown_rate = resolve_unknown_rate(unknown_rate)
        self.duplicate_similarity = duplicate_similarity
        self.open_set = OpenSetCalibrator(registry)
        self.reports = NamespaceReports(registry)
        self.decode_pool = decode_pool or DecodePool()
        self._batcher = DynamicBatcher(
            embedder.embed_array,
            batching or BatchConfig(max_batch_size=embedder.max_batch_size),
        )
        self._draining = threading.Event()
        # Classify's registry check beside its inference (classify_open_set); one thread per call
        # that may run at once is plenty: each holds its thread for about a Redis round trip.
        self._prefetch = ThreadPoolExecutor(max_workers=32, thread_name_prefix="classify-check")
        self.backfill: Backfiller = Backfiller(
            ModelStore(registry),
            embedder.model_id,
            lambda images, cancellation: self.embed(images, operation="backfill", cancellation=cancellation),
            **(backfill_options or {}),
        )

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    @property
    def batch_config(self) -> BatchConfig:
        return self._batcher.config

    def close(self) -> None:
        self.backfill.stop(wait=True)  # before the batcher it feeds
        self._prefetch.shutdown(wait=True)
        self._batcher.close()
        self.decode_pool.close()
        self.open_set.close()

    # -- inference ---------------------------------------------------------------------------

    def embed(
        self,
        images: Sequence[bytes],
        *,
        operation: str = "embed",
        cancellation: CancellationCheck | None = None,
    ) -> np.ndarray:
        """Encoded image files -> ``[N, D]`` L2-normalised float32 embeddings.

        Decoding runs in the bounded decode pool (Overloaded when its queue is full); a set
        ``cancellation`` stops the work at the next image or before the batcher runs it.
        """
        return self._start_embed(images, operation, cancellation, run_here_if_idle=True)()

    def _start_embed(
        self,
        images: Sequence[bytes],
        operation: str,
        cancellation: CancellationCheck | None,
        *,
        run_here_if_idle: bool = False,
        copies: list[bytes] | None = None,
    ) -> Callable[[], np.ndarray]:
        """Decode ``images`` and queue them for the model; returns the function that waits for
        the embeddings (see :meth:`DynamicBatcher.start`).

        All images decode before any reaches the model, so a request that fails or is cancelled
        part way costs no model run. (Queueing them a batch at a time as they decode gained a few
        per cent for a lone large Embed and nothing under load, as the cores are busy anyway:
        docs/benchmarks/code-notes.md.) ``run_here_if_idle``, for a caller that waits at
        once: when the returned function is called, a request of one part runs on this thread if
        the model is idle then (:meth:`DynamicBatcher.run_if_idle`), else it is queued. With
        ``copies`` (a list to fill), the same worker job also makes the images' stored copies.
        """
        started = time.perf_counter()
        pre, limits = self.embedder.meta.preprocess, self.embedder.limits
        try:
            with tracing.span("decode", **{"fewshot.images": len(images)}):
                if copies is None:
                    pixels = self.decode_pool.load_batch(images, pre, limits, cancellation)
                else:
                    pixels, stored = self.decode_pool.load_batch_and_copies(images, pre, limits, cancellation)
                    copies.extend(stored)
        except Cancelled:
            metrics.CANCELLED_REQUESTS.labels("decode").inc()
            raise
        metrics.PREPROCESS_SECONDS.observe(time.perf_counter() - started)
        metrics.IMAGES_TOTAL.labels(operation).inc(len(pixels))
        try:
            if run_here_if_idle:
                rows = functools.partial(self._run_here_or_queue, pixels, cancellation)
            else:
                rows = self._batcher.start(pixels, cancellation)
        except Cancelled:
            metrics.CANCELLED_REQUESTS.labels("queue").inc()
            raise

        def embeddings() -> np.ndarray:
            try:
                return rows()
            except Cancelled:
                metrics.CANCELLED_REQUESTS.labels("queue").inc()
                raise

        return embeddings

    def start_inference(
        self, pixels: np.ndarray, cancellation: CancellationCheck | None = None
    ) -> Callable[[], np.ndarray]:
        """Queue decoded ``pixels`` for the model; returns the function that waits for their
        rows (bulk_add.py queues one full batch while it decodes the next)."""
        try:
            return self._batcher.start(pixels, cancellation)
        except Cancelled:
            metrics.CANCELLED_REQUESTS.labels("queue").inc()
            raise

    def _run_here_or_queue(self, pixels: np.ndarray, cancellation: CancellationCheck | None) -> np.ndarray:
        rows = self._batcher.run_if_idle(pixels, cancellation)
        return rows if rows is not None else self._batcher.start(pixels, cancellation)()

    def classify(
        self,
        images: Sequence[bytes],
        namespace: str | None = None,
        top_k: int | None = 0,
        cancellation: CancellationCheck | None = None,
    ) -> list[list[Prediction]]:
        """Per image, the ``top_k`` classes of ``namespace`` by cosine similarity, best first."""
        return [r.predictions for r in self.classify_open_set(images, namespace, top_k, 0, cancellation)]

    def classify_open_set(
        self,
        images: Sequence[bytes],
        namespace: str | None = None,
        top_k: int | None = 0,
        unknown_rate: float | None = 0,
        cancellation: CancellationCheck | None = None,
    ) -> list[OpenSetResult]:
        """Per image: the ``top_k`` classes (with confidences) and whether it matches none of
        them; ``unknown_rate`` (0: the server's) is the share of known images flagged unknown."""
        namespace = resolve_namespace(namespace)
        top_k = resolve_top_k(top_k)
        unknown_rate = resolve_unknown_rate(unknown_rate, self.unknown_rate)
        if not self.registry.is_cached(namespace, self.model_id):
            # The prototypes first: a namespace we cannot answer for should not cost an inference.
            labeller = self.labeller(namespace, cancellation)
            embeddings = self.embed(images, operation="classify", cancellation=cancellation)
            return labeller(embeddings, top_k, unknown_rate)
        # A namespace this replica answered before: its freshness check (a Redis round trip, and a
        # patch if it changed) runs beside the inference instead of before it, so Classify costs an
        # Embed plus the top-k, not plus the round trip too (docs/benchmarks/registry-scale.md). With
        # batching on it runs on this thread while a batch worker runs the model (no hand-off to a
        # third thread); with batching off, the inference is this thread's, so the check gets one.
        if not self._batcher.config.enabled:
            pending = self._prefetch.submit(tracing.in_context(self.labeller), namespace, cancellation)
            embeddings = self.embed(images, operation="classify", cancellation=cancellation)
            return pending.result()(embeddings, top_k, unknown_rate)
        embeddings_when_ready = self._start_embed(images, "classify", cancellation)
        labeller = self.labeller(namespace, cancellation)
        return labeller(embeddings_when_ready(), top_k, unknown_rate)

    def labeller(
        self, namespace: str, cancellation: CancellationCheck | None = None
    ) -> Callable[[np.ndarray, int, float], list[OpenSetResult]]:
        """Everything Classify does beyond an Embed, for ``namespace``'s current state:
        (unit embeddings [N, D], top_k, unknown_rate) -> results (bench_registry_scale times it)."""
        with _registry_span("prototypes"):
            prototypes = self._prototypes(namespace, cancellation)
        calibration = self.open_set.calibration(namespace, prototypes)
        return functools.partial(label_images, prototypes.classifier, calibration)

    def _prototype_matrix(self, namespace: str) -> PrototypeMatrix:
        return self._prototypes(namespace, None).classifier

    def _prototypes(self, namespace: str, cancellation: CancellationCheck | None) -> PrototypeSet:
        """This model's prototypes of ``namespace``. The registry caches one ready matrix per
        namespace state and refuses (FailedPrecondition) an empty namespace; when this model
        lacks the embeddings of a few examples (added on a replica of another model), they are
        embedded here from their stored images first; of many, a background pass is started and
        the answer is ModelIncomplete with the progress."""
        from ..registry.registry import ModelIncompleteError

        try:
            return self.registry.prototypes(namespace, self.model_id)
        except ModelIncompleteError as exc:
            status = exc.status
        missing = status.examples - status.embedded
        record = self.backfill.store.last_record(namespace, self.model_id)
        if record is not None and record.generation == status.generation and missing <= record.without_image:
            # Nothing changed since a fill found that the rest has no stored image: answer at once,
            # without reading the namespace's classes again on every request.
            raise self._incomplete(namespace, status, missing)
        without_image = None
        if missing <= self.backfill.on_demand_limit:
            result = self.backfill.fill_on_demand(namespace, cancellation)
            if result is not None:
                without_image = result.without_image
                try:
                    return self.registry.prototypes(namespace, self.model_id)
                except ModelIncompleteError as again:  # still short: more came, or no images
                    status = again.status
        if without_image is None or status.examples - status.embedded > without_image:
            without_image = self._start_backfill(namespace, status)
        raise self._incomplete(namespace, status, without_image)

    def _start_backfill(self, namespace: str, status: NamespaceStatus) -> int:
        """Queue a background pass unless the last one found that the rest cannot be embedded;
        returns how many examples that pass found without a stored image."""
        record = self.backfill.store.last_record(namespace, self.model_id)
        without_image = record.without_image if record is not None else 0
        missing = status.examples - status.embedded
        if record is None or missing > record.without_image:
            self.backfill.request(namespace)
        return min(without_image, missing)

    def _incomplete(self, namespace: str, status: NamespaceStatus, without_image: int) -> ModelIncomplete:
        missing = status.examples - status.embedded
        backfilling = missing > without_image
        others = [m for m in self.registry.model_progress(namespace) if m.model_id != self.model_id]
        message = (
            f"namespace {namespace!r}: {status.embedded} of {status.examples} examples embedded "
            f"for model {self.model_id!r}, the model this server runs"
        )
        if backfilling:
            message += "; computing the rest from their stored images, retry shortly"
        if without_image:
            message += f"; {without_image} examples have no stored image: re-upload them (or delete them)"
        if others:
            held = ", ".join(f"{m.model_id!r} ({m.embedded} of {status.examples})" for m in others)
            message += f"; embeddings of other models: {held}"
        return ModelIncomplete(
            message,
            {
                "model_id": self.model_id,
                "embedded": status.embedded,
                "total": status.examples,
                "without_image": without_image,
                "backfilling": backfilling,
            },
        )

    # -- registry ----------------------------------------------------------------------------

    def add_examples(
        self,
        namespace: str | None,
        label: str,
        images: Sequence[bytes],
        cancellation: CancellationCheck | None = None,
    ) -> ClassReport:
        """Embed every image first, so one bad file adds nothing; then add them atomically.

        A request cancelled before its inference starts adds nothing.
        """
        namespace, label = resolve_namespace(namespace), resolve_label(label)
        # One decode job per upload: the model input and the stored copies share each image's budget.
        stored: list[bytes] | None = [] if self.store_images else None
        embeddings = self._start_embed(
            images, "add_examples", cancellation, run_here_if_idle=True, copies=stored
        )()
        # The content hashes let a later bulk import skip these same files (bulk_add.py).
        hashes = [content_hash(data) for data in images]
        with _registry_span("add_examples"):
            info = self.registry.add_examples(namespace, label, embeddings, self.model_id, stored, hashes)
        try:
            with _registry_span("example_snapshot"):
                snapshot, others = self._class_view(namespace, label)
        except Unavailable:  # the add is stored: answer it (without warnings) rather than a 503
            log.warning("added %d examples, but could not re-read the class for warnings", len(images))
            return ClassReport.of(info)
        if label not in snapshot.labels:  # deleted by another request in between
            return ClassReport.of(info)
        warnings = add_warnings(snapshot, label, info.added_example_ids, self.duplicate_similarity, others)
        return ClassReport.of(info, warnings=warnings)

    def _class_view(self, namespace: str, label: str) -> tuple[ExampleSnapshot, PrototypeMatrix | None]:
        """What the shot-quality judgements of ``label`` read: its own examples and mean, and the
        other classes as this replica's synced prototype matrix (brought up to the state read
        after the caller's write, by a patch of the classes changed since its last sync: O(changed),
        not O(namespace); docs/open-set.md). Where the replica cannot hold that matrix (the model
        has not embedded every example yet; the namespace just emptied) the snapshot reads every
        prototype instead, as before."""
        try:
            others: PrototypeMatrix | None = self.registry.prototypes(namespace, self.model_id).classifier
        except FailedPrecondition:  # ModelIncompleteError included; the backfill is Classify's to start
            others = None
        snapshot = self.registry.example_snapshot(
            namespace, only_labels=[label], only_their_means=others is not None, model_id=self.model_id
        )
        return snapshot, others

    def add_examples_bulk(
        self,
        namespace: str | None,
        labels: Sequence[str],
        images: Sequence[bytes],
        cancellation: CancellationCheck | None = None,
    ) -> BulkReport:
        """``images[i]`` as an example of ``labels[i]``, many classes at once, skipping bytes a
        class already holds (bulk_add.py)."""
        from .bulk_add import add_examples_bulk

        return add_examples_bulk(self, namespace, labels, images, self.max_bulk_images, cancellation)

    def list_classes(self, namespace: str | None = None) -> list[ClassSummary]:
        namespace = resolve_namespace(namespace)
        with _registry_span("list_classes"):
            return self.registry.list_classes(namespace)

    def list_classes_page(
        self,
        namespace: str | None = None,
        limit: int | None = 0,
        cursor: str | None = None,
        query: str | None = None,
    ) -> tuple[list[ClassSummary], str | None]:
        """One page of the classes by label (class_pages.py) and the next page's cursor."""
        namespace, limit = resolve_namespace(namespace), resolve_limit(limit)
        after = decode_cursor(cursor) if cursor else None  # refused before Redis is asked
        matches = label_matcher(query) if query else None
        found, last = self.registry.class_page(namespace, after, limit, matches=matches)
        return found, None if last is None else encode_cursor(last)

    def get_class(self, namespace: str | None, label: str) -> ClassReport:
        """The class's example ids, and how well each example fits it (leave-one-out)."""
        namespace, label = resolve_namespace(namespace), resolve_label(label)
        with _registry_span("get_class"):
            info = self.registry.get_class(namespace, label)
            snapshot, others = self._class_view(namespace, label)
        if label not in snapshot.labels:  # deleted by another request in between
            return ClassReport.of(info)
        quality = example_quality(snapshot, label, others, duplicate_similarity=self.duplicate_similarity)
        return ClassReport.of(info, examples=quality)

    def class_confusions(self, namespace: str | None, label: str, top_k: int | None = 0) -> list[Confusion]:
        """The ``top_k`` classes ``label`` is most easily confused with, most similar first."""
        namespace, label = resolve_namespace(namespace), resolve_label(label)
        top_k = resolve_top_k(top_k)
        with _registry_span("example_snapshot"):
            snapshot, others = self._class_view(namespace, label)
        if label not in snapshot.labels:
            raise NotFound(f"no class {label!r} in namespace {namespace!r}")
        return confusions(snapshot, label, top_k, others)

    def example_image(self, namespace: str | None, label: str, example_id: str) -> StoredImage:
        """The stored copy of an example's image; NotFound for an example stored without one."""
        namespace, label, example_id = (
            resolve_namespace(namespace),
            resolve_label(label),
            resolve_example_id(example_id),
        )
        with _registry_span("example_image"):
            data = self.registry.example_image(namespace, label, example_id)
        if not data:
            raise NotFound(
                f"example {example_id!r} of class {label!r} in namespace {namespace!r} has no stored "
                "image: it was added while the server ran with --no-store-images (or before images "
                "were stored)"
            )
        return StoredImage.of(data)

    def report(self, namespace: str | None, cancellation: CancellationCheck | None = None) -> NamespaceReport:
        """Will the namespace's classes work: per-class leave-one-out accuracy, the most confused
        pairs, classes needing more or cleaner shots, the expected accuracy (classify/report.py),
        from a bounded sample of its examples (core/reports.py)."""
        namespace = resolve_namespace(namespace)
        with _registry_span("prototypes"):
            prototypes = self._prototypes(namespace, cancellation)
        with _registry_span("report"):
            return self.reports.report(namespace, prototypes)

    def delete_class(self, namespace: str | None, label: str) -> None:
        namespace, label = resolve_namespace(namespace), resolve_label(label)
        with _registry_span("delete_class"):
            self.registry.delete_class(namespace, label)
        self._deleted()

    def delete_example(self, namespace: str | None, label: str, example_id: str) -> ClassReport | None:
        """The class as it is after the deletion, or None when that was its last example."""
        namespace, label, example_id = (
            resolve_namespace(namespace),
            resolve_label(label),
            resolve_example_id(example_id),
        )
        with _registry_span("delete_example"):
            info = self.registry.delete_example(namespace, label, example_id)
        self._deleted()
        return None if info is None else ClassReport.of(info)

    def _deleted(self) -> None:
        """Tell :attr:`deletion_listeners` (the embedded Valkey compacts its append-only file,
        which would otherwise keep the deleted images' bytes)."""
        for listener in self.deletion_listeners:
            listener()

    def list_namespaces(self) -> list[NamespaceSummary]:
        """Every namespace holding classes, with class and example counts and its model."""
        with _registry_span("list_namespaces"):
            return self.registry.list_namespaces()

    def delete_namespace(self, namespace: str | None) -> DeletedNamespace:
        """Remove a namespace with all its classes and examples, atomically."""
        namespace = resolve_namespace(namespace)
        with _registry_span("delete_namespace"):
            deleted = self.registry.delete_namespace(namespace)
        self._deleted()
        return deleted

    # -- models ------------------------------------------------------------------------------

    def backfill_incomplete_namespaces(self, sweep_every_s: float = 0.0) -> None:
        """Start embedding, in the background, every namespace this model has not fully
        embedded (a replica of a newly rolled model warms up before its first Classify); with
        ``sweep_every_s``, look again that often (a pass whose replica died is resumed)."""
        self.backfill.request_incomplete(self._namespaces_to_backfill)
        if sweep_every_s > 0:
            self.backfill.sweep_every(sweep_every_s, self._namespaces_to_backfill)

    def _namespaces_to_backfill(self) -> list[str]:
        """Namespaces this model has not fully embedded, less those whose last pass found that
        the rest has no stored image (nothing changed since: another pass cannot help)."""
        names = []
        for summary in self.registry.list_namespaces():
            if any(m.model_id == self.model_id and m.complete for m in summary.models):
                continue
            status = self.registry.status(summary.name, self.model_id)
            record = self.backfill.store.last_record(summary.name, self.model_id)
            if (
                record is not None
                and record.generation == status.generation
                and (status.examples - status.embedded <= record.without_image)
            ):
                continue
            names.append(summary.name)
        return names

    def drop_model(self, model_id: str, namespaces: Sequence[str], *, force: bool = False) -> dict[str, int]:
        """Forget ``model_id``'s embeddings in ``namespaces`` (examples and images stay): for a
        model no replica serves any more. Refused for the model this server runs, and (unless
        ``force``) for a model a live server announces (heartbeats.py): it would answer 409 to
        every Classify until it had embedded everything again."""
        from ..registry.heartbeats import live_servers

        model_id = resolve_name(model_id, "model id")
        if model_id == self.model_id:
            raise FailedPrecondition(
                f"model {model_id!r} is the model this server runs: drop it from a server of another model"
            )
        live = live_servers(self.registry.client, self.registry.key_prefix, model_id)
        if live and not force:
            raise FailedPrecondition(
                f"model {model_id!r} is served by {len(live)} live server(s) ({', '.join(live)}): "
                "stop them first, or force the drop (force=true)"
            )
        return {namespace: self.backfill.store.drop(namespace, model_id) for namespace in namespaces}

    # -- health ------------------------------------------------------------------------------

    def begin_draining(self) -> None:
        """Shutdown has begun: report not ready (so load balancers move away); calls still work.
        The background backfill stops after its current batch (its lease released)."""
        self._draining.set()
        self.backfill.stop(wait=False)

    def ready(self) -> bool:
        """Model loaded (it is, once constructed), Redis answering, and not shutting down. Reads
        the cached Redis probe where there is one (redis_health.py): answers at once."""
        if self._draining.is_set() or not self.alive():
            return False
        try:
            return self.registry.reachable()
        except Exception:  # a health probe reports, it never raises
            return False

    def alive(self) -> bool:
        """Liveness: no part of the server has failed for good (e.g. its embedded Redis could
        not be restarted). Never touches Redis; false means only a restart of the process helps."""
        return all(check() for check in self.liveness_checks)


@contextmanager
def _registry_span(operation: str) -> Iterator[object]:
    """A ``registry`` span (Redis round trips, prototype builds) of the current request, whose
    Redis commands share one ``--redis-timeout-s`` in total however many registry calls it makes."""
    with tracing.span("registry", **{"fewshot.registry_op": operation}) as span, redis_time_budget():
        yield span
