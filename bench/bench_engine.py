"""The inference engine against the machine's limit, in one run; prints one JSON line.

- ``sgemm_gflops``: numpy float32 matmul of two N x N matrices (default 4096), the median of a few
  runs: a proxy for the CPU's fp32 limit.
- ``models[].gflop_per_image``: the fp32 model's MatMul/Gemm/Conv FLOPs (2 per multiply-add), counted
  from the graph with ONNX shape inference at batch 1, not hard-coded.
- per variant (the model and its checked variants next to it, e.g. ``default.int8.onnx``), on the
  engine the server gives it (ONNX Runtime's CPU provider; OpenVINO for ``default.bf16.onnx`` where
  installed): img/s on preprocessed tensors for each ``--batch`` size (default 8 and 32) and each
  layout of :data:`LAYOUTS` (one run on all cores; one single-threaded run per core at once), the
  median over interleaved rounds (so machine noise hits every variant alike); the engine figure is
  the fastest of them, and ``ratio_to_sgemm`` = that img/s x the fp32 GFLOP per image / sgemm
  GFLOP/s: the fraction (or multiple) of the fp32 limit the engine delivers.
- ``decode_preprocess_ms``: decode + preprocess per image for JPEGs of 64, 500 and 4000 px (the
  server's ``load_batch``, DCT draft included), the median of several runs.

Several ``--model`` files (e.g. an old and a new default model) are timed in the same interleaved
rounds, keyed ``<file stem>/<precision>``; the GFLOP and sgemm ratios use each model's own graph.

Only compare numbers within one run. Usage:
    PYTHONPATH=service:service/client python bench/bench_engine.py [--model models/default.onnx ...] [--rounds 7]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

from fewshot_common.cores import usable_cores
from fewshot_common.embedder import Embedder
from fewshot_common.images import ImageLimits, load_batch
from fewshot_common.modelmeta import INPUT_NAME, OUTPUT_NAME
from fewshot_common.openvino_engine import cpu_flags
from fewshot_common.variants import available_variants

REPO = Path(__file__).resolve().parents[1]


def openvino_version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sgemm_gflops(size: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    a @ b  # warm-up: thread pool, page faults
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        rates.append(2 * size**3 / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def model_gflop_per_image(path: Path) -> float:
    """MatMul/Gemm/Conv FLOPs of one image, from the graph's inferred shapes at batch 1."""
    model = onnx.load(path)
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)  # Reshape targets are computed
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)
    }
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    flops = 0
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        out = shapes.get(node.output[0])
        weight = shapes.get(node.input[1])
        if not out or not weight or 0 in out:
            raise RuntimeError(f"no inferred shape for {node.op_type} {node.name}")
        if node.op_type == "Conv":  # weight [Cout, Cin/groups, kh, kw]
            flops += 2 * int(np.prod(out)) * int(np.prod(weight[1:]))
        else:
            a = shapes[node.input[0]]
            transposed = any(at.name == "transA" and at.i for at in node.attribute)
            k = a[-2] if transposed else a[-1]
            flops += 2 * int(np.prod(out)) * k
    return flops / 1e9


# How a model run may use the cores: one run on ONNX Runtime's default threads (its own choice:
# one per core, spinning between parallel sections), or one single-threaded run per core at once
# (no thread waits at another's barriers), as the server's two batch workers run on 2 cores.
LAYOUTS = ("1 run x all cores", "1 run per core")


# Long enough for every other session's idle threads to stop spinning (ONNX Runtime's workers
# spin up to 2^20 pause instructions after their last task: tens of milliseconds).
QUIET_S = 0.1


def quiet_seconds(run: Callable[[], object]) -> float:
    """Seconds for one ``run()``, timed as in a server that serves one model: after a pause for
    other sessions' spinning threads to sleep, and an untimed run of the same work (its weights in
    cache). Timed right after three other sessions' runs, the int8 variant measured 0.49-0.54x the
    speed, and still that after one untimed run only (medians of 30 paired rounds, batch 8, 2-core
    AMD EPYC)."""
    time.sleep(QUIET_S)
    run()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def quiet_run(run: Callable[[np.ndarray], object], pixels: np.ndarray) -> float:
    """Seconds for one ``run(pixels)`` (e.g. ``Embedder.run_model``), timed by :func:`quiet_seconds`."""
    return quiet_seconds(lambda: run(pixels))


def run_at_once(run: Callable[[np.ndarray], object], pixels: np.ndarray, callers: int) -> None:
    """``callers`` runs of ``pixels`` started at once on their own threads, until all are done."""
    threads = [threading.Thread(target=run, args=(pixels,)) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


Run = Callable[[np.ndarray], object]


def served_engine_run(path: Path, layout: str, cores: int) -> tuple[Run, str]:
    """A fewshot model file on the engine the server would give it (OpenVINO for a bf16 variant
    where installed, else ONNX Runtime's CPU provider), in one of :data:`LAYOUTS`; and its name."""
    if layout == LAYOUTS[0]:  # the engine's own thread count, spinning where ORT does
        embedder = Embedder(path, providers=["CPUExecutionProvider"])
    else:
        embedder = Embedder(
            path, providers=["CPUExecutionProvider"], intra_op_threads=1, concurrent_runs=cores
        )
    return embedder.run_model, embedder.engine


def onnxruntime_run(path: Path, layout: str, cores: int) -> tuple[Run, str]:
    """Any ONNX file with the fewshot input/output names, on ONNX Runtime's CPU provider."""
    options = ort.SessionOptions()
    if layout == LAYOUTS[1]:
        options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return (
        lambda pixels: session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]
    ), "onnxruntime CPUExecutionProvider"


