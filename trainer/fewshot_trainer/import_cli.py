"""``fewshot import-checkpoint``: official MSN or Hugging Face ViTMSN weights -> a fewshot checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoint import save_checkpoint
from .importers import CheckpointImportError, read_source
from .vit import ARCHS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        required=True,
        choices=("msn", "hf"),
        help="msn: a .pth.tar from facebookresearch/msn; hf: a ViTMSNModel.save_pretrained folder",
    )
    parser.add_argument("source", type=Path, metavar="SRC", help="the checkpoint file (msn) or folder (hf)")
    parser.add_argument("--output", required=True, type=Path, help="where to write the fewshot checkpoint")
    parser.add_argument(
        "--arch",
        choices=sorted(ARCHS),
        help="state the architecture (its head count above all) instead of inferring it; "
        "it must fit the weights' shapes",
    )
    parser.add_argument(
        "--encoder",
        choices=("target", "anchor"),
        default="target",
        help="msn: which encoder becomes the one exported and served (default: the EMA target, "
        "as MSN evaluates; the released files hold only this one)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        imported = read_source(args.format, args.source, arch=args.arch, role=args.encoder)
    except CheckpointImportError as exc:
        print(f"fewshot import-checkpoint: {exc}", file=sys.stderr)
        return 1
    for note in imported.notes:
        print(note)
    save_checkpoint(imported.to_checkpoint(), args.output)
    spec = imported.spec
    parts = ["target_encoder"] + [
        name
        for name in ("encoder", "target_head", "head", "prototypes")
        if getattr(imported, name) is not None
    ]
    print(
        f"wrote {args.output}: {spec.name} ({spec.img_size} px, patch {spec.patch_size}, width "
        f"{spec.embed_dim}, depth {spec.depth}, {spec.num_heads} heads) with {', '.join(parts)}"
    )
    print(f"next: fewshot export --checkpoint {args.output} --output model.onnx")
    return 0
