"""The few-shot registry: classes, their examples (with a stored image each) and, per model id,
the examples' embeddings and the class prototypes, kept in Redis (layout: :mod:`registry_keys`).

The examples are the namespace's; embeddings are a model's. A replica of model ``m`` classifies
with ``m``'s prototypes once ``m`` has embedded every example (it is *complete*); until then
:meth:`Registry.prototypes` raises :class:`ModelIncomplete` with the progress, and the core fills
the gap from the stored images (:mod:`backfill`). Writes are Lua scripts (atomic); each replica
caches one ready :class:`PrototypeSet` per (namespace, model) and revalidates it with one HMGET
of the namespace's state per request (epoch, generation, and the example and embedded counts),
so a change is seen by every replica on its next request. A replica that is behind fetches only
the classes changed since its generation (changes_since.lua) and patches its matrix; it reloads
everything only when the epoch changed or the change log no longer reaches back. A change of any
model's prototypes bumps the generation and logs the label, so this works per model.

Namespaces are listed by SCAN over ``{prefix}:{ns:*}:state`` (every node of a Cluster), not from
a set of names: such a set would live outside the namespaces' hash tags, so no script could keep
it in step on a Cluster. SCAN costs a pass over the keyspace, which an admin call can afford.
"""

from __future__ import annotations

import bisect
import logging
import threading
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import redis
from redis.cluster import RedisCluster

from fewshot_common.errors import FailedPrecondition, InvalidInput, NotFound, Unavailable
from fewshot_common.vectors import l2_normalize

from ..classify.prototypes import PrototypeMatrix, ScanStats
from ..classify.snapshot import ExampleSnapshot, PrototypeSet
from .keys import (
    REFUSED,
    NamespaceKeys,
    decode,
    encode,
    load_script,
    namespace_of_state_key,
    redis_errors,
    script_code,
    state_key_pattern,
    text,
)
from .redis_client import CLUSTER_ERRORS, RedisClient
from .redis_health import health_of

log = logging.getLogger(__name__)

# Lua's unpack() passes each float on the C stack (about 8,000 slots); far above any ViT width.
MAX_EMBEDDING_DIM = 4096
DEFAULT_MAX_EXAMPLES_PER_CLASS = 1000
# Labels the change log keeps per namespace (~100 bytes each in Redis): a replica further behind
# than this many distinct changed classes reloads the namespace in full.
DEFAULT_CHANGE_LOG_SIZE = 10_000
# Beyond this many changed classes one full reload is cheaper than patching (and Lua's unpack()
# of the labels stays far below its C stack limit).
MAX_PATCHED_CLASSES = 4096
_FLOAT32_LE = np.dtype("<f4")
# A script refused because the models or classes changed under it reads them again; this often.
_SCRIPT_ATTEMPTS = 5
T = TypeVar("T")


@dataclass(frozen=True)
class ClassSummary:
    label: str
    count: int


@dataclass(frozen=True)
class ModelCompleteness:
    model_id: str
    embedded: int  # examples of the namespace this model has an embedding of
    complete: bool


@dataclass(frozen=True)
class NamespaceSummary:
    name: str
    class_count: int
    example_count: int
    models: list[ModelCompleteness] = field(default_factory=list)  # most embedded first

    @property
    def model_id(self) -> str | None:
        """The model with the most embeddings here (the only one, before any model roll)."""
        return self.models[0].model_id if self.models else None


@dataclass(frozen=True)
class DeletedNamespace:
    name: str
    class_count: int
    example_count: int


@dataclass(frozen=True)
class ClassInfo:
    label: str
    count: int
    example_ids: list[str]
    # Only set by add_examples: the ids given to this call's examples, in request order.
    added_example_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class NamespaceStatus:
    """One namespace's state as one HMGET read it, for one model."""

    epoch: str
    generation: int
    examples: int  # the namespace's examples
    embedded: int  # how many of them the model has embedded

    @property
    def version(self) -> tuple[str, int]:
        return self.epoch, self.generation

    @property
    def complete(self) -> bool:
        return self.embedded >= self.examples


