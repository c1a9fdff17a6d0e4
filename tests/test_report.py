"""``fewshot train`` ends with report.png; ``fewshot report RUN_DIR`` draws it again."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from test_eval import _class_folders

from fewshot_common.cli import main as fewshot

from test_train import _cli, read_metrics, write_images


def assert_png(path: Path, size: tuple[int, int]) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size
        # Not a blank canvas: curves, labels and legends put many colours on it.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50


def test_a_training_run_ends_with_a_report_of_its_curves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_images(tmp_path / "data", 16)
    probe_set = _class_folders(tmp_path / "probe", per_class=20)
    out = tmp_path / "run"
    # 16 images in batches of 8: two epochs of two steps, each epoch ending with a probe.
    assert (
        fewshot(
            _cli(
                tmp_path,
                "--data",
                str(data),
                "--output",
                str(out),
                "--max-steps",
                "4",
                "--batch-size",
                "8",
                "--eval-dir",
                str(probe_set),
            )
        )
        == 0
    )
    assert f"report {out / 'report.png'}" in capsys.readouterr().out
    epochs = [r for r in read_metrics(out) if r["event"] == "epoch"]
    assert len(epochs) == 2 and "probe" in epochs[-1]  # what the four panels draw
    assert_png(out / "report.png", (1200, 800))

    again = tmp_path / "again.png"
    assert fewshot(["report", str(out), "--output", str(again)]) == 0
    assert_png(again, (1200, 800))


def test_report_of_a_folder_without_metrics_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fewshot(["report", str(tmp_path)]) == 1
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    assert not (tmp_path / "report.png").exists()
