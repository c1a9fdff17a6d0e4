"""How well the "unknown" flag and the confidence work on the Tiny ImageNet dev split; prints JSON.

Protocol (per draw, ``--draws`` draws): of the 50 dev classes, ``--unknown-classes`` are held out
as unknowns; every other class gets 5 random shots registered, its other images are known
queries. The calibration is the server's (``fewshot_service.classify.open_set``, LOO over the shots).

Printed per unknown statistic (``score`` = top-1 cosine, ``margin`` = top-1 minus top-2,
``zscore`` = top-1 standardised by the predicted class's LOO own-scores, shrunk to the global
spread):
- ``auroc``: known queries vs images of held-out classes (1.0 = perfectly separated, 0.5 = chance);
- ``flagged_known`` at each target rate: the fraction of known queries flagged unknown;
- ``flagged_unknown`` at each rate: the fraction of held-out images flagged (detection rate).
And for ``confidence`` (known queries; the top-1's share of the softmax over classes and unknown,
bench/bench_calibration.py compares it with the old margin curve): ``ece`` (15 equal-width bins), the accuracy, and a
reliability table (bin, images, mean confidence, accuracy).

Usage: PYTHONPATH=service:service/client python bench/bench_open_set.py [--model models/default.int8.onnx]
       [--cache /tmp/dev-embeddings.npz]

``--synthetic NOISE`` replaces the model by a stand-in for a strong one (none can be downloaded
here): 50 classes x 50 unit vectors in 128 dimensions, each its class's random centre (centres share a
direction: cosine ~0.5 between classes) plus Gaussian noise of norm about NOISE (cosine to the centre ~ 1 / sqrt(1 + NOISE^2)), so the same calibration
can be watched on embeddings that separate classes well (small NOISE) or barely (large).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np

from fewshot_common.embedder import Embedder
from fewshot_common.image_files import list_labelled_image_files
from fewshot_common.vectors import l2_normalize
from fewshot_service.classify.open_set import (
    LooScores,
    calibrate,
    leave_one_out_scores,
    log_sum_exp,
    top_two,
)

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared" / "data" / "tiny-imagenet" / "fewshot-dev"
RATES = (0.01, 0.05, 0.1, 0.2)
SHOTS = 5
ECE_BINS = 15
ZSCORE_PRIOR = 5.0  # pseudo-examples of the global spread mixed into each class's spread


def embed_dev(model: Path, cache: Path | None) -> tuple[np.ndarray, np.ndarray]:
    if cache is not None and cache.is_file():
        saved = np.load(cache)
        return saved["emb"], saved["labels"]
    files = list_labelled_image_files(DEV)
    embeddings = Embedder(model, max_batch_size=64).embed_paths(files.paths)
    if cache is not None:
        np.savez(cache, emb=embeddings, labels=files.labels)
    return embeddings, files.labels


def synthetic_embeddings(
    noise: float, seed: int, classes: int = 50, per_class: int = 50, dim: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Class centres share a common direction (cosine ~0.5 between two classes), as a real model's do.
    shared = rng.standard_normal(dim)
    spread = rng.standard_normal((classes, dim))
    centres = shared / np.linalg.norm(shared) + spread / np.linalg.norm(spread, axis=1, keepdims=True)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(classes), per_class)
    vectors = centres[labels] + noise * rng.standard_normal((len(labels), dim)) / np.sqrt(dim)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32), labels


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(a known image's statistic > an unknown image's), ties counting half (Mann-Whitney)."""
    above = known[:, None] > unknown[None, :]
    tied = known[:, None] == unknown[None, :]
    return float(above.mean() + 0.5 * tied.mean())


