"""Precision variants (int8, fp16) of an fp32 export, checked against it before they are written.

A variant keeps its parent's ``model_id`` (the embedding space: the registry then lets fp32 and
int8 replicas share classes) only because it passed the check: cosine between the two models'
embeddings on a sample (min and mean) and, given a labelled folder, the few-shot protocol within
``max_accuracy_drop`` points. A variant that fails is not written.

- ``int8`` (``dynamic``): MatMul/Gemm weights quantized to int8 per tensor, their activations per
  batch at run time (ORT ``quantize_dynamic``); convolutions stay fp32. Needs no data.
- ``int8`` (``static``): QDQ int8 with activation ranges calibrated on unlabelled images read and
  preprocessed as the server does, weights per channel.
- ``fp16``: weights and arithmetic in float16, input/output kept float32 (for GPU hosts; CPUs run
  fp16 slowly or not at all).
- ``bf16``: MatMul/Gemm/Conv weights stored as bfloat16 (each cast to float32 in the graph, so any
  ONNX runtime can run the file); the server runs it through OpenVINO, whose bf16 arithmetic on
  AMX was the fastest engine measured on a Xeon. Checked with the engine that will serve it.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

from fewshot_common.embedder import Embedder
from fewshot_common.fewshot_eval import check_class_sizes, evaluate_embeddings
from fewshot_common.image_files import list_image_files, list_labelled_image_files, preprocessed_batches
from fewshot_common.modelmeta import INPUT_NAME, ModelMeta, content_model_id
from fewshot_common.variants import read_meta

from .export import ExportError

Int8Method = Literal["dynamic", "static"]
VARIANT_PRECISIONS = ("int8", "fp16", "bf16")
# The protocols a variant must not lose accuracy on (fewshot_eval keys): 5-way 5-shot, 50-way 5-shot.
CHECKED_PROTOCOLS = ("5way5shot", "allway5shot")
RANDOM_SAMPLE_SIZE = 64


@dataclasses.dataclass(frozen=True)
class CheckThresholds:
    min_cosine: float = 0.98  # every sampled image
    mean_cosine: float = 0.995
    max_accuracy_drop: float = 0.5  # points, on each of CHECKED_PROTOCOLS

    def __post_init__(self) -> None:
        if not (0 < self.min_cosine <= 1 and 0 < self.mean_cosine <= 1):
            raise ExportError("cosine thresholds must be in (0, 1]")
        if self.max_accuracy_drop < 0:
            raise ExportError("the allowed accuracy drop must be >= 0 points")


# --- conversion ----------------------------------------------------------------------------------


class _ImageCalibration:
    """ORT CalibrationDataReader: batches of preprocessed images, as the server would feed them."""

    def __init__(self, paths: Sequence[Path], meta: ModelMeta, batch_size: int = 16) -> None:
        self._batches: Iterator[tuple[np.ndarray, np.ndarray]] = preprocessed_batches(
            paths, meta.preprocess, batch_size, skip_unreadable=True
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch[0]}


def _convert(
    parent: Path,
    precision: str,
    output: Path,
    *,
    int8_method: Int8Method,
    calibration: Sequence[Path],
    meta: ModelMeta,
) -> None:
    from onnxruntime import quantization as q

    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(parent), keep_io_types=True), output)
    elif precision == "bf16":
        onnx.save(bf16_weights(onnx.load(parent)), output)
    elif int8_method == "dynamic":
        # Per-tensor weights: on the shipped model per-channel measured *lower* cosine to fp32,
        # since dynamic activations dominate the error. MatMul/Gemm only: ORT's ConvInteger for
        # the patch embedding is slower than the fp32 Conv, at the same cosine to fp32
        # (docs/benchmarks/code-notes.md).
        q.quantize_dynamic(
            parent,
            output,
            weight_type=q.QuantType.QInt8,
            per_channel=False,
            op_types_to_quantize=["MatMul", "Gemm"],
        )
    else:
        if not calibration:
            raise ExportError("static int8 needs --calibration-data: images to calibrate ranges on")
        q.quantize_static(
            parent,
            output,
            _ImageCalibration(calibration, meta),
            quant_format=q.QuantFormat.QDQ,
            per_channel=True,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
        )


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> the uint16 bit patterns of bfloat16, rounded to nearest even (as hardware does:
    truncating would bias every weight towards zero)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
    return ((bits + rounding) >> 16).astype(np.uint16)


# The nodes whose second input is a weight matrix that bf16 arithmetic multiplies with.
_WEIGHT_OPS = ("MatMul", "Gemm", "Conv")


def bf16_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each float32 weight of a MatMul/Gemm/Conv stored as bfloat16 and cast back
    to float32 by a Cast node: half the bytes, and the values bf16 arithmetic would use. Biases,
    norms and embeddings that are added, not multiplied, stay float32."""
    from onnx import numpy_helper

    weight_names = {node.input[1] for node in model.graph.node if node.op_type in _WEIGHT_OPS}
    casts = []
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name not in weight_names or tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        name, values = tensor.name, numpy_helper.to_array(tensor)
        if not np.isfinite(values).all():
            raise ExportError(f"weight {name} has non-finite values")
        stored = onnx.helper.make_tensor(
            f"{name}.bf16",
            onnx.TensorProto.BFLOAT16,
            values.shape,
            to_bfloat16_bits(values).tobytes(),
            raw=True,
        )
        model.graph.initializer[index].CopyFrom(stored)  # `tensor` is this same message
        casts.append(
            onnx.helper.make_node(
                "Cast", [stored.name], [name], to=onnx.TensorProto.FLOAT, name=f"{name}.cast"
            )
        )
    if not casts:
        raise ExportError("the model has no float32 MatMul/Gemm/Conv weights to store as bf16")
    # Casts first: nodes must be in topological order.
    nodes = [*casts, *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


def _with_meta(path: Path, meta: ModelMeta) -> None:
    model = onnx.load(path)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta.to_metadata_props())
    onnx.save(model, path)


