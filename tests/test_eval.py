"""The few-shot protocol (pure numpy) and the ``fewshot eval`` command on a real exported model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot_common.cli import main
from fewshot_common.fewshot_eval import (
    _accuracy,
    allway_accuracy,
    episode_accuracy,
    evaluate_embeddings,
    l2_normalize,
    nearest_prototype_scores,
)


def _clustered(classes: int, per_class: int, dim: int, noise: float, seed: int = 1):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    return centers[labels] + noise * rng.normal(size=(len(labels), dim)), labels


# --- protocol -------------------------------------------------------------------------------------


def test_nearest_prototype_by_cosine_on_hand_made_points() -> None:
    # Class 0 points along +x, class 1 along +y. Query 2 is closer to class 0 by cosine, though
    # it is labelled 1: exactly one of four queries is wrong.
    emb = l2_normalize(
        np.array(
            [
                [1.0, 0.1],
                [1.0, -0.1],
                [0.1, 1.0],
                [-0.1, 1.0],  # support
                [2.0, 0.5],
                [3.0, 1.0],
                [1.0, 0.2],
                [0.3, 5.0],
            ]  # queries
        )
    )
    support = [np.array([0, 1]), np.array([2, 3])]
    query = [np.array([4, 5]), np.array([6, 7])]
    assert _accuracy(emb, support, query, nearest_prototype_scores) == pytest.approx(0.75)


def test_prototype_is_the_mean_of_support_embeddings() -> None:
    # Class 0's support sits at +-80 degrees (its mean points along 0 degrees), class 1's at 50,
    # the query at 20: a nearest-*example* rule would pick class 1 (30 degrees away versus 60);
    # the prototype rule picks class 0 (20 degrees versus 30).
    angles = np.deg2rad([80.0, -80.0, 50.0, 20.0])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    support = [np.array([0, 1]), np.array([2])]
    assert _accuracy(emb, support, [np.array([3]), np.array([], int)], nearest_prototype_scores) == 1.0
    assert _accuracy(emb, support, [np.array([], int), np.array([3])], nearest_prototype_scores) == 0.0


def test_separable_embeddings_score_far_above_chance_and_shuffled_labels_near_chance() -> None:
    emb, labels = _clustered(classes=20, per_class=30, dim=32, noise=1.0)
    result = evaluate_embeddings(emb, labels, episodes=200, seed=0)
    assert set(result) == {"5way1shot", "5way5shot", "allway5shot"}
    assert result["5way1shot"]["mean"] > 80
    assert result["5way5shot"]["mean"] > 95
    assert result["allway5shot"]["mean"] > 80
    assert result["5way5shot"]["mean"] >= result["5way1shot"]["mean"]

    shuffled = np.random.default_rng(7).permutation(labels)
    chance = evaluate_embeddings(emb, shuffled, episodes=200, seed=0)
    for key, level in (("5way1shot", 20), ("5way5shot", 20), ("allway5shot", 5)):
        # Within about three of its own 95% intervals of chance.
        assert abs(chance[key]["mean"] - level) < max(3.5, 1.6 * chance[key]["ci95"] * 2), key


def test_interval_is_1_96_std_over_sqrt_trials_and_counts_are_reported() -> None:
    emb, labels = _clustered(classes=6, per_class=25, dim=8, noise=2.0)
    norm = l2_normalize(emb)
    a = episode_accuracy(norm, labels, shots=1, episodes=50, rng=np.random.default_rng(3))
    # Redraw the same episodes by hand and recompute the summary.
    rng = np.random.default_rng(3)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    accs = []
    for _ in range(50):
        chosen = rng.choice(len(by_class), size=5, replace=False)
        drawn = [rng.permutation(by_class[c])[:16] for c in chosen]
        accs.append(_accuracy(norm, [d[:1] for d in drawn], [d[1:] for d in drawn], nearest_prototype_scores))
    accs = 100 * np.array(accs)
    assert a["mean"] == pytest.approx(accs.mean())
    assert a["ci95"] == pytest.approx(1.96 * accs.std() / np.sqrt(50))
    assert (a["trials"], a["ways"], a["shots"], a["queries_per_class"]) == (50, 5, 1, 15)
    assert 0 < a["ci95"] < 20


def test_allway_uses_every_class_and_every_other_image() -> None:
    emb, labels = _clustered(classes=7, per_class=9, dim=8, noise=0.01)
    result = allway_accuracy(l2_normalize(emb), labels, draws=4, rng=np.random.default_rng(0))
    assert (result["ways"], result["shots"], result["trials"]) == (7, 5, 4)
    assert result["mean"] == 100.0


def test_same_seed_same_numbers_and_protocols_draw_independently() -> None:
    emb, labels = _clustered(classes=8, per_class=25, dim=16, noise=2.5)
    first = evaluate_embeddings(emb, labels, episodes=60, seed=5)
    assert evaluate_embeddings(emb, labels, episodes=60, seed=5) == first
    assert evaluate_embeddings(emb, labels, episodes=60, seed=6) != first
    # Raw (unnormalised) features give the same answer: normalisation happens inside.
    assert evaluate_embeddings(emb * 7.0, labels, episodes=60, seed=5) == first


@pytest.mark.parametrize(
    ("embeddings", "labels", "message"),
    [
        (np.zeros((10, 4)), np.zeros(9), "labels"),
        (np.full((30, 4), np.nan), np.repeat(np.arange(5), 6), "NaN"),
        (np.ones((40, 4)), np.repeat(np.arange(4), 10), "at least 5 classes"),
        (
            np.ones((50, 4)),
            np.repeat(np.arange(5), 10),
            "need 20 images in every class; the smallest class has 10",
        ),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(embeddings, labels, message) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate_embeddings(embeddings, labels, episodes=5)


# --- the `fewshot eval` command on a real exported model -----------------------------------------

COLOURS = [
    (230, 30, 30),
    (30, 200, 40),
    (40, 60, 230),
    (240, 220, 30),
    (20, 20, 20),
    (200, 60, 220),
]


def _class_folders(root: Path, per_class: int, *, shuffle_labels: bool = False) -> Path:
    """Six classes of flat-coloured noisy images (one in ten grey), clearly separable by colour."""
    rng = np.random.default_rng(0)
    images = []
    for c, colour in enumerate(COLOURS):
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 15, size=(36, 44, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels, "RGB")
            images.append((c, img.convert("L") if i % 10 == 9 else img))
    classes = rng.permutation([c for c, _ in images]) if shuffle_labels else [c for c, _ in images]
    for n, ((_, img), c) in enumerate(zip(images, classes, strict=True)):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{n:04d}.png")
    return root


def _json_last_line(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_eval_cli_scores_separable_classes_far_above_chance_and_matches_the_server_embedder(
    tiny_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fewshot_common.embedder import Embedder
    from fewshot_common.eval_cli import labelled_paths

    data = _class_folders(tmp_path / "data", per_class=20)
    (data / "class_0" / "zz_broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    args = [
        "eval",
        "--model",
        str(tiny_model_path),
        "--data",
        str(data),
        "--episodes",
        "100",
        "--json",
    ]
    assert main(args) == 0
    result = _json_last_line(capsys.readouterr().out)
    assert result["5way1shot"]["mean"] > 70 and result["5way5shot"]["mean"] > 80
    assert result["allway5shot"]["mean"] > 70 and result["allway5shot"]["ways"] == 6
    assert (result["classes"], result["images"], result["skipped"]) == (6, 120, 1)

    # The same numbers as the server's own embedder fed straight into the protocol.
    paths, labels, _ = labelled_paths(data)
    readable = np.array([p.name != "zz_broken.jpg" for p in paths])
    embeddings = Embedder(tiny_model_path).embed_paths(
        [p for p, ok in zip(paths, readable, strict=True) if ok]
    )
    direct = evaluate_embeddings(embeddings, labels[readable], episodes=100, seed=0)
    for key in ("5way1shot", "5way5shot", "allway5shot"):
        assert result[key]["mean"] == pytest.approx(direct[key]["mean"], abs=1e-9)
        assert result[key]["ci95"] == pytest.approx(direct[key]["ci95"], abs=1e-9)


def test_eval_cli_shuffled_labels_score_near_chance(
    tiny_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _class_folders(tmp_path / "data", per_class=20, shuffle_labels=True)
    args = [
        "eval",
        "--model",
        str(tiny_model_path),
        "--data",
        str(data),
        "--episodes",
        "200",
        "--json",
    ]
    assert main(args) == 0
    result = _json_last_line(capsys.readouterr().out)
    assert abs(result["5way1shot"]["mean"] - 20) < 6
    assert abs(result["5way5shot"]["mean"] - 20) < 6
    assert result["allway5shot"]["mean"] < 30  # chance 16.7 over six classes


def test_eval_cli_table_and_max_per_class(
    tiny_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _class_folders(tmp_path / "data", per_class=22)
    base = ["eval", "--model", str(tiny_model_path), "--data", str(data), "--episodes", "20"]
    assert main([*base, "--max-per-class", "20"]) == 0
    table = capsys.readouterr().out
    assert "6 classes, 120 images" in table
    assert re.search(r"5-way 1-shot\s+\d+\.\d\d\s+\d+\.\d\d\s+20 \(5-way\)", table)
    assert re.search(r"all-way 5-shot\s+\d+\.\d\d\s+\d+\.\d\d\s+10 \(6-way\)", table)

    # Too few images per class for 5-shot + 15 queries: a clear message, exit 1, no traceback.
    assert main([*base, "--max-per-class", "10"]) == 1
    err = capsys.readouterr().err
    assert "need 20 images in every class; the smallest class has 10" in err
    assert "embedding" not in err  # refused before any image was embedded


def test_eval_cli_bad_model_or_data_exit_non_zero_with_a_message(
    tiny_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _class_folders(tmp_path / "data", per_class=20)
    assert main(["eval", "--model", str(tmp_path / "none.onnx"), "--data", str(data)]) == 1
    assert "model file not found" in capsys.readouterr().err

    not_onnx = tmp_path / "bad.onnx"
    not_onnx.write_bytes(b"definitely not a protobuf")
    assert main(["eval", "--model", str(not_onnx), "--data", str(data)]) == 1
    assert "not a loadable ONNX model" in capsys.readouterr().err

    assert main(["eval", "--model", str(tiny_model_path), "--data", str(tmp_path / "nowhere")]) == 1
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty" / "a").mkdir(parents=True)
    assert main(["eval", "--model", str(tiny_model_path), "--data", str(tmp_path / "empty")]) == 1
    assert "no class folders with images" in capsys.readouterr().err
