"""Vector helpers shared by the server, ``fewshot eval`` and the exporter (numpy only)."""

from __future__ import annotations

import numpy as np

# Below this norm a row counts as zero: it stays zero instead of becoming NaN or huge.
NORM_EPS = 1e-12


def l2_normalize(vectors: np.ndarray, eps: float = NORM_EPS) -> np.ndarray:
    """Each row (last axis) scaled to unit L2 norm; the dtype is kept."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, eps).astype(vectors.dtype, copy=False)
