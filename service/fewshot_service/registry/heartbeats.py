"""Which servers are alive, per model: each server announces the model it serves.

One sorted set per model (``keys.alive_key``): member = the server's id, score = when its
announcement lapses (Unix seconds). A server re-announces every ``interval_s`` with a lapse of
three intervals, so a server that died (SIGKILL) drops out within that; the key itself expires
with the last announcement. Dropping a model's embeddings is refused while a live server
announces it (FailedPrecondition, naming them), since that server would answer 409 to every
Classify until it re-embedded everything. Clocks of the servers may differ by less than the
lapse minus the interval (10 s by default): announcements are in the announcer's time.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

from fewshot_common.errors import FewshotError

from .keys import alive_key, redis_errors
from .redis_client import RedisClient

log = logging.getLogger(__name__)

LAPSE_INTERVALS = 3


def new_server_id() -> str:
    """A random id: the name under which this server is announced (logged at start)."""
    return uuid.uuid4().hex[:12]


def live_servers(client: RedisClient, prefix: str, model_id: str) -> list[str]:
    """The ids of the servers whose announcement of ``model_id`` has not lapsed."""
    with redis_errors(client):
        members = client.zrangebyscore(alive_key(prefix, model_id), time.time(), "+inf")
    return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)


class Heartbeat:
    """Announces ``model_id`` as served by ``server_id`` until :meth:`stop` (which withdraws it)."""

    def __init__(
        self, client: RedisClient, prefix: str, model_id: str, server_id: str, *, interval_s: float
    ) -> None:
        self.client = client
        self.key = alive_key(prefix, model_id)
        self.server_id = server_id
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Heartbeat:
        self._beat()  # announced before the server takes requests
        self._thread = threading.Thread(target=self._loop, name="fewshot-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5.0)
        try:
            with redis_errors(self.client):
                self.client.zrem(self.key, self.server_id)
        except FewshotError:
            pass  # Redis away: the announcement lapses by itself

    def _beat(self) -> None:
        now, lapse_s = time.time(), self.interval_s * LAPSE_INTERVALS
        try:
            with redis_errors(self.client):
                pipe = self.client.pipeline(transaction=True)
                pipe.zadd(self.key, {self.server_id: now + lapse_s})
                pipe.zremrangebyscore(self.key, "-inf", now)  # those of dead servers
                pipe.expire(self.key, int(lapse_s) + 1)
                pipe.execute()
        except FewshotError as exc:  # Redis away: the next beat tries again
            log.warning("could not announce the model this server runs: %s", exc)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._beat()
