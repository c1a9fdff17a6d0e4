"""The committed recipe of the default model stays valid: it trains a few steps and exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fewshot_common.cli import main as fewshot
from fewshot_common.embedder import Embedder

from conftest import REPO_ROOT

RECIPE = REPO_ROOT / "models" / "default.recipe.yaml"


@pytest.mark.slow
def test_recipe_trains_a_few_steps_on_real_images_and_exports(tmp_path: Path, shared_data: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    for path in sorted((shared_data / "pretrain").iterdir())[:200]:
        (pool / path.name).symlink_to(path)
    run = tmp_path / "run"
    # Batch 16 keeps the test fast; every other setting is the recipe's own.
    assert (
        fewshot(
            [
                "train",
                "--config",
                str(RECIPE),
                "--data",
                str(pool),
                "--output",
                str(run),
                "--max-steps",
                "3",
                "--batch-size",
                "16",
                "--no-progress",
            ]
        )
        == 0
    )

    recipe = yaml.safe_load(RECIPE.read_text())
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    for section in ("model", "criterion", "masking"):
        assert resolved[section] == recipe[section]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[0]["images"] == 200

    model = tmp_path / "model.onnx"
    assert fewshot(["export", "--checkpoint", str(run / "checkpoint.pt"), "--output", str(model)]) == 0
    embedder = Embedder(model)
    assert embedder.meta.arch == recipe["model"]["arch"]
    assert embedder.embed_paths(sorted(pool.iterdir())[:4]).shape == (4, 192)
