"""The few-shot registry: classes, their example embeddings and prototypes, kept in Redis.

Key layout (one hash tag per namespace, so every script of a namespace runs on one Cluster slot)::

    {prefix}:{ns:<hex>}:model        hash   model_id, dim   (what the namespace's embeddings came from)
    {prefix}:{ns:<hex>}:state        hash   generation (bumped on every change), epoch, next_example_id,
                                            log_start, logged (what the change log covers)
    {prefix}:{ns:<hex>}:changes      zset   <label hex> -> generation of its last change (the
                                            change log, capped at change_log_size labels)
    {prefix}:{ns:<hex>}:counts       hash   <label hex> -> number of examples
    {prefix}:{ns:<hex>}:prototypes   hash   <label hex> -> float32 LE prototype
    {prefix}:{ns:<hex>}:sums         hash   <label hex> -> float64 LE sum of unit embeddings,
                                            <label hex>:n -> the example count it covers
    {prefix}:{ns:<hex>}:ex:<label hex>  hash  <example id> -> float32 LE embedding

Namespaces are listed by SCAN over ``{prefix}:{ns:*}:state`` (every node of a Cluster), not from
a set of names: such a set would live outside the namespaces' hash tags, so no script could keep
it in step on a Cluster, and a set kept from Python drifts whenever a process dies between the two
writes. SCAN costs a pass over the keyspace, which listing namespaces (an admin call) can afford.

Namespaces and labels appear in key names only as the hex of their UTF-8, so no label can reach
another key, break out of the hash tag, or look like a glob. Writes are Lua scripts (atomic); each
replica caches one ready :class:`PrototypeSet` per namespace (the only prototype cache; every
read and write of it holds its lock) and revalidates it with one HMGET of the
generation (and the epoch, which changes if Redis ever loses the namespace's state) per request,
so a change is seen by every replica on its next request. A replica that is behind fetches only
the classes changed since its generation (one script: changes_since.lua) and patches its matrix;
it reloads everything only when the epoch changed or the change log no longer reaches back.
"""

from __future__ import annotations

import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Collection, Iterator

import numpy as np
import redis
from redis.cluster import RedisCluster

from fewshot_common.errors import FailedPrecondition, InvalidInput, NotFound, Unavailable
from fewshot_common.vectors import l2_normalize

from .classifier import PrototypeMatrix
from .redis_client import CLUSTER_ERRORS, RedisClient

if TYPE_CHECKING:
    from .shot_quality import ExampleQuality, ShotWarning

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


@dataclass(frozen=True)
class ClassSummary:
    label: str
    count: int


@dataclass(frozen=True)
class NamespaceSummary:
    name: str
    class_count: int
    example_count: int
    model_id: str | None  # the model its embeddings came from


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
    # Set by the core (shot_quality.py): add_examples' warnings, get_class's per-example fit.
    warnings: "list[ShotWarning]" = field(default_factory=list)
    examples: "list[ExampleQuality]" = field(default_factory=list)


@dataclass(frozen=True)
class PrototypeSet:
    """One state of a namespace's prototypes, ready to classify with; never changed once built.

    The registry builds one per (epoch, generation) and hands the same object to every request
    until the namespace changes, so rows are re-normalised once per change of their class.
    """

    classifier: PrototypeMatrix  # re-normalised rows; patched copy-on-write per change
    model_id: str | None
    generation: int
    epoch: str = ""  # with generation, identifies this state of the namespace

    @property
    def labels(self) -> list[str]:
        return self.classifier.labels

    @property
    def matrix(self) -> np.ndarray:
        """[C, D] float32 in ``labels`` order: means of unit vectors (not re-normalised)."""
        return self.classifier.prototypes


@dataclass(frozen=True)
class ExampleSnapshot:
    """A namespace's classes at one state: every prototype, and the example embeddings of the
    classes asked for (the others hold none here). Lists are in ``labels`` order (sorted)."""

    labels: list[str]
    means: np.ndarray  # [C, D] float32: each class's mean of unit embeddings (its prototype row)
    counts: np.ndarray  # [C] examples per class (all of them, also where fewer were fetched)
    example_ids: list[list[str]]  # fetched ids per class, in id order
    embeddings: list[np.ndarray]  # [n_c, D] unit float32 rows, matching example_ids
    epoch: str
    generation: int


