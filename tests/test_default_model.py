"""The shipped default model: it loads in the server with its metadata, and the model card names it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fewshot_service.embedder import Embedder

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = REPO_ROOT / "models" / "default.onnx"
CARD = REPO_ROOT / "models" / "MODEL_CARD.md"


def test_default_model_loads_with_metadata_and_card_states_its_id() -> None:
    embedder = Embedder(MODEL)
    card_id = re.search(r"model_id: `([^`]+)`", CARD.read_text())
    assert card_id is not None, "the model card must state the model id"
    assert embedder.model_id == card_id.group(1)
    pre = embedder.meta.preprocess
    pixels = np.random.default_rng(0).normal(size=(2, 3, pre.input_size, pre.input_size))
    vectors = embedder.embed_array(pixels.astype(np.float32))
    assert vectors.shape == (2, embedder.embedding_dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
