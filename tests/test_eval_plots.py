"""``fewshot eval --plot``: accuracy per class and the most confused pairs, from all-way draws."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_eval import _class_folders

from fewshot_common.cli import main
from fewshot_common.eval_plots import allway_confusion, most_confused_pairs, per_class_accuracy


def _points_with_two_overlapping_classes() -> tuple[np.ndarray, np.ndarray]:
    """Four classes of 12 points: 0 and 1 share one centre, 2 and 3 sit far apart from everything."""
    rng = np.random.default_rng(3)
    centres = np.array([[10.0, 0, 0, 0], [10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 10.0, 0]])
    labels = np.repeat(np.arange(4), 12)
    return centres[labels] + 0.5 * rng.normal(size=(48, 4)), labels


def test_confusion_counts_every_query_of_every_draw_and_finds_the_overlapping_pair() -> None:
    embeddings, labels = _points_with_two_overlapping_classes()
    confusion = allway_confusion(embeddings, labels, 4, shots=5, draws=3, seed=0)
    assert confusion.sum(axis=1).tolist() == [3 * 7] * 4  # 12 images - 5 support, 3 draws
    accuracy = per_class_accuracy(confusion)
    assert accuracy[2] == accuracy[3] == 100.0
    assert accuracy[0] < 90 and accuracy[1] < 90  # the coin-flip pair
    pairs = most_confused_pairs(confusion, ["a", "b", "c", "d"])
    assert (pairs[0].first, pairs[0].second) == ("a", "b") and len(pairs) == 1
    assert pairs[0].rate == pytest.approx(100.0 * (confusion[0, 1] + confusion[1, 0]) / 42)


def test_a_class_without_enough_images_is_left_out_not_an_error() -> None:
    embeddings, labels = _points_with_two_overlapping_classes()
    keep = (labels != 3) | (np.arange(48) % 12 < 2)  # class 3 keeps 2 images: fewer than 5 shots
    confusion = allway_confusion(embeddings[keep], labels[keep], 4, shots=5, draws=2)
    assert confusion[3].sum() == confusion[:, 3].sum() == 0
    assert np.isnan(per_class_accuracy(confusion)[3])


def test_eval_plot_writes_a_png_with_both_panels(
    tiny_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _class_folders(tmp_path / "data", per_class=20)
    plot = tmp_path / "plots" / "eval.png"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_path),
                "--data",
                str(data),
                "--episodes",
                "20",
                "--json",
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["plot"] == str(plot)
    with Image.open(plot) as image:
        image.verify()
    with Image.open(plot) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert 1000 <= width <= 2000 and 300 <= height <= 2000
        # Not a blank canvas: the bars put many colours on it.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50


def test_without_matplotlib_eval_plot_says_how_to_get_it_before_embedding_anything(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    data = _class_folders(tmp_path / "data", per_class=20)
    # None in sys.modules makes `import matplotlib` fail as in the serving install.
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from fewshot_common.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "eval",
            "--model",
            str(tiny_model_path),
            "--data",
            str(data),
            "--plot",
            str(tmp_path / "eval.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "fewshot eval: plots need matplotlib: pip install matplotlib" in result.stderr
    assert "embedding" not in result.stderr and not (tmp_path / "eval.png").exists()
