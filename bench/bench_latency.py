"""One client's latency over each transport, side by side in one run: REST kept alive and on a new
connection per request, gRPC on one channel and on a new channel per call.

    PYTHONPATH=service:service/client:bench python bench/bench_latency.py [--model models/default.onnx]

Single-image ``Embed`` (the synthetic 256-px JPEGs of bench_serving.py), one request at a time from
this process, rounds interleaved so that a busy moment of the machine hits every row alike. Also
times a second server whose listening socket is made as it was before TCP_NODELAY (protocol 0, so
asyncio leaves Nagle's algorithm on for accepted connections): the row ``REST kept alive, Nagle
on`` shows what the fix is worth. Prints one JSON line, then a table of p50 / p99 in ms.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from fewshot_api.fewshot.v1 import fewshot_pb2, fewshot_pb2_grpc
from fewshot_service import app as app_module
from fewshot_service.app import ServerStack
from fewshot_service.registry.redis_server import ManagedRedis
from fewshot_service.settings import Settings

from bench_engine import cpu_model
from bench_serving import DEFAULT_MODEL, synthetic_jpegs

BOUNDARY = "bench-latency"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="ONNX model served")
    parser.add_argument("--requests", type=int, default=300, help="timed requests per row")
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds the requests are split into"
    )
    parser.add_argument("--image-size", type=int, default=256, help="side of the synthetic JPEG sent")
    return parser.parse_args()


def _bind_without_nodelay(host: str, port: int) -> socket.socket:
    """The listening socket as it was made before the fix (protocol 0)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


@contextmanager
def server(model: Path, redis_url: str, *, nodelay: bool = True) -> Iterator[ServerStack]:
    settings = Settings(model=model, redis_url=redis_url, host="127.0.0.1", grpc_port=0, http_port=0)
    bind = app_module._bind
    if not nodelay:
        app_module._bind = _bind_without_nodelay
    try:
        stack = ServerStack(settings).start()
    finally:
        app_module._bind = bind
    try:
        yield stack
    finally:
        stack.stop()


def multipart(image: bytes) -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    )
    return head.encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()


def rest_call(connection: http.client.HTTPConnection, body: bytes) -> None:
    connection.request(
        "POST", "/v1/embed", body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    )
    response = connection.getresponse()
    response.read()
    if response.status != 200:
        raise RuntimeError(f"REST embed answered {response.status}")


def timed_ms(call: Callable[[], None], count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> int:
    args = parse_args()
    image = synthetic_jpegs(1, args.image_size)[0]
    body = multipart(image)
    request = fewshot_pb2.EmbedRequest(images=[image])
    per_round = max(1, args.requests // args.rounds)
    with tempfile.TemporaryDirectory() as tmp, ManagedRedis(Path(tmp), persistent=False) as store:
        with server(args.model, store.url) as fixed, server(args.model, store.url, nodelay=False) as old:
            kept = http.client.HTTPConnection("127.0.0.1", fixed.http_port)
            kept_old = http.client.HTTPConnection("127.0.0.1", old.http_port)
            channel = grpc.insecure_channel(f"127.0.0.1:{fixed.grpc_port}")
            stub = fewshot_pb2_grpc.FewShotStub(channel)

            def rest_new() -> None:
                connection = http.client.HTTPConnection("127.0.0.1", fixed.http_port)
                try:
                    rest_call(connection, body)
                finally:
                    connection.close()

            def grpc_new() -> None:
                with grpc.insecure_channel(f"127.0.0.1:{fixed.grpc_port}") as fresh:
                    fewshot_pb2_grpc.FewShotStub(fresh).Embed(request, timeout=30)

            rows: dict[str, Callable[[], None]] = {
                "REST kept alive": lambda: rest_call(kept, body),
                "REST new connection": rest_new,
                "gRPC one channel": lambda: stub.Embed(request, timeout=30),
                "gRPC new channel": grpc_new,
                "REST kept alive, Nagle on (before the fix)": lambda: rest_call(kept_old, body),
            }
            for call in rows.values():  # warm-up: sessions, connections, first-call allocations
                for _ in range(5):
                    call()
            times: dict[str, list[float]] = {name: [] for name in rows}
            # The server closes a connection idle for its keep-alive timeout (5 s) while the other
            # rows run: each kept-alive row starts its turn on a fresh, warmed connection.
            reconnect = {"REST kept alive": kept, "REST kept alive, Nagle on (before the fix)": kept_old}
            for round_ in range(args.rounds):
                order = list(rows) if round_ % 2 == 0 else list(reversed(rows))
                for name in order:
                    if name in reconnect:
                        reconnect[name].close()
                        rows[name]()  # untimed: http.client connects again on this request
                    times[name] += timed_ms(rows[name], per_round)
            kept.close()
            kept_old.close()
            channel.close()
    figures = {
        name: {
            "p50_ms": round(statistics.median(values), 2),
            "p99_ms": round(statistics.quantiles(values, n=100)[98], 2),
            "n": len(values),
        }
        for name, values in times.items()
    }
    print(
        json.dumps(
            {"cpu": cpu_model(), "model": str(args.model), "image_px": args.image_size, "latency": figures}
        )
    )
    print(f"\n{'one client, single-image Embed':<46} {'p50 ms':>8} {'p99 ms':>8}")
    for name, figure in figures.items():
        print(f"{name:<46} {figure['p50_ms']:>8.2f} {figure['p99_ms']:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
