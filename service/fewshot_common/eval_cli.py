"""``fewshot eval``: the few-shot protocol on a folder-per-class set, through the server's embedder.

Images go through :class:`fewshot_common.embedder.Embedder` (the server's decoder, preprocessing
and ONNX Runtime session), so the numbers are those the running server would give. Needs no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from . import settings_flags
from .embedder import Embedder, InvalidModel
from .fewshot_eval import check_class_sizes, evaluate_embeddings
from .image_files import list_labelled_image_files
from .plotting import PlottingUnavailable, load_pyplot
from .settings_flags import Flag

try:  # a progress bar where the training extras are installed; eval itself works without them
    from tqdm import tqdm
except ModuleNotFoundError:  # pragma: no cover - the serving install
    tqdm = None

PROTOCOL_NAMES = {
    "5way1shot": "5-way 1-shot",
    "5way5shot": "5-way 5-shot",
    "allway5shot": "all-way 5-shot",
}


class EvalError(Exception):
    """The model or the data set cannot be evaluated; the message says why."""


class EvalOptions(BaseModel):
    """Every option of ``fewshot eval``, declared once: its flags and help derive from it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Path = Field(description="an ONNX model from `fewshot export`")
    data: Path = Field(
        description="a folder with one sub-folder of images per class (e.g. tiny-imagenet/fewshot-dev)"
    )
    # Not ``json``: a field of that name would shadow BaseModel.json.
    as_json: Annotated[bool, Flag(name="json")] = Field(
        False, description="print one JSON object (last line) instead of a table"
    )
    episodes: int = Field(600, description="5-way episodes per shot count")
    seed: int = Field(0, description="seed of the episode draws")
    max_per_class: int | None = Field(
        None, description="use only the first N images (in name order) of each class, for a quick check"
    )
    batch_size: int = Field(64, description="images per ONNX Runtime call")
    plot: Annotated[Path | None, Flag(metavar="FILE.png")] = Field(
        None, description="also draw accuracy per class and the most confused class pairs into this PNG"
    )


OPTIONS = EvalOptions


def labelled_paths(root: Path, max_per_class: int | None = None) -> tuple[list[Path], np.ndarray, list[str]]:
    """``root/<class>/**/<image>``: paths, integer labels and class names (sorted)."""
    if not root.is_dir():
        raise EvalError(f"--data {root} is not a folder")
    if max_per_class is not None and max_per_class < 1:
        raise EvalError(f"--max-per-class must be >= 1, got {max_per_class}")
    found = list_labelled_image_files(root, max_per_class)
    if not found.paths:
        raise EvalError(f"--data {root} has no class folders with images in them")
    return found.paths, found.labels, found.classes


def embed_files(embedder: Embedder, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Embed each readable file; returns the embeddings and a mask of which files were readable."""
    progress = tqdm(paths, desc="embedding", unit="img", file=sys.stderr) if tqdm else paths
    # Unreadable files are counted and reported; one bad file must not stop the run.
    embeddings, readable = embedder.embed_readable_paths(progress)
    if not readable.any():
        raise EvalError("none of the images could be read")
    return embeddings, readable


def run(args: argparse.Namespace) -> int:
    try:
        return _run(settings_flags.options_or_exit(EvalOptions, args, "fewshot eval"))
    except (EvalError, InvalidModel, FileNotFoundError, ValueError, PlottingUnavailable) as exc:
        print(f"fewshot eval: {exc}", file=sys.stderr)
        return 1


def _run(args: EvalOptions) -> int:
    if args.batch_size < 1 or args.episodes < 1:
        raise EvalError("--batch-size and --episodes must be >= 1")
    if args.plot is not None:
        load_pyplot()  # a missing matplotlib fails now, not after the slow part
    embedder = Embedder(args.model, max_batch_size=args.batch_size)
    paths, labels, classes = labelled_paths(args.data, args.max_per_class)
    check_class_sizes(labels)  # before the slow part
    embeddings, readable = embed_files(embedder, paths)
    skipped = int((~readable).sum())
    results = evaluate_embeddings(embeddings, labels[readable], episodes=args.episodes, seed=args.seed)

    summary = {
        **results,
        "model_id": embedder.model_id,
        "data": str(args.data),
        "classes": len(classes),
        "images": int(readable.sum()),
        "skipped": skipped,
        "episodes": args.episodes,
        "seed": args.seed,
    }
    if args.plot is not None:
        from .eval_plots import allway_confusion, write_eval_plot

        confusion = allway_confusion(embeddings, labels[readable], len(classes), seed=args.seed)
        write_eval_plot(confusion, classes, args.plot, title=f"{embedder.model_id} on {args.data}")
        summary["plot"] = str(args.plot)
    if args.as_json:
        print(json.dumps(summary))
        return 0
    print(f"model  {embedder.model_id} ({embedder.embedding_dim}-d, {embedder.meta.embedding})")
    print(
        f"data   {args.data}: {len(classes)} classes, {int(readable.sum())} images"
        + (f" ({skipped} unreadable, skipped)" if skipped else "")
    )
    print(f"{'protocol':<16}{'accuracy %':>11}{'95% CI':>9}  trials")
    for key, name in PROTOCOL_NAMES.items():
        r = results[key]
        print(f"{name:<16}{r['mean']:>11.2f}{r['ci95']:>9.2f}  {r['trials']} ({r['ways']}-way)")
    if args.plot is not None:
        print(f"plot   {args.plot}")
    return 0
