"""The trainer's few-shot probe embeds images the way the server and ``fewshot eval`` do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_common.embedder import Embedder
from fewshot_common.vectors import l2_normalize
from fewshot_trainer.export import EmbeddingHead, default_preprocess, export_onnx
from fewshot_trainer.probe import embed_images, few_shot_probe, labelled_images
from fewshot_trainer.vit import build_vit, get_arch

SPEC = get_arch("vit_test_p8_32")


def _class_folders(root: Path, classes: int, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        for i in range(per_class):
            path = root / f"class_{c}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            # Some large JPEGs: the server decodes those at reduced scale (draft), so must the probe.
            size = (200, 260) if i % 7 == 0 else (40, 48)
            Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(path)
    (root / "class_0" / "zz_broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    return root


def test_probe_embeddings_are_the_exported_models_and_skip_unreadable_files(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = build_vit(SPEC).eval()
    preprocess = default_preprocess(SPEC)
    model = tmp_path / "m.onnx"
    export_onnx(EmbeddingHead(vit, "cls"), SPEC, preprocess, model)
    paths, labels = labelled_images(_class_folders(tmp_path / "data", classes=5, per_class=20))

    probed, readable = embed_images(vit, paths, preprocess, torch.device("cpu"), batch_size=4)
    served, served_readable = Embedder(model).embed_readable_paths(paths)

    assert readable.tolist() == served_readable.tolist()
    assert [p.name for p, ok in zip(paths, readable, strict=True) if not ok] == ["zz_broken.jpg"]
    np.testing.assert_allclose(l2_normalize(probed), served, atol=1e-4)
    scores = few_shot_probe(
        vit, tmp_path / "data", preprocess.__dict__, device=torch.device("cpu"), episodes=5
    )
    assert set(scores) == {"5way1shot", "5way5shot", "allway5shot"}


def test_probe_needs_five_classes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 5 class folders, found 4"):
        labelled_images(_class_folders(tmp_path / "data", classes=4, per_class=2))
