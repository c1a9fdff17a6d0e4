"""Training metrics: the JSONL log and the per-epoch collapse indicators.

Collapse shows as few prototypes in use (distinct argmax among targets), a low entropy of the
mean target prediction, a vanishing embedding spread, or max target probability stuck near 1
while only one prototype is used (msn#22: watch ``np`` and ``max_t``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


class JsonlLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


class CollapseMeter:
    """Accumulates target predictions and embeddings over an epoch."""

    def __init__(self, num_prototypes: int) -> None:
        self.prob_sum = torch.zeros(num_prototypes, dtype=torch.float64)
        self.argmax_counts = torch.zeros(num_prototypes, dtype=torch.long)
        self.max_prob_sum = 0.0
        self.std_sum = 0.0
        self.samples = 0
        self.batches = 0

    @torch.no_grad()
    def update(self, target_probs: torch.Tensor, target_z: torch.Tensor) -> None:
        probs = target_probs.detach().float().cpu()
        self.prob_sum += probs.sum(dim=0).double()
        self.argmax_counts += torch.bincount(probs.argmax(dim=1), minlength=probs.shape[1])
        self.max_prob_sum += probs.max(dim=1).values.sum().item()
        self.samples += probs.shape[0]
        # Spread of the L2-normalised embeddings per dimension (~1/sqrt(d) when healthy, 0 collapsed).
        self.std_sum += F.normalize(target_z.detach().float(), dim=1).std(dim=0).mean().item()
        self.batches += 1

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {}
        mean = self.prob_sum / self.samples
        entropy = -(mean * mean.clamp_min(1e-30).log()).sum().item()
        return {
            "target_mean_entropy": entropy,
            "target_mean_entropy_max": math.log(mean.numel()),
            "prototypes_in_use": int((self.argmax_counts > 0).sum().item()),
            "embedding_std": self.std_sum / self.batches,
            "max_target_prob": self.max_prob_sum / self.samples,
        }


def batch_indicators(target_probs: torch.Tensor) -> dict[str, float]:
    """The reference's per-step ``np`` and ``max_t``."""
    probs = target_probs.detach()
    return {
        "np": int(probs.argmax(dim=1).unique().numel()),
        "max_t": probs.max(dim=1).values.mean().item(),
    }
