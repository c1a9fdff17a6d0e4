"""Issue 32: a server that heals itself or says it is sick, against real processes.

The embedded Valkey SIGKILLed (restarted, classes kept; a crash loop fails liveness and ends
``fewshot serve`` non-zero), and an external Redis frozen with SIGSTOP (every call answers within
one timeout, health at once).
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_e2e import COLOURS, add, grpc_of, http_of, photo, upload

from fewshot_client import FewShotClient
from fewshot_service.app import ServerStack
from fewshot_service.registry.redis_server import ManagedRedis
from fewshot_service.settings import Settings

HEALTH_LIMIT_S = 0.1


def wait_for(condition, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def grpc_health(port: int) -> tuple[int, float]:
    """(status, seconds) of a grpc.health.v1 Check."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        started = time.monotonic()
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        return reply.status, time.monotonic() - started


_PROBES: dict[str, httpx.Client] = {}


def timed_get(url: str) -> tuple[int, float]:
    """Like a kubelet's probe: one GET on a client of its own (built beforehand: building an
    httpx client takes longer than the probe on a loaded 2-core machine)."""
    base = url.rsplit("/", 1)[0]
    client = _PROBES.setdefault(base, httpx.Client(timeout=10))
    started = time.monotonic()
    response = client.get(url)
    return response.status_code, time.monotonic() - started


def children_of(pid: int) -> list[int]:
    """The child processes of ``pid`` (every thread's: the restarted Valkey is the watcher's)."""
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as children:
                found += [int(child) for child in children.read().split()]
        except FileNotFoundError:
            pass  # the thread ended meanwhile
    return found


def kill_until_dead(managed: ManagedRedis, timeout: float = 30.0) -> int:
    """SIGKILL the embedded server each time it comes back, until it is declared dead."""
    kills = 0
    deadline = time.monotonic() + timeout
    while not managed.dead and time.monotonic() < deadline:
        pid = managed.pid
        if managed.running and pid is not None:
            os.kill(pid, signal.SIGKILL)
            kills += 1
        time.sleep(0.05)
    return kills


def test_a_killed_embedded_redis_is_restarted_with_its_classes(tmp_path: Path, tiny_model_path: Path) -> None:
    settings = Settings(
        model=tiny_model_path, data_dir=tmp_path / "data", host="127.0.0.1", grpc_port=0, http_port=0
    )
    with ServerStack(settings) as stack:
        url, managed = http_of(stack), stack.managed_redis
        assert managed is not None and stack.redis_health is not None
        add(url, "red", [photo(COLOURS["red"], 0), photo(COLOURS["red"], 1)])
        os.kill(managed.pid or 0, signal.SIGKILL)
        assert wait_for(lambda: managed.restarts == 1, 20), "the embedded Redis was not restarted"
        assert stack.redis_health.wait_for(True, settings.redis_timeout_s)
        assert httpx.get(f"{url}/readyz").status_code == 200
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{url}/v1/classes/red").json()["count"] == 2  # kept by the append-only file
        add(url, "green", [photo(COLOURS["green"], 2)])  # and writes work again
        with grpc_of(stack) as client:
            assert client.classify([photo(COLOURS["red"], 3)])[0][0].label == "red"


def test_an_embedded_redis_that_keeps_dying_fails_liveness(tmp_path: Path, tiny_model_path: Path) -> None:
    settings = Settings(
        model=tiny_model_path, data_dir=tmp_path / "data", host="127.0.0.1", grpc_port=0, http_port=0
    )
    with ServerStack(settings) as stack:
        url, managed = http_of(stack), stack.managed_redis
        assert managed is not None
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert kill_until_dead(managed) > managed.max_restarts
        health = httpx.get(f"{url}/healthz")
        assert health.status_code == 503 and health.json() == {"status": "failed"}
        assert httpx.get(f"{url}/readyz").status_code == 503
        assert grpc_health(stack.grpc_port or 0)[0] == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not stack.alive()


