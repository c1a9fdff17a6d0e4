"""Issue 32: servers announce the model they run (a heartbeat in Redis); dropping a model a live
server announces is refused (409 naming it) unless forced, and allowed once that server died."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest
from test_e2e import COLOURS, photo, upload

from fewshot_client import FewShotClient
from fewshot_client.errors import FailedPrecondition
from fewshot_service.app import ServerStack
from fewshot_service.registry.heartbeats import live_servers

from conftest import stack_settings

PREFIX = "heartbeats"
BEAT_S = 0.5


def test_a_model_a_live_server_announces_is_not_dropped_unless_forced(
    serve_process, redis_url: str, redis_client, tiny_model_path: Path, other_model_path: Path
) -> None:
    model_a = serve_process(
        [
            "--model",
            tiny_model_path,
            "--redis-url",
            redis_url,
            "--redis-key-prefix",
            PREFIX,
            "--heartbeat-s",
            BEAT_S,
        ]
    ).wait_ready()
    response = httpx.post(
        f"{model_a.http_url}/v1/classes/red/examples", files=upload([photo(COLOURS["red"], 0)])
    )
    assert response.status_code == 201, response.text
    model_id_a = model_a.banner.split("model ", 1)[1].split(" ", 1)[0]
    server_a = model_a.output().split(f"serving model {model_id_a} as server ", 1)[1].split(":", 1)[0]

    settings_b = stack_settings(other_model_path, redis_url, redis_key_prefix=PREFIX, heartbeat_s=BEAT_S)
    with (
        ServerStack(settings_b) as model_b,
        httpx.Client(base_url=f"http://127.0.0.1:{model_b.http_port}") as b,
    ):
        assert model_b.core is not None
        assert live_servers(redis_client, PREFIX, model_b.core.model_id) == [model_b.server_id]
        assert live_servers(redis_client, PREFIX, model_id_a) == [server_a]

        refused = b.delete(f"/v1/models/{model_id_a}")
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"] == "failed_precondition"
        assert server_a in refused.json()["message"] and "force=true" in refused.json()["message"]
        with FewShotClient(f"127.0.0.1:{model_b.grpc_port}", http_url=str(b.base_url)) as client:
            with pytest.raises(FailedPrecondition, match=server_a):
                client.delete_model(model_id_a)
        # Model A's server still classifies: its embeddings were not touched.
        classified = httpx.post(f"{model_a.http_url}/v1/classify", files=upload([photo(COLOURS["red"], 1)]))
        assert classified.status_code == 200, classified.text

        # Its server SIGKILLed: no goodbye, the announcement lapses within three beats.
        model_a.process.send_signal(signal.SIGKILL)
        model_a.process.wait()
        deadline = time.monotonic() + 3 * BEAT_S + 2.0
        while live_servers(redis_client, PREFIX, model_id_a) and time.monotonic() < deadline:
            time.sleep(0.1)
        dropped = b.delete(f"/v1/models/{model_id_a}")
        assert dropped.status_code == 200, dropped.text
        assert dropped.json()["dropped_embeddings"] == 1


def test_force_drops_a_model_that_live_servers_announce_and_a_stopped_server_withdraws_at_once(
    redis_url: str, redis_client, tiny_model_path: Path, other_model_path: Path
) -> None:
    settings_a = stack_settings(
        tiny_model_path, redis_url, redis_key_prefix=PREFIX + "-force", heartbeat_s=60
    )
    settings_b = stack_settings(
        other_model_path, redis_url, redis_key_prefix=PREFIX + "-force", heartbeat_s=60
    )
    with ServerStack(settings_a) as a, ServerStack(settings_b) as b:
        assert a.core is not None
        httpx.post(
            f"http://127.0.0.1:{a.http_port}/v1/classes/red/examples",
            files=upload([photo(COLOURS["red"], 0)]),
        )
        with FewShotClient(f"127.0.0.1:{b.grpc_port}", http_url=f"http://127.0.0.1:{b.http_port}") as client:
            with pytest.raises(FailedPrecondition, match=a.server_id):
                client.delete_model(a.core.model_id)
            assert client.delete_model(a.core.model_id, force=True).dropped_embeddings == 1
        model_id_a = a.core.model_id
        a.stop()  # a graceful stop withdraws the announcement (no wait for it to lapse)
        assert live_servers(redis_client, PREFIX + "-force", model_id_a) == []
        assert live_servers(redis_client, PREFIX + "-force", b.core.model_id) == [b.server_id]  # type: ignore[union-attr]
