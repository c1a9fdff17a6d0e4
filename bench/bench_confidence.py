"""Classify's labelling per image at many classes, in-process: the top-k and the confidence
normaliser with the normaliser as a float32 pass over every row (``float32``, what labelling read
before) against the one the int8 scan sums alongside its candidates (``int8``,
``top_k_and_log_partition``, what ``label_images`` reads now); for reference the int8 top-k alone
and the whole of ``label_images`` (``labelling``: also the unknown flag and the confidences).
Prints a table and one JSON line.

A :class:`PrototypeMatrix` of ``--classes`` random unit rows (128 wide, the default model's
embedding), its int8 copy built, BLAS on one thread as the server sets it. Queries are near a
class (a row plus noise), batches of ``--batch`` images; the median of ``--rounds`` interleaved
rounds, per image. ``max_abs_error`` is the largest |int8 - float32 log partition| over every
query timed (log units: the largest relative error of a confidence).

Usage::

    PYTHONPATH=service:service/client python bench/bench_confidence.py [--classes 10000,100000] [--batch 1,8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from fewshot_common.vectors import l2_normalize
from fewshot_service.classify.open_set import DEFAULT_INVERSE_TEMPERATURE, Calibration, label_images
from fewshot_service.classify.prototypes import PrototypeMatrix, limit_blas_threads

TOP_K = 5
UNKNOWN_RATE = 0.05


def old_labelling(matrix: PrototypeMatrix, queries: np.ndarray, beta: float) -> np.ndarray:
    """What label_images read before: the top-k, then a float32 pass for the partition."""
    matrix.top_k(queries, TOP_K)
    return matrix.log_partition(queries, beta)


def timed_ms(call, *args) -> float:
    started = time.perf_counter()
    call(*args)
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", default="10000,100000")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    limit_blas_threads(1)
    rng = np.random.default_rng(0)
    beta = DEFAULT_INVERSE_TEMPERATURE
    calibration = Calibration(np.zeros(0), beta)
    rows_out, result = [], {}
    for classes in [int(c) for c in args.classes.split(",")]:
        rows = l2_normalize(rng.standard_normal((classes, args.dim))).astype(np.float32)
        matrix = PrototypeMatrix([f"c{i:06d}" for i in range(classes)], rows)
        matrix.build_int8_scan()
        for batch in [int(b) for b in args.batch.split(",")]:
            times: dict[str, list[float]] = {"top_k": [], "float32": [], "int8": [], "labelling": []}
            worst = 0.0
            for _ in range(args.rounds):
                picks = rng.integers(0, classes, batch)
                noise = 0.5 * rng.standard_normal((batch, args.dim)) / np.sqrt(args.dim)
                queries = l2_normalize(rows[picks] + noise).astype(np.float32)
                times["top_k"].append(timed_ms(matrix.top_k, queries, TOP_K) / batch)
                times["float32"].append(timed_ms(old_labelling, matrix, queries, beta) / batch)
                times["int8"].append(timed_ms(matrix.top_k_and_log_partition, queries, TOP_K, beta) / batch)
                times["labelling"].append(
                    timed_ms(label_images, matrix, calibration, queries, TOP_K, UNKNOWN_RATE) / batch
                )
                _, approximate = matrix.top_k_and_log_partition(queries, TOP_K, beta)
                worst = max(worst, float(np.abs(approximate - matrix.log_partition(queries, beta)).max()))
            medians = {name: round(statistics.median(values), 3) for name, values in times.items()}
            rows_out.append((classes, batch, medians, worst))
            result[f"{classes}x{batch}"] = {"ms_per_image": medians, "max_abs_error": float(f"{worst:.2e}")}
    print(
        "| classes | batch | int8 top-k alone | top-k + float32 normaliser | top-k + int8 normaliser "
        "| whole labelling | max error |"
    )
    print("|---|---|---|---|---|---|---|")
    for classes, batch, medians, worst in rows_out:
        print(
            f"| {classes:,} | {batch} | {medians['top_k']:.2f} ms | {medians['float32']:.2f} ms | "
            f"{medians['int8']:.2f} ms | {medians['labelling']:.2f} ms | {worst:.1e} |"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
