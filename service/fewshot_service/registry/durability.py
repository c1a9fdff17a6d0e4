"""What an acknowledged add survives (``--durability``; docs/deployment.md, "Durability").

``everysec``: Redis fsyncs its append-only file once a second, so a power loss (or a crash of the
machine, not of the process) can lose about the last second of acknowledged writes.
``always``: every write is fsynced before Redis answers it, so before the server acknowledges
the add. The embedded server is started with ``appendfsync always``; an external Redis or Valkey
must already be configured so (``appendonly yes``, ``appendfsync always``): the server checks it
at start and refuses to start otherwise, rather than promise what the store does not do.

(``WAITAOF`` after each write was the other way; it waits for the writes of the connection it
is sent on, and redis-py hands each command a pooled connection, so every write would have to
carry it in its own pipeline: a change to every write path, for a guarantee the server setting
gives whole.)
"""

from __future__ import annotations

from typing import Literal

import redis
from redis.cluster import RedisCluster

from .redis_client import CLUSTER_ERRORS, RedisClient

Durability = Literal["everysec", "always"]


class DurabilityUnavailable(RuntimeError):
    """The Redis the server was given cannot honour ``--durability always``."""


def appendfsync_for(durability: Durability) -> str:
    """The embedded server's ``appendfsync``."""
    return "always" if durability == "always" else "everysec"


def check_external(client: RedisClient, durability: Durability) -> None:
    """Refuse (DurabilityUnavailable) a Redis that would acknowledge a write before its fsync
    while ``durability`` is ``always``: every master of a Cluster is asked."""
    if durability != "always":
        return
    try:
        if isinstance(client, RedisCluster):
            replies = client.config_get("append*", target_nodes=RedisCluster.PRIMARIES)
            configs = (
                list(replies.values())
                if isinstance(replies, dict) and "appendonly" not in replies
                else [replies]
            )
        else:
            configs = [client.config_get("append*")]
    except (redis.exceptions.RedisError, *CLUSTER_ERRORS) as exc:
        raise DurabilityUnavailable(
            "--durability always: cannot read the Redis configuration (CONFIG GET appendonly, "
            f"appendfsync) to check it fsyncs every write ({type(exc).__name__}); allow CONFIG GET, "
            "or use --durability everysec"
        ) from None
    for config in configs:
        appendonly, appendfsync = config.get("appendonly"), config.get("appendfsync")
        if appendonly != "yes" or appendfsync != "always":
            raise DurabilityUnavailable(
                "--durability always needs a Redis that fsyncs every write before answering it: "
                f"configure appendonly yes and appendfsync always (it has appendonly {appendonly}, "
                f"appendfsync {appendfsync}), or use --durability everysec"
            )
