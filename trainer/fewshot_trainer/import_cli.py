"""``fewshot import-checkpoint``: official MSN or Hugging Face ViTMSN weights -> a fewshot checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from fewshot_common.settings_flags import Flag, options_or_exit

from .checkpoint import save_checkpoint
from .importers import CheckpointImportError, read_source
from .vit import ARCHS

Arch = Literal[tuple(sorted(ARCHS))]  # type: ignore[valid-type]


class ImportCheckpointOptions(BaseModel):
    """Every option of ``fewshot import-checkpoint``, declared once: its flags derive from it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["msn", "hf"] = Field(
        description="msn: a .pth.tar from facebookresearch/msn; hf: a ViTMSNModel.save_pretrained folder"
    )
    source: Annotated[Path, Flag(positional=True, metavar="SRC")] = Field(
        description="the checkpoint file (msn) or folder (hf)"
    )
    output: Path = Field(description="where to write the fewshot checkpoint")
    arch: Arch | None = Field(
        None,
        description="state the architecture (its head count above all) instead of inferring it; "
        "it must fit the weights' shapes",
    )
    encoder: Literal["target", "anchor"] = Field(
        "target",
        description="msn: which encoder becomes the one exported and served (the EMA target, "
        "as MSN evaluates; the released files hold only this one)",
    )


OPTIONS = ImportCheckpointOptions


def run(parsed: argparse.Namespace) -> int:
    args = options_or_exit(ImportCheckpointOptions, parsed, "fewshot import-checkpoint")
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
