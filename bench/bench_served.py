"""Served against the engine, in one run: how much of what ONNX Runtime can do reaches gRPC clients.

- ``engine_img_per_s``: the served model file (the variant the server picks, int8 on a CPU) run
  directly through ONNX Runtime at batch 32 on preprocessed tensors, measured in this process while
  the server idles, before and after the load (the median of both);
- ``served``: single-image gRPC ``Embed`` calls from ``C`` concurrent clients (threads) in **another
  process**, for C in ``--clients`` (default 1, 16, 64), against a real server with dynamic batching
  on and one with it off, in alternating rounds: images/s, p50 and p99 latency (a call the server
  sheds with RESOURCE_EXHAUSTED, its decode queue full, is retried after 5 ms and counted);
- ``batch32_img_per_s``: ``Embed`` with 32 images per call, one client;
- ``served_over_engine``: served images/s at 16 clients over the engine's.

The images are synthetic JPEGs (``--image-size``, default 256 px), so decoding is part of what is
served and not of the engine: ``decode_ms`` says what one costs. The client process shares the CPU
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
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench_engine import cpu_model
from bench_serving import DEFAULT_MODEL, Server, spread_requests, synthetic_jpegs
from fewshot_common.embedder import Embedder
from fewshot_common.images import ImageLimits, load_batch
from fewshot_common.modelmeta import INPUT_NAME, OUTPUT_NAME
from fewshot_common.variants import choose_model_file
from fewshot_service.batcher import BatchConfig
from fewshot_service.redis_server import ManagedRedis


def _client_load(address: str, images: list[bytes], clients: int, requests: int,
                 results: "mp.Queue[tuple[float, list[float], int]]") -> None:
    """In the client process: ``requests`` single-image Embeds from ``clients`` threads."""
    from fewshot_client import FewShotClient
    from fewshot_client.errors import TooLarge

    client = FewShotClient(address)
    for image in images[:clients]:  # warm-up: connections, every code path once
        client.embed([image])
    lock = threading.Lock()
    latencies: list[float] = []
    shed = [0]

    def embed_one(i: int) -> None:
        started = time.perf_counter()
        while True:
            try:
                client.embed([images[i % len(images)]])
                break
            except TooLarge:  # the decode queue is full: back off and retry, as a client should
                with lock:
                    shed[0] += 1
                time.sleep(0.005)
        elapsed = time.perf_counter() - started
        with lock:
            latencies.append(elapsed)

    started = time.perf_counter()
    spread_requests(requests, clients, embed_one)
    results.put((requests / (time.perf_counter() - started), latencies, shed[0]))
    client.close()


def served(address: str, images: list[bytes], clients: int,
           requests: int) -> tuple[float, list[float], int]:
    context = mp.get_context("spawn")  # a clean process: no server threads or gRPC state inherited
    results = context.Queue()
    process = context.Process(target=_client_load, args=(address, images, clients, requests, results))
    process.start()
    while True:  # a client process that dies (any error but a shed call) fails the run at once
        try:
            outcome = results.get(timeout=1)
            break
        except queue.Empty:
            if not process.is_alive():
                raise RuntimeError(f"the client process exited with code {process.exitcode}") from None
    process.join()
    return outcome


def engine_img_per_s(path: Path, pixels: np.ndarray, rounds: int = 10) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    session.run([OUTPUT_NAME], {INPUT_NAME: pixels})
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        session.run([OUTPUT_NAME], {INPUT_NAME: pixels})
        rates.append(len(pixels) / (time.perf_counter() - started))
    return statistics.median(rates)


def ms(values: list[float], q: int) -> float:
    return round(statistics.quantiles(values, n=100)[q - 1] * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="fp32 export")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--requests", type=int, default=600, help="requests per load")
    parser.add_argument("--rounds", type=int, default=2, help="alternating on/off rounds")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[BatchConfig().workers],
                        help="batcher workers (batches run at once); several: each its own server")
    args = parser.parse_args()

    chosen = choose_model_file(args.model, "auto", ["CPUExecutionProvider"])
    embedder = Embedder(chosen.path)
    images = synthetic_jpegs(64, args.image_size)
    pre = embedder.meta.preprocess
    pixels = load_batch(images[:32], pre, ImageLimits())
    started = time.perf_counter()
    for _ in range(5):
        load_batch(images[:1], pre, ImageLimits())
    decode_ms = (time.perf_counter() - started) / 5 * 1000
    engine_before = engine_img_per_s(chosen.path, pixels)

    configs = {f"batching_on_{w}w" if len(args.workers) > 1 else "batching_on": BatchConfig(workers=w)
               for w in args.workers}
    configs["batching_off"] = BatchConfig(enabled=False)
    loads: dict[str, dict[int, list[tuple[float, list[float], int]]]] = {
        mode: {c: [] for c in args.clients} for mode in configs}
    with tempfile.TemporaryDirectory() as tmp, ManagedRedis(Path(tmp) / "redis", persistent=False) as store:
        servers = {mode: Server(embedder, store.url, config) for mode, config in configs.items()}
        try:
            batch_times = []
            client = next(iter(servers.values())).client
            client.embed(images[:32])
            for _ in range(10):
                begun = time.perf_counter()
                client.embed(images[:32])
                batch_times.append(time.perf_counter() - begun)
            for _ in range(args.rounds):
                for clients in args.clients:
                    for mode, server in servers.items():
                        address = f"127.0.0.1:{server.port}"
                        loads[mode][clients].append(served(address, images, clients, args.requests))
        finally:
            for server in servers.values():
                server.close()
    engine = statistics.median([engine_before, engine_img_per_s(chosen.path, pixels)])

    result: dict[str, dict[str, dict[str, float]]] = {}
    for mode, by_clients in loads.items():
        result[mode] = {}
        for clients, runs in by_clients.items():
            latencies = [t for _, run, _ in runs for t in run]
            result[mode][str(clients)] = {
                "img_per_s": round(statistics.median(r for r, _, _ in runs), 1),
                "p50_ms": ms(latencies, 50), "p99_ms": ms(latencies, 99),
                "shed_and_retried": sum(s for _, _, s in runs)}
    at16 = {mode: result[mode].get("16", {}).get("img_per_s") for mode in result}

    record = {
        "bench": "served", "cpu": cpu_model(), "onnxruntime": ort.__version__,
        "model_file": chosen.path.name, "precision": chosen.meta.precision,
        "model_id": chosen.meta.model_id, "image_size": args.image_size,
        "decode_ms": round(decode_ms, 2), "engine_img_per_s": round(engine, 1),
        "batch32_img_per_s": round(32 / statistics.median(batch_times), 1),
        "served": result,
        "served_over_engine": {mode: round(v / engine, 3) for mode, v in at16.items() if v},
    }
    print(json.dumps(record))
    print(f"\nengine ({chosen.path.name}, batch 32): {engine:.1f} img/s; Embed of 32 images: "
          f"{record['batch32_img_per_s']} img/s; decode + preprocess {decode_ms:.2f} ms/image")
    print("| clients | " + " | ".join(f"{mode}: img/s, p50, p99 (ms), shed" for mode in result) + " |")
    print("|---|" + "---|" * len(result))
    for clients in args.clients:
        cells = (result[mode][str(clients)] for mode in result)
        print(f"| {clients} | " + " | ".join(
            f"{c['img_per_s']}, {c['p50_ms']}, {c['p99_ms']}, {c['shed_and_retried']}" for c in cells) + " |")


if __name__ == "__main__":
    main()
