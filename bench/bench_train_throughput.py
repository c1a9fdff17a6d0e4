"""Training throughput on this CPU: bf16 vs fp32, eager vs torch.compile, threads, data loading.

What it measures (all with the recipe's own settings, ``--config``, default the shipped model's):

- **Compute**: real ``MSNTrainer.train_step``s (target forward, masked anchor forward, MSN loss,
  backward, AdamW, EMA) on synthetic view tensors of the recipe's shapes. One trainer per variant,
  all built from the same seed; steps are timed round-robin across variants so a busy machine
  slows all of them alike; median images/s per variant, and its ratio to the baseline
  (fp32, eager, torch's default thread count). Variants:
    precision  fp32 | bf16 (autocast; loss and Sinkhorn stay fp32)
    mode       eager | compile-step (``optimization.compile``: the trainer's forwards + loss as one
               compiled function, backward compiled with it) | compile-encoders (each encoder's
               forward compiled on its own, ``nn.Module.compile``; loss eager)
    threads    ``torch.set_num_threads`` before each step: eager variants at every ``--threads``;
               compiled ones at the default only (inductor bakes the thread count into its
               kernels when it compiles, and a later set_num_threads does not recompile them).
  Compiling happens in each compiled variant's first step: that step's time is reported as
  ``first_step_s`` and left out of images/s. A compile that fails is reported in the JSON
  (``error``) and the variant dropped, not the run.
- **Data loading**: the trainer's own DataLoader (decode + MSN multi-crop augmentations, per-sample
  seeds) over ``--data`` (default ``../shared/data/tiny-imagenet/pretrain`` next to the repo, its
  first ``--load-images`` files; else 256 generated JPEGs): seconds per batch with
  ``num_workers`` 0 (loading alone), and its share of a loading + baseline step; then end to end
  (loader feeding real steps, baseline variant) with ``num_workers`` 0 vs 1, in alternating
  blocks, to show whether overlapping loading with compute pays on this machine's cores.

Output: one JSON line for the whole run (machine, CPU model and flags, every variant, loading),
appended to ``--append FILE`` too if given, then a readable table.

    python bench/bench_train_throughput.py                       # all variants, 10 rounds
    python bench/bench_train_throughput.py --steps 2 --precisions fp32 --modes eager compile-step
    python bench/bench_train_throughput.py --config my.yaml --no-loading --append runs/speed.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "models" / "default.recipe.yaml"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tiny-imagenet" / "pretrain"
MODES = ("eager", "compile-step", "compile-encoders")


@dataclass
class Variant:
    precision: str  # fp32 | bf16
    mode: str  # one of MODES
    threads: int
    trainer: Any = None
    times: list[float] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.precision}-{self.mode}-{self.threads}t"


def build_trainer(config_path: Path, data: Path, overrides: dict[str, Any]):
    from fewshot_trainer.config import load_config
    from fewshot_trainer.train import MSNTrainer, TrainOptions

    config = load_config(config_path, overrides=overrides)
    out = Path(tempfile.mkdtemp(prefix="bench_train_out_"))
    trainer = MSNTrainer(config, TrainOptions(data=data, output=out, progress=False))
    trainer.online.train()
    trainer.target.train()
    return trainer


def tiny_image_folder(count: int) -> Path:
    """Images enough for one batch: the compute variants train on synthetic tensors."""
    import numpy as np
    from PIL import Image

    folder = Path(tempfile.mkdtemp(prefix="bench_train_stub_"))
    for i in range(count):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / f"{i}.png")
    return folder


def synthetic_views(config) -> list:
    import torch

    d, gen = config.data, torch.Generator().manual_seed(0)
    views = [torch.randn(d.batch_size, 3, d.random_size, d.random_size, generator=gen) for _ in range(2)]
    views += [
        torch.randn(d.batch_size, 3, d.focal_size, d.focal_size, generator=gen) for _ in range(d.focal_views)
    ]
    return views


def compile_counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def make_variants(args: argparse.Namespace, default_threads: int) -> list[Variant]:
    variants = []
    for precision in args.precisions:
        for mode in args.modes:
            threads = sorted(set(args.threads)) if mode == "eager" else [default_threads]
            variants += [Variant(precision, mode, t) for t in threads]
    # The baseline first: fp32, eager, default threads (added if the filters left it out).
    baseline = next(
        (v for v in variants if (v.precision, v.mode, v.threads) == ("fp32", "eager", default_threads)), None
    )
    if baseline is None:
        baseline = Variant("fp32", "eager", default_threads)
    return [baseline] + [v for v in variants if v is not baseline]


def first_step(variant: Variant, views: list, meter, stub: Path, config_path: Path) -> None:
    """Build the variant's trainer and run its first (compiling) step; errors go in the row."""
    import torch

    torch.set_num_threads(variant.threads)
    overrides = {
        "data": {"num_workers": 0},
        "optimization": {"bf16": variant.precision == "bf16", "compile": variant.mode == "compile-step"},
    }
    before = compile_counters()
    start = time.perf_counter()
    try:
        trainer = build_trainer(config_path, stub, overrides)
        if variant.mode == "compile-encoders":
            # In place: the modules keep their state_dict keys (no "_orig_mod.").
            trainer.online_module.compile()
            trainer.target.compile()
        trainer.train_step(views, meter)
    except Exception as exc:  # noqa: BLE001 -- a compile failure is a result, not a crash
        variant.result["error"] = f"{type(exc).__name__}: {exc}"[:1000]
        return
    variant.result["first_step_s"] = round(time.perf_counter() - start, 2)
    if variant.mode == "compile-step" and trainer.compile_error:
        # The trainer fell back to eager: timing it would not measure compiling.
        variant.result["error"] = trainer.compile_error
        return
    if variant.mode != "eager":
        after = compile_counters()
        variant.result.update({k: after[k] - before[k] for k in after})
    variant.trainer = trainer


