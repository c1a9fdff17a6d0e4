"""Bounded work per request (issue 14): the decode pool, cancellation in the batcher, and the
hostile inputs end to end over a real server stack (REST and gRPC, real model, private Redis)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from fewshot_api.fewshot.v1 import fewshot_pb2, fewshot_pb2_grpc
from fewshot_common.cancellation import Cancellation
from fewshot_common.errors import Cancelled, Overloaded
from fewshot_service.app import ServerStack
from fewshot_service.core.batcher import BatchConfig, DynamicBatcher
from fewshot_service.core.decode_pool import DecodePool

import hostile_images as hostile
import image_samples as samples
from conftest import stack_settings

MAX_EXAMPLES = 3


# -- the decode pool ----------------------------------------------------------------------------


def test_a_full_decode_pool_refuses_at_once_and_recovers() -> None:
    pool = DecodePool(workers=1, max_queued=1)
    release = threading.Event()
    try:
        with ThreadPoolExecutor(2) as callers:
            running = callers.submit(pool.run, lambda: release.wait(10) and "first")
            queued = callers.submit(pool.run, lambda: "second")
            time.sleep(0.2)  # both have taken their slots
            started = time.monotonic()
            with pytest.raises(Overloaded, match="busy: 1 image decodes running and 1 waiting"):
                pool.run(lambda: "third")
            assert time.monotonic() - started < 0.1
            release.set()
            assert (running.result(5), queued.result(5)) == ("first", "second")
        assert pool.run(lambda: "again") == "again"
    finally:
        release.set()
        pool.close()


def test_a_decode_runs_on_the_requests_own_thread_and_close_waits_for_it() -> None:
    pool = DecodePool(workers=1, max_queued=0)
    release, threads = threading.Event(), []

    def job() -> str:
        threads.append(threading.current_thread())
        release.wait(10)
        return "decoded"

    caller = threading.Thread(target=pool.run, args=(job,))
    caller.start()
    time.sleep(0.1)
    closer = threading.Thread(target=pool.close)
    closer.start()
    time.sleep(0.1)
    assert closer.is_alive()  # the admitted decode is still running
    release.set()
    closer.join(5)
    caller.join(5)
    assert not closer.is_alive() and threads == [caller]  # no hand-off to another thread


def test_a_cancellation_tells_a_passed_deadline_from_a_cancel() -> None:
    # gRPC answers DEADLINE_EXCEEDED for the first and CANCELLED for the second.
    expired = Cancellation.after(0.0)
    assert expired.is_cancelled() and expired.deadline_passed()
    cancelled = Cancellation.after(60.0)
    cancelled.cancel()
    assert cancelled.is_cancelled() and not cancelled.deadline_passed()
    assert not Cancellation().deadline_passed() and not Cancellation().is_cancelled()


def test_a_request_cancelled_while_queued_never_decodes() -> None:
    pool = DecodePool(workers=1, max_queued=4)
    release, ran = threading.Event(), []
    try:
        with ThreadPoolExecutor(2) as callers:
            callers.submit(pool.run, lambda: release.wait(10))
            time.sleep(0.1)
            cancellation = Cancellation()
            waiting = callers.submit(pool.run, lambda: ran.append("decoded"), cancellation)
            cancellation.cancel()
            release.set()
            with pytest.raises(Cancelled, match="before decoding its images"):
                waiting.result(5)
        assert ran == []
    finally:
        release.set()
        pool.close()


# -- cancellation in the batcher ----------------------------------------------------------------


def test_cancelled_requests_leave_the_batcher_queue_without_a_model_run() -> None:
    release, batches = threading.Event(), []

    def run(pixels: np.ndarray) -> np.ndarray:
        release.wait(10)
        batches.append(pixels[:, 0].tolist())
        return pixels * 2

    batcher = DynamicBatcher(run, BatchConfig(max_batch_size=8, max_queue_delay_ms=0, workers=1))
    try:
        with ThreadPoolExecutor(3) as callers:
            blocker = callers.submit(batcher.submit, np.full((1, 1), 1.0))
            time.sleep(0.1)  # the worker is inside run() with the first request
            cancellation = Cancellation()
            dropped = callers.submit(batcher.submit, np.full((1, 1), 2.0), cancellation)
            kept = callers.submit(batcher.submit, np.full((1, 1), 3.0))
            time.sleep(0.1)
            cancellation.cancel()
            release.set()
            with pytest.raises(Cancelled, match="before inference"):
                dropped.result(5)
            assert kept.result(5).tolist() == [[6.0]] and blocker.result(5).tolist() == [[2.0]]
        assert batches == [[1.0], [3.0]]  # the cancelled request's pixels never reached the model
        with pytest.raises(Cancelled):
            batcher.submit(np.ones((1, 1)), Cancellation.after(-1))
    finally:
        release.set()
        batcher.close()


# -- hostile inputs over a real server -----------------------------------------------------------


@pytest.fixture(scope="module")
def stack(private_redis, tiny_model_path: Path) -> Iterator[ServerStack]:
    settings = stack_settings(
        tiny_model_path,
        private_redis.url,
        decode_workers=1,
        decode_queue=0,
        max_examples_per_class=MAX_EXAMPLES,
        redis_key_prefix="decode-budget",
    )
    with ServerStack(settings) as running:
        yield running


@pytest.fixture
def http(stack: ServerStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.http_port}", timeout=60) as client:
        yield client


@pytest.fixture
def stub(stack: ServerStack) -> Iterator[fewshot_pb2_grpc.FewShotStub]:
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        yield fewshot_pb2_grpc.FewShotStub(channel)


def upload(*images: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"f{i}", data, "application/octet-stream")) for i, data in enumerate(images)]


def assert_healthy_and_empty(http: httpx.Client, namespace: str) -> None:
    assert http.get("/readyz").status_code == 200
    listing = http.get("/v1/classes", params={"namespace": namespace}).json()
    assert listing["classes"] == []


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        (
            "scan-repeating-jpeg",
            lambda: hostile.scan_repeating_jpeg(3000, (2000, 2000)),
            "more than 64 scans",
        ),
        ("pixels-per-request", lambda: [hostile.sixteen_bit_png((6000, 6000))] * 6, "pixels in all"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_hostile_uploads_are_refused_fast_and_add_nothing(
    http: httpx.Client, name: str, make, message: str
) -> None:
    made = make()
    images = made if isinstance(made, list) else [samples.solid_png((1, 2, 3)), made]
    started = time.monotonic()
    response = http.post("/v1/classes/cat/examples", params={"namespace": name}, files=upload(*images))
    assert time.monotonic() - started < 5.0
    assert response.status_code == 413, response.text
    body = response.json()
    assert body["error"] == "too_large" and message in body["message"]
    assert_healthy_and_empty(http, name)


@pytest.mark.slow
def test_a_32_bit_tiff_within_the_limits_is_answered_in_bounded_time(http: httpx.Client) -> None:
    tiff = hostile.wide_tiff("I", (6300, 6300))  # 39.7 M pixels, a few hundred KB on the wire
    started = time.monotonic()
    response = http.post("/v1/classes/tiff/examples", params={"namespace": "tiff"}, files=upload(tiff))
    assert response.status_code == 201, response.text
    assert time.monotonic() - started < 30.0
    assert http.get("/readyz").status_code == 200
    assert http.delete("/v1/classes/tiff", params={"namespace": "tiff"}).status_code == 200


def test_a_busy_decode_pool_answers_429_and_the_slow_request_still_succeeds(
    http: httpx.Client, stack: ServerStack
) -> None:
    # ~1.2 s of CPU for its two decodes (model input, stored copy), within the 2 s an image may use
    slow = hostile.scan_repeating_jpeg(16, (6000, 6000))
    with ThreadPoolExecutor(1) as background:
        first = background.submit(
            http.post, "/v1/classes/slow/examples", params={"namespace": "busy"}, files=upload(slow)
        )
        statuses: list[int] = []
        with httpx.Client(base_url=str(http.base_url), timeout=60) as other:
            while not first.done() and 429 not in statuses:
                reply = other.post(
                    f"/v1/classes/fast{len(statuses)}/examples",
                    params={"namespace": "busy"},
                    files=upload(samples.solid_png((5, 5, 5))),
                )
                statuses.append(reply.status_code)
                if reply.status_code == 429:
                    assert reply.json()["error"] == "overloaded"
                time.sleep(0.05)
        assert first.result().status_code == 201
    assert 429 in statuses and set(statuses) <= {201, 429}


def test_the_class_cap_is_409_and_the_class_keeps_its_examples(http: httpx.Client) -> None:
    images = [samples.solid_png((10 * i, 0, 0)) for i in range(MAX_EXAMPLES)]
    namespace = "cap"
    assert (
        http.post(
            "/v1/classes/cat/examples", params={"namespace": namespace}, files=upload(*images)
        ).status_code
        == 201
    )
    response = http.post("/v1/classes/cat/examples", params={"namespace": namespace}, files=upload(images[0]))
    assert response.status_code == 409
    assert f"would exceed the limit of {MAX_EXAMPLES} examples per class" in response.json()["message"]
    classes = http.get("/v1/classes", params={"namespace": namespace}).json()["classes"]
    assert [(c["label"], c["count"]) for c in classes] == [("cat", MAX_EXAMPLES)]


def test_a_scan_bomb_over_grpc_is_resource_exhausted(stub: fewshot_pb2_grpc.FewShotStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(fewshot_pb2.EmbedRequest(images=[hostile.scan_repeating_jpeg(3000)]), timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than 64 scans" in caught.value.details()
    assert stub.Embed(fewshot_pb2.EmbedRequest(images=[hostile.progressive_jpeg()]), timeout=30).embeddings
