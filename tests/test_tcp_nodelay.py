"""Both transports answer kept-alive connections without Nagle's delay (TCP_NODELAY on every
accepted socket): a reused connection must not be slower than a new one."""

from __future__ import annotations

import http.client
import os
import socket
import statistics
import time
from pathlib import Path

import httpx
import pytest

from fewshot_client import FewShotClient
from fewshot_service.app import ServerStack

import image_samples as samples
from conftest import stack_settings


def _accepted_sockets_nodelay(port: int) -> list[int]:
    """TCP_NODELAY of every connection this process accepted on ``port`` (read through /proc)."""
    flags = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        with sock:
            try:
                if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.getsockname()[1] != port:
                    continue
                sock.getpeername()  # accepted connections only, not the listening socket
                flags.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            except OSError:
                continue
    return flags


@pytest.fixture(scope="module")
def stack(tiny_model_path: Path, private_redis) -> ServerStack:
    with ServerStack(stack_settings(tiny_model_path, private_redis.url)) as running:
        yield running


def test_accepted_connections_of_both_transports_set_tcp_nodelay(stack: ServerStack) -> None:
    image = samples.noise_png(0)
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.http_port}") as http:
        assert http.post("/v1/embed", files=[("files", ("a.png", image, "image/png"))]).status_code == 200
        rest_flags = _accepted_sockets_nodelay(stack.http_port)
    with FewShotClient(f"127.0.0.1:{stack.grpc_port}") as client:
        client.embed([image])
        grpc_flags = _accepted_sockets_nodelay(stack.grpc_port)
    assert rest_flags and all(rest_flags), rest_flags
    assert grpc_flags and all(grpc_flags), grpc_flags


def _embed_ms(connection: http.client.HTTPConnection, body: bytes, boundary: str) -> float:
    start = time.perf_counter()
    connection.request(
        "POST", "/v1/embed", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    response = connection.getresponse()
    assert response.status == 200, response.read()
    response.read()
    return (time.perf_counter() - start) * 1000


def test_a_kept_alive_rest_request_is_not_slower_than_a_new_connection(stack: ServerStack) -> None:
    """Without TCP_NODELAY the server's response waited for the client's delayed ACK (~40 ms on
    Linux) on a reused connection only; a new connection never showed it."""
    boundary = "nodelay-test"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + samples.noise_png(1)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    kept = http.client.HTTPConnection("127.0.0.1", stack.http_port)
    _embed_ms(kept, body, boundary)  # warm-up on the kept connection
    kept_ms, new_ms = [], []
    for _ in range(15):  # interleaved, so a busy moment of the machine hits both alike
        kept_ms.append(_embed_ms(kept, body, boundary))
        fresh = http.client.HTTPConnection("127.0.0.1", stack.http_port)
        new_ms.append(_embed_ms(fresh, body, boundary))
        fresh.close()
    kept.close()
    # The stall this guards against adds ~40 ms to every kept-alive request; 15 ms of slack is far
    # below it and far above the noise of a 2-core machine.
    assert statistics.median(kept_ms) <= statistics.median(new_ms) + 15, (kept_ms, new_ms)
