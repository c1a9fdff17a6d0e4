"""The registry's Redis key layout, and what every registry module shares: name encoding, script
loading and the translation of Redis failures.

One hash tag per namespace, so every script of a namespace runs on one Cluster slot::

    {prefix}:{ns:<hex>}:state        hash   generation (bumped on every change of any model's
                                            prototypes), epoch, next_example_id, log_start,
                                            logged (what the change log covers), layout (2),
                                            examples (how many the namespace holds),
                                            n:<model id> (how many of them that model embedded),
                                            label_index (1: the labels zset is complete)
    {prefix}:{ns:<hex>}:changes      zset   <label hex> -> generation of its last change
    {prefix}:{ns:<hex>}:counts       hash   <label hex> -> number of examples
    {prefix}:{ns:<hex>}:labels       zset   <label hex>, score 0: the classes in label order
                                            (ZRANGEBYLEX: cursor pages, prefix search), kept by
                                            every script that creates or deletes a class; state's
                                            label_index says it is complete (index_labels.lua
                                            builds it for a namespace written before it)
    {prefix}:{ns:<hex>}:models       hash   <model id> -> embedding dim, for each model holding
                                            embeddings here
    {prefix}:{ns:<hex>}:img:<label hex>  hash  <example id> -> the stored image ('' for none)
    {prefix}:{ns:<hex>}:sha:<label hex>  hash  sha256 hex of an uploaded file -> <epoch>:<example id>
                                            (bulk import's dedupe, bulk.py; an entry counts only
                                            while that example exists in that epoch; the delete
                                            scripts drop an example's entries with it)

    and per model id (``m`` = ``{prefix}:{ns:<hex>}:m:<model id hex>``):

    m:counts        hash   <label hex> -> examples of the class this model has embedded
    m:prototypes    hash   <label hex> -> float32 LE prototype
    m:sums          hash   <label hex> -> float64 LE sum of unit embeddings, <label hex>:n
    m:ex:<label hex>  hash  <example id> -> float32 LE embedding
    m:lease         string the token of the replica backfilling this model here (expires)
    m:backfill      hash   what its last backfill pass found (expires)

and per model, outside every namespace (heartbeats.py)::

    {prefix}:alive:<model id hex>  zset  <server id> -> when its announcement lapses (Unix s)

A model is complete for a namespace when ``n:<model>`` equals ``examples``. Names appear in key
names only as the hex of their UTF-8, so no label can reach another key, break out of the hash
tag, or look like a glob. Namespaces written before per-model keys (``:model``, ``:prototypes``,
``:sums``, ``:ex:<label hex>``) are migrated on first touch (migrate_layout.lua).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib import resources

import redis

from fewshot_common.errors import Unavailable

from .redis_client import CLUSTER_ERRORS, RedisClient, RedisTimeSpent, redis_time_budget
from .redis_health import health_of

LAYOUT = "2"

# The codes the registry scripts answer with (redis.error_reply); see scripts/*.lua.
SCRIPT_ERRORS = {
    "DIM_MISMATCH",
    "NO_CLASS",
    "NO_EXAMPLE",
    "TOO_MANY_EXAMPLES",
    "CHANGED",
    "LEGACY",
}
REFUSED = "the class store (Redis) refused the request; retry later"
UNREACHABLE = "the class store (Redis) is unreachable; retry later"
TOO_SLOW = "the class store (Redis) did not answer in time; retry later"


def encode(name: str) -> str:
    return name.encode("utf-8").hex()


def decode(field_name: bytes | str) -> str:
    text = field_name.decode("ascii") if isinstance(field_name, bytes) else field_name
    return bytes.fromhex(text).decode("utf-8")


def text(value: bytes | str | int) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def script_code(exc: Exception) -> str:
    return str(exc).split(" ", 1)[0]


def load_script(name: str, *, prelude: bool = True) -> str:
    scripts = resources.files("fewshot_service.registry") / "scripts"
    body = (scripts / name).read_text(encoding="utf-8")
    if not prelude:
        return body
    return (scripts / "prototype.lua").read_text(encoding="utf-8") + "\n" + body


@contextmanager
def redis_errors(client: RedisClient) -> Iterator[None]:
    """Every Redis failure becomes Unavailable; redis-py reconnects by itself on the next call.

    While the client's :class:`RedisHealth` knows Redis unreachable, fail at once rather than wait
    for a socket timeout per command; the first timeout tells it so (see redis_health.py). The
    commands inside share one ``--redis-timeout-s`` (:func:`redis_time_budget`; an enclosing scope,
    e.g. the core's per-operation one, makes its own budget the shared one)."""
    health = health_of(client)
    if health is not None and not health.reachable:
        raise Unavailable(UNREACHABLE, detail=f"not tried: Redis failed {health.last_error}")
    try:
        with redis_time_budget(health.timeout_s if health is not None else None):
            yield
    except RedisTimeSpent as exc:
        if health is not None:
            health.timed_out(exc)  # it decides whether this says Redis stopped answering
        raise Unavailable(TOO_SLOW, detail=str(exc)) from None
    except redis.exceptions.TimeoutError as exc:
        if health is not None:
            health.timed_out(exc)
        raise Unavailable(UNREACHABLE, detail=str(exc)) from None
    except redis.exceptions.ConnectionError as exc:
        # No address in the message: it reaches clients, and the deployment is not theirs to see.
        raise Unavailable(UNREACHABLE, detail=str(exc)) from None
    except CLUSTER_ERRORS as exc:  # e.g. a slot without a master during a failover
        raise Unavailable(
            "the class store (Redis Cluster) is unavailable; retry later", detail=str(exc)
        ) from None
    except redis.exceptions.ResponseError as exc:
        if script_code(exc) in SCRIPT_ERRORS:
            raise  # a registry script's own answer; the caller translates it
        # Redis' words may name keys or script hashes: for the server log only.
        raise Unavailable(REFUSED, detail=f"Redis: {exc}") from None


def alive_key(prefix: str, model_id: str) -> str:
    """The servers announcing ``model_id`` (heartbeats.py)."""
    return f"{prefix}:alive:{encode(model_id)}"


def glob_escape(value: str) -> str:
    """``value`` matched literally by Redis' glob (SCAN MATCH): escape ``* ? [ ] \\``."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in value)


def state_key_pattern(prefix: str) -> str:
    """The SCAN MATCH glob of every namespace's state key (``{prefix}:{ns:*}:state``)."""
    return f"{glob_escape(prefix)}:{{ns:*}}:state"


def namespace_of_state_key(prefix: str, key: bytes | str) -> str:
    """The namespace whose state key is ``key`` (one that :func:`state_key_pattern` matched)."""
    head, tail = f"{prefix}:{{ns:", "}:state"
    name = text(key)
    if not (name.startswith(head) and name.endswith(tail)):
        raise ValueError(f"not a namespace state key: {name!r}")
    return decode(name[len(head) : -len(tail)])


class ModelKeys:
    """The keys of one model's embeddings in one namespace."""

    def __init__(self, namespace_base: str, model_id: str) -> None:
        base = f"{namespace_base}:m:{encode(model_id)}"
        self.model_id = model_id
        self.counts = f"{base}:counts"
        self.prototypes = f"{base}:prototypes"
        self.sums = f"{base}:sums"
        self.lease = f"{base}:lease"
        self.backfill = f"{base}:backfill"
        self._examples = f"{base}:ex:"

    def examples(self, label: str) -> str:
        return self._examples + encode(label)

    def for_class(self, label: str) -> list[str]:
        """This model's keys of one class, in the order the class scripts take them."""
        return [self.counts, self.prototypes, self.sums, self.examples(label)]

    def every_key(self, labels: Iterable[str]) -> list[str]:
        """Every key this model holds in the namespace, its classes ``labels``, in the order the
        scripts that drop a whole model (delete_namespace, drop_model) take them."""
        return [
            self.counts,
            self.prototypes,
            self.sums,
            self.lease,
            self.backfill,
            *(self.examples(label) for label in labels),
        ]


class NamespaceKeys:
    def __init__(self, prefix: str, namespace: str) -> None:
        self.base = base = f"{prefix}:{{ns:{encode(namespace)}}}"
        self.state = f"{base}:state"
        self.counts = f"{base}:counts"
        self.models = f"{base}:models"
        self.changes = f"{base}:changes"
        self.labels = f"{base}:labels"
        self._images = f"{base}:img:"
        self._hashes = f"{base}:sha:"
        # The layout before per-model keys (read once, by the migration).
        self.legacy_model = f"{base}:model"
        self.legacy_prototypes = f"{base}:prototypes"
        self.legacy_sums = f"{base}:sums"
        self._legacy_examples = f"{base}:ex:"

    def images(self, label: str) -> str:
        return self._images + encode(label)

    def hashes(self, label: str) -> str:
        return self._hashes + encode(label)

    def legacy_examples(self, label: str) -> str:
        return self._legacy_examples + encode(label)

    def model(self, model_id: str) -> ModelKeys:
        return ModelKeys(self.base, model_id)

    def for_class(self, label: str, model_ids: list[str]) -> list[str]:
        """The KEYS of a class script: the namespace's, then each model's, in ``model_ids`` order."""
        keys = [
            self.state,
            self.counts,
            self.models,
            self.changes,
            self.images(label),
            self.labels,
            self.hashes(label),
        ]
        for model_id in model_ids:
            keys += self.model(model_id).for_class(label)
        return keys
