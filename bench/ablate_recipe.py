"""Recipe ablation: short training runs, each the base recipe with one lever changed, scored alike.

Every variant trains for the same number of steps from the same seed (``--steps``; the lr/wd/EMA
schedules span ``--epochs``), then its EMA target encoder is scored on a folder-per-class set with
the project's few-shot protocol. The scored vector is the one `fewshot export` would ship:
``--pool`` (default CLS ⊕ patch-mean), centred on the mean over ``--center-samples`` training images,
preprocessed by the server's own decoder and transform. Wall time and images/s are printed next to
the accuracies, since levers such as depth or focal views change the cost of a step.

    python bench/ablate_recipe.py --config models/default.recipe.yaml \
        --data ../shared/data/tiny-imagenet/pretrain --eval-dir ../shared/data/tiny-imagenet/fewshot-dev \
        --steps 250 --variant base --variant 'k1024 model.num_prototypes=1024' \
        --variant 'mask0.5 masking.ratio=0.5'

A variant is ``NAME [section.key=VALUE ...]``; VALUE is read as YAML (``[0.2, 1.0]``, ``true``).
Results are appended to ``<output>/ablation.jsonl`` as each run finishes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``'name a.b=1 c.d=[1,2]'`` -> ``('name', {'a': {'b': 1}, 'c': {'d': [1, 2]}})``, each
    assignment read as ``fewshot train --set`` reads it."""
    from fewshot_trainer.config import parse_overrides

    name, *assignments = text.split()
    try:
        return name, parse_overrides(assignments)
    except ValueError as exc:
        raise SystemExit(f"variant {name!r}: {exc}") from None


def embed(head, paths: list[Path], preprocess, batch_size: int = 256) -> np.ndarray:
    """``head(x)`` for every image, read and preprocessed exactly as the server does."""
    import torch

    from fewshot_common.image_files import preprocessed_batches

    out = []
    for batch, _ in preprocessed_batches(paths, preprocess, batch_size):
        with torch.no_grad():
            out.append(head(torch.from_numpy(batch)).numpy())
    return np.concatenate(out)


def score_checkpoint(
    checkpoint: Path,
    eval_dir: Path,
    center_dir: Path,
    *,
    pool: str,
    center_samples: int,
    episodes: int,
    encoder_role: str = "target",
    blocks: int = 1,
) -> dict[str, float]:
    from fewshot_common.eval_cli import labelled_paths
    from fewshot_common.fewshot_eval import evaluate_embeddings
    from fewshot_trainer.export import EmbeddingHead, encoder_from_checkpoint, mean_embedding
    from fewshot_trainer.export_cli import _center_sample

    _, encoder, preprocess = encoder_from_checkpoint(checkpoint, encoder_role)
    head = EmbeddingHead(encoder, pool, blocks=blocks).eval()
    if center_samples:
        center, _, _ = mean_embedding(head, _center_sample(center_dir, center_samples, 0), preprocess)
        head = EmbeddingHead(encoder, pool, center=center, blocks=blocks).eval()
    paths, labels, _ = labelled_paths(eval_dir)
    results = evaluate_embeddings(embed(head, paths, preprocess), labels, episodes=episodes)
    scores: dict[str, float] = {}
    for name, result in results.items():  # percent already
        scores[name] = round(result["mean"], 1)
        scores[f"{name}_ci95"] = round(result["ci95"], 1)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="base recipe (YAML)")
    parser.add_argument("--data", type=Path, required=True, help="unlabelled training images")
    parser.add_argument("--eval-dir", type=Path, required=True, help="folder-per-class set")
    parser.add_argument("--output", type=Path, default=Path("runs/ablation"))
    parser.add_argument(
        "--variant",
        action="append",
        required=True,
        help="'NAME [section.key=VALUE ...]' (repeat); 'base' alone = the recipe",
    )
    parser.add_argument("--steps", type=int, default=250, help="training steps per variant")
    parser.add_argument("--epochs", type=int, default=1, help="epochs the schedules span")
    parser.add_argument("--pool", default="cls_mean", help="exported vector (fewshot export --pool)")
    parser.add_argument(
        "--blocks", type=int, default=1, help="pool the last N blocks, concatenated (fewshot export --blocks)"
    )
    parser.add_argument(
        "--center-samples",
        type=int,
        default=2000,
        help="training images whose mean is subtracted (0: no centering)",
    )
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument(
        "--encoder",
        choices=("target", "anchor"),
        default="target",
        help="which encoder to score: the EMA target (what export ships) or the "
        "online one (short runs: the target still holds much of its init)",
    )
    parser.add_argument(
        "--score-only",
        action="store_true",
        help="score the variants' existing checkpoints under --output, no training",
    )
    args = parser.parse_args()

    import logging

    from fewshot_trainer.config import deep_update, load_config
    from fewshot_trainer.train import TrainOptions, train

    logging.basicConfig(level=logging.WARNING)
    args.output.mkdir(parents=True, exist_ok=True)
    results_file = args.output / "ablation.jsonl"
    header = f"{'variant':<28} {'5w1s':>6} {'5w5s':>6} {'50w5s':>6} {'img/s':>7} {'min':>6}"
    rows = [header]
    for text in args.variant:
        name, overrides = parse_variant(text)
        overrides = deep_update(overrides, {"optimization": {"epochs": args.epochs}})
        config = load_config(args.config, overrides=overrides)
        run_dir = args.output / name
        record: dict[str, Any] = {"variant": name, "overrides": overrides, "encoder": args.encoder}
        minutes = float("nan")
        if not args.score_only:
            start = time.perf_counter()
            result = train(
                config, TrainOptions(data=args.data, output=run_dir, max_steps=args.steps, progress=False)
            )
            minutes = (time.perf_counter() - start) / 60
            record.update(
                steps=result.step,
                train_minutes=round(minutes, 2),
                img_per_s=round(result.step * config.data.batch_size / (minutes * 60), 1),
                np_last=result.last.get("np"),
            )
        scores = score_checkpoint(
            run_dir / "checkpoint.pt",
            args.eval_dir,
            args.data,
            pool=args.pool,
            center_samples=args.center_samples,
            episodes=args.episodes,
            encoder_role=args.encoder,
            blocks=args.blocks,
        )
        record.update(scores)
        with results_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        rows.append(
            f"{name:<28} {scores['5way1shot']:>6} {scores['5way5shot']:>6} "
            f"{scores['allway5shot']:>6} {record.get('img_per_s', float('nan')):>7} "
            f"{minutes:>6.1f}"
        )
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