def _encode(name: str) -> str:
    return name.encode("utf-8").hex()


def _decode(field_name: bytes | str) -> str:
    text = field_name.decode("ascii") if isinstance(field_name, bytes) else field_name
    return bytes.fromhex(text).decode("utf-8")


def _load_script(name: str, *, prelude: bool = True) -> str:
    scripts = resources.files("fewshot_service") / "registry_scripts"
    body = (scripts / name).read_text(encoding="utf-8")
    if not prelude:
        return body
    return (scripts / "prototype.lua").read_text(encoding="utf-8") + "\n" + body


# The codes the registry scripts answer with (redis.error_reply); see registry_scripts/*.lua.
_REFUSED = "the class store (Redis) refused the request; retry later"
_SCRIPT_ERRORS = {
    "MODEL_MISMATCH", "DIM_MISMATCH", "NO_CLASS", "NO_EXAMPLE", "TOO_MANY_EXAMPLES", "CHANGED",
}  # fmt: skip
# A namespace deletion whose classes change under it reads them again; this many times at most.
_DELETE_NAMESPACE_ATTEMPTS = 5


@contextmanager
def _redis_errors(client: RedisClient) -> Iterator[None]:
    """Every Redis failure becomes Unavailable; redis-py reconnects by itself on the next call."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        # No address in the message: it reaches clients, and the deployment is not theirs to see.
        raise Unavailable("the class store (Redis) is unreachable; retry later", detail=str(exc)) from None
    except CLUSTER_ERRORS as exc:  # e.g. a slot without a master during a failover
        raise Unavailable(
            "the class store (Redis Cluster) is unavailable; retry later", detail=str(exc)
        ) from None
    except redis.exceptions.ResponseError as exc:
        if str(exc).split(" ", 1)[0] in _SCRIPT_ERRORS:
            raise  # a registry script's own answer; the caller translates it
        # Redis' words may name keys or script hashes: for the server log only.
        raise Unavailable(_REFUSED, detail=f"Redis: {exc}") from None



def _glob_escape(text: str) -> str:
    """``text`` matched literally by Redis' glob (SCAN MATCH): escape ``* ? [ ] \\``."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class _NamespaceKeys:
    def __init__(self, prefix: str, namespace: str) -> None:
        base = f"{prefix}:{{ns:{_encode(namespace)}}}"
        self.model = f"{base}:model"
        self.state = f"{base}:state"
        self.counts = f"{base}:counts"
        self.prototypes = f"{base}:prototypes"
        self.sums = f"{base}:sums"
        self.changes = f"{base}:changes"
        self._examples = f"{base}:ex:"

    def examples(self, label: str) -> str:
        return self._examples + _encode(label)

    def for_class(self, label: str) -> list[str]:
        """The KEYS every class script takes, in its order."""
        return [
            self.model, self.state, self.counts, self.prototypes, self.examples(label), self.sums,
            self.changes,
        ]  # fmt: skip


