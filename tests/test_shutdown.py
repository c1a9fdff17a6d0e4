"""Graceful shutdown of a real `fewshot serve` process (issue 16): on SIGTERM readiness goes
false first, then both transports refuse new calls, finish the ones in flight, and the process
exits 0 within ``--shutdown-grace-s``."""

from __future__ import annotations

import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fewshot_api.fewshot.v1 import fewshot_pb2, fewshot_pb2_grpc

import image_samples as samples

GRACE_S = 20.0


def slow_batch(count: int = 48) -> list[bytes]:
    """Large noisy JPEGs: decoding them one at a time keeps a request busy for a while."""
    rng = np.random.default_rng(0)
    from PIL import Image

    base = rng.integers(0, 256, (900, 1200, 3), dtype=np.uint8)
    return [
        samples.encode(Image.fromarray(np.roll(base, i, axis=1)), "JPEG", quality=95) for i in range(count)
    ]


def timed(call, *args, **kwargs) -> tuple[object, float]:
    result = call(*args, **kwargs)
    return result, time.monotonic()


@pytest.fixture
def server(serve_process, tiny_model_path: Path, tmp_path: Path):
    return serve_process(
        [
            "--model",
            tiny_model_path,
            "--data-dir",
            tmp_path / "data",
            "--decode-workers",
            "1",
            "--shutdown-grace-s",
            GRACE_S,
            "--shutdown-delay-s",
            "1.0",
        ]
    ).wait_ready()


@pytest.mark.slow
def test_sigterm_turns_readiness_false_then_finishes_calls_in_flight_and_exits_0(server) -> None:
    images = slow_batch()
    channel = grpc.insecure_channel(server.grpc_target)
    stub = fewshot_pb2_grpc.FewShotStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    http = httpx.Client(base_url=server.http_url, timeout=60)
    try:
        assert http.get("/readyz").status_code == 200
        with ThreadPoolExecutor(max_workers=2) as pool:
            # One call per transport, both in flight when the signal arrives.
            rest: Future = pool.submit(
                timed,
                http.post,
                "/v1/classes/crowd/examples",
                files=[("files", (f"{i}.jpg", img, "image/jpeg")) for i, img in enumerate(images)],
            )
            rpc: Future = pool.submit(timed, stub.Embed, fewshot_pb2.EmbedRequest(images=images), timeout=60)
            time.sleep(0.5)  # both requests sent and being decoded
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)

            # Readiness goes false while the server still answers (the --shutdown-delay-s window).
            deadline, http_not_ready = time.monotonic() + 0.8, False
            while time.monotonic() < deadline and not http_not_ready:
                http_not_ready = httpx.get(f"{server.http_url}/readyz", timeout=2).status_code == 503
            check = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            assert http_not_ready, "/readyz never answered 503 after SIGTERM"
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING

            response, rest_done = rest.result(timeout=GRACE_S + 10)
            reply, rpc_done = rpc.result(timeout=GRACE_S + 10)
        assert response.status_code == 201, response.text
        assert response.json()["count"] == len(images)
        assert len(reply.embeddings) == len(images)
        # Both really were in flight at the signal (else this test proves nothing: make the
        # batch bigger), and finished after it.
        assert rest_done > signalled and rpc_done > signalled

        exit_code = server.process.wait(timeout=GRACE_S + 5)
        assert time.monotonic() - signalled < GRACE_S + 5
        assert exit_code == 0, server.output()
        with pytest.raises(httpx.ConnectError):  # new connections are refused
            httpx.get(f"{server.http_url}/readyz", timeout=2)
        with pytest.raises(grpc.RpcError) as refused:
            fewshot_pb2_grpc.FewShotStub(grpc.insecure_channel(server.grpc_target)).Embed(
                fewshot_pb2.EmbedRequest(images=[samples.solid_png((1, 2, 3))]), timeout=3
            )
        assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        http.close()
        channel.close()


@pytest.mark.slow
def test_a_call_longer_than_the_grace_is_cut_and_the_process_still_exits(
    serve_process, tiny_model_path: Path, tmp_path: Path
) -> None:
    server = serve_process(
        [
            "--model",
            tiny_model_path,
            "--data-dir",
            tmp_path / "data",
            "--decode-workers",
            "1",
            "--shutdown-grace-s",
            "0.2",
        ]
    ).wait_ready()
    images = slow_batch(64)
    channel = grpc.insecure_channel(server.grpc_target)
    try:
        call = fewshot_pb2_grpc.FewShotStub(channel).Embed.future(
            fewshot_pb2.EmbedRequest(images=images), timeout=60
        )
        time.sleep(0.5)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=15) == 0, server.output()
        exited = time.monotonic() - signalled
        with pytest.raises(grpc.RpcError):
            call.result(timeout=10)
        assert exited < 10, f"took {exited:.1f}s to exit with a 0.2 s grace"
    finally:
        channel.close()