def test_fewshot_serve_exits_non_zero_when_its_embedded_redis_cannot_come_back(
    serve_process, tiny_model_path: Path, tmp_path: Path
) -> None:
    server = serve_process(["--model", tiny_model_path, "--data-dir", tmp_path / "data"]).wait_ready()
    kills, deadline = 0, time.monotonic() + 60
    while server.process.poll() is None and time.monotonic() < deadline:
        for child in children_of(server.process.pid):
            try:
                os.kill(child, signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    assert server.process.wait(timeout=30) == 1, server.output()
    assert kills > 5
    output = server.output()
    assert "exited unexpectedly (killed by SIGKILL)" in output and "giving up" in output
    assert "liveness failed" in output
    assert "requirepass" not in output  # the password never reaches the log


def test_a_frozen_redis_answers_every_call_within_the_timeout_and_health_at_once(
    serve_process, tmp_path: Path, tiny_model_path: Path
) -> None:
    """A separate ``fewshot serve`` process: timings here are the server's, not this test's GIL."""
    timeout_s, slack_s = 1.0, 1.0  # slack: the adds and classifies embed first (CPU)
    with ManagedRedis(tmp_path / "redis", persistent=False) as external:  # SIGSTOPped below
        server = serve_process(
            [
                "--model",
                tiny_model_path,
                "--redis-url",
                external.url,
                "--redis-timeout-s",
                timeout_s,
            ]
        ).wait_ready()
        url = server.http_url
        add(url, "red", [photo(COLOURS["red"], 0)])
        shot, query = upload([photo(COLOURS["red"], 1)]), upload([photo(COLOURS["red"], 2)])
        grpc_query = photo(COLOURS["red"], 3)
        assert external.pid is not None
        with (
            httpx.Client(base_url=url, timeout=30) as http,
            FewShotClient(server.grpc_target, timeout=30) as rpc,
        ):
            requests = [
                lambda: http.get("/v1/classes"),
                lambda: http.get("/v1/classes/red"),
                lambda: http.post("/v1/classes/red/examples", files=shot),
                lambda: http.post("/v1/classify", files=query),
            ] * 6

            def timed(call):  # type: ignore[no-untyped-def]
                started = time.monotonic()
                return call(), time.monotonic() - started

            def grpc_call() -> tuple[grpc.StatusCode, float]:
                started = time.monotonic()
                try:
                    rpc.classify([grpc_query])
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    code = exc.code()
                return code, time.monotonic() - started

            def frozen_then_thawed(run) -> None:  # type: ignore[no-untyped-def]
                timed(requests[0])  # the pool's connections are open before the freeze
                os.kill(external.pid or 0, signal.SIGSTOP)
                try:
                    run()
                finally:
                    os.kill(external.pid or 0, signal.SIGCONT)
                assert wait_for(lambda: timed_get(f"{url}/readyz")[0] == 200, timeout_s)

            def health_while_requests_wait() -> None:
                # Requests that only wait on Redis (no CPU: on this 2-core machine embeddings
                # would time the CPU, not Redis) hold the worker threads; liveness answers at once.
                with ThreadPoolExecutor(24) as pool:
                    waiting = [pool.submit(timed, requests[i % 2]) for i in range(24)]
                    time.sleep(0.2)
                    health = [timed_get(f"{url}/healthz") for _ in range(5)]
                    assert all(f.result()[0].status_code == 503 for f in waiting)
                assert all(status == 200 and took < HEALTH_LIMIT_S for status, took in health), health

            timed_get(f"{url}/healthz")  # the probe's connection is open before the freeze
            frozen_then_thawed(health_while_requests_wait)
            timed(requests[0])  # the pool's connections are open before the freeze
            os.kill(external.pid, signal.SIGSTOP)
            try:
                with ThreadPoolExecutor(len(requests) + 8) as pool:
                    grpc_calls = [pool.submit(grpc_call) for _ in range(8)]
                    rest = [pool.submit(timed, call) for call in requests]
                    for response, took in (f.result() for f in rest):
                        assert response.status_code == 503, response.text
                        assert response.json()["error"] == "unavailable"
                        assert took < timeout_s + slack_s, f"{response.request.url} took {took:.2f}s"
                    for code, took in (f.result() for f in grpc_calls):
                        assert code == grpc.StatusCode.UNAVAILABLE and took < timeout_s + slack_s, (
                            code,
                            took,
                        )
                # Readiness knows within one timeout, and says so at once.
                assert wait_for(lambda: timed_get(f"{url}/readyz")[0] == 503, timeout_s)
                status, took = timed_get(f"{url}/readyz")
                assert status == 503 and took < HEALTH_LIMIT_S, (status, took)
                status, took = grpc_health(server.grpc_port)
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING and took < HEALTH_LIMIT_S, took
                # Later calls do not wait for Redis at all.
                response, took = timed(requests[0])
                assert response.status_code == 503 and took < HEALTH_LIMIT_S * 2, took
            finally:
                os.kill(external.pid, signal.SIGCONT)
            assert wait_for(lambda: timed_get(f"{url}/readyz")[0] == 200, timeout_s)
            assert http.get("/v1/classes/red").json()["count"] >= 1
            assert rpc.classify([grpc_query])[0][0].label == "red"
