"""Serve-time levers of issue 19, one row each, on one model's embeddings of a labelled folder.

The few-shot protocol of ``fewshot eval`` (same episodes and draws for every row, so rows compare
draw by draw), with the classifier or the embedding changed in one way per row; no labels beyond
the shots:

- ``prototype``: the protocol and the server (cosine to the mean of the shots);
- ``flip``: each image's embedding averaged with its mirror image's (2x the inference);
- ``centre a``: shots and queries centred on ``a`` x the mean of all the shots (the namespace's
  own examples), then cosine to the prototypes;
- ``shrink a``: prototypes moved away from the namespace mean by ``a`` x that mean (queries kept);
- ``mix l``: ``(1 - l)`` x the prototype score + ``l`` x the best single shot's score.

    python bench/ablate_serve_time.py --model models/default.int8.onnx \
        --eval-dir ../shared/data/tiny-imagenet/fewshot-dev

Prints one Markdown row per lever: 5-way 1-shot, 5-way 5-shot, all-way 5-shot (mean ± 95%).
"""

from __future__ import annotations

import argparse
import io
import time
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from fewshot_common.embedder import Embedder
from fewshot_common.fewshot_eval import Scorer, evaluate_embeddings, nearest_prototype_scores
from fewshot_common.image_files import list_labelled_image_files
from fewshot_common.vectors import l2_normalize

PROTOCOLS = ("5way1shot", "5way5shot", "allway5shot")


def centred_scores(support: list[np.ndarray], queries: np.ndarray, amount: float) -> np.ndarray:
    mean = amount * np.concatenate(support).mean(axis=0)
    prototypes = l2_normalize(np.stack([s.mean(axis=0) for s in support]) - mean)
    return l2_normalize(queries - mean) @ prototypes.T


def shrunk_scores(support: list[np.ndarray], queries: np.ndarray, amount: float) -> np.ndarray:
    mean = amount * np.concatenate(support).mean(axis=0)
    return queries @ l2_normalize(np.stack([s.mean(axis=0) for s in support]) - mean).T


def mixed_scores(support: list[np.ndarray], queries: np.ndarray, weight: float) -> np.ndarray:
    nearest_shot = np.stack([(queries @ s.T).max(axis=1) for s in support], axis=1)
    return (1 - weight) * nearest_prototype_scores(support, queries) + weight * nearest_shot


def mirrored(data: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(buffer, "PNG")
    return buffer.getvalue()


def embed(embedder: Embedder, images: list[bytes], batch: int = 64) -> np.ndarray:
    return np.concatenate(
        [embedder.embed_images(images[i : i + batch]) for i in range(0, len(images), batch)]
    )


def row(name: str, embeddings: np.ndarray, labels: np.ndarray, episodes: int, scorer: Scorer) -> str:
    results = evaluate_embeddings(embeddings, labels, episodes=episodes, scorer=scorer)
    return (
        f"| {name} | "
        + " | ".join(f"{results[p]['mean']:.1f} ± {results[p]['ci95']:.1f}" for p in PROTOCOLS)
        + " |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/default.int8.onnx"))
    parser.add_argument("--eval-dir", type=Path, required=True)
    parser.add_argument("--episodes", type=int, default=600)
    args = parser.parse_args()

    files = list_labelled_image_files(args.eval_dir)
    labels = np.asarray(files.labels)
    images = [path.read_bytes() for path in files.paths]
    embedder = Embedder(args.model)
    start = time.perf_counter()
    plain = embed(embedder, images)
    flipped = l2_normalize(l2_normalize(plain) + l2_normalize(embed(embedder, [mirrored(i) for i in images])))
    print(
        f"{args.model} ({embedder.model_id}), {len(images)} images, embedded twice in "
        f"{time.perf_counter() - start:.0f} s\n"
    )
    print("| lever | 5-way 1-shot | 5-way 5-shot | all-way 5-shot |\n|---|---|---|---|")
    print(row("prototype (protocol, server)", plain, labels, args.episodes, nearest_prototype_scores))
    print(row("flip averaging", flipped, labels, args.episodes, nearest_prototype_scores))
    for amount in (0.5, 1.0):
        print(row(f"centre {amount}", plain, labels, args.episodes, partial(centred_scores, amount=amount)))
        print(row(f"shrink {amount}", plain, labels, args.episodes, partial(shrunk_scores, amount=amount)))
    for weight in (0.3, 0.5):
        print(row(f"mix {weight}", plain, labels, args.episodes, partial(mixed_scores, weight=weight)))


if __name__ == "__main__":
    main()
