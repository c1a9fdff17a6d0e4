"""Training throughput and memory with anchor masking on and off, side by side in one run.

Real ``MSNTrainer.train_step``s (target + anchor forward, loss, backward, AdamW, EMA) on synthetic
view tensors, so data loading (identical for every ratio) is left out. One trainer per mask ratio,
built from the same seed; steps are timed round-robin across ratios so a busy machine slows all
of them alike, and the median step time is reported.

Memory:
- ``saved_mib``: bytes autograd keeps for backward during one step (unique storages) -- the
  activation memory masking is meant to cut; exact and unaffected by machine load.
- CUDA: ``torch.cuda.max_memory_allocated`` over one step per ratio.
- CPU with ``--rss``: peak RSS of a separate child process per ratio (includes the interpreter,
  weights and optimizer state, so ratios differ less).

    python bench/bench_masking.py                  # vit_tiny_p8_64 config, ratios 0 / 0.3 / 0.7
    python bench/bench_masking.py --arch vit_small_p16_224 --batch-size 16 --ratios 0 0.15 0.7
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def build_trainer(arch: str, ratio: float, batch_size: int, bf16: bool):
    import numpy as np
    from PIL import Image

    from fewshot_trainer.config import load_config
    from fewshot_trainer.train import MSNTrainer, TrainOptions

    config = load_config(
        arch=arch,
        overrides={
            "data": {"batch_size": batch_size, "num_workers": 0},
            "masking": {"ratio": ratio},
            "optimization": {"bf16": bf16},
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        # The trainer wants an image folder; the timed steps use synthetic tensors instead.
        for i in range(batch_size):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(Path(tmp) / f"{i}.png")
        trainer = MSNTrainer(config, TrainOptions(data=Path(tmp), output=Path(tmp) / "out", progress=False))
    trainer.online.train()
    trainer.target.train()
    return trainer


def synthetic_views(trainer, batch_size: int) -> list:
    import torch

    d = trainer.config.data
    views = [torch.randn(batch_size, 3, d.random_size, d.random_size) for _ in range(2)]
    views += [torch.randn(batch_size, 3, d.focal_size, d.focal_size) for _ in range(d.focal_views)]
    return views


def saved_activation_mib(trainer, views, meter) -> float:
    """Unique storages autograd saves for backward during one training step."""
    import torch

    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.train_step(views, meter)
    return sum(seen.values()) / 2**20


def child_peak_rss(args: argparse.Namespace, ratio: float) -> float:
    cmd = [
        sys.executable,
        __file__,
        "--child-rss",
        "--arch",
        args.arch,
        "--ratios",
        str(ratio),
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
    ]
    cmd += ["--bf16"] if args.bf16 else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from fewshot_trainer.masking import num_kept
    from fewshot_trainer.metrics import CollapseMeter

    trainers = [build_trainer(args.arch, r, args.batch_size, args.bf16) for r in args.ratios]
    device = trainers[0].device
    views = [v.to(device) for v in synthetic_views(trainers[0], args.batch_size)]
    meter = CollapseMeter(trainers[0].config.model.num_prototypes)
    rows = []
    for ratio, trainer in zip(args.ratios, trainers):
        trainer.train_step(views, meter)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        row = {
            "ratio": ratio,
            "kept": num_kept(trainer.spec.num_patches, ratio),
            "patches": trainer.spec.num_patches,
            "saved_mib": saved_activation_mib(trainer, views, meter),
            "times": [],
        }
        if device.type == "cuda":
            row["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        rows.append(row)
    for _ in range(args.steps):
        for row, trainer in zip(rows, trainers):
            start = time.perf_counter()
            trainer.train_step(views, meter)
            if device.type == "cuda":
                torch.cuda.synchronize()
            row["times"].append(time.perf_counter() - start)
    for row in rows:
        row["img_per_s"] = args.batch_size / statistics.median(row.pop("times"))
        row["device"] = f"{device} ({torch.get_num_threads()} threads)"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_tiny_p8_64")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.3, 0.7])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per ratio")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--rss", action="store_true", help="also peak RSS per ratio (CPU)")
    parser.add_argument("--child-rss", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child_rss:
        from fewshot_trainer.metrics import CollapseMeter

        trainer = build_trainer(args.arch, args.ratios[0], args.batch_size, args.bf16)
        views = synthetic_views(trainer, args.batch_size)
        meter = CollapseMeter(trainer.config.model.num_prototypes)
        for _ in range(2):
            trainer.train_step(views, meter)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return

    rows = run(args)
    if args.rss:
        for row in rows:
            row["peak_rss_mib"] = child_peak_rss(args, row["ratio"])
    for row in rows:
        print(json.dumps(row))
    base = rows[0]
    mem_keys = [k for k in ("saved_mib", "cuda_peak_mib", "peak_rss_mib") if k in base]
    print(
        f"\n{args.arch}, batch {args.batch_size}, {base['device']}, "
        f"{'bf16' if args.bf16 else 'fp32'}; ratios relative to mask {base['ratio']}"
    )
    print(
        f"{'mask':>5} {'kept':>9} {'img/s':>8} {'speed-up':>9}"
        + "".join(f" {k:>14} {'ratio':>6}" for k in mem_keys)
    )
    for row in rows:
        line = (
            f"{row['ratio']:>5.2f} {row['kept']:>4}/{row['patches']:<4} "
            f"{row['img_per_s']:>8.2f} {row['img_per_s'] / base['img_per_s']:>8.2f}x"
        )
        line += "".join(f" {row[k]:>14.1f} {row[k] / base[k]:>5.2f}x" for k in mem_keys)
        print(line)


if __name__ == "__main__":
    main()
