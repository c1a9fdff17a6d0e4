"""The inference engine against the machine's limit, in one run; prints one JSON line.

- ``sgemm_gflops``: numpy float32 matmul of two N x N matrices (default 4096), the median of a few
  runs: a proxy for the CPU's fp32 limit.
- ``models[].gflop_per_image``: the fp32 model's MatMul/Gemm/Conv FLOPs (2 per multiply-add), counted
  from the graph with ONNX shape inference at batch 1, not hard-coded.
- per variant (the model and its checked variants next to it, e.g. ``default.int8.onnx``): ONNX
  Runtime img/s at batch 32 on preprocessed tensors (median over interleaved rounds, so machine
  noise hits every variant alike), and ``fp32_equiv_gflops / sgemm`` = img/s x the fp32 GFLOP per
  image / sgemm GFLOP/s: the fraction (or multiple) of the fp32 limit the engine delivers.
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
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

from fewshot_common.images import ImageLimits, load_batch
from fewshot_common.modelmeta import INPUT_NAME, OUTPUT_NAME
from fewshot_common.variants import available_variants

REPO = Path(__file__).resolve().parents[1]


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


def engine_rates(files: dict[str, Path], batch: int, rounds: int) -> dict[str, float]:
    sessions = {}
    size = None
    for precision, path in files.items():
        sessions[precision] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        size = sessions[precision].get_inputs()[0].shape[-1]
    pixels = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    for session in sessions.values():  # warm-up
        session.run([OUTPUT_NAME], {INPUT_NAME: pixels})
    rates: dict[str, list[float]] = {p: [] for p in sessions}
    for _ in range(rounds):  # interleaved, so a noisy moment hits every variant
        for precision, session in sessions.items():
            start = time.perf_counter()
            session.run([OUTPUT_NAME], {INPUT_NAME: pixels})
            rates[precision].append(batch / (time.perf_counter() - start))
    return {p: statistics.median(r) for p, r in rates.items()}


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
    parser.add_argument("--model", type=Path, nargs="+", default=[REPO / "models" / "default.onnx"],
                        help="fp32 exports; their checked variants next to them are timed too")
    parser.add_argument("--batch", type=int, default=32)
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
        models.append({"file": model.name, "model_id": variants["fp32"].meta.model_id,
                       "gflop_per_image": round(model_gflop, 4)})
        for precision, variant in variants.items():
            key = f"{model.stem}/{precision}" if several else precision
            if key in files:
                raise SystemExit(f"two models named {model.stem}: give files with distinct names")
            files[key] = variant.path
            gflop[key] = model_gflop
            fp32_key[key] = f"{model.stem}/fp32" if several else "fp32"
    sgemm_before = sgemm_gflops(args.sgemm_size, args.sgemm_repeats)
    rates = engine_rates(files, args.batch, args.rounds)
    sgemm_after = sgemm_gflops(args.sgemm_size, args.sgemm_repeats)
    sgemm = statistics.mean([sgemm_before, sgemm_after])  # bracket the engine runs
    engine = {
        key: {
            "file": files[key].name,
            "img_per_s": round(rate, 1),
            "fp32_equiv_gflops": round(rate * gflop[key], 1),
            "ratio_to_sgemm": round(rate * gflop[key] / sgemm, 3),
            "speedup_vs_fp32": round(rate / rates[fp32_key[key]], 3),
        }
        for key, rate in rates.items()
    }
    record = {
        "bench": "engine",
        "cpu": cpu_model(),
        "cores": __import__("os").cpu_count(),
        "onnxruntime": ort.__version__,
        "models": models,
        "sgemm_size": args.sgemm_size,
        "sgemm_gflops": round(sgemm, 1),
        "sgemm_gflops_before_after": [round(sgemm_before, 1), round(sgemm_after, 1)],
        "batch": args.batch,
        "rounds": args.rounds,
        "engine": engine,
        "decode_preprocess_ms": decode_ms(args.model[0], (64, 500, 4000), repeats=max(5, args.rounds)),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
