"""Engine levers on this CPU, one run: which ONNX Runtime graph of an fp32 export runs fastest, and
what each costs in agreement with fp32. Prints one JSON line, then a Markdown table and, for fp32 and
the shipped int8 recipe, where the time goes (share of kernel time per operator type).

Variants, each built here in a temporary folder from ``--model`` (the fp32 export):

- ``int8 dynamic, MatMul only``: what ``fewshot export --precision int8`` writes (variants.py);
- ``int8 dynamic, all ops``: ORT's default op set, which turns the patch-embedding Conv into a
  ConvInteger too;
- ``int8 dynamic, per-channel``: per-channel weight scales, MatMul only;
- ``int8 static QDQ``: activations quantized with ranges calibrated on ``--calibration-data``
  (per-channel weights, U8 activations), what ``--int8-method static`` writes;
- ``int8 static QDQ, weight MatMuls only``: the same, but only the MatMuls with a weight matrix
  (the attention's two activation-by-activation MatMuls, the softmax, GELU and norms stay fp32),
  ranges by the 99.999th percentile: which nodes stay fp32 is the lever;
- ``bf16 on OpenVINO``: MatMul/Conv weights stored as bf16 (``fewshot export --precision bf16``),
  run by OpenVINO in bf16 arithmetic where the CPU has it (what a CPU with AMX-BF16 serves);
- ``fp32 + transformer fusions``: ``onnxruntime.transformers.optimizer`` (model type ``vit``).

img/s at batch ``--batch`` on real preprocessed images, the median over interleaved rounds (so a
noisy moment hits every variant alike), each timed run after an untimed one so that no other
session's spinning threads share its cores (bench_engine.quiet_run); numpy sgemm before and after as the fp32 limit proxy
(``ratio_to_sgemm`` = img/s x the fp32 GFLOP per image / sgemm GFLOP/s, as in bench_engine.py);
cosine to fp32 (min, mean) over ``--eval-dir`` images. Only compare numbers within one run:

    PYTHONPATH=service:service/client:trainer python bench/ablate_engine.py --model models/default.onnx \\
        --calibration-data ../shared/data/tiny-imagenet/pretrain --eval-dir ../shared/data/tiny-imagenet/fewshot-dev
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime import quantization as q

from fewshot_common.image_files import list_image_files, list_labelled_image_files, preprocessed_batches
from fewshot_common.modelmeta import INPUT_NAME, OUTPUT_NAME, Preprocess
from fewshot_common.openvino_engine import OpenVinoRunner, openvino_available
from fewshot_common.variants import read_meta
from fewshot_trainer.variants import bf16_weights

from bench_engine import LAYOUTS, cpu_model, model_gflop_per_image, onnxruntime_run, quiet_run, sgemm_gflops

CPU = ["CPUExecutionProvider"]
SHIPPED = "int8 dynamic, MatMul only (shipped)"
BF16 = "bf16 on OpenVINO (served on AMX)"


class _Calibration:
    """ORT CalibrationDataReader over preprocessed images."""

    def __init__(self, paths: list[Path], preprocess: Preprocess) -> None:
        self._batches = preprocessed_batches(paths, preprocess, 16, skip_unreadable=True)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch[0]}


def build_variants(
    model: Path, folder: Path, calibration: list[Path], preprocess: Preprocess
) -> dict[str, Path]:
    def dynamic(name: str, **options: object) -> Path:
        path = folder / f"{name}.onnx"
        q.quantize_dynamic(model, path, weight_type=q.QuantType.QInt8, **options)
        return path

    def static() -> Path:
        path = folder / "static.onnx"
        q.quantize_static(
            model,
            path,
            _Calibration(calibration, preprocess),
            quant_format=q.QuantFormat.QDQ,
            per_channel=True,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
        )
        return path

    def static_weight_matmuls() -> Path:
        path = folder / "static_weights.onnx"
        graph = onnx.load(model).graph
        weights = {t.name for t in graph.initializer}
        activation_matmuls = [
            node.name for node in graph.node if node.op_type == "MatMul" and not weights & set(node.input)
        ]
        q.quantize_static(
            model,
            path,
            _Calibration(calibration, preprocess),
            quant_format=q.QuantFormat.QDQ,
            per_channel=True,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=activation_matmuls,
            calibrate_method=q.CalibrationMethod.Percentile,
        )
        return path

    def bf16() -> Path:
        path = folder / "bf16.onnx"
        onnx.save(bf16_weights(onnx.load(model)), path)
        return path

    def fused() -> Path:
        from onnxruntime.transformers.optimizer import optimize_model

        path = folder / "fused.onnx"
        # 0 heads / 0 hidden size: the optimizer reads them off the graph
        optimize_model(str(model), model_type="vit", num_heads=0, hidden_size=0).save_model_to_file(str(path))
        return path

    builders: dict[str, Callable[[], Path]] = {
        SHIPPED: lambda: dynamic("dyn_matmul", per_channel=False, op_types_to_quantize=["MatMul", "Gemm"]),
        "int8 dynamic, all ops": lambda: dynamic("dyn_all", per_channel=False),
        "int8 dynamic, per-channel": lambda: dynamic(
            "dyn_pc", per_channel=True, op_types_to_quantize=["MatMul", "Gemm"]
        ),
        "int8 static QDQ (calibrated)": static,
        "int8 static QDQ, weight MatMuls only": static_weight_matmuls,
        BF16: bf16,
        "fp32 + transformer fusions": fused,
    }
    files = {"fp32": model}
    for name, build in builders.items():
        try:
            files[name] = build()
        except Exception as exc:  # noqa: BLE001 -- a lever ORT cannot apply is a finding, not a crash
            print(f"<!-- {name}: not built ({type(exc).__name__}: {str(exc)[:200]}) -->")
    return files


def engine_run(name: str, path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """One run of a batch on all cores: OpenVINO for the bf16 variant (where installed), ONNX
    Runtime's CPU provider for the rest."""
    if name == BF16 and openvino_available():
        runner = OpenVinoRunner(path, threads_per_run=None, concurrent_runs=1)
        return runner.run
    run, _ = onnxruntime_run(path, LAYOUTS[0], cores=0)  # ORT's own threads: one per core
    return run


