"""The one score every ranking uses (:func:`exact_scores`) and how far BLAS may stray from it
(:func:`blas_error_bound`): BLAS narrows the field, the exact score decides (prototypes.py)."""

from __future__ import annotations

import numpy as np

# Rows re-scored exactly at a time (float64 temporaries of 4096 x D).
EXACT_CHUNK_ROWS = 4096


def exact_scores(rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``rows [N, D] . query [D]`` as float32, bit-identical on every CPU.

    A product of two float32 is exact in float64 (24 + 24 significant bits < 53), and the sum
    adds halves of the columns elementwise (a fixed pairwise tree, no reduction whose order a
    SIMD kernel may choose), so the one rounding that depends on anything is the final one to
    float32, and it depends only on the inputs.
    """
    if len(rows) > EXACT_CHUNK_ROWS:  # many tied rows: keep the float64 temporaries small
        return np.concatenate(
            [
                exact_scores(rows[start : start + EXACT_CHUNK_ROWS], query)
                for start in range(0, len(rows), EXACT_CHUNK_ROWS)
            ]
        )
    products = np.asarray(rows, dtype=np.float64) * np.asarray(query, dtype=np.float64)[None, :]
    width = products.shape[1]
    padded = 1 << max(width - 1, 0).bit_length()
    if padded != width:  # zeros are exact: pad to a power of two so every level halves evenly
        products = np.concatenate([products, np.zeros((len(products), padded - width))], axis=1)
    while products.shape[1] > 1:
        half = products.shape[1] // 2
        products = products[:, :half] + products[:, half:]
    return products[:, 0].astype(np.float32)


def blas_error_bound(dim: int, query_norm: float, row_norm: float = 1.0) -> float:
    """A bound on ``|BLAS float32 dot product - exact score|`` for any summation order.

    A float32 dot product of ``dim`` terms errs by at most ``gamma_dim * sum|q_i w_i|`` <=
    ``gamma_dim |q| |w|`` (Higham, 3.1; FMA only tightens it), and the exact score's own rounding
    to float32 adds half an ulp (< 2**-24 in [-1, 1]).
    """
    unit_roundoff = 2.0**-24
    gamma = dim * unit_roundoff / (1 - dim * unit_roundoff)
    return gamma * query_norm * row_norm * 1.01 + unit_roundoff  # 1.01: rows re-normalised in float32
