"""How long calls and probes take while Redis is frozen (SIGSTOP): the fault probe of issue 32.

Starts a private Valkey and ``fewshot serve --redis-url`` on it (``--redis-timeout-s``), adds one
class, freezes Valkey, then times ``--calls`` sequential REST calls of each kind and the probes,
and after SIGCONT how long until /readyz is 200 again. Prints one JSON line, then a table:

    PYTHONPATH=service:service/client python bench/bench_redis_freeze.py --model models/default.onnx
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from fewshot_service.registry.redis_server import ManagedRedis


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def timed(call) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    status = call().status_code
    return status, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/default.onnx"))
    parser.add_argument("--redis-timeout-s", type=float, default=2.0)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ManagedRedis(Path(tmp) / "redis", persistent=False) as valkey:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fewshot_common.cli",
                "serve",
                "--model",
                str(args.model),
                "--redis-url",
                valkey.url,
                "--redis-timeout-s",
                str(args.redis_timeout_s),
                "--grpc-port",
                "0",
                "--http-port",
                "0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert server.stdout is not None
            banner = server.stdout.readline()
            port = int(re.search(r"HTTP on https?://[^ ]+:(\d+)", banner).group(1))  # type: ignore[union-attr]
            files = [("files", ("a.png", png(0), "image/png"))]
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
                assert http.post("/v1/classes/a/examples", files=files).status_code == 201
                calls = {
                    "GET /v1/classes": lambda: http.get("/v1/classes"),
                    "POST examples": lambda: http.post("/v1/classes/a/examples", files=files),
                    "POST /v1/classify": lambda: http.post("/v1/classify", files=files),
                    "GET /healthz": lambda: http.get("/healthz"),
                    "GET /readyz": lambda: http.get("/readyz"),
                }
                for call in calls.values():
                    timed(call)  # warm
                assert valkey.pid is not None
                os.kill(valkey.pid, signal.SIGSTOP)
                results: dict[str, dict[str, object]] = {}
                try:
                    for name, call in calls.items():
                        runs = [timed(call) for _ in range(args.calls)]
                        results[name] = {
                            "status": sorted({s for s, _ in runs}),
                            "first_s": round(runs[0][1], 3),
                            "median_s": round(statistics.median(t for _, t in runs), 3),
                            "max_s": round(max(t for _, t in runs), 3),
                        }
                finally:
                    os.kill(valkey.pid, signal.SIGCONT)
                started = time.monotonic()
                while http.get("/readyz").status_code != 200:
                    time.sleep(0.01)
                ready_again_s = round(time.monotonic() - started, 3)
        finally:
            server.terminate()
            server.wait(30)
    print(
        json.dumps(
            {"redis_timeout_s": args.redis_timeout_s, "calls": results, "ready_again_s": ready_again_s}
        )
    )
    print(
        f"\n| call (Redis frozen, --redis-timeout-s {args.redis_timeout_s}) | status | first s | median s | max s |"
    )
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['status']} | {r['first_s']} | {r['median_s']} | {r['max_s']} |")
    print(f"\n/readyz 200 again {ready_again_s} s after SIGCONT")


if __name__ == "__main__":
    main()