def time_compute(args: argparse.Namespace, variants: list[Variant], default_threads: int) -> int:
    import torch

    from fewshot_trainer.config import load_config
    from fewshot_trainer.metrics import CollapseMeter

    config = load_config(args.config)
    views = synthetic_views(config)
    meter = CollapseMeter(config.model.num_prototypes)
    stub = tiny_image_folder(config.data.batch_size)
    for variant in variants:
        first_step(variant, views, meter, stub, args.config)
        status = variant.result.get("error") or f"first step {variant.result['first_step_s']} s"
        print(f"# {variant.name}: {status}", file=sys.stderr, flush=True)
    live = [v for v in variants if v.trainer is not None]
    for v in live:  # one uncounted step each after compiling: caches, allocator
        torch.set_num_threads(v.threads)
        v.trainer.train_step(views, meter)
    before = compile_counters()
    for _ in range(args.steps):
        for v in live:
            torch.set_num_threads(v.threads)
            start = time.perf_counter()
            v.trainer.train_step(views, meter)
            v.times.append(time.perf_counter() - start)
    torch.set_num_threads(default_threads)
    # Shapes are static (a fixed number of kept tokens): nothing should compile while timed.
    recompiled = compile_counters()["graphs"] - before["graphs"]
    batch = config.data.batch_size
    for v in live:
        median = statistics.median(v.times)
        v.result.update(
            {
                "step_s": round(median, 4),
                "img_per_s": round(batch / median, 2),
                "step_s_min": round(min(v.times), 4),
                "steps": len(v.times),
            }
        )
    return recompiled


def loading_folder(args: argparse.Namespace) -> tuple[Path, str]:
    """The first ``--load-images`` files of ``--data`` (linked), else generated JPEGs."""
    import numpy as np
    from PIL import Image

    folder = Path(tempfile.mkdtemp(prefix="bench_train_data_"))
    if args.data.is_dir():
        files = sorted(p for p in args.data.iterdir() if p.is_file())[: args.load_images]
        for path in files:
            (folder / path.name).symlink_to(path.resolve())
        if files:
            return folder, f"{args.data} (first {len(files)} files)"
    rng = np.random.default_rng(0)
    for i in range(256):
        # Smooth random blobs, 64 px like tiny-imagenet, as JPEG: decode cost of the real thing.
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((64, 64), Image.BICUBIC).save(folder / f"{i:04d}.jpg", quality=90)
    return folder, "256 generated 64-px JPEGs"


