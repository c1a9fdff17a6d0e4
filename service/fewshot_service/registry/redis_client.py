"""The Redis client the server talks through: one server (``redis.Redis``) or a Redis Cluster.

Both expose what the registry uses (Lua scripts, one-key hash commands, a MULTI pipeline whose
keys share one hash tag), so the registry takes either. A cluster client needs only one node's URL:
it learns the other nodes and the slot map from it, and relearns them after a failover.
"""

from __future__ import annotations

from typing import TypeAlias
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

RedisClient: TypeAlias = redis.Redis | RedisCluster

# Cluster-only failures that are not redis.RedisError (SlotNotCoveredError, while a failover has left
# a slot without a master, is one): the registry answers them as Unavailable too.
CLUSTER_ERRORS: tuple[type[Exception], ...] = (redis.exceptions.RedisClusterException,)


def connect_redis(url: str, timeout_s: float = 2.0, *, cluster: bool = False) -> RedisClient:
    """A client that fails fast while Redis is away and reconnects by itself when it is back.

    One quick retry covers the usual case of a pooled connection that died with a restarted server.
    A cluster client gets two: the first retry after a connection error also refreshes the slot map,
    which is how it finds the replica promoted in a failover. Only connection errors are retried,
    never a timeout: a command that waited ``timeout_s`` has used the call's whole time in Redis
    (with a retry of it, a frozen Redis held each command twice as long). The cluster client
    retries timeouts whatever it is told, so there each try gets a third of ``timeout_s``.
    """
    backoff = ExponentialBackoff(cap=0.2, base=0.05)
    options = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "health_check_interval": 30,
    }
    if cluster:
        options["socket_timeout"] = options["socket_connect_timeout"] = timeout_s / 3
        try:
            # Connects at once: it must read the slot map from a node before any command.
            return RedisCluster.from_url(url, retry=_retry(backoff, 2), **options)
        except (redis.exceptions.RedisError, *CLUSTER_ERRORS) as exc:
            raise RuntimeError(f"cannot use the Redis Cluster named by the Redis URL: {exc}") from None
    return redis.Redis.from_url(url, retry=_retry(backoff, 1), **options)


def _retry(backoff: ExponentialBackoff, retries: int) -> Retry:
    """Retries of refused or reset connections (quick to fail), not of timeouts (see above)."""
    return Retry(backoff, retries, supported_errors=(redis.exceptions.ConnectionError,))


def redacted_url(url: str) -> str:
    """``url`` with its password replaced by ``***``: the form to print or log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
