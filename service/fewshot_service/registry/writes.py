"""Every change of a namespace's classes and examples: each one Lua script (atomic), run with the
namespace's current models and after its migration from the old layout."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence

import numpy as np
import redis
from redis.cluster import RedisCluster

from fewshot_common.errors import InvalidInput, NotFound, Unavailable

from .keys import REFUSED, NamespaceKeys, decode, encode, redis_errors, script_code, text
from .migration import Migration
from .store import FLOAT32_LE, SCRIPT_ATTEMPTS, Store, check_embeddings, script_error
from .types import ClassInfo, DeletedNamespace


class Writes:
    def __init__(
        self, store: Store, migration: Migration, on_namespace_deleted: Callable[[str], None]
    ) -> None:
        self._store = store
        self._migration = migration
        self._on_namespace_deleted = on_namespace_deleted  # the replica frees its copy

    def add_examples(
        self,
        namespace: str,
        label: str,
        embeddings: np.ndarray,
        model_id: str,
        images: Sequence[bytes] | None = None,
        hashes: Sequence[str] | None = None,
    ) -> ClassInfo:
        """Store ``embeddings`` [n, D] of ``model_id`` as new examples of ``label``, all or none,
        each with its stored image (``images``, parallel; none: stored without, so another model
        can never embed them) and the content hash of its uploaded file (``hashes``, parallel),
        by which a bulk import skips what the class already holds.

        Refused (FailedPrecondition) when the class would exceed ``max_examples_per_class``.
        """
        store = self._store
        keys = store.keys(namespace)
        if not model_id:
            raise InvalidInput("model_id must not be empty")
        vectors = check_embeddings(embeddings)
        args = self.add_args(label, model_id, vectors, images, hashes)
        self._migration.ensure_layout(namespace)
        with redis_errors(store.client):
            try:
                reply = self._migration.run_migrating(
                    namespace,
                    lambda: store.scripts.add(keys=self.add_keys(keys, label, model_id), args=args),
                )
            except redis.exceptions.ResponseError as exc:
                raise script_error(exc, namespace, label, model_id, adding=len(vectors)) from None
            example_ids = store.example_ids(keys, label)
        _generation, count, *added = reply
        return ClassInfo(
            label=label,
            count=int(count),
            example_ids=example_ids,
            added_example_ids=[text(i) for i in added],
        )

    def add_args(
        self,
        label: str,
        model_id: str,
        vectors: np.ndarray,
        images: Sequence[bytes] | None,
        hashes: Sequence[str] | None = None,
        epoch: str | None = None,
    ) -> list[object]:
        """The ARGV of add_examples.lua for ``vectors`` (checked), their stored images and their
        files' content hashes. ``epoch`` is the namespace's epoch should this add create it (one
        per request is enough: only the first add of a new namespace uses it)."""
        for name, parallel in (("stored images", images), ("content hashes", hashes)):
            if parallel is not None and len(parallel) != len(vectors):
                raise InvalidInput(f"{len(parallel)} {name} for {len(vectors)} embeddings")
        triples: list[object] = []
        for i, row in enumerate(vectors):
            triples += [
                row.astype(FLOAT32_LE).tobytes(),
                images[i] if images is not None else b"",
                hashes[i] if hashes is not None else "",
            ]
        return [
            encode(label),
            model_id,
            vectors.shape[1],
            epoch or uuid.uuid4().hex,
            self._store.max_examples_per_class,
            self._store.change_log_size,
            *triples,
        ]

    @staticmethod
    def add_keys(keys: NamespaceKeys, label: str, model_id: str) -> list[str]:
        """The KEYS of add_examples.lua."""
        return [
            keys.state,
            keys.counts,
            keys.models,
            keys.changes,
            keys.images(label),
            *keys.model(model_id).for_class(label),
            keys.labels,
            keys.hashes(label),
        ]

    def run_adds(
        self,
        keys: NamespaceKeys,
        model_id: str,
        adds: Sequence[tuple[str, np.ndarray, Sequence[bytes] | None, Sequence[str] | None]],
    ) -> list[object]:
        """Run add_examples.lua for each (label, checked vectors, stored images, content hashes)
        of ``adds``, pipelined in one round trip; on a Cluster one round trip each, as redis-py's
        cluster pipeline refuses scripts. Each reply, or the ResponseError of a refused add, in
        order: the caller decides what a refusal means. The layout must be ensured already."""
        client = self._store.client
        pipelined = not isinstance(client, RedisCluster)
        epoch = uuid.uuid4().hex  # the namespace's, should these adds create it
        replies: list[object] = []
        with redis_errors(client):
            runner = client.pipeline(transaction=False) if pipelined else client
            for label, vectors, images, hashes in adds:
                args = self.add_args(label, model_id, vectors, images, hashes, epoch=epoch)
                try:
                    replies.append(
                        self._store.scripts.add(
                            keys=self.add_keys(keys, label, model_id), args=args, client=runner
                        )
                    )
                except redis.exceptions.ResponseError as exc:
                    replies.append(exc)
            if pipelined:
                # Errors as values: redis-py's raised form quotes the command, keys included.
                replies = runner.execute(raise_on_error=False)  # type: ignore[union-attr]
        return replies

    def add_classes(
        self, namespace: str, classes: dict[str, np.ndarray], model_id: str, *, chunk: int = 1000
    ) -> None:
        """Bulk load: ``label -> embeddings [n, D]`` (no stored images) through the same script
        as :meth:`add_examples`, pipelined ``chunk`` classes per round trip; no ids are returned.

        Not atomic as a whole (each class is); a refusal raises after the chunks before it landed.
        redis-py's cluster pipeline refuses scripts, so on a Cluster it is one round trip a class.
        """
        store = self._store
        keys = store.keys(namespace)
        if not model_id:
            raise InvalidInput("model_id must not be empty")
        items = [(label, check_embeddings(vectors)) for label, vectors in classes.items()]
        self._migration.ensure_layout(namespace)
        step = chunk if not isinstance(store.client, RedisCluster) else 1
        for start in range(0, len(items), step):
            batch = items[start : start + step]
            replies = self.run_adds(
                keys, model_id, [(label, vectors, None, None) for label, vectors in batch]
            )
            for (label, vectors), reply in zip(batch, replies):
                if isinstance(reply, redis.exceptions.ResponseError):
                    raise script_error(reply, namespace, label, model_id, adding=len(vectors))

    def delete_class(self, namespace: str, label: str) -> None:
        store = self._store
        keys = store.keys(namespace)
        self._migration.ensure_layout(namespace)
        try:
            self._migration.with_models(
                namespace,
                lambda models: store.scripts.delete_class(
                    keys=keys.for_class(label, models),
                    args=[encode(label), store.change_log_size, *models],
                ),
            )
        except redis.exceptions.ResponseError as exc:
            raise script_error(exc, namespace, label) from None

    def delete_example(self, namespace: str, label: str, example_id: str) -> ClassInfo | None:
        """Remove one example (its image and every model's embedding of it); returns the class as
        it is now, or None if that was its last."""
        store = self._store
        keys = store.keys(namespace)
        self._migration.ensure_layout(namespace)
        try:
            _, count = self._migration.with_models(
                namespace,
                lambda models: store.scripts.delete_example(
                    keys=keys.for_class(label, models),
                    args=[encode(label), example_id, store.change_log_size, *models],
                ),
            )
        except redis.exceptions.ResponseError as exc:
            raise script_error(exc, namespace, label, example_id=example_id) from None
        if int(count) == 0:
            return None
        with redis_errors(store.client):
            example_ids = store.example_ids(keys, label)
        return ClassInfo(label=label, count=len(example_ids), example_ids=example_ids)

    def delete_namespace(self, namespace: str) -> DeletedNamespace:
        """Remove every class, example, image, model embedding and the state of ``namespace`` in
        one script (atomic); NotFound when it holds no classes. Replicas drop their copy on their
        next request: the state (epoch) is gone, and a later add starts a new one."""
        store = self._store
        keys = store.keys(namespace)
        self._migration.ensure_layout(namespace)
        for _attempt in range(SCRIPT_ATTEMPTS):
            with redis_errors(store.client):
                pipe = store.client.pipeline(transaction=True)
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
                    keys.labels,
                    *(keys.images(label) for label in labels),
                    *(keys.hashes(label) for label in labels),
                ]
                for model in models:
                    script_keys += keys.model(model).every_key(labels)
                try:
                    classes, examples = store.scripts.delete_namespace(
                        keys=script_keys, args=[len(fields), *fields, *models]
                    )
                except redis.exceptions.ResponseError as exc:
                    if script_code(exc) == "CHANGED":
                        continue  # a class or model came or went between the read and the script
                    raise Unavailable(REFUSED, detail=f"Redis: {exc}") from None
            self._on_namespace_deleted(namespace)
            return DeletedNamespace(namespace, int(classes), int(examples))
        raise Unavailable(f"namespace {namespace!r} kept changing while being deleted; retry later")
