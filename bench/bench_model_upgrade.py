"""What a model roll costs, in one run: prints one JSON line. Preliminary on a shared CPU.

- ``bytes_per_example``: Redis ``INFO memory`` used_memory delta per added example, split into the
  stored image and the rest (the embedding, its share of sums/prototypes/counts, the example id):
  the same examples are added once with ``store_images`` and once without, each into a fresh
  private Valkey/Redis, through the server's own core (embedding, bounded copy, add script).
  Two kinds of upload: ``small`` (Tiny ImageNet dev JPEGs as they are, 64x64: kept as uploaded)
  and ``photo`` (the same images upscaled to 1600x1200 with mild sensor-like noise, JPEG q92:
  stored re-encoded to fit 384 px on the shorter side, JPEG q90). Real photos have more detail
  than upscaled 64 px images, so their stored copies are likely larger: the noise is there to
  keep the estimate from being optimistic, not to model any camera.
- ``backfill``: a second model (the first with one weight scaled and a new id; a different
  embedding space to the registry) embeds every example from the stored images in background
  passes (``Backfiller.backfill``: lease, batches of 32, fill script), examples/s; beside it the
  same model's plain embed throughput on the same stored images, so the overhead shows.

Without ``../shared/data/tiny-imagenet`` the images are generated (say so in the output). Usage::

    PYTHONPATH=service python bench/bench_model_upgrade.py [--examples 500]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "service")]

from fewshot_service.app import build_core  # noqa: E402
from fewshot_service.classify.prototypes import limit_blas_threads  # noqa: E402
from fewshot_service.registry.redis_server import ManagedRedis  # noqa: E402
from fewshot_service.settings import Settings  # noqa: E402

from rolled_model import rolled_model  # noqa: E402

DEV = REPO.parent / "shared" / "data" / "tiny-imagenet" / "fewshot-dev"
PER_CLASS = 10


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def small_images(n: int) -> tuple[list[bytes], str]:
    if DEV.is_dir():
        files = sorted(p for d in sorted(DEV.iterdir()) if d.is_dir() for p in sorted(d.iterdir()))
        step = max(1, len(files) // n)
        return [p.read_bytes() for p in files[::step][:n]], "tiny-imagenet fewshot-dev"
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        out.append(buffer.getvalue())
    return out, "generated noise (tiny-imagenet absent)"


def as_photo(data: bytes, seed: int) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((1600, 1200), Image.Resampling.BICUBIC)
    noisy = np.asarray(image, dtype=np.float32) + np.random.default_rng(seed).normal(0, 6, (1200, 1600, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def used_memory(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


class PrivateRedis(ManagedRedis):
    """A non-persistent server in a temporary folder, removed with it."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp()
        super().__init__(Path(self.folder), persistent=False)

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def load(model: Path, images: list[bytes], store_images: bool) -> tuple[int, float, str, PrivateRedis]:
    """Adds ``images`` (classes of PER_CLASS) into a fresh Redis; returns the memory delta, the
    add time, the Redis URL and the server (still running: the caller stops it)."""
    server = PrivateRedis()
    url = server.start()
    settings = Settings(
        model=model, redis_url=url, intra_op_threads=os.cpu_count(), store_images=store_images
    )
    core = build_core(settings, redis.Redis.from_url(url))
    try:
        before = used_memory(url)
        started = time.perf_counter()
        for start in range(0, len(images), PER_CLASS):
            core.add_examples("bench", f"class-{start // PER_CLASS:04d}", images[start : start + PER_CLASS])
        elapsed = time.perf_counter() - started
        return used_memory(url) - before, elapsed, url, server
    finally:
        core.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "default.onnx")
    args = parser.parse_args()
    limit_blas_threads()
    small, source = small_images(args.examples)
    photos = [as_photo(data, i) for i, data in enumerate(small)]
    n = len(small)

    storage = {}
    for kind, images in (("small", small), ("photo", photos)):
        with_images, add_s, _, server = load(args.model, images, store_images=True)
        server.stop()
        without, _, _, server = load(args.model, images, store_images=False)
        server.stop()
        storage[kind] = {
            "upload_bytes_mean": round(sum(map(len, images)) / n),
            "redis_bytes_per_example": round(with_images / n),
            "image_part": round((with_images - without) / n),
            "embedding_part": round(without / n),
            "add_examples_per_s": round(n / add_s, 1),
        }

    # Backfill: the photos, stored by model A, embedded again by model B.
    with tempfile.TemporaryDirectory() as tmp:
        rolled = Path(tmp) / "rolled.onnx"
        rolled_model(args.model, rolled)
        _, _, url, server = load(args.model, photos, store_images=True)
        try:
            settings = Settings(model=rolled, redis_url=url, intra_op_threads=os.cpu_count())
            core_b = build_core(settings, redis.Redis.from_url(url))
            try:
                started = time.perf_counter()
                result = core_b.backfill.backfill("bench")
                backfill_s = time.perf_counter() - started
                assert result is not None and result.filled == n, result
                store = core_b.backfill.store
                # Every example (a model id that embedded none), to read all the stored images.
                stored = store.stored_images("bench", store.missing("bench", "no-such-model").examples)
                started = time.perf_counter()
                for start in range(0, n, 32):
                    core_b.embed([s for s in stored[start : start + 32] if s])
                embed_s = time.perf_counter() - started
                model_b, precision_b = core_b.model_id, core_b.embedder.meta.precision
            finally:
                core_b.close()
        finally:
            server.stop()

    print(
        json.dumps(
            {
                "cpu": cpu_model(),
                "cores": len(os.sched_getaffinity(0)),
                "examples": n,
                "images": source,
                "model": args.model.name,
                "storage": storage,
                "backfill": {
                    "model": model_b,
                    "precision": precision_b,
                    "examples_per_s": round(n / backfill_s, 1),
                    "plain_embed_of_stored_images_per_s": round(n / embed_s, 1),
                    "batch": 32,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
