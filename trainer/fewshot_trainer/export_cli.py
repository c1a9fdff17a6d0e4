"""``fewshot export``: a ViT (random, or an encoder of a checkpoint) to ONNX with its metadata."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fewshot_common import settings_flags
from fewshot_common.image_files import list_image_files
from fewshot_common.modelmeta import PRECISIONS
from fewshot_common.variants import variant_path

from .export import (
    ENCODER_KEYS,
    POOL_DESCRIPTIONS,
    EmbeddingHead,
    ExportError,
    Pool,
    at_input_size,
    default_preprocess,
    encoder_from_checkpoint,
    export_onnx,
    pooled_embeddings,
    whitening_projection,
)
from .variants import CheckThresholds, write_variant
from .vit import ARCHS, build_vit, get_arch

DEFAULT_ARCH = "vit_tiny_p8_64"
_CHECKS = CheckThresholds()
# Choices read from their registries; Literal[tuple] is Literal[each], which the flags turn into choices.
Precision = Literal[PRECISIONS]  # type: ignore[valid-type]
Arch = Literal[tuple(sorted(ARCHS))]  # type: ignore[valid-type]
Encoder = Literal[tuple(sorted(ENCODER_KEYS))]  # type: ignore[valid-type]


class ExportOptions(BaseModel):
    """Every option of ``fewshot export``, declared once: the flags and their help derive from it
    (:mod:`fewshot_common.settings_flags`, as ``fewshot serve``'s from ``Settings``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: Path | None = Field(
        None,
        description=(
            "where to write the .onnx file (required, except with --from-onnx: then the variant "
            "goes next to that file as NAME.PRECISION.onnx)"
        ),
    )
    precision: Precision = Field(
        "fp32",
        description=(
            "fp32; int8, fp16 or bf16 also write a variant next to the fp32 file "
            "(NAME.int8.onnx), checked against it first (cosine, and the few-shot protocol with "
            "--check-data); the server serves the fastest checked variant for its hardware (bf16: "
            "bf16 weights, run in bf16 by OpenVINO on CPUs with bf16 units)"
        ),
    )
    from_onnx: Path | None = Field(
        None,
        description=("derive the --precision variant from this existing fp32 export instead of exporting"),
    )
    int8_method: Literal["dynamic", "static"] = Field(
        "dynamic",
        description=(
            "dynamic: int8 weights, activations quantized per batch (needs no data); "
            "static: QDQ with activation ranges calibrated on --calibration-data, per-channel weights"
        ),
    )
    calibration_data: Path | None = Field(None, description="folder of unlabelled images for static int8")
    check_data: Path | None = Field(
        None,
        description=(
            "folder-per-class labelled images: the variant must match fp32 on the few-shot protocol"
        ),
    )
    min_cosine: float = Field(
        _CHECKS.min_cosine,
        description=("refuse a variant whose embedding of any checked image has a lower cosine to fp32's"),
    )
    mean_cosine: float = Field(
        _CHECKS.mean_cosine, description=("refuse a variant whose mean cosine to fp32 is lower")
    )
    max_accuracy_drop: float = Field(
        _CHECKS.max_accuracy_drop,
        description=(
            "refuse a variant more than this many points below fp32 on 5-way 5-shot or all-way "
            "5-shot of --check-data"
        ),
    )
    checkpoint: Path | None = Field(
        None,
        description=(
            "a fewshot checkpoint (from `fewshot train` or `fewshot import-checkpoint`); "
            "without it the model is randomly initialised"
        ),
    )
    arch: Arch | None = Field(
        None,
        description=(
            f"architecture of a random model (default {DEFAULT_ARCH}); "
            "with --checkpoint it must match the checkpoint's"
        ),
    )
    encoder: Encoder = Field(
        "target",
        description=("which encoder of the checkpoint: the EMA target (as MSN evaluates) or the anchor"),
    )
    pool: Pool = Field(
        "cls", description="; ".join(f"{name}: {text}" for name, text in POOL_DESCRIPTIONS.items())
    )
    blocks: int = Field(
        1,
        description=(
            "pool each of the last N blocks' outputs (through the final norm) and concatenate "
            "them, last block first (1: the last block only)"
        ),
    )
    input_size: int | None = Field(
        None,
        description=(
            "input resolution of the exported graph, a multiple of the patch size (default: the "
            "trained one); the position embedding is resampled to the larger patch grid"
        ),
    )
    center_data: Path | None = Field(
        None,
        description=(
            "folder of images (searched recursively): subtract their mean embedding inside the graph"
        ),
    )
    center_samples: int = Field(
        2000, description=("how many images of --center-data to average (drawn at random with --seed)")
    )
    whiten: bool = Field(
        False,
        description=(
            "also whiten with the covariance of the --center-data embeddings (PCA whitening with "
            "shrinkage, inside the graph): directions that a few dominant factors inflate count less"
        ),
    )
    whiten_shrinkage: float = Field(
        0.3,
        description=(
            "added to every variance, as a fraction of the mean variance (smaller "
            "whitens harder, larger is closer to plain centering)"
        ),
    )
    whiten_dim: int | None = Field(
        None, description=("keep this many leading principal directions (default: all; the embedding size)")
    )
    seed: int = Field(0, description="random init and centering sample")


