"""Issue 32: a call's time in Redis is bounded by ``--redis-timeout-s`` in total, not per command.

A real Redis behind a loopback proxy that holds every reply for 0.6 of the timeout: each command
answers in time, so only a budget shared by a call's commands stops a call of several of them
from waiting once per command.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from slow_redis_proxy import SlowRedisProxy
from test_e2e import COLOURS, add, photo
from test_self_healing import HEALTH_LIMIT_S, timed_get, wait_for

from fewshot_service.app import ServerStack
from fewshot_service.registry.redis_client import RedisTimeSpent, connect_redis, redis_time_budget

from conftest import stack_settings

TIMEOUT_S = 1.0
DELAY_S = 0.6 * TIMEOUT_S
# Below the probe's share of the timeout (redis_health.PROBE_TIMEOUT_SHARE): Redis stays "reachable".
LIVE_DELAY_S = 0.4 * TIMEOUT_S
# Thread wake-ups and the proxy's own forwarding on a loaded 2-core machine.
MARGIN_S = 0.4


@pytest.fixture
def proxy(redis_url: str) -> Iterator[SlowRedisProxy]:
    parts = redis.connection.parse_url(redis_url)
    with SlowRedisProxy(parts["host"], parts["port"], parts.get("password")) as slow:
        yield slow


def test_the_commands_inside_one_budget_share_the_timeout(proxy: SlowRedisProxy) -> None:
    client = connect_redis(proxy.url, TIMEOUT_S)
    try:
        client.set("k", "v")  # the connection (and its handshake) before the slowness
        proxy.delay_s = DELAY_S
        assert client.get("k") == b"v"  # outside a budget each command has its own timeout
        started = time.monotonic()
        with pytest.raises(RedisTimeSpent), redis_time_budget(TIMEOUT_S):
            for _ in range(3):  # three round trips of 0.6 timeout each: 1.8 without the budget
                client.get("k")
        took = time.monotonic() - started
        assert TIMEOUT_S * 0.9 <= took < TIMEOUT_S + MARGIN_S, took
        # A budget spent before a command leaves nothing half-read: the pooled connection that
        # gave up on a reply was dropped, so the next call reads its own replies, not that one.
        proxy.delay_s = 0
        pipe = client.pipeline(transaction=True)
        pipe.set("k", "w").get("k").incr("n")
        assert pipe.execute() == [True, b"w", 1]
        with redis_time_budget(TIMEOUT_S):
            assert client.get("k") == b"w" and client.get("n") == b"1"
    finally:
        client.close()


def test_a_nested_scope_spends_the_outer_budget(proxy: SlowRedisProxy) -> None:
    client = connect_redis(proxy.url, TIMEOUT_S)
    try:
        client.ping()
        proxy.delay_s = DELAY_S
        started = time.monotonic()
        with pytest.raises(RedisTimeSpent), redis_time_budget():  # its total comes from inside
            for _ in range(2):  # two registry blocks of one command each, one budget
                with redis_time_budget(TIMEOUT_S):
                    client.get("k")
        assert time.monotonic() - started < TIMEOUT_S + MARGIN_S
    finally:
        client.close()


def test_a_call_of_several_slow_commands_answers_503_within_the_timeout(
    proxy: SlowRedisProxy, tiny_model_path: Path
) -> None:
    """GET /v1/classes/<label> reads the class, then its examples and the namespace's
    prototypes (several round trips, each in time): 503 after one timeout, not one per round
    trip, and health answers meanwhile."""
    with ServerStack(stack_settings(tiny_model_path, proxy.url, redis_timeout_s=TIMEOUT_S)) as stack:
        url = f"http://127.0.0.1:{stack.http_port}"
        add(url, "red", [photo(COLOURS["red"], s) for s in range(2)])
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/v1/classes/red").status_code == 200
            timed_get(f"{url}/healthz")  # the probe's client is built before the slowness
            proxy.delay_s = LIVE_DELAY_S
            try:
                started = time.monotonic()
                response = http.get("/v1/classes/red")
                took = time.monotonic() - started
                assert response.status_code == 503, response.text
                assert response.json()["error"] == "unavailable"
                assert "Redis" in response.json()["message"] and "6379" not in response.text
                assert took < TIMEOUT_S + MARGIN_S, took
                status, health_took = timed_get(f"{url}/healthz")
                assert status == 200 and health_took < HEALTH_LIMIT_S, health_took
                # Each PING answers within the probe's share of the timeout: Redis is slow, not
                # gone, so the call's budget (not the breaker) is what stopped the call.
                assert stack.redis_health is not None and stack.redis_health.reachable
                # Slower than that share, the probe finds Redis too slow: readiness says so.
                proxy.delay_s = DELAY_S
                assert wait_for(lambda: timed_get(f"{url}/readyz")[0] == 503, TIMEOUT_S * 2)
            finally:
                proxy.delay_s = 0
            assert wait_for(lambda: timed_get(f"{url}/readyz")[0] == 200, TIMEOUT_S * 2)
            assert http.get("/v1/classes/red").json()["count"] == 2