def zscore_model(loo: LooScores, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class: mean and (shrunk) spread of its examples' LOO own-scores."""
    own = loo.own_scores
    spread = own.std()
    means, spreads = np.full(classes, own.mean()), np.full(classes, spread)
    for c in range(classes):
        mine = own[loo.own == c]
        if len(mine):
            means[c] = mine.mean()
            variance = (ZSCORE_PRIOR * spread**2 + len(mine) * mine.var()) / (ZSCORE_PRIOR + len(mine))
            spreads[c] = np.sqrt(variance)
    return means, spreads


def statistics(scores: np.ndarray, means: np.ndarray, spreads: np.ndarray) -> dict[str, np.ndarray]:
    top1, top2 = top_two(scores)
    best = scores.argmax(axis=1)
    return {"score": top1, "margin": top1 - top2, "zscore": (top1 - means[best]) / spreads[best]}


def one_draw(
    embeddings: np.ndarray, labels: np.ndarray, unknown_classes: int, rng: np.random.Generator
) -> dict:
    classes = rng.permutation(np.unique(labels))
    held_out, registered = classes[:unknown_classes], np.sort(classes[unknown_classes:])
    shots, queries, query_labels = [], [], []
    for position, c in enumerate(registered):
        members = rng.permutation(np.flatnonzero(labels == c))
        shots.append(embeddings[members[:SHOTS]])
        queries.append(embeddings[members[SHOTS:]])
        query_labels += [position] * (len(members) - SHOTS)
    means = np.stack([s.mean(axis=0) for s in shots]).astype(np.float32)
    counts = np.full(len(shots), SHOTS)
    loo = leave_one_out_scores(means, counts, shots)
    prototypes = l2_normalize(means)
    known = np.concatenate(queries) @ prototypes.T
    unknown = embeddings[np.isin(labels, held_out)] @ prototypes.T
    class_means, class_spreads = zscore_model(loo, len(shots))
    loo_stats = statistics(loo.scores, class_means, class_spreads)
    known_stats = statistics(known, class_means, class_spreads)
    unknown_stats = statistics(unknown, class_means, class_spreads)
    result: dict = {"statistics": {}}
    for kind in loo_stats:
        thresholds = {rate: np.quantile(loo_stats[kind], rate) for rate in RATES}
        result["statistics"][kind] = {
            "auroc": auroc(known_stats[kind], unknown_stats[kind]),
            "flagged_known": {r: float((known_stats[kind] < t).mean()) for r, t in thresholds.items()},
            "flagged_unknown": {r: float((unknown_stats[kind] < t).mean()) for r, t in thresholds.items()},
        }
    calibration = calibrate(loo)
    beta = calibration.inverse_temperature
    log_partition = log_sum_exp(known * beta)
    confidence = calibration.distribution(known.max(axis=1, keepdims=True), log_partition, 0.05)[0][:, 0]
    correct = known.argmax(axis=1) == np.asarray(query_labels)
    result["confidence"] = (confidence, correct)
    result["curve"] = calibration.inverse_temperature
    return result


def reliability(
    confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> tuple[float, list[dict]]:
    """ECE over ``bins`` equal-width bins, and per non-empty bin: images, mean confidence, accuracy
    (bin edges with one decimal where they need no more, as with 10 bins)."""
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    digits = 1 if 10 % bins == 0 else 2
    ece, table = 0.0, []
    for b in range(bins):
        inside = index == b
        if not inside.any():
            continue
        ece += inside.mean() * abs(confidence[inside].mean() - correct[inside].mean())
        table.append(
            {
                "bin": f"{b / bins:.{digits}f}-{(b + 1) / bins:.{digits}f}",
                "images": int(inside.sum()),
                "confidence": round(float(confidence[inside].mean()), 3),
                "accuracy": round(float(correct[inside].mean()), 3),
            }
        )
    return float(ece), table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "default.int8.onnx")
    parser.add_argument("--cache", type=Path, default=None, help="npz to reuse the dev embeddings")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--unknown-classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic", type=float, metavar="NOISE", help="a synthetic stand-in model")
    args = parser.parse_args()
    if args.synthetic is not None:
        embeddings, labels = synthetic_embeddings(args.synthetic, args.seed)
    else:
        embeddings, labels = embed_dev(args.model, args.cache)
    rng = np.random.default_rng(args.seed)
    draws = [one_draw(embeddings, labels, args.unknown_classes, rng) for _ in range(args.draws)]
    model = f"synthetic, noise {args.synthetic}" if args.synthetic is not None else args.model.name
    summary: dict = {
        "model": model,
        "cpu": platform.processor() or platform.machine(),
        "draws": args.draws,
        "registered_classes": 50 - args.unknown_classes,
        "shots": SHOTS,
        "statistics": {},
    }
    for kind in draws[0]["statistics"]:
        per = [d["statistics"][kind] for d in draws]
        summary["statistics"][kind] = {
            "auroc": round(float(np.mean([p["auroc"] for p in per])), 3),
            "flagged_known": {
                r: round(float(np.mean([p["flagged_known"][r] for p in per])), 3) for r in RATES
            },
            "flagged_unknown": {
                r: round(float(np.mean([p["flagged_unknown"][r] for p in per])), 3) for r in RATES
            },
        }
    confidence = np.concatenate([d["confidence"][0] for d in draws])
    correct = np.concatenate([d["confidence"][1] for d in draws])
    ece, table = reliability(confidence, correct)
    summary["confidence"] = {
        "ece": round(ece, 4),
        "accuracy": round(float(correct.mean()), 3),
        "mean_confidence": round(float(confidence.mean()), 3),
        "mean_inverse_temperature": round(float(np.mean([d["curve"] for d in draws])), 2),
        "reliability": table,
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
