"""Served against the engine, in one run: how much of what the engine can do reaches gRPC clients,
and where the rest of the CPU goes.

- ``engine_img_per_s``: the served model file (the variant the server picks: int8 on ONNX Runtime
  on a CPU, bf16 on OpenVINO on a CPU with AMX-BF16) run directly on its engine on preprocessed
  tensors, the fastest of bench_engine.py's layouts and batch sizes (8 and 32), measured in this
  process while the servers idle, before and after the loads (the median of both); the same for
  each other file a config serves (``engine_img_per_s_by_file``);
- ``served``: single-image gRPC ``Embed`` calls from ``C`` concurrent clients (threads) in **another
  process**, for C in ``--clients`` (default 1, 16, 64), against real servers built by the server's
  own ``build_core`` from :data:`CONFIGS` (the defaults; runs of up to 32 images, the default until
  the CPU cap of 8; one batch worker on ONNX Runtime's own spinning threads, the default before
  that; batching off; the int8 variant on ONNX Runtime, where the default serves bf16), in
  alternating rounds (every other one in reverse order): images/s, p50 and p99
  latency (a call the server sheds with RESOURCE_EXHAUSTED, its decode queue full, is retried after
  5 ms and counted);
- ``cpu_ms_per_image`` at each load: CPU time of the server process and of the client process per
  image served, and the share of the machine's cores they kept busy; beside them, measured alone,
  decode + preprocess per image and the engine's core-ms per image. ``ceiling_img_per_s`` is what
  the cores could serve if the engine, the decode and the client were all the work there was:
  ``served / ceiling`` is what the server's own work (gRPC, hand-offs, batching) leaves;
- ``grpc_floor_cpu_ms``: server and client CPU per call of a do-nothing unary gRPC method with a
  request of one JPEG's size, 16 client threads in another process: what gRPC's own Python server
  and client cost per image whatever the handler does;
- ``batch32_img_per_s``: ``Embed`` with 32 images per call, one client, per server (interleaved, each
  call timed after a pause and an untimed call, as bench_engine.py times the engine);
- ``served_over_engine``: served images/s at 16 clients over the engine figure of the file served.

The images are synthetic JPEGs (``--image-size``, default 256 px). The client process shares the CPU
with the server, as clients on the same host do. Prints one JSON line, then a table:

    PYTHONPATH=service:service/client python bench/bench_served.py [--model models/default.onnx]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import onnxruntime as ort

from fewshot_client import FewShotClient
from fewshot_common.cores import usable_cores
from fewshot_common.images import ImageLimits, load_batch
from fewshot_common.variants import choose_model_file
from fewshot_service.app import build_core
from fewshot_service.registry.redis_client import connect_redis
from fewshot_service.registry.redis_server import ManagedRedis
from fewshot_service.settings import Settings
from fewshot_service.transport.grpc.server import create_grpc_server

from bench_engine import best, cpu_model, engine_rates, openvino_version, quiet_seconds
from bench_serving import DEFAULT_MODEL, spread_requests, synthetic_jpegs

# Server settings compared, each over the same model file; the first is what `fewshot serve` runs.
CONFIGS: dict[str, dict[str, object]] = {
    "default": {},
    # The default before runs were capped at 8 images on a CPU: up to 32 images a run.
    "max batch 32": {"max_batch_size": 32},
    "1 worker, spinning": {"batch_workers": 1, "intra_op_threads": usable_cores(), "intra_op_spinning": True},
    "batching off": {"batching": False},
    # The int8 variant on ONNX Runtime, where the default is bf16 on OpenVINO (a CPU with AMX-BF16).
    "int8": {"precision": "int8"},
}


@dataclass
class Load:
    """One closed loop of single-image Embeds, as the client process saw it and what it cost."""

    img_per_s: float
    latencies: list[float]
    shed: int
    server_cpu_s: float
    client_cpu_s: float
    wall_s: float
    images: int


def _client_load(
    address: str,
    images: list[bytes],
    clients: int,
    requests: int,
    results: mp.Queue[tuple[float, list[float], int, float, float]],
    go: mp.Event,
    started: mp.Event,
) -> None:
    """In the client process: ``requests`` single-image Embeds from ``clients`` threads."""
    from fewshot_client.errors import TooLarge

    client = FewShotClient(address)
    for image in images[:clients]:  # warm-up: connections, every code path once
        client.embed([image])
    lock = threading.Lock()
    latencies: list[float] = []
    shed = [0]

    def embed_one(i: int) -> None:
        begun = time.perf_counter()
        while True:
            try:
                client.embed([images[i % len(images)]])
                break
            except TooLarge:  # the decode queue is full: back off and retry, as a client should
                with lock:
                    shed[0] += 1
                time.sleep(0.005)
        elapsed = time.perf_counter() - begun
        with lock:
            latencies.append(elapsed)

    started.set()
    go.wait()  # the parent starts its CPU clock first
    begun, cpu_begun = time.perf_counter(), time.process_time()
    spread_requests(requests, clients, embed_one)
    wall, cpu = time.perf_counter() - begun, time.process_time() - cpu_begun
    results.put((requests / wall, latencies, shed[0], cpu, wall))
    client.close()


def in_client_process(target: Callable[..., None], *args: object) -> tuple[Any, float]:
    """Run ``target(*args, results, go, started)`` in a fresh client process and return what it
    put on ``results`` and this (the server's) process's CPU seconds meanwhile. ``target`` sets
    ``started`` when warmed up and starts its own clock on ``go``, after this one's."""
    context = mp.get_context("spawn")  # a clean process: no server threads or gRPC state inherited
    results, go, started = context.Queue(), context.Event(), context.Event()
    process = context.Process(target=target, args=(*args, results, go, started))
    process.start()
    while not started.wait(timeout=1):
        if not process.is_alive():
            raise RuntimeError(f"the client process exited with code {process.exitcode}")
    cpu_begun = time.process_time()
    go.set()
    while True:  # a client process that dies (any error but a shed call) fails the run at once
        try:
            result = results.get(timeout=1)
            break
        except queue.Empty:
            if not process.is_alive():
                raise RuntimeError(f"the client process exited with code {process.exitcode}") from None
    server_cpu = time.process_time() - cpu_begun  # ends a little after the client's clock
    process.join()
    return result, server_cpu


def served(address: str, images: list[bytes], clients: int, requests: int) -> Load:
    """Run one load from a fresh client process; the server's CPU is this process's."""
    (rate, latencies, shed, client_cpu, wall), server_cpu = in_client_process(
        _client_load, address, images, clients, requests
    )
    return Load(rate, latencies, shed, server_cpu, client_cpu, wall, requests)


ECHO_SERVICE, ECHO_NAME = "bench.Floor", "Echo"


def _echo_load(
    address: str,
    payload: bytes,
    clients: int,
    calls: int,
    results: mp.Queue[float],
    go: mp.Event,
    started: mp.Event,
) -> None:
    """In the client process: ``calls`` unary calls of ``payload`` from ``clients`` threads."""
    with grpc.insecure_channel(address) as channel:
        echo = channel.unary_unary(f"/{ECHO_SERVICE}/{ECHO_NAME}")
        for _ in range(clients):
            echo(payload)
        started.set()
        go.wait()
        cpu_begun = time.process_time()
        spread_requests(calls, clients, lambda _: echo(payload))
        results.put(time.process_time() - cpu_begun)


def grpc_call_floor(payload_bytes: int, clients: int = 16, calls: int = 5000) -> tuple[float, float]:
    """Server and client CPU ms per call of a unary method that does nothing (a 512-byte answer,
    about one embedding's), served by a gRPC server in this process as the real ones are."""
    server = grpc.server(ThreadPoolExecutor(max_workers=64))
    echo = grpc.unary_unary_rpc_method_handler(lambda request, context: bytes(512))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ECHO_SERVICE, {ECHO_NAME: echo}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client_cpu, server_cpu = in_client_process(
            _echo_load, f"127.0.0.1:{port}", bytes(payload_bytes), clients, calls
        )
    finally:
        server.stop(None)
    return 1000 * server_cpu / calls, 1000 * client_cpu / calls


def engine_img_per_s(path: Path, input_size: int) -> tuple[float, str, int]:
    """The file's fastest engine figure (img/s, layout, batch) on the engine the server gives it,
    as bench_engine.py times it."""
    rates, _ = engine_rates({"served": path}, [8, 32], rounds=5, cores=usable_cores(), input_size=input_size)
    return best(rates["served"])


def ms(values: list[float], q: int) -> float:
    return round(statistics.quantiles(values, n=100)[q - 1] * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="fp32 export")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--requests", type=int, default=600, help="requests per load")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over the configs")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    args = parser.parse_args()

    cores = usable_cores()
    cpu = ["CPUExecutionProvider"]
    files = {
        name: choose_model_file(args.model, str(CONFIGS[name].get("precision", "auto")), cpu)
        for name in args.configs
    }
    chosen = files[args.configs[0]]
    images = synthetic_jpegs(64, args.image_size)
    pre = chosen.meta.preprocess
    load_batch(images[:1], pre, ImageLimits())
    started = time.perf_counter()
    for image in images[:20]:
        load_batch([image], pre, ImageLimits())
    decode_ms = (time.perf_counter() - started) / 20 * 1000
    served_files = sorted({file.path for file in files.values()})
    size = chosen.meta.preprocess.input_size
    engine_before = {path: engine_img_per_s(path, size) for path in served_files}
    floor_server_ms, floor_client_ms = grpc_call_floor(round(statistics.mean(map(len, images))))

    loads: dict[str, dict[int, list[Load]]] = {name: {c: [] for c in args.clients} for name in args.configs}
    with tempfile.TemporaryDirectory() as tmp, ManagedRedis(Path(tmp) / "redis", persistent=False) as store:
        servers = {}
        for name in args.configs:
            client = connect_redis(store.url)
            core = build_core(Settings(model=args.model, redis_url=store.url, **CONFIGS[name]), client)
            server, port = create_grpc_server(core, host="127.0.0.1", port=0, max_workers=64)
            servers[name] = (server, port, core, client)
        try:
            batch_times: dict[str, list[float]] = {name: [] for name in servers}
            batch_clients = {
                name: FewShotClient(f"127.0.0.1:{port}") for name, (_, port, _, _) in servers.items()
            }
            for _ in range(10):  # interleaved, each call after a pause and an untimed call
                for name, client in batch_clients.items():
                    batch_times[name].append(quiet_seconds(lambda c=client: c.embed(images[:32])))
            for client in batch_clients.values():
                client.close()
            for number in range(args.rounds):
                # Every other round in reverse order, so no server is always measured first (right
                # after the previous load): in a fixed order batching off led the default by 5 % at
                # one client over 11 rounds; in alternating order the default led, 125.8 to 121.2.
                names = list(servers) if number % 2 == 0 else list(servers)[::-1]
                for clients in args.clients:
                    for name in names:
                        port = servers[name][1]
                        loads[name][clients].append(
                            served(f"127.0.0.1:{port}", images, clients, args.requests)
                        )
        finally:
            for server, _, core, client in servers.values():
                server.stop(None)
                core.close()
                client.close()
    engine_after = {path: engine_img_per_s(path, size) for path in served_files}
    engines = {
        path: statistics.median([engine_before[path][0], engine_after[path][0]]) for path in served_files
    }
    engine = engines[chosen.path]
    engine_core_ms = 1000 * cores / engine

    result: dict[str, dict[str, dict[str, object]]] = {}
    for name, by_clients in loads.items():
        result[name] = {"batch32_img_per_s": round(32 / statistics.median(batch_times[name]), 1)}
        for clients, runs in by_clients.items():
            latencies = [t for run in runs for t in run.latencies]
            images_served = sum(run.images for run in runs)
            server_ms = 1000 * sum(run.server_cpu_s for run in runs) / images_served
            client_ms = 1000 * sum(run.client_cpu_s for run in runs) / images_served
            ceiling = 1000 * cores / (1000 * cores / engines[files[name].path] + decode_ms + client_ms)
            rate = statistics.median(run.img_per_s for run in runs)
            result[name][str(clients)] = {
                "img_per_s": round(rate, 1),
                "img_per_s_each_round": [round(r.img_per_s, 1) for r in runs],
                "p50_ms": ms(latencies, 50),
                "p99_ms": ms(latencies, 99),
                "shed_and_retried": sum(run.shed for run in runs),
                "cpu_ms_per_image": {"server": round(server_ms, 2), "client": round(client_ms, 2)},
                "cores_busy": round(
                    sum(r.server_cpu_s + r.client_cpu_s for r in runs) / sum(r.wall_s for r in runs) / cores,
                    3,
                ),
                "ceiling_img_per_s": round(ceiling, 1),
                "served_over_ceiling": round(rate / ceiling, 3),
            }
    record = {
        "bench": "served",
        "cpu": cpu_model(),
        "cores": cores,
        "onnxruntime": ort.__version__,
        "openvino": openvino_version(),
        "model_file": chosen.path.name,
        "precision": chosen.meta.precision,
        "model_id": chosen.meta.model_id,
        "image_size": args.image_size,
        "decode_ms": round(decode_ms, 3),
        "engine_img_per_s": round(engine, 1),
        "engine_at": {"layout": engine_before[chosen.path][1], "batch": engine_before[chosen.path][2]},
        "engine_img_per_s_by_file": {path.name: round(rate, 1) for path, rate in engines.items()},
        "model_file_by_config": {name: file.path.name for name, file in files.items()},
        "engine_core_ms_per_image": round(engine_core_ms, 2),
        "grpc_floor_cpu_ms": {"server": round(floor_server_ms, 3), "client": round(floor_client_ms, 3)},
        "batch32_img_per_s": {name: result[name]["batch32_img_per_s"] for name in result},
        "configs": {name: CONFIGS[name] for name in args.configs},
        "served": result,
        # Each server against the engine figure of the file it serves.
        "served_over_engine": {
            name: round(float(result[name]["16"]["img_per_s"]) / engines[files[name].path], 3)
            for name in result
            if "16" in result[name]
        },
    }
    print(json.dumps(record))
    print("engines: " + ", ".join(f"{p.name} {r:.1f} img/s" for p, r in engines.items()))
    print(
        f"\nengine ({chosen.path.name}): {engine:.1f} img/s ({engine_core_ms:.2f} core-ms per image); "
        f"decode + preprocess "
        f"{decode_ms:.2f} ms per image; {cores} cores"
    )
    print(
        f"a do-nothing gRPC call of one JPEG's size: {floor_server_ms:.3f} ms server CPU, "
        f"{floor_client_ms:.3f} ms client CPU"
    )
    print(
        "Embed of 32 images, img/s: "
        + ", ".join(f"{name} {rate}" for name, rate in record["batch32_img_per_s"].items())
    )
    print(
        "| config | clients | img/s (each round) | p50, p99 ms | shed | server / client CPU ms per image "
        "| cores busy | served / ceiling |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in result:
        for clients in args.clients:
            c = result[name][str(clients)]
            cpu = c["cpu_ms_per_image"]
            print(
                f"| {name} | {clients} | {c['img_per_s']} ({', '.join(map(str, c['img_per_s_each_round']))}) "
                f"| {c['p50_ms']}, {c['p99_ms']} | {c['shed_and_retried']} | {cpu['server']} / {cpu['client']} "
                f"| {c['cores_busy']} | {c['served_over_ceiling']} |"
            )


if __name__ == "__main__":
    main()
