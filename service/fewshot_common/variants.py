"""Precision variants of an exported model: where they live and which one a host should serve.

`fewshot export --precision int8` writes ``<stem>.int8.onnx`` next to ``<stem>.onnx`` only after
checking it against that fp32 parent (see ``fewshot_trainer.variants``). The server, given the
parent, looks for such siblings and serves the fastest one for its execution provider.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .embedder import InvalidModel, unoptimised_session
from .modelmeta import PRECISIONS, ModelMeta
from .openvino_engine import bf16_is_fastest

PrecisionChoice = Literal["auto", "fp32", "int8", "fp16", "bf16"]
PRECISION_CHOICES: tuple[str, ...] = ("auto", *PRECISIONS)

# Fastest first, per kind of host. On x86 CPUs int8 (integer GEMMs, a quarter of the weight bytes)
# beat fp32 on every machine measured (bench/bench_engine.py), and a CPU with AMX-BF16 runs the bf16
# variant through OpenVINO faster still (docs/benchmarks/engine.md); without bf16 units a bf16
# variant is fp32 arithmetic on rounded weights, so it comes last. On a GPU fp16 runs on tensor
# cores, while ORT's CUDA provider runs int8 QDQ graphs partly in fp32.
SPEED_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("int8", "fp32", "bf16"),
    "cpu+bf16": ("bf16", "int8", "fp32"),
    "gpu": ("fp16", "fp32"),
}
GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})


class VariantError(InvalidModel):
    """The requested precision is not available for this model."""


@dataclass(frozen=True)
class ModelFile:
    path: Path
    meta: ModelMeta


def variant_path(parent: str | os.PathLike[str], precision: str) -> Path:
    """``models/default.onnx`` -> ``models/default.int8.onnx``."""
    parent = Path(parent)
    return parent.with_name(f"{parent.stem}.{precision}{parent.suffix}")


def read_meta(
    path: str | os.PathLike[str], providers: list[str] | tuple[str, ...] = ("CPUExecutionProvider",)
) -> ModelMeta:
    """The fewshot metadata of an ONNX file (through ONNX Runtime: the serving install has no
    ``onnx`` package), in an unoptimised session so reading it costs little."""
    session = unoptimised_session(path, providers)
    return ModelMeta.from_metadata_props(session.get_modelmeta().custom_metadata_map)


def available_variants(
    model_path: str | os.PathLike[str],
    providers: list[str] | tuple[str, ...] = ("CPUExecutionProvider",),
) -> dict[str, ModelFile]:
    """``model_path`` and its checked variants next to it, by precision.

    A sibling counts only when its metadata says it is a variant of this very model (same
    ``model_id``, a recorded check); anything else with a matching name is ignored. A model that
    is itself a variant has no variants: it is served as given.
    """
    path = Path(model_path)
    meta = read_meta(path, providers)
    found = {meta.precision: ModelFile(path, meta)}
    if meta.is_variant:
        return found
    for precision in PRECISIONS:
        candidate = variant_path(path, precision)
        if precision == "fp32" or not candidate.is_file():
            continue
        try:
            other = read_meta(candidate, providers)
        except Exception:  # a truncated or foreign file next to the model must not stop serving
            continue
        if other.model_id == meta.model_id and other.precision == precision and other.variant_check:
            found[precision] = ModelFile(candidate, other)
    return found


def host_kind(providers: list[str] | tuple[str, ...], *, cpu_bf16: bool | None = None) -> str:
    """``gpu`` when the first (preferred) provider is a GPU one; else ``cpu+bf16`` where the CPU
    runs bf16 fastest (``cpu_bf16``, by default: AMX-BF16 and OpenVINO present), else ``cpu``."""
    if providers and providers[0] in GPU_PROVIDERS:
        return "gpu"
    return "cpu+bf16" if (bf16_is_fastest() if cpu_bf16 is None else cpu_bf16) else "cpu"


def choose_model_file(
    model_path: str | os.PathLike[str],
    precision: str,
    providers: list[str] | tuple[str, ...],
    *,
    cpu_bf16: bool | None = None,
) -> ModelFile:
    """The file to serve: with ``auto`` the fastest available variant for the host (``cpu_bf16``:
    see :func:`host_kind`); otherwise the variant of that precision, or a :class:`VariantError`
    naming the ones there are."""
    if precision not in PRECISION_CHOICES:
        raise VariantError(f"unknown precision {precision!r}; choose one of {PRECISION_CHOICES}")
    found = available_variants(model_path, providers)
    if precision != "auto":
        if precision not in found:
            raise VariantError(
                f"no checked {precision} variant of {Path(model_path).name} (have: "
                f"{', '.join(sorted(found))}); write one with `fewshot export --from-onnx "
                f"{model_path} --precision {precision}`"
            )
        return found[precision]
    for candidate in SPEED_ORDER[host_kind(providers, cpu_bf16=cpu_bf16)]:
        if candidate in found:
            return found[candidate]
    # The given file is a variant not in this host's order (e.g. fp16 on a CPU): serve it anyway.
    return next(iter(found.values()))
