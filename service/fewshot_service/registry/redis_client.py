"""The Redis client the server talks through: one server (``redis.Redis``) or a Redis Cluster.

Both expose what the registry uses (Lua scripts, one-key hash commands, a MULTI pipeline whose
keys share one hash tag), so the registry takes either. A cluster client needs only one node's URL:
it learns the other nodes and the slot map from it, and relearns them after a failover.

A call's time in Redis is bounded in total, not per command (:func:`redis_time_budget`): the
commands inside one budget share ``--redis-timeout-s``, each waiting at most what is left of it. A
socket timeout alone bounds each command, so a call of several slow-but-in-time commands (a read,
then a pipeline, then a script) would wait once per command.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.retry import Retry
from redis.utils import SENTINEL

RedisClient: TypeAlias = redis.Redis | RedisCluster

# Cluster-only failures that are not redis.RedisError (SlotNotCoveredError, while a failover has left
# a slot without a master, is one): the registry answers them as Unavailable too.
CLUSTER_ERRORS: tuple[type[Exception], ...] = (redis.exceptions.RedisClusterException,)


class RedisTimeSpent(redis.exceptions.TimeoutError):
    """The call's time in Redis ran out (its budget, not one command's full socket timeout).
    ``waited_s``: how long the last command waited for its reply before giving up (0: not sent)."""

    def __init__(self, waited_s: float) -> None:
        super().__init__("the call's time in Redis (--redis-timeout-s) is spent")
        self.waited_s = waited_s


class _Budget:
    """The time in Redis left to one call. ``total_s`` None: not known yet, the first
    :func:`redis_time_budget` inside that names one sets it."""

    def __init__(self, total_s: float | None) -> None:
        self.total_s = total_s
        self._spent_s = 0.0
        self._lock = threading.Lock()  # a call may hand work to a thread that shares its context

    def remaining_s(self) -> float | None:
        return None if self.total_s is None else self.total_s - self._spent_s

    def spend(self, seconds: float) -> None:
        with self._lock:
            self._spent_s += seconds


_BUDGET: ContextVar[_Budget | None] = ContextVar("fewshot_redis_time_budget", default=None)


@contextmanager
def redis_time_budget(total_s: float | None = None) -> Iterator[None]:
    """Every Redis command inside shares one budget of ``total_s`` seconds of waiting for Redis
    (those of nested scopes too: the outermost scope's budget is the one spent). ``None`` opens a
    scope whose total the first inner scope that knows it sets (the registry knows the timeout,
    its callers need not). Without any scope each command has its full socket timeout."""
    current = _BUDGET.get()
    if current is not None:
        if current.total_s is None:
            current.total_s = total_s
        yield
        return
    token = _BUDGET.set(_Budget(total_s))
    try:
        yield
    finally:
        _BUDGET.reset(token)


class _BudgetedConnection:
    """A redis-py connection whose reads wait at most what is left of the call's budget. Replies
    are read one by one (a pipeline's too), so each read gets the remaining time as its timeout."""

    socket_timeout: float | None

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        budget = _BUDGET.get()
        remaining = None if budget is None else budget.remaining_s()
        if remaining is not None and remaining <= 0:
            raise RedisTimeSpent(0.0)  # nothing sent: the connection stays usable
        super().send_packed_command(command, check_health)  # type: ignore[misc]

    def read_response(self, disable_decoding: bool = False, *, timeout: Any = SENTINEL, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        remaining = None if budget is None else budget.remaining_s()
        if budget is None or remaining is None or timeout is not SENTINEL:
            return super().read_response(disable_decoding, timeout=timeout, **kwargs)  # type: ignore[misc]
        if remaining <= 0:
            self.disconnect()  # type: ignore[attr-defined]  # a reply is still due: drop the connection
            raise RedisTimeSpent(0.0)
        shortened = self.socket_timeout is None or remaining < self.socket_timeout
        started = time.monotonic()
        try:
            return super().read_response(  # type: ignore[misc]
                disable_decoding, timeout=remaining if shortened else SENTINEL, **kwargs
            )
        except redis.exceptions.TimeoutError as exc:
            if shortened:  # redis-py has dropped the connection, as after any read timeout
                raise RedisTimeSpent(time.monotonic() - started) from exc
            raise
        finally:
            budget.spend(time.monotonic() - started)


class _TcpConnection(_BudgetedConnection, Connection):
    pass


class _TlsConnection(_BudgetedConnection, SSLConnection):
    pass


class _UnixConnection(_BudgetedConnection, UnixDomainSocketConnection):
    pass


def _connection_class(url: str) -> type[Connection | UnixDomainSocketConnection]:
    """The budgeted form of the connection class redis-py picks for ``url``'s scheme."""
    scheme = urlsplit(url).scheme
    return {"rediss": _TlsConnection, "unix": _UnixConnection}.get(scheme, _TcpConnection)


def connect_redis(url: str, timeout_s: float = 2.0, *, cluster: bool = False) -> RedisClient:
    """A client that fails fast while Redis is away and reconnects by itself when it is back.

    One quick retry covers the usual case of a pooled connection that died with a restarted server.
    A cluster client gets two: the first retry after a connection error also refreshes the slot map,
    which is how it finds the replica promoted in a failover. Only connection errors are retried,
    never a timeout: a command that waited ``timeout_s`` has used the call's whole time in Redis
    (with a retry of it, a frozen Redis held each command twice as long). The cluster client
    retries timeouts whatever it is told, so there each try gets a third of ``timeout_s``. Inside
    a :func:`redis_time_budget` each read waits at most what is left of the call's budget.
    """
    backoff = ExponentialBackoff(cap=0.2, base=0.05)
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "health_check_interval": 30,
        "connection_class": _connection_class(url),
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
