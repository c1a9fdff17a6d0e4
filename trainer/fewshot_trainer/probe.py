"""Few-shot probe during training: embed a folder-per-class set with the target encoder (torch)
and score it with the project's numpy protocol (``fewshot_eval.evaluate_embeddings``).

Files are listed, read and preprocessed by :mod:`fewshot_common.image_files`, as ``fewshot eval``
and the server do (same decoder, same interpolation, unreadable files skipped), so the probe's
numbers are those ``fewshot eval`` gives the model exported with ``--pool cls``. The network runs
in torch: the model is not exported yet, and this is faster than an export per epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from fewshot_common.fewshot_eval import evaluate_embeddings
from fewshot_common.image_files import list_labelled_image_files, preprocessed_batches
from fewshot_common.modelmeta import Preprocess

from .model import forward_cls

MIN_CLASSES = 5  # the 5-way protocols need them


def labelled_images(root: Path) -> tuple[list[Path], np.ndarray]:
    """``root/<class>/**/<image>``: paths and integer labels, classes in sorted order."""
    found = list_labelled_image_files(root)
    if len(found.classes) < MIN_CLASSES:
        raise ValueError(
            f"--eval-dir {root} needs at least {MIN_CLASSES} class folders, found {len(found.classes)}"
        )
    return found.paths, found.labels


def as_preprocess(preprocess: Preprocess | dict[str, Any]) -> Preprocess:
    """A checkpoint's or config's preprocess dict (lists allowed) as the metadata type."""
    if isinstance(preprocess, Preprocess):
        return preprocess
    return Preprocess.from_dict(preprocess)


@torch.no_grad()
def embed_images(
    vit: VisionTransformer,
    paths: list[Path],
    preprocess: Preprocess | dict[str, Any],
    device: torch.device,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """CLS after the final norm of every readable image; returns it and a mask of the readable
    files (unreadable ones are skipped, as ``fewshot eval`` does)."""
    readable = np.zeros(len(paths), dtype=bool)
    out = [torch.empty(0, vit.embed_dim)]
    for pixels, positions in preprocessed_batches(
        paths, as_preprocess(preprocess), batch_size, skip_unreadable=True
    ):
        out.append(forward_cls(vit, torch.from_numpy(pixels).to(device)).float().cpu())
        readable[positions] = True
    return torch.cat(out).numpy(), readable


def few_shot_probe(
    vit: VisionTransformer,
    eval_dir: Path,
    preprocess: Preprocess | dict[str, Any],
    *,
    device: torch.device,
    episodes: int = 200,
) -> dict[str, float]:
    paths, labels = labelled_images(eval_dir)
    embeddings, readable = embed_images(vit, paths, preprocess, device)
    results = evaluate_embeddings(embeddings, labels[readable], episodes=episodes)
    return {name: round(result["mean"], 2) for name, result in results.items()}
