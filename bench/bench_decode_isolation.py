"""What decoding in a worker process costs per image, against decoding in the server's process.

    PYTHONPATH=service:service/client:bench python bench/bench_decode_isolation.py [--model models/default.onnx]

For JPEGs of a few sizes (the synthetic photo-like images of bench_serving.py), one image per
request, one at a time: ``load_batch`` in this process (what the server did before issue 29)
against the same call through a one-worker ``DecodePool`` (the bytes piped to the worker, the
preprocessed input piped back), with the model's preprocessing; and the example-upload job (model
input and stored copy in one worker job) against doing both in this process. Rounds alternate;
prints the medians in ms as one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort

from fewshot_common.images import DRAFT_FACTOR, ImageLimits, load_batch
from fewshot_common.modelmeta import ModelMeta
from fewshot_service.core.decode_pool import DecodePool
from fewshot_service.core.stored_images import bounded_copy

from bench_engine import cpu_model
from bench_serving import DEFAULT_MODEL, synthetic_jpegs


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model whose preprocessing is used")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024, 4000], help="JPEG sides (px)")
    parser.add_argument("--repeats", type=int, default=40, help="timed calls per row and round")
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args()


def median_ms(call: Callable[[], object], repeats: int) -> list[float]:
    call()  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> int:
    args = parse_args()
    props = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"]).get_modelmeta()
    pre = ModelMeta.from_metadata_props(props.custom_metadata_map).preprocess
    limits = ImageLimits()
    pool = DecodePool(workers=1, max_queued=1)
    figures: dict[str, dict[str, float]] = {}
    try:
        for side in args.sizes:
            image = synthetic_jpegs(1, side)[0]
            rows: dict[str, Callable[[], object]] = {
                "in process": lambda: load_batch([image], pre, limits),
                "worker": lambda: pool.load_batch([image], pre, limits),
                "upload, in process": lambda: (load_batch([image], pre, limits), bounded_copy(image, limits)),
                "upload, worker": lambda: pool.load_batch_and_copies([image], pre, limits),
            }
            times: dict[str, list[float]] = {name: [] for name in rows}
            for round_ in range(args.rounds):
                for name in rows if round_ % 2 == 0 else reversed(rows):
                    times[name] += median_ms(rows[name], args.repeats)
            figures[f"{side}px"] = {name: round(statistics.median(t), 3) for name, t in times.items()}
    finally:
        pool.close()
    print(
        json.dumps(
            {"cpu": cpu_model(), "draft_factor": DRAFT_FACTOR, "input_size": pre.input_size, "ms": figures}
        )
    )
    names = list(next(iter(figures.values())))
    print("\n" + f"{'JPEG':>8} " + " ".join(f"{name:>20}" for name in names) + "   (median ms per image)")
    for size, row in figures.items():
        print(f"{size:>8} " + " ".join(f"{row[name]:>20.3f}" for name in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
