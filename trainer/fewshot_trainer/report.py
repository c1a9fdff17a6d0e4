"""``fewshot report RUN_DIR``: a training run's ``metrics.jsonl`` drawn as one PNG, ``report.png``.

``fewshot train`` writes it when it finishes; run it by hand on a run that is still going or was
stopped. Four panels: the losses by step; prototypes in use (per epoch, and distinct targets per
batch by step); the target's mean entropy against its maximum (per epoch); and the few-shot probe's
accuracy by epoch (with ``--eval-dir``). Collapse shows as falling prototypes and entropy.
Torch-free: it only reads the JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field

from fewshot_common.plotting import PlottingUnavailable, load_pyplot
from fewshot_common.settings_flags import Flag, options_or_exit

METRICS_NAME = "metrics.jsonl"  # train.METRICS_NAME, not imported: that would import torch
REPORT_NAME = "report.png"
PROBE_NAMES = {"5way1shot": "5-way 1-shot", "5way5shot": "5-way 5-shot", "allway5shot": "all-way 5-shot"}


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``; a torn last line (a killed run) is left out."""
    path = run_dir / METRICS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a `fewshot train --output` folder?")
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def _series(events: list[dict[str, Any]], event: str, x: str, y: str) -> tuple[list[float], list[float]]:
    rows = [e for e in events if e.get("event") == event and e.get(y) is not None]
    # Epochs are logged from 0; the plots count them as the model card does, 1 = after the first.
    return [e[x] + (x == "epoch") for e in rows], [e[y] for e in rows]


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def write_training_report(run_dir: Path, path: Path | None = None) -> Path:
    """Draw ``run_dir``'s metrics into ``path`` (default ``run_dir/report.png``); returns the path."""
    events = read_events(run_dir)
    plt = load_pyplot()
    path = path or run_dir / REPORT_NAME
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    losses, prototypes, entropy, probe = axes.flat

    for key, label in (("loss", "total"), ("ce", "cross-entropy"), ("memax", "ME-MAX")):
        steps, values = _series(events, "step", "step", key)
        if steps:
            losses.plot(steps, values, label=label)
    losses.set(title="loss", xlabel="step")
    if losses.lines:
        losses.legend()
    else:
        _empty(losses, "no step logged yet")

    steps, in_batch = _series(events, "step", "step", "np")
    epoch_steps, in_use = _series(events, "epoch", "step", "prototypes_in_use")
    if steps:
        prototypes.plot(steps, in_batch, alpha=0.5, label="distinct targets in a batch")
    if epoch_steps:
        prototypes.plot(epoch_steps, in_use, "o-", label="in use over the epoch")
    prototypes.set(title="prototypes in use", xlabel="step", ylim=(0, None))
    if prototypes.lines:
        prototypes.legend()
    else:
        _empty(prototypes, "no step logged yet")

    epochs, mean_entropy = _series(events, "epoch", "epoch", "target_mean_entropy")
    if epochs:
        entropy.plot(epochs, mean_entropy, "o-", label="target mean entropy")
        _, maxima = _series(events, "epoch", "epoch", "target_mean_entropy_max")
        if maxima:
            entropy.axhline(maxima[-1], color="grey", linestyle="--", label="maximum (uniform)")
            entropy.set_ylim(0, 1.1 * maxima[-1])
        entropy.legend(loc="lower right")
    else:
        _empty(entropy, "no epoch finished yet")
    entropy.set(title="target mean entropy (nats)", xlabel="epoch")
    entropy.set_ylim(bottom=0)

    probed = [e for e in events if e.get("event") == "epoch" and e.get("probe")]
    for key, label in PROBE_NAMES.items():
        points = [(e["epoch"] + 1, e["probe"][key]) for e in probed if key in e["probe"]]
        if points:
            probe.plot(*zip(*points), "o-", label=label)
    probe.set(title="few-shot probe accuracy %", xlabel="epoch", ylim=(0, 100))
    if probe.lines:
        probe.legend()
    else:
        _empty(probe, "no probe: train with --eval-dir")

    for ax in (entropy, probe):
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    fig.suptitle(f"fewshot train: {run_dir}")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class ReportOptions(BaseModel):
    """The options of ``fewshot report``: its flags derive from them."""

    run_dir: Annotated[Path, Flag(positional=True, metavar="RUN_DIR")] = Field(
        description="the --output folder of a `fewshot train` run"
    )
    output: Path | None = Field(None, description=f"PNG to write (default RUN_DIR/{REPORT_NAME})")


OPTIONS = ReportOptions


def run(parsed: argparse.Namespace) -> int:
    args = options_or_exit(ReportOptions, parsed, "fewshot report")
    try:
        path = write_training_report(args.run_dir, args.output)
    except (FileNotFoundError, PlottingUnavailable) as exc:
        print(f"fewshot report: {exc}", file=sys.stderr)
        return 1
    print(f"report {path}")
    return 0
