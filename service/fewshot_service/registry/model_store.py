"""What a model roll needs from Redis: which examples a model has not embedded yet, their stored
images, writing the embeddings computed from them, a lease per (namespace, model) so one replica
of a model backfills a namespace at a time, and dropping a model's embeddings.

Every script touches only the keys it is passed, all under the namespace's hash tag.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import redis

from fewshot_common.errors import FailedPrecondition, Unavailable

from .keys import REFUSED, decode, encode, load_script, redis_errors, script_code, text
from .registry import Registry

_FLOAT32_LE = np.dtype("<f4")
# What a backfill pass found is kept this long (the record would otherwise outlive a namespace
# deleted while no replica of that model ran).
_RECORD_TTL_S = 24 * 3600
# Classes whose example ids are compared per round trip when looking for missing embeddings.
_CLASSES_PER_ROUND_TRIP = 256
_ATTEMPTS = 5


@dataclass(frozen=True)
class MissingExample:
    label: str
    example_id: str


@dataclass(frozen=True)
class Missing:
    """Examples of a namespace the model has no embedding of, as of ``epoch``."""

    epoch: str
    examples: list[MissingExample]


@dataclass(frozen=True)
class BackfillRecord:
    """What the last backfill pass of a model over a namespace found."""

    without_image: int  # missing examples it could not embed: no stored image (re-upload them)
    generation: int  # the namespace's generation when it finished


class ModelStore:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        client = registry.client
        self._client = client
        self._fill = client.register_script(load_script("fill_embeddings.lua"))
        self._lease = client.register_script(load_script("lease.lua", prelude=False))
        self._drop = client.register_script(load_script("drop_model.lua"))

    # -- what is missing -----------------------------------------------------------------------

    def missing(self, namespace: str, model_id: str, limit: int | None = None) -> Missing:
        """Up to ``limit`` examples ``model_id`` has not embedded. Costs one read of the class
        counts (the namespace's and the model's), then the ids of the incomplete classes only."""
        batches = self.iter_missing(namespace, model_id, limit)
        epoch = next(batches).epoch
        examples = [example for batch in batches for example in batch.examples]
        return Missing(epoch, examples[:limit] if limit is not None else examples)

    def iter_missing(self, namespace: str, model_id: str, limit: int | None = None) -> Iterator[Missing]:
        """First an empty :class:`Missing` carrying the epoch, then the missing examples class
        batch by class batch (so a backfill of a large namespace starts without reading it all)."""
        self.registry.ensure_layout(namespace)
        keys, mk = self.registry.keys(namespace), self.registry.keys(namespace).model(model_id)
        with redis_errors(self._client):
            pipe = self._client.pipeline(transaction=True)
            pipe.hget(keys.state, "epoch")
            pipe.hgetall(keys.counts)
            pipe.hgetall(mk.counts)
            epoch, counts, embedded = pipe.execute()
        epoch_text = text(epoch or b"")
        yield Missing(epoch_text, [])
        incomplete = sorted(decode(f) for f, n in counts.items() if int(n) > int(embedded.get(f, 0)))
        found = 0
        for start in range(0, len(incomplete), _CLASSES_PER_ROUND_TRIP):
            labels = incomplete[start : start + _CLASSES_PER_ROUND_TRIP]
            with redis_errors(self._client):
                pipe = self._client.pipeline(transaction=False)
                for label in labels:
                    pipe.hkeys(keys.images(label))
                    pipe.hkeys(mk.examples(label))
                replies = pipe.execute()
            batch = []
            for i, label in enumerate(labels):
                have = set(replies[2 * i + 1])
                ids = sorted((text(x) for x in replies[2 * i] if x not in have), key=lambda x: (len(x), x))
                batch += [MissingExample(label, example_id) for example_id in ids]
            found += len(batch)
            yield Missing(epoch_text, batch)
            if limit is not None and found >= limit:
                return

    def stored_images(self, namespace: str, examples: Sequence[MissingExample]) -> list[bytes | None]:
        """Each example's stored image: b"" where none was stored, None where the example is gone."""
        keys = self.registry.keys(namespace)
        with redis_errors(self._client):
            pipe = self._client.pipeline(transaction=False)
            for example in examples:
                pipe.hget(keys.images(example.label), example.example_id)
            return list(pipe.execute())

    # -- writing embeddings --------------------------------------------------------------------

    def fill(
        self,
        namespace: str,
        model_id: str,
        epoch: str,
        examples: Sequence[MissingExample],
        embeddings: np.ndarray,
    ) -> int:
        """Store ``model_id``'s embeddings of ``examples`` (parallel rows), skipping examples
        deleted meanwhile (or of another epoch) and ones embedded meanwhile; one script, so a
        class's prototype and the namespace's counts move together. Returns how many it wrote."""
        if not len(examples):
            return 0
        keys = self.registry.keys(namespace)
        mk = keys.model(model_id)
        by_label: dict[str, list[tuple[str, bytes]]] = {}
        for example, row in zip(examples, np.asarray(embeddings, dtype=np.float32)):
            by_label.setdefault(example.label, []).append(
                (example.example_id, row.astype(_FLOAT32_LE).tobytes())
            )
        script_keys = [keys.state, keys.counts, keys.models, keys.changes, mk.counts, mk.prototypes, mk.sums]
        args: list[object] = [model_id, embeddings.shape[1], epoch, self.registry.change_log_size]
        for label, rows in by_label.items():
            script_keys += [keys.images(label), mk.examples(label)]
            args += [encode(label), len(rows)]
            for example_id, blob in rows:
                args += [example_id, blob]
        with redis_errors(self._client):
            try:
                return int(self._fill(keys=script_keys, args=args))
            except redis.exceptions.ResponseError as exc:
                if script_code(exc) == "DIM_MISMATCH":
                    raise FailedPrecondition(
                        f"model {model_id!r} was recorded with another embedding size in "
                        f"namespace {namespace!r}"
                    ) from None
                raise Unavailable(REFUSED, detail=f"Redis: {exc}") from None

    # -- the backfill lease and record ---------------------------------------------------------

    def try_lease(self, namespace: str, model_id: str, token: str, lease_ms: int) -> bool:
        """Take the (namespace, model) backfill lease unless another replica holds it."""
        lease = self.registry.keys(namespace).model(model_id).lease
        with redis_errors(self._client):
            return bool(self._client.set(lease, token, nx=True, px=lease_ms))

    def renew_lease(self, namespace: str, model_id: str, token: str, lease_ms: int) -> bool:
        """Extend the lease; False when it is no longer ours (it expired and was taken)."""
        return self._lease_call(namespace, model_id, "renew", token, lease_ms)

    def release_lease(self, namespace: str, model_id: str, token: str) -> bool:
        return self._lease_call(namespace, model_id, "release", token, 0)

    def _lease_call(self, namespace: str, model_id: str, action: str, token: str, lease_ms: int) -> bool:
        lease = self.registry.keys(namespace).model(model_id).lease
        with redis_errors(self._client):
            return bool(self._lease(keys=[lease], args=[action, token, lease_ms]))

    def lease_holder(self, namespace: str, model_id: str) -> str | None:
        lease = self.registry.keys(namespace).model(model_id).lease
        with redis_errors(self._client):
            holder = self._client.get(lease)
        return text(holder) if holder is not None else None

    def record(self, namespace: str, model_id: str, without_image: int, generation: int) -> None:
        key = self.registry.keys(namespace).model(model_id).backfill
        with redis_errors(self._client):
            pipe = self._client.pipeline(transaction=True)
            pipe.hset(
                key,
                mapping={
                    "without_image": without_image,
                    "generation": generation,
                    "finished": f"{time.time():.3f}",
                },
            )
            pipe.expire(key, _RECORD_TTL_S)
            pipe.execute()

    def last_record(self, namespace: str, model_id: str) -> BackfillRecord | None:
        key = self.registry.keys(namespace).model(model_id).backfill
        with redis_errors(self._client):
            without_image, generation = self._client.hmget(key, "without_image", "generation")
        if without_image is None:
            return None
        return BackfillRecord(int(without_image), int(generation or 0))

    # -- dropping a model ----------------------------------------------------------------------

    def drop(self, namespace: str, model_id: str) -> int:
        """Forget every embedding of ``model_id`` in ``namespace`` (examples and images stay);
        returns how many were dropped."""
        self.registry.ensure_layout(namespace)
        keys = self.registry.keys(namespace)
        mk = keys.model(model_id)
        for _attempt in range(_ATTEMPTS):
            with redis_errors(self._client):
                fields = [text(f) for f in self._client.hkeys(mk.counts)]
                script_keys = [keys.state, keys.models, *mk.every_key(decode(f) for f in fields)]
                try:
                    return int(self._drop(keys=script_keys, args=[model_id, *fields]))
                except redis.exceptions.ResponseError as exc:
                    if script_code(exc) == "CHANGED":
                        continue
                    raise Unavailable(REFUSED, detail=f"Redis: {exc}") from None
        raise Unavailable(f"namespace {namespace!r} kept changing; retry later")
