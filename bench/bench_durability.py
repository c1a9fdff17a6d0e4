"""What ``--durability always`` costs per add; prints one JSON line.

Two embedded Valkey servers (ManagedRedis, persistent, as ``fewshot serve`` starts it), one with
``appendfsync everysec`` and one with ``always``, their data folders side by side under
``--dir`` (the disk is what an fsync costs: name it with the figures). Each add is the
registry's add of one example, as the server stores it after the model ran: a 128-d embedding
(the default model's) and a stored image of ``--image-bytes``. Rounds alternate between the two
servers so machine noise hits both; the figures are medians and 95th percentiles per add, in ms.

Usage:
    PYTHONPATH=service:service/client python bench/bench_durability.py [--adds 300] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from fewshot_service.registry.redis_client import connect_redis
from fewshot_service.registry.redis_server import ManagedRedis
from fewshot_service.registry.registry import Registry


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adds", type=int, default=300, help="adds per setting")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--image-bytes", type=int, default=20_000)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    image = os.urandom(args.image_bytes)
    times: dict[str, list[float]] = {"everysec": [], "always": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        servers = {mode: ManagedRedis(Path(tmp) / mode, persistent=True, appendfsync=mode) for mode in times}
        registries = {}
        for mode, server in servers.items():
            registries[mode] = Registry(connect_redis(server.start()))
        try:
            for i in range(args.adds):
                for mode, registry in registries.items():
                    vector = rng.normal(size=(1, args.dim)).astype(np.float32)
                    started = time.perf_counter()
                    registry.add_examples("bench", f"class-{i % 100}", vector, "model", [image])
                    times[mode].append((time.perf_counter() - started) * 1000)
        finally:
            for server in servers.values():
                server.stop()
    result = {
        mode: {
            "median_ms": round(statistics.median(t), 3),
            "p95_ms": round(np.percentile(t, 95), 3),
        }
        for mode, t in times.items()
    }
    result["always_minus_everysec_median_ms"] = round(
        result["always"]["median_ms"] - result["everysec"]["median_ms"], 3
    )
    result.update(adds=args.adds, dim=args.dim, image_bytes=args.image_bytes, dir=str(args.dir))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