def engine_rates(
    files: dict[str, Path],
    batches: list[int],
    rounds: int,
    cores: int,
    input_size: int,
    make_run: Callable[[Path, str, int], tuple[Run, str]] = served_engine_run,
) -> tuple[dict[str, dict[str, dict[int, float]]], dict[str, str]]:
    """img/s per file key, layout and batch size (the median over interleaved rounds), and the
    engine that ran each file."""
    runs: dict[tuple[str, str], Run] = {}
    engines: dict[str, str] = {}
    for key, path in files.items():
        for layout in LAYOUTS:
            runs[key, layout], engines[key] = make_run(path, layout, cores)
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, 3, input_size, input_size)).astype(np.float32) for b in batches}
    times: dict[tuple[str, str, int], list[float]] = {}
    for _ in range(rounds):  # interleaved, so a noisy moment hits every variant
        for (key, layout), run in runs.items():
            for batch, pixels in inputs.items():
                if layout == LAYOUTS[0]:
                    seconds = quiet_run(run, pixels) / batch
                else:
                    seconds = quiet_seconds(lambda: run_at_once(run, pixels, cores)) / (cores * batch)
                times.setdefault((key, layout, batch), []).append(seconds)
    rates: dict[str, dict[str, dict[int, float]]] = {}
    for (key, layout, batch), seconds in times.items():
        rates.setdefault(key, {}).setdefault(layout, {})[batch] = 1 / statistics.median(seconds)
    return rates, engines


def best(rates: dict[str, dict[int, float]]) -> tuple[float, str, int]:
    """The fastest (img/s, layout, batch) of one file's rates."""
    return max(
        (rate, layout, batch) for layout, by_batch in rates.items() for batch, rate in by_batch.items()
    )


def jpeg(side: int) -> bytes:
    """A photo-like (smooth plus noise) JPEG of side x side pixels."""
    rng = np.random.default_rng(side)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)
    noisy = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (side, side, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def decode_ms(model: Path, sides: tuple[int, ...], repeats: int) -> dict[str, float]:
    meta = available_variants(model)["fp32"].meta
    limits = ImageLimits()
    result = {}
    for side in sides:
        data = jpeg(side)
        load_batch([data], meta.preprocess, limits)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            load_batch([data], meta.preprocess, limits)
            times.append((time.perf_counter() - start) * 1e3)
        result[f"{side}px"] = round(statistics.median(times), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        type=Path,
        nargs="+",
        default=[REPO / "models" / "default.onnx"],
        help="fp32 exports; their checked variants next to them are timed too",
    )
    parser.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[8, 32],
        help="batch sizes; the engine figure is the fastest of them",
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sgemm-size", type=int, default=4096)
    parser.add_argument("--sgemm-repeats", type=int, default=3)
    args = parser.parse_args()

    several = len(args.model) > 1
    files: dict[str, Path] = {}
    gflop: dict[str, float] = {}  # per timed key: its fp32 model's GFLOP per image
    fp32_key: dict[str, str] = {}  # per timed key: the key of its fp32 model
    models: list[dict[str, object]] = []
    for model in args.model:
        variants = available_variants(model)
        if "fp32" not in variants:
            raise SystemExit(f"{model} is a {next(iter(variants))} variant; give the fp32 export")
        model_gflop = model_gflop_per_image(model)
        models.append(
            {
                "file": model.name,
                "model_id": variants["fp32"].meta.model_id,
                "gflop_per_image": round(model_gflop, 4),
            }
        )
        for precision, variant in variants.items():
            key = f"{model.stem}/{precision}" if several else precision
            if key in files:
                raise SystemExit(f"two models named {model.stem}: give files with distinct names")
            files[key] = variant.path
            gflop[key] = model_gflop
            fp32_key[key] = f"{model.stem}/fp32" if several else "fp32"
    cores = usable_cores()
    sgemm_before = sgemm_gflops(args.sgemm_size, args.sgemm_repeats)
    input_size = variants["fp32"].meta.preprocess.input_size
    rates, engines = engine_rates(files, args.batch, args.rounds, cores, input_size)
    sgemm_after = sgemm_gflops(args.sgemm_size, args.sgemm_repeats)
    sgemm = statistics.mean([sgemm_before, sgemm_after])  # bracket the engine runs
    engine = {}
    for key, by_layout in rates.items():
        rate, layout, batch = best(by_layout)
        engine[key] = {
            "file": files[key].name,
            "engine": engines[key],
            "img_per_s": round(rate, 1),
            "at": {"layout": layout, "batch": batch},
            "fp32_equiv_gflops": round(rate * gflop[key], 1),
            "ratio_to_sgemm": round(rate * gflop[key] / sgemm, 3),
            "speedup_vs_fp32": round(rate / best(rates[fp32_key[key]])[0], 3),
            "img_per_s_by_layout_and_batch": {
                lay: {str(b): round(r, 1) for b, r in by_batch.items()} for lay, by_batch in by_layout.items()
            },
        }
    record = {
        "bench": "engine",
        "cpu": cpu_model(),
        "cores": cores,
        "onnxruntime": ort.__version__,
        "openvino": openvino_version(),
        "cpu_flags": sorted(
            cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}
        ),
        "models": models,
        "sgemm_size": args.sgemm_size,
        "sgemm_gflops": round(sgemm, 1),
        "sgemm_gflops_before_after": [round(sgemm_before, 1), round(sgemm_after, 1)],
        "batches": args.batch,
        "rounds": args.rounds,
        "engine": engine,
        "decode_preprocess_ms": decode_ms(args.model[0], (64, 500, 4000), repeats=max(5, args.rounds)),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