# --- check ---------------------------------------------------------------------------------------


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Embedder outputs are unit vectors already.
    return np.sum(a * b, axis=1)


def check_variant(
    parent: Path,
    variant: Path,
    *,
    check_data: Path | None,
    thresholds: CheckThresholds,
    providers: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Compare ``variant`` with ``parent``; the measured figures, or an ExportError saying which
    threshold failed. With ``check_data`` (folders of labelled images) the cosines are over all its
    images and the few-shot protocol is run on both; otherwise over seeded random inputs."""
    reference, candidate = Embedder(parent, providers=providers), Embedder(variant, providers=providers)
    figures: dict[str, float] = {}
    if check_data is None:
        size = reference.meta.preprocess.input_size
        pixels = np.random.default_rng(seed).standard_normal((RANDOM_SAMPLE_SIZE, 3, size, size))
        cosines = _cosines(reference.embed_array(pixels), candidate.embed_array(pixels))
    else:
        found = list_labelled_image_files(check_data)
        if not found.paths:
            raise ExportError(f"--check-data {check_data} has no class folders with images")
        check_class_sizes(found.labels)
        ref_vectors, readable = reference.embed_readable_paths(found.paths)
        var_vectors, _ = candidate.embed_readable_paths(found.paths)
        cosines = _cosines(ref_vectors, var_vectors)
        ref_acc = evaluate_embeddings(ref_vectors, found.labels[readable], seed=seed)
        var_acc = evaluate_embeddings(var_vectors, found.labels[readable], seed=seed)
        for protocol in ref_acc:
            figures[f"{protocol}_fp32"] = round(ref_acc[protocol]["mean"], 3)
            figures[f"{protocol}_variant"] = round(var_acc[protocol]["mean"], 3)
    if candidate.meta.precision == "bf16":
        # 1 where the check ran bf16 arithmetic (OpenVINO on bf16 units), 0 where it ran fp32 on
        # the rounded weights (no such units or no OpenVINO): the figures hold for that engine.
        figures["bf16_arithmetic"] = float(candidate.compute_precision == "bf16")
    figures["cosine_min"] = round(float(cosines.min()), 6)
    figures["cosine_mean"] = round(float(cosines.mean()), 6)
    figures["check_images"] = float(len(cosines))

    failures = []
    if not figures["cosine_min"] >= thresholds.min_cosine:  # `not >=` also catches NaN
        failures.append(f"min cosine {figures['cosine_min']:.4f} < {thresholds.min_cosine}")
    if not figures["cosine_mean"] >= thresholds.mean_cosine:
        failures.append(f"mean cosine {figures['cosine_mean']:.4f} < {thresholds.mean_cosine}")
    if check_data is not None:
        for protocol in CHECKED_PROTOCOLS:
            drop = figures[f"{protocol}_fp32"] - figures[f"{protocol}_variant"]
            if not drop <= thresholds.max_accuracy_drop:
                failures.append(
                    f"{protocol} {figures[f'{protocol}_variant']:.2f} is {drop:.2f} points below "
                    f"fp32's {figures[f'{protocol}_fp32']:.2f} (allowed {thresholds.max_accuracy_drop})"
                )
    if failures:
        raise ExportError("the variant failed its check against fp32, not written: " + "; ".join(failures))
    return figures


# --- the whole step ------------------------------------------------------------------------------


def write_variant(
    parent: str | Path,
    precision: str,
    output: str | Path,
    *,
    int8_method: Int8Method = "dynamic",
    calibration_data: Path | None = None,
    calibration_samples: int = 256,
    check_data: Path | None = None,
    thresholds: CheckThresholds = CheckThresholds(),
    providers: Sequence[str] | None = None,
    seed: int = 0,
) -> ModelMeta:
    """Derive the ``precision`` variant of the fp32 export ``parent``, check it, write ``output``."""
    parent, output = Path(parent), Path(output)
    if precision not in VARIANT_PRECISIONS:
        raise ExportError(f"unknown variant precision {precision!r}; choose one of {VARIANT_PRECISIONS}")
    try:
        meta = read_meta(parent)
    except Exception as exc:
        raise ExportError(f"{parent}: not a fewshot ONNX export ({exc})") from exc
    if meta.is_variant:
        raise ExportError(f"{parent} is already a {meta.precision} variant; derive from the fp32 export")
    calibration: list[Path] = []
    if calibration_data is not None:
        files = list_image_files(calibration_data)
        rng = np.random.default_rng(seed)
        calibration = [files[i] for i in sorted(rng.permutation(len(files))[:calibration_samples])]

    with tempfile.TemporaryDirectory() as scratch:
        draft = Path(scratch) / output.name
        _convert(parent, precision, draft, int8_method=int8_method, calibration=calibration, meta=meta)
        variant_id = content_model_id(meta.arch, draft.read_bytes())
        method = f", {int8_method}" if precision == "int8" else ""
        extra = {**meta.extra, "variant": f"{precision}{method} from {parent.name}"}
        unchecked = dataclasses.replace(
            meta, precision=precision, variant_id=variant_id, extra=extra, variant_check={}
        )
        _with_meta(draft, unchecked)
        figures = check_variant(
            parent, draft, check_data=check_data, thresholds=thresholds, providers=providers, seed=seed
        )
        checked = dataclasses.replace(unchecked, variant_check=figures)
        _with_meta(draft, checked)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_suffix(output.suffix + ".tmp")
        tmp.write_bytes(draft.read_bytes())
        tmp.replace(output)
    return checked
