"""Namespaces written before per-model keys: moved to the current layout on first touch, once per
namespace (migrate_layout.lua), and the retry of a write that found one (its script answers LEGACY).
Namespaces written before the label index (keys.py, ``labels``) get it built on first touch, once
(index_labels.lua); from then on every script that creates or deletes a class keeps it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import redis

from fewshot_common.errors import Unavailable

from .keys import REFUSED, decode, redis_errors, script_code, text
from .store import SCRIPT_ATTEMPTS, Store

log = logging.getLogger(__name__)
T = TypeVar("T")


class Migration:
    def __init__(self, store: Store) -> None:
        self._store = store
        # Namespaces this replica has seen in the current layout (a migration is once per namespace).
        self._current_layout: set[str] = set()

    def ensure_layout(self, namespace: str) -> None:
        """Migrate ``namespace`` if it is still in the old layout, and index its labels if they
        are not yet (checked once per replica)."""
        if namespace in self._current_layout:
            return
        keys = self._store.keys(namespace)
        with redis_errors(self._store.client):
            epoch, layout, indexed = self._store.client.hmget(keys.state, "epoch", "layout", "label_index")
        if epoch is not None and layout is None:
            self.migrate_namespace(namespace)  # indexes the labels too
        elif epoch is not None and indexed is None:
            self.index_labels(namespace)
        if epoch is not None:
            self._current_layout.add(namespace)

    def index_labels(self, namespace: str) -> None:
        """Build the label index of a namespace written before it (one script: O(namespace), once)."""
        keys = self._store.keys(namespace)
        with redis_errors(self._store.client):
            indexed = self._store.scripts.index_labels(keys=[keys.state, keys.counts, keys.labels])
        if indexed:
            log.info("namespace %r: its %d labels indexed for paging", namespace, int(indexed))

    def migrate_namespace(self, namespace: str) -> None:
        """Old layout -> per-model keys, in one script: the recorded model's embeddings become
        that model's, without stored images (so only that model serves them, as before)."""
        store = self._store
        keys = store.keys(namespace)
        for _attempt in range(SCRIPT_ATTEMPTS):
            with redis_errors(store.client):
                pipe = store.client.pipeline(transaction=True)
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
                    keys.labels,
                ]
                for f in fields:
                    label = decode(f)
                    script_keys += [keys.legacy_examples(label), keys.images(label), mk.examples(label)]
                try:
                    migrated = store.scripts.migrate(keys=script_keys, args=[model, *fields])
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

    def with_models(self, namespace: str, run: Callable[[list[str]], T]) -> T:
        """``run(model ids)`` with the namespace's current models, again when a script answers
        CHANGED (a model came or went in between) or LEGACY (migrated first)."""
        store = self._store
        keys = store.keys(namespace)
        for _attempt in range(SCRIPT_ATTEMPTS):
            with redis_errors(store.client):
                models = sorted(text(m) for m in store.client.hkeys(keys.models))
                try:
                    return run(models)
                except redis.exceptions.ResponseError as exc:
                    if script_code(exc) == "CHANGED":
                        continue
                    if script_code(exc) == "LEGACY":
                        self.migrate_namespace(namespace)
                        continue
                    raise
        raise Unavailable(f"namespace {namespace!r} kept changing; retry later")

    def run_migrating(self, namespace: str, run: Callable[[], T]) -> T:
        """``run()``, again once after migrating when a script finds the namespace's old layout."""
        try:
            return run()
        except redis.exceptions.ResponseError as exc:
            if script_code(exc) != "LEGACY":
                raise
        self.migrate_namespace(namespace)
        return run()
