"""Whether Redis answers, known without asking it on the request path.

A background probe PINGs Redis every ``interval_s`` (over a client of its own, so it never waits
behind the request pool) and caches the answer: readiness (/readyz, grpc.health.v1) reads that
cache and answers at once whatever Redis does.

It is also a breaker. A frozen Redis (SIGSTOP, a stalled VM, a network that drops packets) does
not refuse connections, it lets every command wait for its socket timeout; a registry call of
several commands would wait once per command. The first command that times out marks Redis
unreachable, and from then on every registry block (:func:`keys.redis_errors`) fails at once with
Unavailable until the probe gets an answer again. So a call spends at most about one
``--redis-timeout-s`` in Redis, and the calls that arrive meanwhile none.

The timeout bounds a call's time in Redis in total (redis_client.redis_time_budget): a call of
several commands that are each slow but in time runs out of its budget. That trips the breaker
only when the last command itself waited at least the probe's share of the timeout (a Redis
that slow fails the probe too); a call whose budget earlier commands used up says nothing about
whether Redis answers now.
"""

from __future__ import annotations

import logging
import threading
import weakref

import redis

from .redis_client import CLUSTER_ERRORS, RedisClient, RedisTimeSpent

log = logging.getLogger(__name__)

# The probe's PING may take half the timeout: a Redis slower than that is too slow for requests.
PROBE_TIMEOUT_SHARE = 0.5
MAX_PROBE_INTERVAL_S = 0.5

# The health of each request client, for redis_errors (which is handed only the client).
_BY_CLIENT: weakref.WeakKeyDictionary[object, RedisHealth] = weakref.WeakKeyDictionary()


def health_of(client: object) -> RedisHealth | None:
    return _BY_CLIENT.get(client)


class RedisHealth:
    """The cached reachability of the Redis behind ``client`` (the request client), probed over
    ``probe_client``. ``start()`` the probe thread; ``stop()`` it."""

    def __init__(self, client: RedisClient, probe_client: RedisClient, *, timeout_s: float) -> None:
        self._probe_client = probe_client
        self.timeout_s = timeout_s  # a call's whole time in Redis (redis_errors' budget)
        self.interval_s = min(MAX_PROBE_INTERVAL_S, timeout_s / 4)
        self.last_error = ""  # why Redis was last found unreachable (server log only)
        self._reachable = self._ping()  # known before the first request
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        _BY_CLIENT[client] = self

    @property
    def reachable(self) -> bool:
        return self._reachable

    def start(self) -> RedisHealth:
        self._thread = threading.Thread(target=self._loop, name="fewshot-redis-probe", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5.0)
        self._probe_client.close()

    def timed_out(self, error: Exception) -> None:
        """A request's command timed out: Redis is unreachable until the probe says otherwise."""
        if isinstance(error, RedisTimeSpent) and error.waited_s < PROBE_TIMEOUT_SHARE * self.timeout_s:
            return  # the call's budget ran out, not Redis' patience: the probe still decides
        self.last_error = f"a command: {error}"
        self._set(False)

    def wait_for(self, reachable: bool, timeout: float) -> bool:
        """Block until the cached state is ``reachable`` (tests)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._reachable is reachable, timeout)

    def _set(self, reachable: bool) -> None:
        with self._changed:
            if reachable != self._reachable:
                log.warning(
                    "Redis is %s", "reachable again" if reachable else "unreachable: requests answer 503"
                )
            self._reachable = reachable
            self._changed.notify_all()

    def _ping(self) -> bool:
        try:
            return bool(self._probe_client.ping())
        except (redis.exceptions.RedisError, *CLUSTER_ERRORS) as exc:
            self.last_error = f"the last probe: {exc}"  # for the server log (it may name the address)
            return False

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._set(self._ping())
