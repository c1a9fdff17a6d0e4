"""The trainer checkpoint: one dict in one file, written atomically.

Layout (every key present; ``None`` where a checkpoint has no such part, e.g. an imported one has
no optimizer state):

- ``format``/``version``: ``"fewshot-msn"`` / 1.
- ``arch``: :class:`~fewshot_trainer.vit.ArchSpec` as a dict.
- ``preprocess``: :class:`fewshot_common.modelmeta.Preprocess` as a dict (used by export).
- ``target_encoder``, ``encoder``: timm ``VisionTransformer`` state dicts (EMA target; anchor).
- ``target_head``, ``head``: projection-head state dicts (keys ``fc1, bn1, fc2, bn2, fc3``).
- ``prototypes``: ``[K, D]`` tensor.
- ``optimizer``: optimizer state dict; ``step``/``epoch``: progress; ``config``: the resolved
  training config dict; ``rng``: RNG states for exact resume; ``extra``: anything else (dict).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

# The file a training run keeps its latest state in, inside its output folder.
CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "fewshot-msn"
VERSION = 1
KEYS = (
    "arch",
    "preprocess",
    "target_encoder",
    "encoder",
    "target_head",
    "head",
    "prototypes",
    "optimizer",
    "step",
    "epoch",
    "config",
    "rng",
    "extra",
)


def make_checkpoint(**parts: Any) -> dict[str, Any]:
    unknown = set(parts) - set(KEYS)
    if unknown:
        raise ValueError(f"unknown checkpoint keys: {sorted(unknown)}")
    ckpt: dict[str, Any] = {"format": FORMAT, "version": VERSION}
    ckpt.update({key: parts.get(key) for key in KEYS})
    return ckpt


def save_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a fewshot checkpoint (format {FORMAT!r}); "
            "official MSN or Hugging Face weights go through `fewshot import-checkpoint` first"
        )
    if ckpt.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt.get('version')} is not {VERSION}")
    return ckpt
