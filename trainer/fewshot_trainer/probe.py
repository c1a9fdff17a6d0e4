"""Few-shot probe during training: embed a folder-per-class set with the target encoder (torch)
and score it with the project's numpy protocol (``fewshot_eval.evaluate_embeddings``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torchvision import transforms as T

from .data import IMAGE_EXTENSIONS, load_rgb
from fewshot_common.fewshot_eval import evaluate_embeddings
from .model import forward_cls


def labelled_images(root: Path) -> tuple[list[Path], np.ndarray]:
    """``root/<class>/<image>``: paths and integer labels, classes in sorted order."""
    classes = sorted(d for d in Path(root).iterdir() if d.is_dir())
    if len(classes) < 5:
        raise ValueError(f"--eval-dir {root} needs at least 5 class folders, found {len(classes)}")
    paths, labels = [], []
    for label, folder in enumerate(classes):
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(path)
                labels.append(label)
    return paths, np.asarray(labels)


@torch.no_grad()
def embed_images(vit: VisionTransformer, paths: list[Path], preprocess: dict[str, Any],
                 device: torch.device, batch_size: int = 256) -> np.ndarray:
    """CLS after the final norm, preprocessed exactly like the exported model will be."""
    transform = T.Compose([
        T.Resize(preprocess["resize_size"], interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(preprocess["input_size"]),
        T.ToTensor(),
        T.Normalize(preprocess["mean"], preprocess["std"]),
    ])
    out = []
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([transform(load_rgb(p)) for p in paths[start:start + batch_size]])
        out.append(forward_cls(vit, batch.to(device)).float().cpu())
    return torch.cat(out).numpy()


def few_shot_probe(vit: VisionTransformer, eval_dir: Path, preprocess: dict[str, Any], *,
                   device: torch.device, episodes: int = 200) -> dict[str, float]:
    paths, labels = labelled_images(eval_dir)
    embeddings = embed_images(vit, paths, preprocess, device)
    results = evaluate_embeddings(embeddings, labels, episodes=episodes)
    return {name: round(result["mean"], 2) for name, result in results.items()}
