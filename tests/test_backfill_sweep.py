"""Issue 32: a backfill whose ``fewshot serve`` was SIGKILLed mid-pass is resumed by a fresh
server of the same model once the lease expires, by the periodic sweep, with no traffic at all."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import redis
from test_e2e import COLOURS, photo

from fewshot_service.app import ServerStack
from fewshot_service.registry.model_store import ModelStore
from fewshot_service.registry.registry import Registry

from conftest import stack_settings

PREFIX = "sweep"
NS = "shop"
EXAMPLES = 320
LEASE_S = 6.0  # longer than a server takes to start (the control below)


def test_a_killed_backfill_is_resumed_by_the_sweep_without_traffic(
    serve_process, redis_url: str, tiny_model_path: Path, other_model_path: Path
) -> None:
    settings = stack_settings(tiny_model_path, redis_url, redis_key_prefix=PREFIX, backfill_on_start=False)
    with (
        ServerStack(settings) as model_a,
        httpx.Client(base_url=f"http://127.0.0.1:{model_a.http_port}", timeout=60) as http,
    ):
        for start in range(0, EXAMPLES, 64):
            files = [
                ("files", (f"{i}.png", photo(COLOURS["red" if i % 2 else "blue"], i, (64, 64)), "image/png"))
                for i in range(start, start + 64)
            ]
            response = http.post(
                f"/v1/classes/{'red' if start % 128 else 'blue'}/examples",
                params={"namespace": NS},
                files=files,
            )
            assert response.status_code == 201, response.text
    client = redis.Redis.from_url(redis_url)
    store = ModelStore(Registry(client, key_prefix=PREFIX))

    def serve_b(sweep_s: float):  # type: ignore[no-untyped-def]
        return serve_process(
            [
                "--model",
                other_model_path,
                "--redis-url",
                redis_url,
                "--redis-key-prefix",
                PREFIX,
                "--backfill-lease-s",
                LEASE_S,
                "--backfill-sweep-s",
                sweep_s,
                # Slow enough to be caught mid-pass: one image per model run, one thread.
                "--max-batch-size",
                1,
                "--batch-workers",
                1,
                "--intra-op-threads",
                1,
            ]
        )

    def embedded(model_id: str) -> int:
        return store.registry.status(NS, model_id).embedded

    def kill_mid_pass() -> tuple[str, int]:
        """A server of model B SIGKILLed while it holds the lease, a batch or so into its pass."""
        doomed = serve_b(0).wait_ready()
        model_b = doomed.banner.split("model ", 1)[1].split(" ", 1)[0]
        deadline = time.monotonic() + 30
        while store.lease_holder(NS, model_b) is None and time.monotonic() < deadline:
            time.sleep(0.005)
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait()
        assert store.lease_holder(NS, model_b) is not None
        return model_b, embedded(model_b)

    def wait_lease_expired(model_b: str) -> None:
        deadline = time.monotonic() + LEASE_S + 5
        while store.lease_holder(NS, model_b) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.lease_holder(NS, model_b) is None, "the dead server's lease did not expire"

    # Without the sweep, a fresh server finds the lease held at its start and never looks again.
    model_b, killed_at = kill_mid_pass()
    assert killed_at < EXAMPLES
    idle = serve_b(0).wait_ready()
    assert store.lease_holder(NS, model_b) is not None, "the lease expired before the server started"
    wait_lease_expired(model_b)
    time.sleep(2.0)
    assert embedded(model_b) == killed_at
    idle.stop()

    # With it: started while the lease is held too, it takes the namespace at the first sweep
    # after the lease expired and finishes it; nothing else talks to it.
    model_b, killed_at = kill_mid_pass()
    assert killed_at < EXAMPLES
    sweeping = serve_b(0.5).wait_ready()
    assert store.lease_holder(NS, model_b) is not None, "the lease expired before the server started"
    deadline = time.monotonic() + LEASE_S + 60
    while embedded(model_b) < EXAMPLES and time.monotonic() < deadline:
        time.sleep(0.2)
    assert embedded(model_b) == EXAMPLES, f"{embedded(model_b)} of {EXAMPLES}: {sweeping.output()[-2000:]}"
    client.close()
