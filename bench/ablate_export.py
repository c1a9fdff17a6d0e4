"""Export ablation: which vector should a trained checkpoint ship? One checkpoint, export-time levers.

Embeds a folder-per-class set (and the centring images) once per input size through the encoder,
exactly as `fewshot export` + the server would (server decoder and transform, the same seeded sample
of ``--center-data``), then scores each choice with the project's few-shot protocol:

- pool: CLS after the final norm, or CLS ⊕ mean of the patch tokens (``cls_mean``);
- ``--blocks``: that vector from each of the last N blocks, concatenated;
- centred on the mean of the centring images, and optionally PCA-whitened with their covariance
  (``--shrinkage``, ``--whiten-dim``), as ``fewshot export --center-data --whiten`` bakes in;
- ``--input-sizes``: the network served at another resolution (position embedding resampled).

    python bench/ablate_export.py --checkpoint runs/default/checkpoint.pt \
        --center-data ../shared/data/tiny-imagenet/pretrain \
        --eval-dir ../shared/data/tiny-imagenet/fewshot-dev --input-sizes 64 96

Prints one Markdown table row per choice: 5-way 1-shot, 5-way 5-shot, all-way 5-shot (mean ± 95%).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fewshot_common.fewshot_eval import evaluate_embeddings
from fewshot_trainer.export import (
    EmbeddingHead,
    at_input_size,
    encoder_from_checkpoint,
    pooled_embeddings,
    whitening_projection,
)
from fewshot_trainer.export_cli import _center_sample
from fewshot_trainer.probe import labelled_images

PROTOCOLS = ("5way1shot", "5way5shot", "allway5shot")


def score(embeddings: np.ndarray, labels: np.ndarray, episodes: int) -> str:
    results = evaluate_embeddings(embeddings, labels, episodes=episodes)
    return " | ".join(f"{results[p]['mean']:.1f} ± {results[p]['ci95']:.1f}" for p in PROTOCOLS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--center-data", required=True, type=Path)
    parser.add_argument("--eval-dir", required=True, type=Path)
    parser.add_argument("--input-sizes", type=int, nargs="+", help="default: the trained size")
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--shrinkage", type=float, nargs="+", default=[1.0, 0.3, 0.1])
    parser.add_argument("--whiten-dim", type=int, default=256)
    parser.add_argument("--center-samples", type=int, default=2000)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0, help="centring sample, as `fewshot export`")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    spec, encoder, preprocess = encoder_from_checkpoint(args.checkpoint)
    eval_paths, labels = labelled_images(args.eval_dir)
    center_paths = _center_sample(args.center_data, args.center_samples, args.seed)
    print(
        f"{args.checkpoint}: {spec.name}; {len(eval_paths)} evaluation images, "
        f"{len(center_paths)} centring images, {args.episodes} episodes\n"
    )
    print("| input | blocks | vector | 5-way 1-shot | 5-way 5-shot | all-way 5-shot |")
    print("|---|---|---|---|---|---|")
    width = 2 * spec.embed_dim  # one block's CLS ⊕ patch-mean; its first half is the CLS
    for size in args.input_sizes or [spec.img_size]:
        sized_spec, sized, sized_pre = at_input_size(encoder, spec, preprocess, size)
        head = EmbeddingHead(sized, "cls_mean", blocks=max(args.blocks))
        started = time.perf_counter()
        center_all, _ = pooled_embeddings(head, center_paths, sized_pre)
        eval_all, _ = pooled_embeddings(head, eval_paths, sized_pre)
        seconds = time.perf_counter() - started
        print(f"<!-- {size} px: {len(center_all) + len(eval_all)} images embedded in {seconds:.0f} s -->")
        for blocks in args.blocks:
            rows: list[tuple[str, np.ndarray]] = []
            if blocks == 1:
                cls = eval_all[:, : spec.embed_dim]
                rows.append(("CLS", cls))
                rows.append(("CLS, centred", cls - center_all[:, : spec.embed_dim].mean(axis=0)))
            columns = slice(0, blocks * width)
            center, evals = center_all[:, columns], eval_all[:, columns]
            mean = center.mean(axis=0)
            rows.append(("CLS ⊕ patch-mean, centred", evals - mean))
            for shrinkage in args.shrinkage:
                projection = (
                    whitening_projection(
                        center, shrinkage=shrinkage, dim=min(args.whiten_dim, center.shape[1])
                    )
                    .double()
                    .numpy()
                )
                name = (
                    f"CLS ⊕ patch-mean, centred + whitened "
                    f"(shrinkage {shrinkage:g}, {projection.shape[1]} dims)"
                )
                rows.append((name, (evals - mean) @ projection))
            for name, embeddings in rows:
                print(
                    f"| {size} | {blocks} | {name} | {score(embeddings, labels, args.episodes)} |", flush=True
                )


if __name__ == "__main__":
    main()
