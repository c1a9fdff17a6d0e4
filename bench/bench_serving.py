"""Serving benchmark: a real gRPC server, a real model, a private Redis; prints the figures.

    python bench/bench_serving.py [--model models/default.onnx] [--requests 200] [--concurrency 16]

Measures, over loopback gRPC with the thin client:
  * Embed latency for one image (p50/p95),
  * Embed throughput at batch 32 (images/s),
  * Classify latency for one image against 1,000 registered classes (p50/p95),
  * throughput of single-image Embeds from many concurrent clients, with dynamic batching on
    and off, side by side in one run.

Without --model it serves models/default.onnx when present, else exports a randomly initialised
vit_tiny_p8_64 into a temporary folder (speed does not depend on the weights; needs the train
extra). The client runs in this process, so it shares the CPU with the server: on a small
machine the figures are a lower bound.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime
import redis
from PIL import Image
from prometheus_client import REGISTRY

from fewshot_client import FewShotClient
from fewshot_common.cores import intra_op_threads_per_batch, usable_cores
from fewshot_common.embedder import Embedder
from fewshot_service.core.batcher import BatchConfig
from fewshot_service.core.core import FewShotCore
from fewshot_service.registry.redis_server import ManagedRedis
from fewshot_service.registry.registry import Registry
from fewshot_service.transport.grpc.server import create_grpc_server

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "models" / "default.onnx"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, help="ONNX model (default: models/default.onnx, else a fresh vit_tiny_p8_64)"
    )
    parser.add_argument("--requests", type=int, default=200, help="timed requests per latency figure")
    parser.add_argument("--batch-rounds", type=int, default=20, help="timed batch-32 Embed calls")
    parser.add_argument("--classes", type=int, default=1000, help="classes registered for Classify")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    parser.add_argument("--concurrent-requests", type=int, default=400, help="requests per batching mode")
    parser.add_argument("--image-size", type=int, default=256, help="side of the synthetic JPEGs sent")
    parser.add_argument("--queue-delay-ms", type=float, default=BatchConfig().max_queue_delay_ms)
    parser.add_argument("--rounds", type=int, default=3, help="alternating on/off rounds")
    parser.add_argument("--workers", type=int, default=BatchConfig().workers, help="batches run at once")
    parser.add_argument(
        "--threads",
        type=int,
        help="ONNX Runtime intra-op threads (default: the server's, the cores / --workers)",
    )
    return parser.parse_args()


@contextmanager
def model_path(requested: Path | None) -> Iterator[Path]:
    if requested is not None:
        yield requested
        return
    if DEFAULT_MODEL.is_file():
        yield DEFAULT_MODEL
        return
    import torch

    from fewshot_common.modelmeta import Preprocess
    from fewshot_trainer.export import export_onnx
    from fewshot_trainer.vit import build_vit, get_arch

    torch.manual_seed(0)
    spec = get_arch("vit_tiny_p8_64")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vit_tiny_p8_64.onnx"
        export_onnx(build_vit(spec), spec, Preprocess(input_size=64, resize_size=72), path)
        yield path


def synthetic_jpegs(count: int, side: int) -> list[bytes]:
    """Smooth random colour fields: JPEG-compressible like photos, different per image."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def timed(call: Callable[[], object], repeats: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def percentiles_ms(times: list[float]) -> str:
    cuts = statistics.quantiles(times, n=100)
    return f"p50 {cuts[49] * 1000:7.2f} ms   p95 {cuts[94] * 1000:7.2f} ms   (n={len(times)})"


class Server:
    def __init__(self, embedder: Embedder, redis_url: str, batching: BatchConfig) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.registry = Registry(self.redis)
        self.core = FewShotCore(embedder, self.registry, batching=batching)
        self.server, self.port = create_grpc_server(self.core, host="127.0.0.1", port=0, max_workers=64)
        self.client = FewShotClient(f"127.0.0.1:{self.port}")

    def close(self) -> None:
        self.client.close()
        self.server.stop(None)
        self.core.close()
        self.redis.close()