class SyncStats:
    """How a replica caught up with Redis (tests, benchmarks): ``full`` reloads and ``patch``es of
    the changed classes. Counted by request threads, hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {"full": 0, "patch": 0}

    def add(self, how: str) -> None:
        with self._lock:
            self._counts[how] += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class ModelIncompleteError(FailedPrecondition):
    """Raised by :meth:`Registry.prototypes`: the model lacks embeddings of some examples.
    The core turns it into :class:`fewshot_common.errors.ModelIncomplete` with the whole story."""

    def __init__(self, namespace: str, model_id: str, status: NamespaceStatus) -> None:
        super().__init__(
            f"namespace {namespace!r}: {status.embedded} of {status.examples} examples embedded "
            f"for model {model_id!r}"
        )
        self.namespace, self.model_id, self.status = namespace, model_id, status


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
        if max_examples_per_class <= 0:
            raise ValueError(f"max_examples_per_class must be positive, got {max_examples_per_class}")
        if change_log_size <= 0:
            raise ValueError(f"change_log_size must be positive, got {change_log_size}")
        self.max_examples_per_class = max_examples_per_class
        self.change_log_size = change_log_size
        self.sync_stats = SyncStats()
        self.scan_stats = ScanStats()  # how this replica's int8 copies answered
        if not key_prefix or "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must be non-empty and free of '{' and '}' (the hash tag)")
        self.client = client
        self._prefix = key_prefix
        self._add = client.register_script(load_script("add_examples.lua"))
        self._delete_class = client.register_script(load_script("delete_class.lua"))
        self._delete_example = client.register_script(load_script("delete_example.lua"))
        self._changes_since = client.register_script(load_script("changes_since.lua", prelude=False))
        self._delete_namespace = client.register_script(load_script("delete_namespace.lua"))
        self._migrate = client.register_script(load_script("migrate_layout.lua"))
        self._cache: dict[tuple[str, str], PrototypeSet] = {}
        self._cache_lock = threading.Lock()
        # One sync per (namespace, model) at a time: requests that find it stale wait for it.
        self._sync_locks: dict[tuple[str, str], threading.Lock] = {}
        # Namespaces this replica has seen in the current layout (a migration is once per namespace).
        self._current_layout: set[str] = set()

    @property
    def key_prefix(self) -> str:
        return self._prefix

    def keys(self, namespace: str) -> NamespaceKeys:
        return NamespaceKeys(self._prefix, namespace)

    def reachable(self) -> bool:
        """Redis answers: the background probe's last answer where there is one, else a PING."""
        health = health_of(self.client)
        return health.reachable if health is not None else self.ping()

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except (redis.exceptions.RedisError, *CLUSTER_ERRORS):
            return False

    # -- writes --------------------------------------------------------------------------------

    def add_examples(
        self,
        namespace: str,
        label: str,
        embeddings: np.ndarray,
        model_id: str,
        images: Sequence[bytes] | None = None,
    ) -> ClassInfo:
        """Store ``embeddings`` [n, D] of ``model_id`` as new examples of ``label``, all or none,
        each with its stored image (``images``, parallel; none: stored without, so another model
        can never embed them).

        Refused (FailedPrecondition) when the class would exceed ``max_examples_per_class``.
        """
        keys = self.keys(namespace)
        if not model_id:
            raise InvalidInput("model_id must not be empty")
        vectors = self._check_embeddings(embeddings)
        args = self._add_args(label, model_id, vectors, images)
        self._ensure_layout(namespace)
        with redis_errors(self.client):
            try:
                reply = self._run_migrating(
                    namespace,
                    lambda: self._add(keys=self._add_keys(keys, label, model_id), args=args),
                )
            except redis.exceptions.ResponseError as exc:
                raise self._script_error(exc, namespace, label, model_id, adding=len(vectors)) from None
            example_ids = self._example_ids(keys, label)
        _generation, count, *added = reply
        return ClassInfo(
            label=label,
            count=int(count),
            example_ids=example_ids,
            added_example_ids=[text(i) for i in added],
        )

    def _add_args(
        self, label: str, model_id: str, vectors: np.ndarray, images: Sequence[bytes] | None
    ) -> list[object]:
        if images is not None and len(images) != len(vectors):
            raise InvalidInput(f"{len(images)} stored images for {len(vectors)} embeddings")
        pairs: list[object] = []
        for i, row in enumerate(vectors):
            pairs += [row.astype(_FLOAT32_LE).tobytes(), images[i] if images is not None else b""]
        return [
            encode(label),
            model_id,
            vectors.shape[1],
            uuid.uuid4().hex,
            self.max_examples_per_class,
            self.change_log_size,
            *pairs,
        ]

    @staticmethod
    def _add_keys(keys: NamespaceKeys, label: str, model_id: str) -> list[str]:
        return [
            keys.state,
            keys.counts,
            keys.models,
            keys.changes,
            keys.images(label),
            *keys.model(model_id).for_class(label),
        ]

    def add_classes(
        self, namespace: str, classes: dict[str, np.ndarray], model_id: str, *, chunk: int = 1000
    ) -> None:
        """Bulk load: ``label -> embeddings [n, D]`` (no stored images) through the same script
        as :meth:`add_examples`, pipelined ``chunk`` classes per round trip; no ids are returned.

        Not atomic as a whole (each class is); a refusal raises after the chunks before it landed.
        redis-py's cluster pipeline refuses scripts, so on a Cluster it is one round trip a class.
        """
        keys = self.keys(namespace)
        if not model_id:
            raise InvalidInput("model_id must not be empty")
        items = [(label, self._check_embeddings(vectors)) for label, vectors in classes.items()]
        self._ensure_layout(namespace)
        pipelined = not isinstance(self.client, RedisCluster)
        for start in range(0, len(items), chunk if pipelined else 1):
            batch = items[start : start + chunk] if pipelined else items[start : start + 1]
            with redis_errors(self.client):
                runner = self.client.pipeline(transaction=False) if pipelined else self.client
                replies: list[object] = []
                for label, vectors in batch:
                    args = self._add_args(label, model_id, vectors, None)
                    try:
                        replies.append(
                            self._add(keys=self._add_keys(keys, label, model_id), args=args, client=runner)
                        )
                    except redis.exceptions.ResponseError as exc:
                        replies.append(exc)
                if pipelined:
                    # Errors as values: redis-py's raised form quotes the command, keys included.
                    replies = runner.execute(raise_on_error=False)  # type: ignore[union-attr]
            for (label, vectors), reply in zip(batch, replies):
                if isinstance(reply, redis.exceptions.ResponseError):
                    raise self._script_error(reply, namespace, label, model_id, adding=len(vectors))

    def delete_class(self, namespace: str, label: str) -> None:
        keys = self.keys(namespace)
        self._ensure_layout(namespace)
        try:
            self._with_models(
                namespace,
                lambda models: self._delete_class(
                    keys=keys.for_class(label, models), args=[encode(label), self.change_log_size, *models]
                ),
            )
        except redis.exceptions.ResponseError as exc:
            raise self._script_error(exc, namespace, label) from None

    def delete_example(self, namespace: str, label: str, example_id: str) -> ClassInfo | None:
        """Remove one example (its image and every model's embedding of it); returns the class as
        it is now, or None if that was its last."""
        keys = self.keys(namespace)
        self._ensure_layout(namespace)
        try:
            _, count = self._with_models(
                namespace,
                lambda models: self._delete_example(
                    keys=keys.for_class(label, models),
                    args=[encode(label), example_id, self.change_log_size, *models],
                ),
            )
        except redis.exceptions.ResponseError as exc:
            raise self._script_error(exc, namespace, label, example_id=example_id) from None
        if int(count) == 0:
            return None
        with redis_errors(self.client):
            example_ids = self._example_ids(keys, label)
        return ClassInfo(label=label, count=len(example_ids), example_ids=example_ids)

    def _with_models(self, namespace: str, run: Callable[[list[str]], T]) -> T:
        """``run(model ids)`` with the namespace's current models, again when a script answers
        CHANGED (a model came or went in between) or LEGACY (migrated first)."""
        keys = self.keys(namespace)
        for _attempt in range(_SCRIPT_ATTEMPTS):
            with redis_errors(self.client):
                models = sorted(text(m) for m in self.client.hkeys(keys.models))
                try:
                    return run(models)
                except redis.exceptions.ResponseError as exc:
                    if script_code(exc) == "CHANGED":
                        continue
                    if script_code(exc) == "LEGACY":
                        self._migrate_namespace(namespace)
                        continue
                    raise
        raise Unavailable(f"namespace {namespace!r} kept changing; retry later")

    def _run_migrating(self, namespace: str, run: Callable[[], T]) -> T:
        """``run()``, again once after migrating when a script finds the namespace's old layout."""
        try:
            return run()
        except redis.exceptions.ResponseError as exc:
            if script_code(exc) != "LEGACY":
                raise
        self._migrate_namespace(namespace)
        return run()

    # -- reads ---------------------------------------------------------------------------------

    def list_classes(self, namespace: str) -> list[ClassSummary]:
        keys = self.keys(namespace)
        with redis_errors(self.client):
            counts = self.client.hgetall(keys.counts)  # the same field in both layouts
        summaries = [ClassSummary(decode(f), int(c)) for f, c in counts.items()]
        return sorted(summaries, key=lambda s: s.label)

    def class_page(
        self, namespace: str, after: str | None, limit: int
    ) -> tuple[list[ClassSummary], str | None]:
        """Up to ``limit`` classes by label after ``after``, and the label the next page starts
        after (None: this is the last page).

        Only the page's labels are decoded and only its counts read: the fields are hex of the
        labels' UTF-8, which sorts as the labels do (code point order), so the cursor is found by
        bisection among the raw fields. Still one HKEYS of the namespace (no index of labels in
        Redis). A class deleted between the two reads is left out of the page."""
        keys = self.keys(namespace)
        with redis_errors(self.client):
            fields = sorted(self.client.hkeys(keys.counts))
            start = bisect.bisect_right(fields, encode(after).encode()) if after else 0
            chosen = fields[start : start + limit]
            counts = self.client.hmget(keys.counts, chosen) if chosen else []
        found = [ClassSummary(decode(f), int(c)) for f, c in zip(chosen, counts) if c is not None]
        return found, decode(chosen[-1]) if start + limit < len(fields) else None

    def get_class(self, namespace: str, label: str) -> ClassInfo:
        keys = self.keys(namespace)
        self._ensure_layout(namespace)
        with redis_errors(self.client):
            example_ids = self._example_ids(keys, label)
        if not example_ids:
            raise NotFound(f"no class {label!r} in namespace {namespace!r}")
        return ClassInfo(label=label, count=len(example_ids), example_ids=example_ids)

    def example_image(self, namespace: str, label: str, example_id: str) -> bytes:
        """The stored copy of one example's image: b"" when it was stored without one
        (``--no-store-images``, or migrated from the layout before stored images)."""
        keys = self.keys(namespace)
        self._ensure_layout(namespace)
        with redis_errors(self.client):
            pipe = self.client.pipeline(transaction=False)
            pipe.hget(keys.images(label), example_id)
            pipe.exists(keys.images(label))
            stored, class_exists = pipe.execute()
        if stored is None:
            if not class_exists:
                raise NotFound(f"no class {label!r} in namespace {namespace!r}")
            raise NotFound(f"class {label!r} in namespace {namespace!r} has no example {example_id!r}")
        return bytes(stored)

    def models(self, namespace: str) -> dict[str, int]:
        """Model id -> embedding dim, for every model holding embeddings in ``namespace``."""
        self._ensure_layout(namespace)
        with redis_errors(self.client):
            raw = self.client.hgetall(self.keys(namespace).models)
        return {text(k): int(v) for k, v in raw.items()}

    def model_progress(self, namespace: str) -> list[ModelCompleteness]:
        """Each model's embedded count in ``namespace``, most embedded first (one MULTI)."""
        self._ensure_layout(namespace)
        keys = self.keys(namespace)
        with redis_errors(self.client):
            pipe = self.client.pipeline(transaction=True)
            pipe.hkeys(keys.models)
            pipe.hgetall(keys.state)
            models, state = pipe.execute()
        return _progress(models, state)

    def list_namespaces(self) -> list[NamespaceSummary]:
        """Every namespace that holds classes, by name, with its counts and per-model progress."""
        pattern = state_key_pattern(self._prefix)
        with redis_errors(self.client):
            names = sorted(
                {
                    namespace_of_state_key(self._prefix, key)
                    for key in self.client.scan_iter(match=pattern, count=1000)
                }
            )
        for name in names:
            self._ensure_layout(name)
        with redis_errors(self.client):
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                keys = self.keys(name)
                pipe.hvals(keys.counts)
                pipe.hkeys(keys.models)
                pipe.hgetall(keys.state)
            replies = pipe.execute() if names else []
        summaries = []
        for i, name in enumerate(names):
            counts, models, state = replies[3 * i : 3 * i + 3]
            if not counts:  # a namespace whose classes were all deleted keeps only its state
                continue
            summaries.append(
                NamespaceSummary(name, len(counts), sum(int(c) for c in counts), _progress(models, state))
            )
        return summaries

    def delete_namespace(self, namespace: str) -> DeletedNamespace:
        """Remove every class, example, image, model embedding and the state of ``namespace`` in
        one script (atomic); NotFound when it holds no classes. Replicas drop their copy on their
        next request: the state (epoch) is gone, and a later add starts a new one."""
        keys = self.keys(namespace)
        self._ensure_layout(namespace)
        for _attempt in range(_SCRIPT_ATTEMPTS):
            with redis_errors(self.client):
                pipe = self.client.pipeline(transaction=True)
                pipe.hkeys(keys.counts)
                pipe.hkeys(keys.models)
                raw_fields, raw_models = pipe.execute()
                fields, models = [text(f) for f in raw_fields], sorted(text(m) for m in raw_models)
                if not fields:
                    raise NotFound(f"no namespace {namespace!r} (it holds no classes)")
                labels = [decode(f) for f in fields]
                script_keys = [
                    keys.state,
                    keys.counts,
                    keys.models,
                    keys.changes,
                    *(keys.images(label) for label in labels),
                ]
                for model in models:
                    mk = keys.model(model)
                    script_keys += [
                        mk.counts,
                        mk.prototypes,
                        mk.sums,
                        mk.lease,
                        mk.backfill,
                        *(mk.examples(label) for label in labels),
                    ]
                try:
                    classes, examples = self._delete_namespace(
                        keys=script_keys, args=[len(fields), *fields, *models]
                    )
                except redis.exceptions.ResponseError as exc:
                    if script_code(exc) == "CHANGED":
                        continue  # a class or model came or went between the read and the script
                    raise Unavailable(REFUSED, detail=f"Redis: {exc}") from None
            with self._cache_lock:  # free this replica's matrices now; others on their next request
                for key in [k for k in self._cache if k[0] == namespace]:
                    del self._cache[key]
            return DeletedNamespace(namespace, int(classes), int(examples))
        raise Unavailable(f"namespace {namespace!r} kept changing while being deleted; retry later")

    def generation(self, namespace: str) -> int:
        """The namespace's change counter: one cheap round trip."""
        keys = self.keys(namespace)
        with redis_errors(self.client):
            return int(self.client.hget(keys.state, "generation") or 0)

    def status(self, namespace: str, model_id: str) -> NamespaceStatus:
        """Epoch, generation, example count and ``model_id``'s embedded count: one HMGET (a
        namespace still in the old layout is migrated first, once)."""
        keys = self.keys(namespace)
        for _attempt in range(2):
            with redis_errors(self.client):
                epoch, generation, layout, examples, embedded = self.client.hmget(
                    keys.state, "epoch", "generation", "layout", "examples", f"n:{model_id}"
                )
            if epoch is None or layout is not None:
                return NamespaceStatus(
                    text(epoch or b""), int(generation or 0), int(examples or 0), int(embedded or 0)
                )
            self._migrate_namespace(namespace)
        raise Unavailable(f"namespace {namespace!r} could not be migrated; retry later")

    def is_cached(self, namespace: str, model_id: str) -> bool:
        """Whether this replica holds a matrix of ``namespace`` under ``model_id`` (maybe stale)."""
        with self._cache_lock:
            return (namespace, model_id) in self._cache

    def prototypes(self, namespace: str, expected_model_id: str | None = None) -> PrototypeSet:
        """The namespace's prototype matrix under ``expected_model_id`` (None: the namespace's
        only model), from this replica's cache while it is current.

        Raises FailedPrecondition when the namespace has no classes, and
        :class:`ModelIncompleteError` when the model lacks embeddings of some of its examples.
        """
        model_id = expected_model_id or self._only_model(namespace)
        status = self.status(namespace, model_id)
        if status.examples <= 0:
            raise FailedPrecondition(
                f"namespace {namespace!r} has no classes yet: add examples to a class first"
            )
        if not status.complete:
            raise ModelIncompleteError(namespace, model_id, status)
        with self._cache_lock:
            cached = self._cache.get((namespace, model_id))
        if cached is None or (cached.epoch, cached.generation) != status.version:
            cached = self._sync(namespace, model_id, status.version)
        return cached

    def _only_model(self, namespace: str) -> str:
        models = self.models(namespace)
        if len(models) == 1:
            return next(iter(models))
        if not models:
            raise FailedPrecondition(
                f"namespace {namespace!r} has no classes yet: add examples to a class first"
            )
        raise InvalidInput(f"namespace {namespace!r} holds embeddings of {len(models)} models: name one")

    def _sync(self, namespace: str, model_id: str, version: tuple[str, int]) -> PrototypeSet:
        """Bring this replica's copy of ``namespace`` under ``model_id`` to Redis's current state
        (at least ``version``, which the caller read after its own writes: read-your-write)."""
        key = (namespace, model_id)
        with self._cache_lock:
            lock = self._sync_locks.setdefault(key, threading.Lock())
        with lock:
            with self._cache_lock:
                cached = self._cache.get(key)
            if cached is not None and (cached.epoch, cached.generation) == version:
                return cached  # another request synced it while this one waited
            fresh = None
            if cached is not None and cached.epoch == version[0] and cached.epoch:
                fresh = self._fetch_changes(namespace, model_id, cached)
            how = "patch"
            if fresh is None:
                fresh, how = self._fetch_prototypes(namespace, model_id), "full"
            with self._cache_lock:
                self._cache[key] = fresh
            self.sync_stats.add(how)
            return fresh

    def _fetch_changes(self, namespace: str, model_id: str, cached: PrototypeSet) -> PrototypeSet | None:
        """``cached`` patched with the classes changed since it, or None: reload in full."""
        keys = self.keys(namespace)
        max_changes = min(MAX_PATCHED_CLASSES, max(256, len(cached.classifier) // 2))
        with redis_errors(self.client):
            reply = self._changes_since(
                keys=[keys.state, keys.changes, keys.model(model_id).prototypes],
                args=[cached.epoch, cached.generation, max_changes],
            )
        epoch, generation, outcome, *changed = reply
        if text(outcome) != "patch":
            return None
        changes = {
            decode(changed[i]): None if blob is None else np.frombuffer(blob, dtype=_FLOAT32_LE)
            for i, blob in zip(range(0, len(changed), 2), changed[1::2])
        }
        if any(row is not None and len(row) != cached.classifier.dim for row in changes.values()):
            return None  # the namespace was emptied and restarted by a model of another width
        return PrototypeSet(
            classifier=cached.classifier.patched(changes) if changes else cached.classifier,
            model_id=model_id,
            generation=int(generation),
            epoch=text(epoch),
        )

    def _fetch_prototypes(self, namespace: str, model_id: str) -> PrototypeSet:
        keys = self.keys(namespace)
        with redis_errors(self.client):
            # One MULTI: generation and prototypes come from the same instant.
            pipe = self.client.pipeline(transaction=True)
            pipe.hmget(keys.state, "epoch", "generation")
            pipe.hgetall(keys.model(model_id).prototypes)
            (epoch, generation), raw = pipe.execute()
        labels = [decode(f) for f in raw]
        if raw:
            matrix = np.frombuffer(b"".join(raw.values()), dtype=_FLOAT32_LE).reshape(len(raw), -1)
        else:
            matrix = np.zeros((0, 0), dtype=np.float32)
        return PrototypeSet(
            classifier=PrototypeMatrix(labels, matrix, self.scan_stats),
            model_id=model_id,
            generation=int(generation or 0),
            epoch=text(epoch or b""),
        )

    def example_snapshot(
        self,
        namespace: str,
        max_per_class: int | None = None,
        only_labels: Collection[str] | None = None,
        only_their_means: bool = False,
        model_id: str | None = None,
    ) -> ExampleSnapshot:
        """Prototypes and example embeddings of ``namespace`` under ``model_id`` (None: its only
        model) as of one state (two pipelined round trips, retried while a write lands between
        them): every class's examples, or only ``only_labels``'; at most
        ``max_per_class`` per class, spread evenly over the ids. ``only_their_means``: the
        snapshot holds those classes only (their prototypes and counts), not every class's --
        O(classes asked), not O(namespace). Classes the model has not embedded are left out."""
        wanted_labels = None if only_labels is None else set(only_labels)
        asked = sorted(wanted_labels or ()) if only_their_means else None
        keys = self.keys(namespace)
        model_keys = keys.model(model_id or self._only_model(namespace))
        self._ensure_layout(namespace)
        for _attempt in range(3):
            with redis_errors(self.client):
                pipe = self.client.pipeline(transaction=True)
                pipe.hmget(keys.state, "epoch", "generation")
                if asked is None:
                    pipe.hgetall(model_keys.prototypes)
                    pipe.hgetall(model_keys.counts)
                    version, raw_means, raw_counts = pipe.execute()
                else:
                    fields = [encode(label).encode() for label in asked]
                    if fields:
                        pipe.hmget(model_keys.prototypes, fields)
                        pipe.hmget(model_keys.counts, fields)
                        version, means_list, counts_list = pipe.execute()
                    else:
                        (version,), means_list, counts_list = pipe.execute(), [], []
                    raw_means = {f: m for f, m in zip(fields, means_list) if m is not None}
                    raw_counts = {f: c for f, c in zip(fields, counts_list) if c is not None}
                labels = sorted(decode(f) for f in raw_means)
                wanted = [label for label in labels if wanted_labels is None or label in wanted_labels]
                pipe = self.client.pipeline(transaction=True)
                pipe.hmget(keys.state, "epoch", "generation")
                for label in wanted:
                    pipe.hgetall(model_keys.examples(label))
                version_after, *raw_examples = pipe.execute()
            if version_after == version:
                break
        fetched = dict(zip(wanted, raw_examples))
        dim = len(next(iter(raw_means.values()))) // _FLOAT32_LE.itemsize if raw_means else 0
        means = [np.frombuffer(raw_means[encode(label).encode()], _FLOAT32_LE) for label in labels]
        counts = [int(raw_counts.get(encode(label).encode(), 0)) for label in labels]
        example_ids, embeddings = [], []
        for label in labels:
            blobs = {text(k): v for k, v in fetched.get(label, {}).items()}
            ids = _sample_evenly(sorted(blobs, key=lambda i: (len(i), i)), max_per_class)
            rows = [np.frombuffer(blobs[i], _FLOAT32_LE) for i in ids]
            matrix = np.stack(rows) if rows else np.zeros((0, dim), np.float32)
            example_ids.append(ids)
            embeddings.append(l2_normalize(matrix).astype(np.float32, copy=False))
        epoch, generation = version_after
        return ExampleSnapshot(
            labels=labels,
            means=np.stack(means) if means else np.zeros((0, 0), np.float32),
            counts=np.asarray(counts, dtype=np.int64),
            example_ids=example_ids,
            embeddings=embeddings,
            epoch=text(epoch or b""),
            generation=int(generation or 0),
        )

    # -- the layout before per-model keys --------------------------------------------------------

    def _ensure_layout(self, namespace: str) -> None:
        """Migrate ``namespace`` if it is still in the old layout (checked once per replica)."""
        if namespace in self._current_layout:
            return
        keys = self.keys(namespace)
        with redis_errors(self.client):
            epoch, layout = self.client.hmget(keys.state, "epoch", "layout")
        if epoch is not None and layout is None:
            self._migrate_namespace(namespace)
        if epoch is not None:
            self._current_layout.add(namespace)

    def _migrate_namespace(self, namespace: str) -> None:
        """Old layout -> per-model keys, in one script: the recorded model's embeddings become
        that model's, without stored images (so only that model serves them, as before)."""
        keys = self.keys(namespace)
        for _attempt in range(_SCRIPT_ATTEMPTS):
            with redis_errors(self.client):
                pipe = self.client.pipeline(transaction=True)
                pipe.hget(keys.legacy_model, "model_id")
                pipe.hkeys(keys.counts)
                model_id, raw_fields = pipe.execute()
                model = text(model_id) if model_id is not None else ""
                mk = keys.model(model)
                fields = [text(f) for f in raw_fields]
                script_keys = [
                    keys.state,
                    keys.legacy_model,
                    keys.counts,
                    keys.legacy_prototypes,
                    keys.legacy_sums,
                    keys.models,
                    mk.counts,
                    mk.prototypes,
                    mk.sums,
                ]
                for f in fields:
                    label = decode(f)
                    script_keys += [keys.legacy_examples(label), keys.images(label), mk.examples(label)]
                try:
                    migrated = self._migrate(keys=script_keys, args=[model, *fields])
                except redis.exceptions.ResponseError as exc:
                    if script_code(exc) == "CHANGED":
                        continue
                    raise Unavailable(REFUSED, detail=f"Redis: {exc}") from None
            if migrated:
                log.info(
                    "namespace %r moved to per-model keys: its %d classes are model %s's "
                    "embeddings, without stored images",
                    namespace,
                    len(fields),
                    model or "-",
                )
            self._current_layout.add(namespace)
            return
        raise Unavailable(f"namespace {namespace!r} kept changing while being migrated; retry later")

    # -- helpers -------------------------------------------------------------------------------

    def _example_ids(self, keys: NamespaceKeys, label: str) -> list[str]:
        ids = [text(i) for i in self.client.hkeys(keys.images(label))]
        return sorted(ids, key=lambda i: (len(i), i))  # numeric order: ids are counters

    @staticmethod
    def _check_embeddings(embeddings: np.ndarray) -> np.ndarray:
        vectors = np.asarray(embeddings)
        if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] == 0:
            raise InvalidInput(f"embeddings must be a non-empty [n, D] array, got {vectors.shape}")
        if vectors.shape[1] > MAX_EMBEDDING_DIM:
            raise InvalidInput(f"embedding dim {vectors.shape[1]} exceeds {MAX_EMBEDDING_DIM}")
        vectors = vectors.astype(np.float32)
        if not np.all(np.isfinite(vectors)):
            raise InvalidInput("embeddings contain NaN or infinity")
        if np.any(np.linalg.norm(vectors, axis=1) == 0):
            raise InvalidInput("an embedding is all zeros and has no direction")
        return vectors

    @staticmethod
    def _script_error(
        exc: redis.exceptions.ResponseError,
        namespace: str,
        label: str,
        model_id: str | None = None,
        example_id: str | None = None,
        adding: int = 0,
    ) -> Exception:
        code, _, detail = str(exc).partition(" ")
        if code == "TOO_MANY_EXAMPLES":
            held, limit = detail.split()
            return FailedPrecondition(
                f"class {label!r} in namespace {namespace!r} holds {held} examples; adding "
                f"{adding} would exceed the limit of {limit} examples per class: delete some "
                "examples first (a prototype gains little beyond a few hundred)"
            )
        if code == "NO_CLASS":
            return NotFound(f"no class {label!r} in namespace {namespace!r}")
        if code == "NO_EXAMPLE":
            return NotFound(f"class {label!r} in namespace {namespace!r} has no example {example_id!r}")
        if code == "DIM_MISMATCH":
            return FailedPrecondition(
                f"namespace {namespace!r} holds {detail}-dimensional embeddings of model "
                f"{model_id!r}; these differ"
            )
        return Unavailable(REFUSED, detail=f"Redis: {exc}")


def _progress(models: list[bytes], state: dict[bytes, bytes]) -> list[ModelCompleteness]:
    total = int(state.get(b"examples", 0))
    progress = []
    for model in (text(m) for m in models):
        embedded = int(state.get(f"n:{model}".encode(), 0))
        progress.append(ModelCompleteness(model, embedded, embedded >= total))
    return sorted(progress, key=lambda p: (-p.embedded, p.model_id))


def _sample_evenly(ids: list[str], limit: int | None) -> list[str]:
    """At most ``limit`` of ``ids``, spread evenly over them: the same choice on every replica."""
    if limit is None or len(ids) <= limit:
        return ids
    return [ids[i] for i in np.linspace(0, len(ids) - 1, limit).round().astype(int)]
