"""What every part of the registry shares: the Redis client, the key prefix, the limits, the
loaded scripts, and the translation of a script's refusal into the service's errors."""

from __future__ import annotations

import numpy as np
import redis

from fewshot_common.errors import FailedPrecondition, InvalidInput, NotFound, Unavailable

from .keys import REFUSED, NamespaceKeys, load_script, text
from .redis_client import RedisClient

# Lua's unpack() passes each float on the C stack (about 8,000 slots); far above any ViT width.
MAX_EMBEDDING_DIM = 4096
DEFAULT_MAX_EXAMPLES_PER_CLASS = 1000
# Labels the change log keeps per namespace (~100 bytes each in Redis): a replica further behind
# than this many distinct changed classes reloads the namespace in full.
DEFAULT_CHANGE_LOG_SIZE = 10_000
FLOAT32_LE = np.dtype("<f4")
# A script refused because the models or classes changed under it reads them again; this often.
SCRIPT_ATTEMPTS = 5


class Scripts:
    """The registry's Lua scripts, registered once per client (redis-py sends EVALSHA)."""

    def __init__(self, client: RedisClient) -> None:
        self.add = client.register_script(load_script("add_examples.lua"))
        self.delete_class = client.register_script(load_script("delete_class.lua"))
        self.delete_example = client.register_script(load_script("delete_example.lua"))
        self.changes_since = client.register_script(load_script("changes_since.lua", prelude=False))
        self.delete_namespace = client.register_script(load_script("delete_namespace.lua"))
        self.migrate = client.register_script(load_script("migrate_layout.lua"))
        self.index_labels = client.register_script(load_script("index_labels.lua", prelude=False))


class Store:
    """The client, key prefix, limits and scripts one :class:`Registry` works with."""

    def __init__(
        self,
        client: RedisClient,
        key_prefix: str,
        max_examples_per_class: int,
        change_log_size: int,
    ) -> None:
        if max_examples_per_class <= 0:
            raise ValueError(f"max_examples_per_class must be positive, got {max_examples_per_class}")
        if change_log_size <= 0:
            raise ValueError(f"change_log_size must be positive, got {change_log_size}")
        if not key_prefix or "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must be non-empty and free of '{' and '}' (the hash tag)")
        self.client = client
        self.prefix = key_prefix
        self.max_examples_per_class = max_examples_per_class
        self.change_log_size = change_log_size
        self.scripts = Scripts(client)

    def keys(self, namespace: str) -> NamespaceKeys:
        return NamespaceKeys(self.prefix, namespace)

    def example_ids(self, keys: NamespaceKeys, label: str) -> list[str]:
        ids = [text(i) for i in self.client.hkeys(keys.images(label))]
        return sorted(ids, key=lambda i: (len(i), i))  # numeric order: ids are counters


def check_embeddings(embeddings: np.ndarray) -> np.ndarray:
    """``embeddings`` as float32 [n, D], refused (InvalidInput) unless every row is a direction."""
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


def script_error(
    exc: redis.exceptions.ResponseError,
    namespace: str,
    label: str,
    model_id: str | None = None,
    example_id: str | None = None,
    adding: int = 0,
) -> Exception:
    """A class script's refusal (scripts/*.lua, ``redis.error_reply``) as the service's error."""
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