def register_classes(server: Server, count: int, namespace: str) -> None:
    """``count`` classes of 5 examples each, written straight to the registry (faster than
    embedding 5,000 images, and Classify's cost does not depend on what the vectors are)."""
    rng = np.random.default_rng(1)
    dim = server.core.embedder.embedding_dim
    for i in range(count):
        vectors = rng.normal(size=(5, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        server.registry.add_examples(namespace, f"class-{i:04d}", vectors, server.core.model_id)


def spread_requests(requests: int, clients: int, call: Callable[[int], None]) -> None:
    """``call(0)`` .. ``call(requests - 1)`` from ``clients`` threads at once, each taking the
    next index as it is free (a closed loop of ``clients`` concurrent callers)."""
    counter = iter(range(requests))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            call(i)

    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(worker) for _ in range(clients)]:
            future.result()


def concurrent_throughput(
    server: Server, images: list[bytes], clients: int, requests: int
) -> tuple[float, float, float]:
    """``requests`` single-image Embeds issued by ``clients`` threads at once: images per
    wall-clock second, images per CPU-second of this process (server and client), and images
    per model run. The second is what batching saves; the first also depends on what else
    the machine runs."""
    for image in images[:clients]:  # warm up every code path once
        server.client.embed([image])
    runs_before, images_before = _batch_runs()
    started, cpu_started = time.perf_counter(), time.process_time()
    spread_requests(requests, clients, lambda i: server.client.embed([images[i % len(images)]]))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    runs, images_run = (now - before for now, before in zip(_batch_runs(), (runs_before, images_before)))
    return requests / wall, requests / cpu, images_run / max(runs, 1)


def _batch_runs() -> tuple[float, float]:
    """(model runs, images run) so far, from the batcher's Prometheus histogram."""
    count = REGISTRY.get_sample_value("fewshot_batch_images_count") or 0.0
    total = REGISTRY.get_sample_value("fewshot_batch_images_sum") or 0.0
    return count, total


def main() -> int:
    args = parse_args()
    images = synthetic_jpegs(64, args.image_size)
    with model_path(args.model) as path, tempfile.TemporaryDirectory() as tmp:
        # As the server builds it on a CPU: each batch worker's share of the cores, no spinning.
        threads = args.threads or intra_op_threads_per_batch(usable_cores(), args.workers)
        embedder = Embedder(path, intra_op_threads=threads, spinning=False)
        print(
            f"model      {path.name}: {embedder.model_id}, {embedder.meta.arch}, "
            f"input {embedder.meta.preprocess.input_size}px, dim {embedder.embedding_dim}"
        )
        print(
            f"runtime    onnxruntime {onnxruntime.__version__}, providers {embedder.providers}, "
            f"intra-op threads {threads}, {os.cpu_count()} CPUs, "
            f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.2f}"
        )
        print(
            f"images     synthetic {args.image_size}x{args.image_size} JPEG, "
            f"~{sum(map(len, images)) // len(images) // 1024} KiB each"
        )
        with ManagedRedis(Path(tmp) / "redis", persistent=False) as store:
            batching = BatchConfig(max_queue_delay_ms=args.queue_delay_ms, workers=args.workers)
            batched = Server(embedder, store.url, batching)
            try:
                one = images[:1]
                latency = timed(lambda: batched.client.embed(one), args.requests)
                print(f"Embed, 1 image          {percentiles_ms(latency)}")

                batch = images[:32]
                times = timed(lambda: batched.client.embed(batch), args.batch_rounds, warmup=2)
                print(
                    f"Embed, batch of 32      {32 / statistics.median(times):7.1f} images/s "
                    f"(median of {len(times)} calls, {statistics.median(times) * 1000:.1f} ms each)"
                )

                register_classes(batched, args.classes, "bench")
                classify = lambda: batched.client.classify(one, namespace="bench", top_k=5)  # noqa: E731
                print(
                    f"Classify, 1 image, {args.classes} classes "
                    f"{percentiles_ms(timed(classify, args.requests))}"
                )

                # Both servers at once, measured in alternation, so that a change in background
                # load hits both modes alike.
                unbatched = Server(embedder, store.url, BatchConfig(enabled=False))
                try:
                    on, off = [], []
                    load = (images, args.concurrency, args.concurrent_requests)
                    for _ in range(args.rounds):
                        on.append(concurrent_throughput(batched, *load))
                        off.append(concurrent_throughput(unbatched, *load))
                finally:
                    unbatched.close()
            finally:
                batched.close()
            print(
                f"{args.concurrency} concurrent clients, 1 image per Embed "
                f"({args.concurrent_requests} requests x {args.rounds} alternating rounds):"
            )
            for name, results in (
                (
                    f"batching on  (max batch 32, max delay {args.queue_delay_ms} ms, "
                    f"{args.workers} worker{'s' if args.workers > 1 else ''})",
                    on,
                ),
                ("batching off (one ORT run per request)", off),
            ):
                wall = [r[0] for r in results]
                cpu = [r[1] for r in results]
                print(
                    f"  {name:<60} {statistics.median(wall):7.1f} images/s   "
                    f"{statistics.median(cpu):6.1f} images/CPU-s   "
                    f"(rounds: {' '.join(f'{w:.1f}' for w in wall)} images/s)"
                )
                print(f"  {'':<60} {statistics.median(r[2] for r in results):7.1f} images per model run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
