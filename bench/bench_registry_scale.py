"""The registry at scale, in one run: prints one JSON line. Preliminary on a shared CPU.

For each class count (default 1k, 10k, 100k; ``--shots`` examples per class, default 5 as in a
few-shot namespace, bulk-loaded through the registry's own add script into a private Valkey/Redis):

- ``classify_minus_embed_ms``: what a Classify costs beyond an Embed of the same image, on a
  replica that did not write: ``warm`` (namespace unchanged) and ``after_add`` (another replica
  added one example just before). Measured directly as the in-process work Classify adds
  (``core.labeller``: the registry's check or sync, the open-set calibration, the one top-k
  scan and the confidences), median over interleaved rounds, because
  end-to-end Embed timings on a shared CPU vary by more than the difference; the end-to-end
  medians of ``core.classify`` and ``core.embed`` are printed alongside for scale.
- ``classify_minus_embed_overlapped_ms``: the same as served, where the check of a namespace
  the replica answered before runs beside the inference: only the labelling after it is added
  (the check takes far less than the ~10 ms inference).
- ``full_reload_ms``: what a replica pays when it must reload everything (new replica, new epoch,
  trimmed change log): the old path for every change.
- ``redis_bytes_per_class`` (``INFO memory`` used_memory delta over the load),
  ``replica_bytes_per_class`` (Python heap allocated by one full reload, tracemalloc: matrix,
  labels and their index) and ``replica_int8_copy_bytes_per_class`` (resident-set growth while
  the int8 copy is built: ONNX Runtime's copies of it).
- ``first_classify_minus_embed_ms`` / ``first_calibration_ms``: the first Classify of a fresh
  namespace (no calibration yet), and the background calibration it starts (sampled above
  ``calibrator.SYNC_CALIBRATION_CLASSES`` classes).
- ``top_k_ms``: one query near one of the classes (and per query in a batch of 32) against all
  classes, k=5; from 20,000 classes on through the int8 copy (classify/prototypes.py), whose answers are
  counted (``int8_answers``), beside the float32 scan of the same queries.

``extrapolated_1m`` scales the largest measured count linearly to 1,000,000 classes: an
extrapolation, not a measurement. Usage (a few minutes at most)::

    PYTHONPATH=service:service/client python bench/bench_registry_scale.py [--classes 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import redis

from fewshot_service.app import build_core
from fewshot_service.classify.prototypes import INT8_SCAN_MIN_CLASSES, limit_blas_threads
from fewshot_service.registry.redis_server import ManagedRedis
from fewshot_service.registry.registry import Registry
from fewshot_service.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


_INT8_COPY_RSS = """
import os, sys, numpy as np
from pathlib import Path
from fewshot_service.classify.int8_scan import Int8Scan
def rss():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
rows = np.random.default_rng(0).standard_normal((int(sys.argv[1]), int(sys.argv[2])), dtype=np.float32)
rows /= np.linalg.norm(rows, axis=1, keepdims=True)
before = rss()
scan = Int8Scan(rows)
print(rss() - before)
"""


def int8_copy_bytes(classes: int, dim: int) -> int:
    """Resident-set growth while an int8 copy of ``classes`` rows is built, in a fresh process
    (in this one, freed and reused memory made the delta meaningless, even negative)."""
    result = subprocess.run(
        [sys.executable, "-c", _INT8_COPY_RSS, str(classes), str(dim)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout.strip().splitlines()[-1])


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3)


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def unit_rows(count: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim), dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_image() -> bytes:
    import io

    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def measure(classes: int, shots: int, url: str, core, writer: Registry, rounds: int) -> dict[str, object]:
    namespace = f"scale-{classes}"
    model_id, dim = core.model_id, core.embedder.meta.embedding_dim
    client = redis.Redis.from_url(url)
    before = int(client.info("memory")["used_memory"])
    vectors = unit_rows(classes * shots, dim, seed=classes)
    load_s = timed(
        lambda: writer.add_classes(
            namespace,
            {f"class-{i:07d}": vectors[i * shots : (i + 1) * shots] for i in range(classes)},
            model_id,
        )
    )
    redis_bytes = int(client.info("memory")["used_memory"]) - before

    reader = core.registry  # the replica that classifies; `writer` is another one
    image = test_image()
    query = core.embed([image])
    tracemalloc.start()
    reader.prototypes(namespace, model_id)  # a full reload; slowed by tracemalloc, not timed
    replica_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    classify_overhead_cold = timed(lambda: core.labeller(namespace)(query, 5, core.unknown_rate))
    calibrated_s = timed(core.open_set.wait_idle)  # the first (background) calibration

    def classify_overhead() -> None:  # exactly what core.classify_open_set adds to core.embed
        core.labeller(namespace)(query, 5, core.unknown_rate)

    def after_the_check() -> float:  # what is left when the check runs beside the inference
        labeller = core.labeller(namespace)
        return timed(lambda: labeller(query, 5, core.unknown_rate))

    warm, after_add, e2e_classify, e2e_embed = [], [], [], []
    warm_overlapped, after_add_overlapped = [], []
    rng = np.random.default_rng(1)
    for _ in range(rounds):
        warm.append(timed(classify_overhead))
        warm_overlapped.append(after_the_check())
        for overlapped in (False, True):
            label = f"class-{int(rng.integers(classes)):07d}"
            writer.add_examples(
                namespace, label, unit_rows(1, dim, seed=int(rng.integers(1 << 30))), model_id
            )
            if overlapped:
                after_add_overlapped.append(after_the_check())
            else:
                after_add.append(timed(classify_overhead))
        # Paired: an Embed, then a Classify of the same image, right after another replica's add;
        # then both again (warm).
        label = f"class-{int(rng.integers(classes)):07d}"
        writer.add_examples(namespace, label, unit_rows(1, dim, seed=int(rng.integers(1 << 30))), model_id)
        e2e_embed.append(timed(lambda: core.embed([image])))
        e2e_classify.append(timed(lambda: core.classify([image], namespace)))
        e2e_embed.append(timed(lambda: core.embed([image])))
        e2e_classify.append(timed(lambda: core.classify([image], namespace)))
    full_reloads = []
    for _ in range(3):
        fresh = Registry(reader.client, key_prefix=reader.key_prefix)
        full_reloads.append(timed(lambda: fresh.prototypes(namespace, model_id)))
    matrix = reader.prototypes(namespace, model_id).classifier
    matrix.build_int8_scan()  # else built in the background after the first large top-k
    batch = unit_rows(32, dim, seed=2)
    # Queries like real ones: an image near one of the classes, not a uniformly random direction.
    near = vectors[np.random.default_rng(3).integers(len(vectors), size=rounds)]
    near = near + unit_rows(rounds, dim, seed=4)  # cosine ~0.7 to the example it started from
    near = near / np.linalg.norm(near, axis=1, keepdims=True)
    answers_before = matrix.scan_stats.counts()
    top1 = [timed(lambda: matrix.top_k(near[i : i + 1], 5)) for i in range(rounds)]
    top32 = [timed(lambda: matrix.top_k(batch, 5)) / 32 for _ in range(max(rounds // 4, 3))]
    float32 = [
        timed(lambda: [matrix._best(r, 5) for r in matrix._scores(near[i : i + 1])]) for i in range(rounds)
    ]
    answers = {key: count - answers_before[key] for key, count in matrix.scan_stats.counts().items()}
    client.close()
    return {
        "classes": classes,
        "shots": shots,
        "load_s": round(load_s, 2),
        "classify_minus_embed_ms": {"warm": median_ms(warm), "after_add": median_ms(after_add)},
        # As served: a namespace the replica answered before is checked beside the inference
        # (core.classify_open_set), so only the labelling after it adds to the Embed.
        "classify_minus_embed_overlapped_ms": {
            "warm": median_ms(warm_overlapped),
            "after_add": median_ms(after_add_overlapped),
        },
        "end_to_end_ms": {
            "embed": median_ms(e2e_embed),
            "classify": median_ms(e2e_classify),
            # Median of the per-pair differences: drift of the machine cancels out; includes what
            # in-process loops hide (the top-k scan and the inference evicting each other's
            # data from the caches). The first pair of each round follows another replica's add.
            "classify_minus_embed_after_add": median_ms(
                [c - e for c, e in zip(e2e_classify[0::2], e2e_embed[0::2])]
            ),
            "classify_minus_embed_warm": median_ms(
                [c - e for c, e in zip(e2e_classify[1::2], e2e_embed[1::2])]
            ),
        },
        "full_reload_ms": median_ms(full_reloads),
        # The first Classify of a namespace (its calibration not yet computed), and how long
        # the background calibration took after it.
        "first_classify_minus_embed_ms": round(classify_overhead_cold * 1e3, 3),
        "first_calibration_ms": round(calibrated_s * 1e3, 1),
        "reader_syncs": reader.sync_stats.counts(),  # cumulative: every size shares the reader
        "redis_bytes_per_class": round(redis_bytes / classes),
        "replica_bytes_per_class": round(replica_bytes / classes),
        # Only where top-k uses the int8 copy (classifier.INT8_SCAN_MIN_CLASSES and more).
        "replica_int8_copy_bytes_per_class": (
            round(int8_copy_bytes(classes, dim) / classes) if classes >= INT8_SCAN_MIN_CLASSES else 0
        ),
        "top_k_ms": {
            "one_query": median_ms(top1),
            "per_query_in_32": median_ms(top32),
            "one_query_float32_scan": median_ms(float32),  # side by side: without the int8 copy
            "int8_answers": answers,  # from the int8 copy's candidates / fell back to float32
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", default="1000,10000,100000")
    parser.add_argument("--shots", type=int, default=5, help="examples per class")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "default.onnx")
    parser.add_argument(
        "--blas-threads-default",
        action="store_true",
        help="leave numpy's BLAS threads as they are (the server limits them to 1)",
    )
    args = parser.parse_args()
    counts = [int(c) for c in args.classes.split(",")]
    with tempfile.TemporaryDirectory() as tmp, ManagedRedis(Path(tmp), persistent=False) as server:
        settings = Settings(model=args.model, redis_url=server.url, intra_op_threads=1)
        reader_client = redis.Redis.from_url(server.url)
        writer = Registry(redis.Redis.from_url(server.url))
        if not args.blas_threads_default:
            limit_blas_threads()  # as ServerStack does
        core = build_core(settings, reader_client)
        try:
            results = [measure(c, args.shots, server.url, core, writer, args.rounds) for c in counts]
        finally:
            core.close()
    largest = results[-1]
    scale = 1_000_000 / largest["classes"]
    print(
        json.dumps(
            {
                "cpu": cpu_model(),
                "model": core.model_id,
                "dim": core.embedder.meta.embedding_dim,
                "blas_threads": "default" if args.blas_threads_default else 1,
                "results": results,
                "extrapolated_1m": {
                    "note": f"linear from {largest['classes']} classes: not measured",
                    "redis_gib": round(largest["redis_bytes_per_class"] * 1e6 / 2**30, 2),
                    "replica_gib": round(largest["replica_bytes_per_class"] * 1e6 / 2**30, 2),
                    "top_k_one_query_ms": round(largest["top_k_ms"]["one_query"] * scale, 1),
                    "full_reload_s": round(largest["full_reload_ms"] * scale / 1e3, 1),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
