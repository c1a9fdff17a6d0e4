"""A namespace's example embeddings and prototypes as of one state (:class:`ExampleSnapshot`),
read for the shot-quality judgements and the open-set calibration."""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from fewshot_common.vectors import l2_normalize

from ..classify.snapshot import ExampleSnapshot
from .keys import decode, encode, redis_errors, text
from .migration import Migration
from .reads import Reads
from .store import FLOAT32_LE, Store


class Snapshots:
    def __init__(self, store: Store, migration: Migration, reads: Reads) -> None:
        self._store = store
        self._migration = migration
        self._reads = reads

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
        client = self._store.client
        wanted_labels = None if only_labels is None else set(only_labels)
        asked = sorted(wanted_labels or ()) if only_their_means else None
        keys = self._store.keys(namespace)
        model_keys = keys.model(model_id or self._reads.only_model(namespace))
        self._migration.ensure_layout(namespace)
        for _attempt in range(3):
            with redis_errors(client):
                pipe = client.pipeline(transaction=True)
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
                pipe = client.pipeline(transaction=True)
                pipe.hmget(keys.state, "epoch", "generation")
                for label in wanted:
                    pipe.hgetall(model_keys.examples(label))
                version_after, *raw_examples = pipe.execute()
            if version_after == version:
                break
        fetched = dict(zip(wanted, raw_examples))
        dim = len(next(iter(raw_means.values()))) // FLOAT32_LE.itemsize if raw_means else 0
        means = [np.frombuffer(raw_means[encode(label).encode()], FLOAT32_LE) for label in labels]
        counts = [int(raw_counts.get(encode(label).encode(), 0)) for label in labels]
        example_ids, embeddings = [], []
        for label in labels:
            blobs = {text(k): v for k, v in fetched.get(label, {}).items()}
            ids = sample_evenly(sorted(blobs, key=lambda i: (len(i), i)), max_per_class)
            rows = [np.frombuffer(blobs[i], FLOAT32_LE) for i in ids]
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


def sample_evenly(ids: list[str], limit: int | None) -> list[str]:
    """At most ``limit`` of ``ids``, spread evenly over them: the same choice on every replica."""
    if limit is None or len(ids) <= limit:
        return ids
    return [ids[i] for i in np.linspace(0, len(ids) - 1, limit).round().astype(int)]
