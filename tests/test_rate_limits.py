"""Per-key rate limits (issue 32): requests/s and images/s from the key file, over both transports
of a real server; 429 + Retry-After / RESOURCE_EXHAUSTED + retry-after; the metric; SIGHUP."""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client import REGISTRY

from fewshot_api.fewshot.v1 import fewshot_pb2, fewshot_pb2_grpc
from fewshot_client import FewShotClient
from fewshot_client.errors import RateLimited
from fewshot_common import cli, errors
from fewshot_service.app import ServerStack
from fewshot_service.transport.access import AccessControl, Action, key_digest
from fewshot_service.transport.rate_limit import Limit, RateLimiter

import image_samples as samples
from conftest import stack_settings

IMAGE = samples.solid_png((20, 120, 220))
# Key name -> its limit fields in the key file.
LIMITS = {
    "req-rest": "requests_per_s = 2",
    "req-grpc": "requests_per_s = 2",
    "img-rest": "images_per_s = 3",
    "img-grpc": "images_per_s = 3",
    "free": "",
}


def key_file_text(keys: dict[str, str], limits: dict[str, str]) -> str:
    return "".join(
        f'[[keys]]\nname = "{name}"\nsha256 = "{key_digest(key).hex()}"\nrole = "write"\n'
        f'namespaces = ["*"]\n{limits[name]}\n\n'
        for name, key in keys.items()
    )


@pytest.fixture(scope="module")
def limited(
    tiny_model_path: Path, private_redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerStack, dict[str, str]]]:
    keys = {name: secrets.token_urlsafe(32) for name in LIMITS}
    key_file = tmp_path_factory.mktemp("limits") / "keys.toml"
    key_file.write_text(key_file_text(keys, LIMITS))
    settings = stack_settings(
        tiny_model_path, private_redis.url, redis_key_prefix="limits", api_keys=key_file
    )
    with ServerStack(settings) as stack:
        # Warm both paths up (the first inference is slow), so "quick" requests are quick.
        assert rest_embed(stack, keys["free"]).status_code == 200
        with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
            assert grpc_embed(channel, keys["free"]) is None
        yield stack, keys


def refused(key_name: str, kind: str) -> float:
    return (
        REGISTRY.get_sample_value("fewshot_rate_limited_total", {"key_name": key_name, "kind": kind}) or 0.0
    )


