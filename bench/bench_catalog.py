"""Getting classes in, at scale: one REST add and one class GET against a real server whose
namespace already holds 0, 1k, 10k and 100k classes (issue 31 part A). Prints a table and one JSON line.

A real :class:`ServerStack` (the default model, uvicorn on loopback, a private Valkey/Redis). Each
namespace is filled fast through the registry's bulk path (``Registry.add_classes``: the same add
script, pipelined; one example per class, random unit vectors), not through REST one by one. Then,
in interleaved rounds over the sizes (so drift on a shared CPU hits every size alike):

- ``add``: ``POST /v1/classes/{new label}/examples`` with one 64-px JPEG (a new class per add, one
  example each, as in the issue's measurement), end to end from an httpx client;
- ``get``: ``GET /v1/classes/{that label}``;
- ``list_page``: ``GET /v1/classes?limit=50`` (the playground's first page), ``--list-rounds``
  times per size after the rounds above.

p50 and p99 per size, and the ratios 100k / 0 (the goal: p50 within 1.3x for add and get).
``old_snapshot_ms`` is, for comparison, what the previous add/GET path read on top (the
whole-namespace ``example_snapshot``), timed in-process on the same data.

Usage (about two minutes at 100k; modest repeat counts for a shared machine)::

    PYTHONPATH=service:service/client python bench/bench_catalog.py [--classes 0,1000,10000,100000] [--rounds 40]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from fewshot_common.vectors import l2_normalize
from fewshot_service.app import ServerStack
from fewshot_service.registry.redis_server import ManagedRedis
from fewshot_service.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def jpeg(rng: np.random.Generator, size: int = 64) -> bytes:
    pixels = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((size, size), Image.BILINEAR)  # blocky: JPEG-friendly
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 2), "p99": round(p99, 2)}


def fill(stack: ServerStack, namespace: str, classes: int, rng: np.random.Generator) -> float:
    core = stack.core
    assert core is not None
    dim = core.embedder.meta.embedding_dim
    started = time.perf_counter()
    for start in range(0, classes, 10_000):
        batch = {
            f"bulk{i:06d}": l2_normalize(rng.standard_normal((1, dim)))
            for i in range(start, min(classes, start + 10_000))
        }
        core.registry.add_classes(namespace, batch, core.model_id)
    return time.perf_counter() - started


def timed_ms(request, *args, **kwargs) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = request(*args, **kwargs)
    return (time.perf_counter() - started) * 1000, response


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", default="0,1000,10000,100000")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--list-rounds", type=int, default=10)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "default.onnx")
    args = parser.parse_args()
    sizes = [int(c) for c in args.classes.split(",")]
    rng = np.random.default_rng(31)
    with (
        tempfile.TemporaryDirectory() as tmp,
        ManagedRedis(Path(tmp), persistent=False) as redis_server,
    ):
        settings = Settings(
            model=args.model,
            redis_url=redis_server.url,
            host="127.0.0.1",
            grpc_port=0,
            http_port=0,
        )
        with (
            ServerStack(settings) as stack,
            httpx.Client(base_url=f"http://127.0.0.1:{stack.http_port}", timeout=60) as http,
        ):
            fill_s = {n: round(fill(stack, f"cat{n}", n, rng), 1) for n in sizes}
            timings: dict[int, dict[str, list[float]]] = {
                n: {"add": [], "get": [], "list_page": []} for n in sizes
            }
            for round_ in range(args.warmup + args.rounds):
                for n in sizes:
                    label, params = f"new {round_:04d}", {"namespace": f"cat{n}"}
                    shot = [("files", ("shot.jpg", jpeg(rng), "image/jpeg"))]
                    add_ms, added = timed_ms(
                        http.post,
                        f"/v1/classes/{label}/examples",
                        params=params,
                        files=shot,
                    )
                    get_ms, got = timed_ms(http.get, f"/v1/classes/{label}", params=params)
                    for response in (added, got):
                        response.raise_for_status()
                    if round_ >= args.warmup:  # the first rounds sync the replica's matrix in full
                        timings[n]["add"].append(add_ms)
                        timings[n]["get"].append(get_ms)
            # Apart, after: a page at 100k allocates 100k objects, which would disturb the rounds.
            for n in sizes:
                for _ in range(args.list_rounds):
                    list_ms, listed = timed_ms(
                        http.get,
                        "/v1/classes",
                        params={"namespace": f"cat{n}", "limit": 50},
                    )
                    listed.raise_for_status()
                    timings[n]["list_page"].append(list_ms)
            core = stack.core
            assert core is not None
            stack_scan_counts = (
                core.registry.scan_stats.counts()
            )  # top-k answers from the int8 copy / fell back
            old_snapshot_ms = {}
            for n in sizes:
                runs = []
                for _ in range(3):
                    started = time.perf_counter()
                    core.registry.example_snapshot(
                        f"cat{n}", only_labels=["new 0000"], model_id=core.model_id
                    )
                    runs.append((time.perf_counter() - started) * 1000)
                old_snapshot_ms[n] = round(statistics.median(runs), 1)
    result = {
        "cpu": cpu_model(),
        "rounds": args.rounds,
        "fill_seconds": fill_s,
        "sizes": {n: {what: quantiles(values) for what, values in timings[n].items()} for n in sizes},
        "old_snapshot_ms": old_snapshot_ms,
        "int8_scan_answers": stack_scan_counts,
    }
    lo, hi = min(sizes), max(sizes)
    result["ratio_p50_largest_over_smallest"] = {
        what: round(result["sizes"][hi][what]["p50"] / result["sizes"][lo][what]["p50"], 2)
        for what in ("add", "get", "list_page")
    }
    print(f"CPU: {result['cpu']}; {args.rounds} rounds after {args.warmup} warm-up rounds; ms")
    print(
        "| classes already in the namespace | add one example p50 / p99 | GET the class p50 / p99 | list page of 50 p50 / p99 | old whole-namespace snapshot |"
    )
    print("|---|---|---|---|---|")
    for n in sizes:
        row = result["sizes"][n]
        print(
            f"| {n:,} | {row['add']['p50']} / {row['add']['p99']} | {row['get']['p50']} / {row['get']['p99']} | "
            f"{row['list_page']['p50']} / {row['list_page']['p99']} | {old_snapshot_ms[n]} |"
        )
    print(f"p50 ratio {hi:,} / {lo:,}: {result['ratio_p50_largest_over_smallest']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
