"""The few-shot registry: classes, their examples (with a stored image each) and, per model id,
the examples' embeddings and the class prototypes, kept in Redis (layout: :mod:`keys`).

The examples are the namespace's; embeddings are a model's. A replica of model ``m`` classifies
with ``m``'s prototypes once ``m`` has embedded every example (it is *complete*); until then
:meth:`Registry.prototypes` raises :class:`ModelIncompleteError` with the progress, and the core
fills the gap from the stored images (:mod:`backfill`).

:class:`Registry` is a facade over one part per job, sharing one :class:`store.Store`:

- :mod:`writes`: adds and deletes, each one Lua script (atomic);
- :mod:`reads`: classes, pages of them, models, state, the namespaces;
- :mod:`prototype_cache`: this replica's prototype matrices, patched from the change log;
- :mod:`snapshots`: example embeddings as of one state;
- :mod:`migration`: namespaces of the layout before per-model keys, moved on first touch.

Namespaces are listed by SCAN over ``{prefix}:{ns:*}:state`` (every node of a Cluster), not from
a set of names: such a set would live outside the namespaces' hash tags, so no script could keep
it in step on a Cluster. SCAN costs a pass over the keyspace, which an admin call can afford.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import numpy as np
import redis

from ..classify.prototypes import ScanStats
from ..classify.snapshot import ExampleSnapshot, PrototypeSet
from .keys import NamespaceKeys
from .migration import Migration
from .prototype_cache import MAX_PATCHED_CLASSES, PrototypeCache, SyncStats
from .reads import Reads
from .redis_client import CLUSTER_ERRORS, RedisClient
from .redis_health import health_of
from .snapshots import Snapshots
from .store import (
    DEFAULT_CHANGE_LOG_SIZE,
    DEFAULT_MAX_EXAMPLES_PER_CLASS,
    MAX_EMBEDDING_DIM,
    Store,
)
from .types import (
    ClassInfo,
    ClassSummary,
    DeletedNamespace,
    ModelCompleteness,
    ModelIncompleteError,
    NamespaceStatus,
    NamespaceSummary,
)
from .writes import Writes

__all__ = [
    "DEFAULT_CHANGE_LOG_SIZE",
    "DEFAULT_MAX_EXAMPLES_PER_CLASS",
    "MAX_EMBEDDING_DIM",
    "MAX_PATCHED_CLASSES",
    "ClassInfo",
    "ClassSummary",
    "DeletedNamespace",
    "ModelCompleteness",
    "ModelIncompleteError",
    "NamespaceStatus",
    "NamespaceSummary",
    "Registry",
    "SyncStats",
]


class Registry:
    """Classes, examples and per-model prototypes per namespace; safe to share between threads
    and replicas."""

    def __init__(
        self,
        client: RedisClient,
        *,
        key_prefix: str = "fewshot",
        max_examples_per_class: int = DEFAULT_MAX_EXAMPLES_PER_CLASS,
        change_log_size: int = DEFAULT_CHANGE_LOG_SIZE,
    ) -> None:
        self.store = Store(client, key_prefix, max_examples_per_class, change_log_size)
        self.migration = Migration(self.store)
        self.reads = Reads(self.store, self.migration)
        self.prototype_cache = PrototypeCache(self.store, self.reads)
        self.writes = Writes(self.store, self.migration, self.prototype_cache.forget)
        self.snapshots = Snapshots(self.store, self.migration, self.reads)

    # -- what the parts share --------------------------------------------------------------------

    @property
    def client(self) -> RedisClient:
        return self.store.client

    @property
    def key_prefix(self) -> str:
        return self.store.prefix

    @property
    def max_examples_per_class(self) -> int:
        return self.store.max_examples_per_class

    @property
    def change_log_size(self) -> int:
        return self.store.change_log_size

    @property
    def sync_stats(self) -> SyncStats:
        return self.prototype_cache.sync_stats

    @property
    def scan_stats(self) -> ScanStats:
        return self.prototype_cache.scan_stats

    def keys(self, namespace: str) -> NamespaceKeys:
        return self.store.keys(namespace)

    def reachable(self) -> bool:
        """Redis answers: the background probe's last answer where there is one, else a PING."""
        health = health_of(self.client)
        return health.reachable if health is not None else self.ping()

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except (redis.exceptions.RedisError, *CLUSTER_ERRORS):
            return False

    # -- writes (writes.py) ----------------------------------------------------------------------

    def add_examples(
        self,
        namespace: str,
        label: str,
        embeddings: np.ndarray,
        model_id: str,
        images: Sequence[bytes] | None = None,
        hashes: Sequence[str] | None = None,
    ) -> ClassInfo:
        return self.writes.add_examples(namespace, label, embeddings, model_id, images, hashes)

    def add_classes(
        self, namespace: str, classes: dict[str, np.ndarray], model_id: str, *, chunk: int = 1000
    ) -> None:
        self.writes.add_classes(namespace, classes, model_id, chunk=chunk)

    def delete_class(self, namespace: str, label: str) -> None:
        self.writes.delete_class(namespace, label)

    def delete_example(self, namespace: str, label: str, example_id: str) -> ClassInfo | None:
        return self.writes.delete_example(namespace, label, example_id)

    def delete_namespace(self, namespace: str) -> DeletedNamespace:
        return self.writes.delete_namespace(namespace)

    # -- reads (reads.py) ------------------------------------------------------------------------

    def list_classes(self, namespace: str) -> list[ClassSummary]:
        return self.reads.list_classes(namespace)

    def class_page(
        self,
        namespace: str,
        after: str | None,
        limit: int,
        *,
        prefix: str = "",
        matches: Callable[[str], bool] | None = None,
    ) -> tuple[list[ClassSummary], str | None]:
        return self.reads.class_page(namespace, after, limit, prefix=prefix, matches=matches)

    def get_class(self, namespace: str, label: str) -> ClassInfo:
        return self.reads.get_class(namespace, label)

    def example_image(self, namespace: str, label: str, example_id: str) -> bytes:
        return self.reads.example_image(namespace, label, example_id)

    def models(self, namespace: str) -> dict[str, int]:
        return self.reads.models(namespace)

    def model_progress(self, namespace: str) -> list[ModelCompleteness]:
        return self.reads.model_progress(namespace)

    def list_namespaces(self) -> list[NamespaceSummary]:
        return self.reads.list_namespaces()

    def generation(self, namespace: str) -> int:
        return self.reads.generation(namespace)

    def status(self, namespace: str, model_id: str) -> NamespaceStatus:
        return self.reads.status(namespace, model_id)

    # -- this replica's prototypes (prototype_cache.py) ------------------------------------------

    def is_cached(self, namespace: str, model_id: str) -> bool:
        return self.prototype_cache.is_cached(namespace, model_id)

    def prototypes(self, namespace: str, expected_model_id: str | None = None) -> PrototypeSet:
        return self.prototype_cache.prototypes(namespace, expected_model_id)

    # -- snapshots (snapshots.py) ----------------------------------------------------------------

    def example_snapshot(
        self,
        namespace: str,
        max_per_class: int | None = None,
        only_labels: Collection[str] | None = None,
        only_their_means: bool = False,
        model_id: str | None = None,
    ) -> ExampleSnapshot:
        return self.snapshots.example_snapshot(
            namespace, max_per_class, only_labels, only_their_means, model_id
        )

    # -- the old layout (migration.py) -----------------------------------------------------------

    def ensure_layout(self, namespace: str) -> None:
        """Migrate ``namespace`` first if it is still in the old layout (once per replica)."""
        self.migration.ensure_layout(namespace)