def rest_embed(stack: ServerStack, key: str, images: int = 1) -> httpx.Response:
    files = [("files", (f"{i}.png", IMAGE, "image/png")) for i in range(images)]
    return httpx.post(
        f"http://127.0.0.1:{stack.http_port}/v1/embed",
        files=files,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def grpc_embed(channel: grpc.Channel, key: str, images: int = 1) -> grpc.RpcError | None:
    stub = fewshot_pb2_grpc.FewShotStub(channel)
    try:
        stub.Embed(
            fewshot_pb2.EmbedRequest(images=[IMAGE] * images),
            metadata=[("authorization", f"Bearer {key}")],
            timeout=30,
        )
    except grpc.RpcError as exc:
        return exc
    return None


def retry_after(exc: grpc.RpcError) -> int:
    return int(dict(exc.trailing_metadata() or ())["retry-after"])


def test_rest_third_quick_request_is_429_with_retry_after_then_passes(limited) -> None:
    stack, keys = limited
    before = refused("req-rest", "requests")
    assert [rest_embed(stack, keys["req-rest"]).status_code for _ in range(2)] == [200, 200]
    third = rest_embed(stack, keys["req-rest"])
    assert third.status_code == 429
    assert third.json()["error"] == "rate_limited"
    assert "req-rest" in third.json()["message"] and keys["req-rest"] not in third.text
    wait = int(third.headers["Retry-After"])
    assert wait == 1  # 2 per second: the next token comes within a second
    assert refused("req-rest", "requests") == before + 1
    time.sleep(wait)
    assert rest_embed(stack, keys["req-rest"]).status_code == 200


def test_grpc_third_quick_call_is_resource_exhausted_with_retry_after_then_passes(limited) -> None:
    stack, keys = limited
    before = refused("req-grpc", "requests")
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        assert [grpc_embed(channel, keys["req-grpc"]) for _ in range(2)] == [None, None]
        third = grpc_embed(channel, keys["req-grpc"])
        assert third is not None and third.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "req-grpc" in third.details()
        wait = retry_after(third)
        assert wait == 1
        assert refused("req-grpc", "requests") == before + 1
        time.sleep(wait)
        assert grpc_embed(channel, keys["req-grpc"]) is None


def test_images_are_counted_per_image_on_both_transports(limited) -> None:
    stack, keys = limited
    # 3 images/s, burst 3: two images pass, two more do not (one left), one more does.
    assert rest_embed(stack, keys["img-rest"], images=2).status_code == 200
    second = rest_embed(stack, keys["img-rest"], images=2)
    assert second.status_code == 429 and int(second.headers["Retry-After"]) >= 1
    assert rest_embed(stack, keys["img-rest"], images=1).status_code == 200
    assert refused("img-rest", "images") >= 1
    # More images than the burst could ever allow: 413, not a wait that never ends.
    assert rest_embed(stack, keys["img-rest"], images=4).status_code == 413
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        assert grpc_embed(channel, keys["img-grpc"], images=2) is None
        second_call = grpc_embed(channel, keys["img-grpc"], images=2)
        assert second_call is not None and second_call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert retry_after(second_call) >= 1
        assert grpc_embed(channel, keys["img-grpc"], images=1) is None


def test_keys_without_limits_are_unlimited(limited) -> None:
    stack, keys = limited
    assert {rest_embed(stack, keys["free"], images=3).status_code for _ in range(8)} == {200}
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        assert {grpc_embed(channel, keys["free"], images=3) for _ in range(8)} == {None}
    assert refused("free", "requests") == 0 and refused("free", "images") == 0


def test_the_bucket_refills_at_its_rate_and_honours_the_burst() -> None:
    now = [100.0]
    limiter = RateLimiter(clock=lambda: now[0])
    limit = Limit(rate=2.0, burst=4.0)
    for _ in range(4):
        limiter.take("k", "requests", limit)
    with pytest.raises(errors.RateLimited) as refusal:
        limiter.take("k", "requests", limit)
    assert refusal.value.retry_after_s == 1  # 0.5 s rounded up to whole seconds
    now[0] += 0.5
    limiter.take("k", "requests", limit)
    now[0] += 60  # a long pause saves up no more than the burst
    for _ in range(4):
        limiter.take("k", "requests", limit)
    with pytest.raises(errors.RateLimited):
        limiter.take("k", "requests", limit)
    slow = Limit(rate=0.1, burst=1.0)
    limiter.take("slow", "images", slow)
    with pytest.raises(errors.RateLimited) as refusal:
        limiter.take("slow", "images", slow)
    assert refusal.value.retry_after_s == 10


def test_key_file_limits_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(key_file_text({"k": "secret-key-1"}, {"k": "requests_per_s = -1"}))
    with pytest.raises(ValueError, match="requests_per_s"):
        AccessControl(path)
    path.write_text(key_file_text({"k": "secret-key-1"}, {"k": "images_burst = 20"}))
    with pytest.raises(ValueError, match="images_burst needs images_per_s"):
        AccessControl(path)
    path.write_text(key_file_text({"k": "secret-key-1"}, {"k": "images_per_s = 5\nimages_burst = 20"}))
    principal = AccessControl(path).check("secret-key-1", Action.EMBED)
    assert principal.limits.images == Limit(rate=5, burst=20) and principal.limits.requests is None


def test_keygen_writes_the_limits(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert (
        cli.main(
            [
                "keygen",
                "--name",
                "bot",
                "--role",
                "read",
                "--namespace",
                "*",
                "--requests-per-s",
                "2",
                "--images-per-s",
                "7.5",
                "--images-burst",
                "30",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    key = captured.err.split("\n")[1].strip()
    (tmp_path / "keys.toml").write_text(captured.out)
    assert "requests_per_s = 2\n" in captured.out and "requests_burst" not in captured.out
    principal = AccessControl(tmp_path / "keys.toml").check(key, Action.EMBED)
    assert principal.limits.requests == Limit(rate=2, burst=2)
    assert principal.limits.images == Limit(rate=7.5, burst=30)
    with pytest.raises(SystemExit):
        cli.main(["keygen", "--name", "b", "--role", "read", "--namespace", "*", "--requests-per-s", "0"])


def test_sighup_reload_changes_the_limits(
    tiny_model_path: Path, redis_url: str, tmp_path: Path, serve_process
) -> None:
    key = secrets.token_urlsafe(32)
    key_file = tmp_path / "keys.toml"
    key_file.write_text(key_file_text({"bot": key}, {"bot": "requests_per_s = 1"}))
    server = serve_process(
        ["--model", tiny_model_path, "--api-keys", key_file, "--api-keys-poll-s", "0"],
        env={"REDIS_URL": redis_url},
    ).wait_ready()

    def statuses(n: int) -> list[int]:
        return [
            httpx.get(f"{server.http_url}/v1/classes", headers={"Authorization": f"Bearer {key}"}).status_code
            for _ in range(n)
        ]

    assert statuses(2) == [200, 429]
    staging = tmp_path / "keys.new"
    staging.write_text(key_file_text({"bot": key}, {"bot": "requests_per_s = 50"}))
    staging.replace(key_file)
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while "API keys: reloaded" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert statuses(5) == [200] * 5  # the new limit, a fresh bucket
    assert server.stop() == 0
    assert key not in server.output()


def test_the_client_raises_rate_limited_with_the_wait_over_both_transports(limited) -> None:
    stack, keys = limited
    grpc_target, http_url = f"127.0.0.1:{stack.grpc_port}", f"http://127.0.0.1:{stack.http_port}"
    time.sleep(1.1)  # full buckets, whatever the earlier tests left
    with FewShotClient(grpc_target, http_url=http_url, api_key=keys["img-grpc"]) as client:
        client.embed([IMAGE] * 3)  # 3 images/s: the bucket is empty now
        with pytest.raises(RateLimited) as over_grpc:
            client.embed([IMAGE])
        assert over_grpc.value.retry_after_s == 1
        assert over_grpc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with FewShotClient(grpc_target, http_url=http_url, api_key=keys["req-rest"]) as client:
        client.list_classes()
        client.list_classes()  # 2 requests/s: the third must wait
        with pytest.raises(RateLimited) as over_rest:
            client.list_classes()
        assert over_rest.value.retry_after_s == 1 and over_rest.value.status == 429