def time_loading(
    args: argparse.Namespace, baseline_step_s: float | None, default_threads: int
) -> dict[str, Any]:
    import torch

    from fewshot_trainer.metrics import CollapseMeter

    folder, source = loading_folder(args)
    trainers = {
        w: build_trainer(
            args.config,
            folder,
            {"data": {"num_workers": w}, "optimization": {"bf16": False, "compile": False}},
        )
        for w in (0, 1)
    }
    batch = trainers[0].config.data.batch_size
    result: dict[str, Any] = {"source": source, "batch_size": batch}
    if trainers[0].steps_per_epoch < args.load_batches + 1:
        return {
            **result,
            "error": f"{len(trainers[0].dataset)} images: fewer than "
            f"{args.load_batches + 1} batches; raise --load-images",
        }
    torch.set_num_threads(default_threads)

    # 1. Loading alone, in this process (num_workers 0): what it adds to a step when not overlapped.
    loader = iter(trainers[0]._loader(0, 0))
    next(loader)
    times = []
    for _ in range(args.load_batches):
        start = time.perf_counter()
        next(loader)
        times.append(time.perf_counter() - start)
    del loader
    load_s = statistics.median(times)
    result["load_s_per_batch"] = round(load_s, 4)
    if baseline_step_s:
        result["load_share_of_step"] = round(load_s / (load_s + baseline_step_s), 3)

    # 2. End to end: loader + baseline steps, num_workers 0 vs 1, in alternating blocks (ABAB)
    #    so drift in machine load hits both; the first step of each block (worker start) is left out.
    e2e: dict[int, list[float]] = {0: [], 1: []}
    meter = CollapseMeter(trainers[0].config.model.num_prototypes)
    for block in range(2 * args.e2e_rounds):
        workers = block % 2
        trainer = trainers[workers]
        loader = iter(trainer._loader(block // 2, 0))
        tick = time.perf_counter()
        for i in range(args.load_batches + 1):
            trainer.train_step(next(loader), meter)
            now = time.perf_counter()
            if i:
                e2e[workers].append(now - tick)
            tick = now
        del loader
    for workers, step_times in e2e.items():
        result[f"e2e_img_per_s_workers{workers}"] = round(batch / statistics.median(step_times), 2)
    result["e2e_worker_speedup"] = round(
        result["e2e_img_per_s_workers1"] / result["e2e_img_per_s_workers0"], 3
    )
    return result


def machine_info(default_threads: int) -> dict[str, Any]:
    import torch

    from fewshot_trainer.hardware import cpu_info, has_native_bf16

    cpu = cpu_info()
    return {
        "cpu": cpu.model_name,
        "cpu_flags": cpu.reported_flags(),
        "native_bf16": has_native_bf16(cpu.flags),
        "cores": os.cpu_count(),
        "default_threads": default_threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def print_table(record: dict[str, Any]) -> None:
    m = record["machine"]
    flags = " ".join(f for f, on in m["cpu_flags"].items() if on) or "none of the reported"
    print(
        f"\n{m['cpu']} ({m['cores']} cores; {flags}); torch {m['torch']}, "
        f"default {m['default_threads']} threads"
    )
    print(
        f"{record['config']}: batch {record['batch_size']}, {record['steps']} timed steps per "
        f"variant (median); ratio to {record['variants'][0]['name']}"
    )
    print(f"{'variant':<26} {'img/s':>8} {'ratio':>7} {'step s':>8} {'first step s':>13}  note")
    base = record["variants"][0].get("img_per_s")
    for row in record["variants"]:
        if "error" in row:
            print(f"{row['name']:<26} {'-':>8} {'-':>7} {'-':>8} {'-':>13}  {row['error'][:60]}")
            continue
        ratio = f"{row['img_per_s'] / base:.2f}x" if base else "-"
        note = f"{row['graphs']} graph(s), {row['graph_breaks']} break(s)" if "graphs" in row else ""
        print(
            f"{row['name']:<26} {row['img_per_s']:>8.2f} {ratio:>7} {row['step_s']:>8.3f} "
            f"{row['first_step_s']:>13.2f}  {note}"
        )
    load = record.get("loading")
    if load and "error" not in load:
        share = load.get("load_share_of_step")
        print(
            f"\ndata loading ({load['source']}): {load['load_s_per_batch']:.3f} s per batch of "
            f"{load['batch_size']} in-process"
            + (f", {share:.0%} of a loading + baseline step" if share is not None else "")
        )
        print(
            f"end to end, baseline: {load['e2e_img_per_s_workers0']:.2f} img/s with "
            f"num_workers 0, {load['e2e_img_per_s_workers1']:.2f} with 1 "
            f"({load['e2e_worker_speedup']:.2f}x)"
        )
    elif load:
        print(f"\ndata loading: {load['error']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="training config (default: the shipped model's recipe)",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts for the eager variants"
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="image folder for the loading measurement"
    )
    parser.add_argument(
        "--load-images",
        type=int,
        default=512,
        help="how many of --data's files to use (listing 51k costs a minute)",
    )
    parser.add_argument(
        "--load-batches",
        type=int,
        default=5,
        help="timed batches per loading measurement and per end-to-end block",
    )
    parser.add_argument(
        "--e2e-rounds", type=int, default=2, help="end-to-end blocks per num_workers setting (alternating)"
    )
    parser.add_argument("--no-loading", action="store_true", help="skip the data-loading part")
    parser.add_argument("--append", type=Path, help="also append the JSON line to this file")
    args = parser.parse_args()

    import torch

    # Every compiled variant is one more cache entry for the same code: room for all of them.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    default_threads = torch.get_num_threads()
    variants = make_variants(args, default_threads)
    recompiled = time_compute(args, variants, default_threads)
    from fewshot_trainer.config import load_config

    config = load_config(args.config)
    record: dict[str, Any] = {
        "bench": "train_throughput",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(default_threads),
        "config": str(args.config),
        "arch": config.model.arch,
        "batch_size": config.data.batch_size,
        "focal_views": config.data.focal_views,
        "mask_ratio": config.masking.ratio,
        "steps": args.steps,
        "recompiles_while_timed": recompiled,
        "variants": [
            {"name": v.name, "precision": v.precision, "mode": v.mode, "threads": v.threads, **v.result}
            for v in variants
        ],
    }
    base = record["variants"][0]
    for row in record["variants"]:
        if "img_per_s" in row and "img_per_s" in base:
            row["ratio"] = round(row["img_per_s"] / base["img_per_s"], 3)
    if not args.no_loading:
        for v in variants:
            v.trainer = None  # free the compute variants' memory
        record["loading"] = time_loading(args, base.get("step_s"), default_threads)
    line = json.dumps(record)
    print(line)
    if args.append:
        args.append.parent.mkdir(parents=True, exist_ok=True)
        with args.append.open("a") as f:
            f.write(line + "\n")
    print_table(record)


if __name__ == "__main__":
    main()
