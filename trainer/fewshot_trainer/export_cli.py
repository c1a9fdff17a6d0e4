"""``fewshot export``: a ViT (random, or an encoder of a checkpoint) to ONNX with its metadata."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from fewshot_common.image_files import list_image_files
from fewshot_common.modelmeta import PRECISIONS
from fewshot_common.variants import variant_path

from .export import (
    ENCODER_KEYS,
    POOL_DESCRIPTIONS,
    POOLS,
    EmbeddingHead,
    ExportError,
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output",
        type=Path,
        help="where to write the .onnx file (required, except with --from-onnx: then the variant "
        "goes next to that file as NAME.PRECISION.onnx)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (default); int8, fp16 or bf16 also write a variant next to the fp32 file "
        "(NAME.int8.onnx), checked against it first (cosine, and the few-shot protocol with "
        "--check-data); the server serves the fastest checked variant for its hardware (bf16: "
        "bf16 weights, run in bf16 by OpenVINO on CPUs with bf16 units)",
    )
    parser.add_argument(
        "--from-onnx",
        type=Path,
        metavar="FP32_ONNX",
        help="derive the --precision variant from this existing fp32 export instead of exporting",
    )
    parser.add_argument(
        "--int8-method",
        choices=("dynamic", "static"),
        default="dynamic",
        help="dynamic: int8 weights, activations quantized per batch (default, needs no data); "
        "static: QDQ with activation ranges calibrated on --calibration-data, per-channel weights",
    )
    parser.add_argument(
        "--calibration-data", type=Path, help="folder of unlabelled images for static int8"
    )
    parser.add_argument(
        "--check-data",
        type=Path,
        help="folder-per-class labelled images: the variant must match fp32 on the few-shot protocol",
    )
    defaults = CheckThresholds()
    parser.add_argument(
        "--min-cosine",
        type=float,
        default=defaults.min_cosine,
        help=f"refuse a variant whose embedding of any checked image has a lower cosine to fp32's "
        f"(default {defaults.min_cosine})",
    )
    parser.add_argument(
        "--mean-cosine",
        type=float,
        default=defaults.mean_cosine,
        help=f"refuse a variant whose mean cosine to fp32 is lower (default {defaults.mean_cosine})",
    )
    parser.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=defaults.max_accuracy_drop,
        help="refuse a variant more than this many points below fp32 on 5-way 5-shot or all-way "
        f"5-shot of --check-data (default {defaults.max_accuracy_drop})",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="a fewshot checkpoint (from `fewshot train` or `fewshot import-checkpoint`); "
        "without it the model is randomly initialised",
    )
    parser.add_argument(
        "--arch",
        choices=sorted(ARCHS),
        help=f"architecture of a random model (default {DEFAULT_ARCH}); "
        "with --checkpoint it must match the checkpoint's",
    )
    parser.add_argument(
        "--encoder",
        choices=sorted(ENCODER_KEYS),
        default="target",
        help="which encoder of the checkpoint: the EMA target (default, as MSN evaluates) or the anchor",
    )
    parser.add_argument(
        "--pool",
        choices=POOLS,
        default="cls",
        help="; ".join(f"{name}: {text}" for name, text in POOL_DESCRIPTIONS.items()),
    )
    parser.add_argument(
        "--blocks",
        type=int,
        default=1,
        help="pool each of the last N blocks' outputs (through the final norm) and concatenate "
        "them, last block first (default 1: the last block only)",
    )
    parser.add_argument(
        "--input-size",
        type=int,
        help="input resolution of the exported graph, a multiple of the patch size (default: the "
        "trained one); the position embedding is resampled to the larger patch grid",
    )
    parser.add_argument(
        "--center-data",
        type=Path,
        help="folder of images (searched recursively): subtract their mean embedding inside the graph",
    )
    parser.add_argument(
        "--center-samples",
        type=int,
        default=2000,
        help="how many images of --center-data to average (drawn at random with --seed; default 2000)",
    )
    parser.add_argument(
        "--whiten",
        action="store_true",
        help="also whiten with the covariance of the --center-data embeddings (PCA whitening with "
        "shrinkage, inside the graph): directions that a few dominant factors inflate count less",
    )
    parser.add_argument(
        "--whiten-shrinkage",
        type=float,
        default=0.3,
        help="added to every variance, as a fraction of the mean variance (default 0.3; smaller "
        "whitens harder, larger is closer to plain centering)",
    )
    parser.add_argument(
        "--whiten-dim",
        type=int,
        help="keep this many leading principal directions (default: all; the embedding size)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random init and centering sample (default 0)"
    )


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
        return _run(args)
    except ExportError as exc:
        print(f"fewshot export: {exc}", file=sys.stderr)
        return 1


def _write_variant(args: argparse.Namespace, parent: Path, output: Path) -> None:
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


def _run(args: argparse.Namespace) -> int:
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
            raise ExportError(
                f"--arch {args.arch} does not match the checkpoint's arch {spec.name}"
            )
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
                f", PCA-whitened over the same images ({dim} directions, "
                f"shrinkage {args.whiten_shrinkage:g})"
            )
            extra["whiten_shrinkage"] = f"{args.whiten_shrinkage:g}"
            extra["whiten_dim"] = str(dim)
        head = EmbeddingHead(
            encoder, args.pool, center=center, blocks=args.blocks, projection=projection
        )

    meta = export_onnx(head, spec, preprocess, args.output, embedding=embedding, extra=extra)
    print(
        f"wrote {args.output}: model_id {meta.model_id}, {meta.embedding_dim}-d ({meta.embedding}), "
        f"input {preprocess.input_size} px (resize {preprocess.resize_size}, {preprocess.interpolation})"
    )
    if args.precision != "fp32":
        _write_variant(args, args.output, variant_path(args.output, args.precision))
    return 0