OPTIONS = ExportOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags ``fewshot export`` parses, on another parser (tests)."""
    settings_flags.add_arguments(parser, ExportOptions)


def _center_sample(folder: Path, samples: int, seed: int) -> list[Path]:
    if not folder.is_dir():
        raise ExportError(f"--center-data {folder} is not a folder")
    if samples < 1:
        raise ExportError(f"--center-samples must be >= 1, got {samples}")
    files = list_image_files(folder)
    if not files:
        raise ExportError(f"--center-data {folder} holds no image files")
    if len(files) <= samples:
        return files
    chosen = np.random.default_rng(seed).choice(len(files), size=samples, replace=False)
    return [files[i] for i in sorted(chosen)]


def run(args: argparse.Namespace) -> int:
    try:
        return _run(settings_flags.model_from_args(ExportOptions, args))
    except ExportError as exc:
        print(f"fewshot export: {exc}", file=sys.stderr)
        return 1


def _write_variant(args: ExportOptions, parent: Path, output: Path) -> None:
    thresholds = CheckThresholds(args.min_cosine, args.mean_cosine, args.max_accuracy_drop)
    meta = write_variant(
        parent,
        args.precision,
        output,
        int8_method=args.int8_method,
        calibration_data=args.calibration_data,
        check_data=args.check_data,
        thresholds=thresholds,
        seed=args.seed,
    )
    check = ", ".join(f"{key} {value:g}" for key, value in meta.variant_check.items())
    print(f"wrote {output}: {meta.precision} variant {meta.variant_id} of {meta.model_id}; check: {check}")


def _run(args: ExportOptions) -> int:
    if args.from_onnx is not None:
        if args.precision == "fp32":
            raise ExportError("--from-onnx derives a variant: give --precision int8, fp16 or bf16")
        _write_variant(args, args.from_onnx, args.output or variant_path(args.from_onnx, args.precision))
        return 0
    if args.output is None:
        raise ExportError("--output is required (except with --from-onnx)")
    torch.manual_seed(args.seed)
    extra = {"pool": args.pool}
    if args.checkpoint is None:
        spec = get_arch(args.arch or DEFAULT_ARCH)
        encoder, preprocess = build_vit(spec), default_preprocess(spec)
        extra["weights"] = f"random init, seed {args.seed}"
    else:
        spec, encoder, preprocess = encoder_from_checkpoint(args.checkpoint, args.encoder)
        if args.arch is not None and args.arch != spec.name:
            raise ExportError(f"--arch {args.arch} does not match the checkpoint's arch {spec.name}")
        extra["weights"] = f"{args.encoder} encoder of {args.checkpoint.name}"
    if args.input_size is not None and args.input_size != spec.img_size:
        trained = spec.img_size
        spec, encoder, preprocess = at_input_size(encoder, spec, preprocess, args.input_size)
        extra["input_size"] = f"{spec.img_size} (trained at {trained}; position embedding resampled)"
    head = EmbeddingHead(encoder, args.pool, blocks=args.blocks)
    embedding = POOL_DESCRIPTIONS[args.pool]
    if args.blocks > 1:
        embedding += f", for each of the last {args.blocks} blocks (last first), concatenated"
        extra["blocks"] = str(args.blocks)

    if args.whiten and args.center_data is None:
        raise ExportError("--whiten needs --center-data: the images to estimate the covariance from")
    if args.center_data is not None:
        paths = _center_sample(args.center_data, args.center_samples, args.seed)
        embeddings, skipped = pooled_embeddings(head, paths, preprocess)
        used = len(embeddings)
        print(
            f"centering: mean embedding of {used} images from {args.center_data}"
            + (f" ({skipped} unreadable, skipped)" if skipped else "")
        )
        center = torch.from_numpy(embeddings.mean(axis=0)).float()
        projection = None
        embedding += f", centred (minus the mean over {used} images of {args.center_data.name})"
        extra["center_images"] = str(used)
        if args.whiten:
            projection = whitening_projection(
                embeddings, shrinkage=args.whiten_shrinkage, dim=args.whiten_dim
            )
            dim = projection.shape[1]
            print(f"whitening: {dim} principal directions, shrinkage {args.whiten_shrinkage}")
            embedding += (
                f", PCA-whitened over the same images ({dim} directions, shrinkage {args.whiten_shrinkage:g})"
            )
            extra["whiten_shrinkage"] = f"{args.whiten_shrinkage:g}"
            extra["whiten_dim"] = str(dim)
        head = EmbeddingHead(encoder, args.pool, center=center, blocks=args.blocks, projection=projection)

    meta = export_onnx(head, spec, preprocess, args.output, embedding=embedding, extra=extra)
    print(
        f"wrote {args.output}: model_id {meta.model_id}, {meta.embedding_dim}-d ({meta.embedding}), "
        f"input {preprocess.input_size} px (resize {preprocess.resize_size}, {preprocess.interpolation})"
    )
    if args.precision != "fp32":
        _write_variant(args, args.output, variant_path(args.output, args.precision))
    return 0
