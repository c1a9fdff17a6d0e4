"""Calibration of Classify's ``confidence``, before (a logistic curve over each prediction's margin
to the best other class, fitted on its own) and after (one softmax over the classes and "unknown",
temperature fitted per namespace): ECE and a reliability table; prints JSON.

Protocol (the dev split's README, "50-way 5-shot"): per draw (``--draws``, default 10), 5 random
shots of each of the 50 dev classes are registered and every other image is a query (``--ways 5``:
5 random classes per draw instead, the small namespace where the old confidences summed past 1). The namespace is
calibrated as the server does (``fewshot_service.classify.open_set``: leave-one-out over the shots).
For each query, the top-1's confidence is compared with whether the top-1 is right; ``ece`` is the
expected calibration error over ``--bins`` equal-width bins (default 10). Also printed: the NLL
of the query's true class (after only: the old curves are no distribution), the mean sum of the
top-3 confidences (the old ones sum past 1), the mean fitted 1/T, and the mean P(unknown).

Usage: PYTHONPATH=service:service/client python bench/bench_calibration.py [--model models/default.int8.onnx]
       [--cache /tmp/dev-embeddings.npz] [--synthetic NOISE]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
from bench_open_set import embed_dev, reliability, synthetic_embeddings

from fewshot_common.vectors import l2_normalize
from fewshot_service.classify.open_set import (
    DEFAULT_UNKNOWN_RATE,
    LooScores,
    calibrate,
    leave_one_out_scores,
    log_sum_exp,
    top_two,
)

REPO = Path(__file__).resolve().parents[1]
SHOTS = 5
# The margin curve Classify used before the softmax, and its dev-split fallback (slope, intercept).
OLD_DEFAULT_CURVE = (5.7, -2.1)


def old_margin_curve(loo: LooScores) -> tuple[float, float]:
    """The former per-namespace fit: P(LOO top-1 right) = sigmoid(a * margin + b) by Newton's
    method with a small L2 term; the dev default where it rose the wrong way or had < 10 rows."""
    if len(loo.own) < 10:
        return OLD_DEFAULT_CURVE
    top1, top2 = top_two(loo.scores)
    features = np.stack([top1 - top2, np.ones_like(top1)], axis=1)
    y, weights = loo.correct.astype(np.float64), np.zeros(2)
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-features @ weights))
        hessian = (features.T * (p * (1 - p))) @ features + 1e-2 * np.eye(2)
        step = np.linalg.solve(hessian, features.T @ (p - y) + 1e-2 * weights)
        weights -= step
        if np.abs(step).max() < 1e-8:
            break
    return (float(weights[0]), float(weights[1])) if weights[0] > 0 else OLD_DEFAULT_CURVE


def old_confidences(scores: np.ndarray, curve: tuple[float, float], k: int = 3) -> np.ndarray:
    """[N, k] confidences of each query's top-k under the old rule (margin to the best other)."""
    ranked = -np.sort(-scores, axis=1)[:, :k]
    rival = np.where(ranked >= ranked[:, :1], ranked[:, 1:2], ranked[:, :1])
    return 1.0 / (1.0 + np.exp(-(curve[0] * (ranked - rival) + curve[1])))


def one_draw(
    embeddings: np.ndarray, labels: np.ndarray, ways: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    classes = np.sort(rng.permutation(np.unique(labels))[:ways])
    shots, queries, query_labels = [], [], []
    for position, c in enumerate(classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        shots.append(embeddings[members[:SHOTS]])
        queries.append(embeddings[members[SHOTS:]])
        query_labels += [position] * (len(members) - SHOTS)
    means = np.stack([s.mean(axis=0) for s in shots]).astype(np.float32)
    loo = leave_one_out_scores(means, np.full(len(shots), SHOTS), shots)
    scores = (np.concatenate(queries) @ l2_normalize(means).T).astype(np.float64)
    truth = np.asarray(query_labels)
    calibration = calibrate(loo)
    beta = calibration.inverse_temperature
    probabilities, unknown = calibration.distribution(
        scores, log_sum_exp(scores * beta), DEFAULT_UNKNOWN_RATE
    )
    top3 = -np.sort(-probabilities, axis=1)[:, :3]
    return {
        "correct": scores.argmax(axis=1) == truth,
        "old": old_confidences(scores, old_margin_curve(loo)),
        "new": top3,
        "nll": -np.log(probabilities[np.arange(len(truth)), truth]),
        "unknown": unknown,
        "beta": np.array([beta]),
    }


def measure(
    embeddings: np.ndarray, labels: np.ndarray, draws: int, seed: int, bins: int = 10, ways: int = 50
) -> dict:
    rng = np.random.default_rng(seed)
    runs = [one_draw(embeddings, labels, ways, rng) for _ in range(draws)]
    joined = {key: np.concatenate([r[key] for r in runs]) for key in runs[0]}
    correct = joined["correct"]
    summary: dict = {"queries": int(len(correct)), "accuracy": round(float(correct.mean()), 4)}
    for name in ("old", "new"):
        ece, table = reliability(joined[name][:, 0], correct, bins)
        summary[name] = {
            "ece": round(ece, 4),
            "mean_confidence": round(float(joined[name][:, 0].mean()), 4),
            "mean_top3_sum": round(float(joined[name].sum(axis=1).mean()), 3),
            "max_top3_sum": round(float(joined[name].sum(axis=1).max()), 3),
            "reliability": table,
        }
    summary["new"]["nll_true_class"] = round(float(joined["nll"].mean()), 4)
    summary["new"]["mean_p_unknown"] = round(float(joined["unknown"].mean()), 4)
    summary["new"]["mean_inverse_temperature"] = round(float(joined["beta"].mean()), 2)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "default.int8.onnx")
    parser.add_argument("--cache", type=Path, default=None, help="npz to reuse the dev embeddings")
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--bins", type=int, default=10)
    parser.add_argument("--ways", type=int, default=50, help="classes per draw (the dev split has 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic", type=float, metavar="NOISE", help="a synthetic stand-in model")
    args = parser.parse_args()
    if args.synthetic is not None:
        embeddings, labels = synthetic_embeddings(args.synthetic, args.seed)
    else:
        embeddings, labels = embed_dev(args.model, args.cache)
    summary = {
        "model": f"synthetic, noise {args.synthetic}" if args.synthetic is not None else args.model.name,
        "cpu": platform.processor() or platform.machine(),
        "draws": args.draws,
        "ways": args.ways,
        "shots": SHOTS,
        **measure(embeddings, labels, args.draws, args.seed, args.bins, args.ways),
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