class Registry:
    """Classes and prototypes per namespace; safe to share between threads and replicas."""

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
        self.sync_counts = {"full": 0, "patch": 0}  # how replicas caught up (tests, metrics)
        if not key_prefix or "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must be non-empty and free of '{' and '}' (the hash tag)")
        self._client = client
        self._prefix = key_prefix
        self._add = client.register_script(_load_script("add_examples.lua"))
        self._delete_class = client.register_script(_load_script("delete_class.lua"))
        self._delete_example = client.register_script(_load_script("delete_example.lua"))
        self._changes_since = client.register_script(_load_script("changes_since.lua", prelude=False))
        self._delete_namespace = client.register_script(
            _load_script("delete_namespace.lua", prelude=False)
        )
        self._cache: dict[str, PrototypeSet] = {}
        self._cache_lock = threading.Lock()
        # One sync per namespace at a time: requests that find it stale wait for that one fetch.
        self._sync_locks: dict[str, threading.Lock] = {}

    @property
    def key_prefix(self) -> str:
        return self._prefix

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except (redis.exceptions.RedisError, *CLUSTER_ERRORS):
            return False

    def add_examples(
        self, namespace: str, label: str, embeddings: np.ndarray, model_id: str
    ) -> ClassInfo:
        """Store ``embeddings`` [n, D] as new examples of ``label``, all or none.

        Refused (FailedPrecondition) when the class would exceed ``max_examples_per_class``.
        """
        keys = self._keys(namespace)
        if not model_id:
            raise InvalidInput("model_id must not be empty")
        vectors = self._check_embeddings(embeddings)
        blobs = [row.astype(_FLOAT32_LE).tobytes() for row in vectors]
        with _redis_errors(self._client):
            try:
                reply = self._add(
                    keys=keys.for_class(label),
                    args=[
                        _encode(label), model_id, vectors.shape[1], uuid.uuid4().hex,
                        self.max_examples_per_class, self.change_log_size, *blobs,
                    ],
                )  # fmt: skip
            except redis.exceptions.ResponseError as exc:
                raise self._script_error(exc, namespace, label, model_id, adding=len(blobs)) from None
            example_ids = self._example_ids(keys, label)
        _generation, count, *added = reply
        return ClassInfo(
            label=label,
            count=int(count),
            example_ids=example_ids,
            added_example_ids=[_text(i) for i in added],
        )

    def add_classes(
        self, namespace: str, classes: dict[str, np.ndarray], model_id: str, *, chunk: int = 1000
    ) -> None:
        """Bulk load: ``label -> embeddings [n, D]`` through the same script as
        :meth:`add_examples`, pipelined ``chunk`` classes per round trip; no ids are returned.

        Not atomic as a whole (each class is); a refusal raises after the chunks before it landed.
        redis-py's cluster pipeline refuses scripts, so on a Cluster it is one round trip a class.
        """
        keys = self._keys(namespace)
        if not model_id:
            raise InvalidInput("model_id must not be empty")
        items = [(label, self._check_embeddings(vectors)) for label, vectors in classes.items()]
        pipelined = not isinstance(self._client, RedisCluster)
        for start in range(0, len(items), chunk if pipelined else 1):
            batch = items[start : start + chunk] if pipelined else items[start : start + 1]
            with _redis_errors(self._client):
                runner = self._client.pipeline(transaction=False) if pipelined else self._client
                replies: list[object] = []
                for label, vectors in batch:
                    args = [
                        _encode(label), model_id, vectors.shape[1], uuid.uuid4().hex,
                        self.max_examples_per_class, self.change_log_size,
                        *(row.astype(_FLOAT32_LE).tobytes() for row in vectors),
                    ]  # fmt: skip
                    try:
                        replies.append(self._add(keys=keys.for_class(label), args=args, client=runner))
                    except redis.exceptions.ResponseError as exc:
                        replies.append(exc)
                if pipelined:
                    # Errors as values: redis-py's raised form quotes the command, keys included.
                    replies = runner.execute(raise_on_error=False)  # type: ignore[union-attr]
            for (label, vectors), reply in zip(batch, replies):
                if isinstance(reply, redis.exceptions.ResponseError):
                    raise self._script_error(reply, namespace, label, model_id, adding=len(vectors))

    def list_classes(self, namespace: str) -> list[ClassSummary]:
        keys = self._keys(namespace)
        with _redis_errors(self._client):
            counts = self._client.hgetall(keys.counts)
        summaries = [ClassSummary(_decode(f), int(c)) for f, c in counts.items()]
        return sorted(summaries, key=lambda s: s.label)

    def get_class(self, namespace: str, label: str) -> ClassInfo:
        keys = self._keys(namespace)
        with _redis_errors(self._client):
            example_ids = self._example_ids(keys, label)
        if not example_ids:
            raise NotFound(f"no class {label!r} in namespace {namespace!r}")
        return ClassInfo(label=label, count=len(example_ids), example_ids=example_ids)

    def delete_class(self, namespace: str, label: str) -> None:
        keys = self._keys(namespace)
        with _redis_errors(self._client):
            try:
                self._delete_class(
                    keys=keys.for_class(label), args=[_encode(label), self.change_log_size]
                )
            except redis.exceptions.ResponseError as exc:
                raise self._script_error(exc, namespace, label) from None

    def delete_example(self, namespace: str, label: str, example_id: str) -> ClassInfo | None:
        """Remove one example; returns the class as it is now, or None if that was its last."""
        keys = self._keys(namespace)
        with _redis_errors(self._client):
            try:
                _, count = self._delete_example(
                    keys=keys.for_class(label),
                    args=[_encode(label), example_id, self.change_log_size],
                )
            except redis.exceptions.ResponseError as exc:
                raise self._script_error(exc, namespace, label, example_id=example_id) from None
            if int(count) == 0:
                return None
            example_ids = self._example_ids(keys, label)
        return ClassInfo(label=label, count=len(example_ids), example_ids=example_ids)

    def list_namespaces(self) -> list[NamespaceSummary]:
        """Every namespace that holds classes, by name, with its counts and model."""
        pattern = f"{_glob_escape(self._prefix)}:{{ns:*}}:state"
        with _redis_errors(self._client):
            names = sorted(
                {_decode(_text(key)[len(self._prefix) + 5 : -len("}:state")])
                 for key in self._client.scan_iter(match=pattern, count=1000)}
            )  # fmt: skip
            pipe = self._client.pipeline(transaction=False)
            for name in names:
                keys = self._keys(name)
                pipe.hvals(keys.counts)
                pipe.hget(keys.model, "model_id")
            replies = pipe.execute() if names else []
        summaries = []
        for name, counts, model_id in zip(names, replies[::2], replies[1::2]):
            if counts:  # a namespace whose classes were all deleted keeps only its state
                summaries.append(NamespaceSummary(
                    name, len(counts), sum(int(c) for c in counts),
                    _text(model_id) if model_id is not None else None,
                ))  # fmt: skip
        return summaries

    def delete_namespace(self, namespace: str) -> DeletedNamespace:
        """Remove every class, example and the state of ``namespace`` in one script (atomic);
        NotFound when it holds no classes. Replicas drop their copy on their next request: the
        state (epoch) is gone, and a later add starts a new one."""
        keys = self._keys(namespace)
        for _attempt in range(_DELETE_NAMESPACE_ATTEMPTS):
            with _redis_errors(self._client):
                fields = [_text(f) for f in self._client.hkeys(keys.counts)]
                if not fields:
                    raise NotFound(f"no namespace {namespace!r} (it holds no classes)")
                script_keys = [
                    keys.model, keys.state, keys.counts, keys.prototypes, keys.sums, keys.changes,
                    *(keys.examples(_decode(f)) for f in fields),
                ]  # fmt: skip
                try:
                    classes, examples = self._delete_namespace(keys=script_keys, args=fields)
                except redis.exceptions.ResponseError as exc:
                    if str(exc).startswith("CHANGED"):
                        continue  # a class came or went between the read and the script
                    raise Unavailable(_REFUSED, detail=f"Redis: {exc}") from None
            with self._cache_lock:  # free this replica's matrix now; others on their next request
                self._cache.pop(namespace, None)
            return DeletedNamespace(namespace, int(classes), int(examples))
        raise Unavailable(f"namespace {namespace!r} kept changing while being deleted; retry later")

    def generation(self, namespace: str) -> int:
        """The namespace's change counter: one cheap round trip."""
        return self._version(namespace)[1]

    def _version(self, namespace: str) -> tuple[str, int]:
        keys = self._keys(namespace)
        with _redis_errors(self._client):
            epoch, generation = self._client.hmget(keys.state, "epoch", "generation")
        return _text(epoch or b""), int(generation or 0)

    def prototypes(self, namespace: str, expected_model_id: str | None = None) -> PrototypeSet:
        """The namespace's prototype matrix, from this replica's cache while it is current.

        Raises FailedPrecondition when the namespace has no classes, or (given
        ``expected_model_id``) when its embeddings came from another model.
        """
        version = self._version(namespace)
        with self._cache_lock:
            cached = self._cache.get(namespace)
        if cached is None or (cached.epoch, cached.generation) != version:
            cached = self._sync(namespace, version)
        if not len(cached.classifier):
            raise FailedPrecondition(
                f"namespace {namespace!r} has no classes yet: add examples to a class first"
            )
        if expected_model_id is not None and cached.model_id != expected_model_id:
            raise FailedPrecondition(
                f"namespace {namespace!r} holds embeddings of model {cached.model_id!r}, but this "
                f"server runs model {expected_model_id!r}; embeddings of two models are not "
                "comparable: re-add the examples under this model or use another namespace"
            )
        return cached

    def _sync(self, namespace: str, version: tuple[str, int]) -> PrototypeSet:
        """Bring this replica's copy of ``namespace`` to Redis's current state (at least
        ``version``, which the caller read after its own writes: read-your-write holds)."""
        with self._cache_lock:
            lock = self._sync_locks.setdefault(namespace, threading.Lock())
        with lock:
            with self._cache_lock:
                cached = self._cache.get(namespace)
            if cached is not None and (cached.epoch, cached.generation) == version:
                return cached  # another request synced it while this one waited
            fresh = None
            if cached is not None and cached.epoch == version[0] and cached.epoch:
                fresh = self._fetch_changes(namespace, cached)
            how = "patch"
            if fresh is None:
                fresh, how = self._fetch_prototypes(namespace), "full"
            with self._cache_lock:
                self._cache[namespace] = fresh
                self.sync_counts[how] += 1
            return fresh

    def _fetch_changes(self, namespace: str, cached: PrototypeSet) -> PrototypeSet | None:
        """``cached`` patched with the classes changed since it, or None: reload in full."""
        keys = self._keys(namespace)
        max_changes = min(MAX_PATCHED_CLASSES, max(256, len(cached.classifier) // 2))
        with _redis_errors(self._client):
            reply = self._changes_since(
                keys=[keys.state, keys.model, keys.changes, keys.prototypes],
                args=[cached.epoch, cached.generation, max_changes],
            )
        epoch, generation, model_id, outcome, *changed = reply
        if _text(outcome) != "patch":
            return None
        changes = {
            _decode(changed[i]): None if blob is None else np.frombuffer(blob, dtype=_FLOAT32_LE)
            for i, blob in zip(range(0, len(changed), 2), changed[1::2])
        }
        if any(row is not None and len(row) != cached.classifier.dim for row in changes.values()):
            return None  # the namespace was emptied and restarted by a model of another width
        return PrototypeSet(
            classifier=cached.classifier.patched(changes) if changes else cached.classifier,
            model_id=_text(model_id) if model_id is not None else None,
            generation=int(generation),
            epoch=_text(epoch),
        )

    def _fetch_prototypes(self, namespace: str) -> PrototypeSet:
        keys = self._keys(namespace)
        with _redis_errors(self._client):
            # One MULTI: generation, model and prototypes come from the same instant.
            pipe = self._client.pipeline(transaction=True)
            pipe.hmget(keys.state, "epoch", "generation")
            pipe.hget(keys.model, "model_id")
            pipe.hgetall(keys.prototypes)
            (epoch, generation), model_id, raw = pipe.execute()
        labels = [_decode(f) for f in raw]
        if raw:
            matrix = np.frombuffer(b"".join(raw.values()), dtype=_FLOAT32_LE).reshape(len(raw), -1)
        else:
            matrix = np.zeros((0, 0), dtype=np.float32)
        return PrototypeSet(
            classifier=PrototypeMatrix(labels, matrix),
            model_id=_text(model_id) if model_id is not None else None,
            generation=int(generation or 0),
            epoch=_text(epoch or b""),
        )

    def example_snapshot(
        self,
        namespace: str,
        max_per_class: int | None = None,
        only_label: str | None = None,
        only_labels: Collection[str] | None = None,
        only_their_means: bool = False,
    ) -> ExampleSnapshot:
        """Prototypes and example embeddings of ``namespace`` as of one state (two pipelined
        round trips, retried while a write lands between them): every class's examples, or only
        ``only_label``'s (or ``only_labels``'); at most ``max_per_class`` per class, spread evenly
        over the ids. ``only_their_means``: the snapshot holds those classes only (their
        prototypes and counts), not every class's -- O(classes asked), not O(namespace)."""
        if only_label is not None:
            only_labels = [only_label]
        wanted_labels = None if only_labels is None else set(only_labels)
        asked = sorted(wanted_labels or ()) if only_their_means else None
        keys = self._keys(namespace)
        for _attempt in range(3):
            with _redis_errors(self._client):
                pipe = self._client.pipeline(transaction=True)
                pipe.hmget(keys.state, "epoch", "generation")
                if asked is None:
                    pipe.hgetall(keys.prototypes)
                    pipe.hgetall(keys.counts)
                    version, raw_means, raw_counts = pipe.execute()
                else:
                    fields = [_encode(label).encode() for label in asked]
                    if fields:
                        pipe.hmget(keys.prototypes, fields)
                        pipe.hmget(keys.counts, fields)
                        version, means_list, counts_list = pipe.execute()
                    else:
                        (version,), means_list, counts_list = pipe.execute(), [], []
                    raw_means = {f: m for f, m in zip(fields, means_list) if m is not None}
                    raw_counts = {f: c for f, c in zip(fields, counts_list) if c is not None}
                labels = sorted(_decode(f) for f in raw_means)
                wanted = [label for label in labels if wanted_labels is None or label in wanted_labels]
                pipe = self._client.pipeline(transaction=True)
                pipe.hmget(keys.state, "epoch", "generation")
                for label in wanted:
                    pipe.hgetall(keys.examples(label))
                version_after, *raw_examples = pipe.execute()
            if version_after == version:
                break
        fetched = dict(zip(wanted, raw_examples))
        dim = len(next(iter(raw_means.values()))) // _FLOAT32_LE.itemsize if raw_means else 0
        means = [np.frombuffer(raw_means[_encode(label).encode()], _FLOAT32_LE) for label in labels]
        counts = [int(raw_counts.get(_encode(label).encode(), 0)) for label in labels]
        example_ids, embeddings = [], []
        for label in labels:
            blobs = {_text(k): v for k, v in fetched.get(label, {}).items()}
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
            epoch=_text(epoch or b""),
            generation=int(generation or 0),
        )

    def _keys(self, namespace: str) -> _NamespaceKeys:
        return _NamespaceKeys(self._prefix, namespace)

    def _example_ids(self, keys: _NamespaceKeys, label: str) -> list[str]:
        ids = [_text(i) for i in self._client.hkeys(keys.examples(label))]
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
        if code == "MODEL_MISMATCH":
            return FailedPrecondition(
                f"namespace {namespace!r} holds embeddings of model {detail!r}, not {model_id!r}; "
                "embeddings of two models are not comparable: use another namespace or delete "
                "its classes first"
            )
        if code == "DIM_MISMATCH":
            return FailedPrecondition(
                f"namespace {namespace!r} holds {detail}-dimensional embeddings; these differ"
            )
        return Unavailable(_REFUSED, detail=f"Redis: {exc}")


def _sample_evenly(ids: list[str], limit: int | None) -> list[str]:
    """At most ``limit`` of ``ids``, spread evenly over them: the same choice on every replica."""
    if limit is None or len(ids) <= limit:
        return ids
    return [ids[i] for i in np.linspace(0, len(ids) - 1, limit).round().astype(int)]


def _text(value: bytes | str | int) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