def op_shares(path: Path, pixels: np.ndarray, prefix: Path, runs: int = 8) -> dict[str, float]:
    """Share of the kernel time per operator type, from ORT's profiler."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(prefix)
    session = ort.InferenceSession(str(path), options, providers=CPU)
    for _ in range(runs):
        session.run([OUTPUT_NAME], {INPUT_NAME: pixels})
    by_op: collections.Counter[str] = collections.Counter()
    for event in json.loads(Path(session.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
    total = sum(by_op.values()) or 1
    return {op: round(t / total, 3) for op, t in by_op.most_common(8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="fp32 export")
    parser.add_argument("--calibration-data", type=Path, required=True)
    parser.add_argument("--eval-dir", type=Path, required=True, help="images for the cosine check")
    parser.add_argument("--images", type=int, default=256, help="images for the cosine check")
    parser.add_argument(
        "--batch",
        type=int,
        default=8,
        help="images per run (8: the engine's fastest on 2 cores, bench_engine.py)",
    )
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    meta = read_meta(args.model)
    gflop = model_gflop_per_image(args.model)
    sample = list_labelled_image_files(args.eval_dir).paths
    sample = sample[:: max(1, len(sample) // args.images)][: args.images]
    calibration = list_image_files(args.calibration_data)
    calibration = calibration[:: max(1, len(calibration) // 256)][:256]
    pixels = np.concatenate(
        [b for b, _ in preprocessed_batches(sample, meta.preprocess, 64, skip_unreadable=True)]
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = build_variants(args.model, folder, calibration, meta.preprocess)
        runs = {k: engine_run(k, p) for k, p in files.items()}
        outputs = {k: run(pixels) for k, run in runs.items()}
        unit = {k: o / np.linalg.norm(o, axis=1, keepdims=True) for k, o in outputs.items()}
        cosines = {k: np.sum(u * unit["fp32"], axis=1) for k, u in unit.items()}
        batch = pixels[: args.batch]
        for run in runs.values():  # warm-up
            run(batch)
        sgemm_before = sgemm_gflops(4096, 3)
        rates: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                rates[name].append(len(batch) / quiet_run(run, batch))
        sgemm_after = sgemm_gflops(4096, 3)
        sgemm = (sgemm_before + sgemm_after) / 2
        shares = {
            name: op_shares(files[name], batch, folder / "profile")
            for name in ("fp32", SHIPPED)
            if name in files
        }
    median = {k: statistics.median(v) for k, v in rates.items()}
    rows = {
        name: {
            "img_per_s": round(rate, 1),
            "x_fp32": round(rate / median["fp32"], 2),
            "ratio_to_sgemm": round(rate * gflop / sgemm, 3),
            "cosine_min": round(float(cosines[name].min()), 4),
            "cosine_mean": round(float(cosines[name].mean()), 4),
        }
        for name, rate in median.items()
    }
    print(
        json.dumps(
            {
                "bench": "ablate_engine",
                "cpu": cpu_model(),
                "onnxruntime": ort.__version__,
                "model_id": meta.model_id,
                "gflop_per_image": round(gflop, 4),
                "sgemm_gflops_before_after": [round(sgemm_before, 1), round(sgemm_after, 1)],
                "batch": args.batch,
                "rounds": args.rounds,
                "images": len(pixels),
                "variants": rows,
                "op_time_shares": shares,
            }
        )
    )
    print(
        f"\n| variant (batch {args.batch}) | img/s | × fp32 | ÷ sgemm ({sgemm:.0f} GFLOP/s) "
        "| cosine to fp32 min / mean |"
    )
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['img_per_s']} | {row['x_fp32']} | {row['ratio_to_sgemm']} "
            f"| {row['cosine_min']} / {row['cosine_mean']} |"
        )
    for name, share in shares.items():
        print(f"\n{name}: " + ", ".join(f"{op} {s:.0%}" for op, s in share.items()))


if __name__ == "__main__":
    main()
