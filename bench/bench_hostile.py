"""Hostile-input benchmark: the worst inputs the default limits accept, fired concurrently at a
real server process; prints its peak RSS and CPU seconds per request as one JSON line.

Run from the repository root (loopback only, about a minute on 2 cores):

    PYTHONPATH=service:service/client:trainer:tests python bench/bench_hostile.py [--model models/default.onnx]

The server is ``fewshot serve`` with its default limits and a private Redis in a temp folder.
Each phase sends ``--concurrency`` requests at once of one kind (the worst accepted of each):

- ``scan_jpeg``: a 6000x6000 progressive JPEG with 64 scans (the scan cap), ~200 KB;
- ``tiff32``: a 6300x6300 32-bit integer TIFF (39.7 M pixels, under the 40 M cap), ~260 KB;
- ``png16x5``: five 6300x6300 16-bit PNGs in one request (the 200 M pixels/request budget);
- ``mixed``: all of them at once, 3x ``--concurrency`` requests, more than the decode pool's
  workers + queue, so some are refused with 429 instead of queueing.

Peak RSS is the kernel's high-water mark (VmHWM), reset before each phase (clear_refs 5);
``peak_rss_with_workers_mb`` samples the server plus its decode worker processes (issue 29) every
10 ms; CPU seconds are the server's and its workers' user + system time over the phase.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "service"), str(REPO / "service" / "client")]

import hostile_images as hostile  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def cpu_seconds(pid: int) -> float:
    """The process's CPU and its reaped children's (decode workers replaced after a refusal)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK") + sum(
        _own_cpu(child) for child in children(pid)
    )


def _own_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The decode workers (and any other child) of the server process."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def rss_mb(pid: int) -> float:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


class TotalRssSampler:
    """Peak of server + decode workers RSS, sampled every 10 ms (a killed worker's own
    high-water mark dies with it, so the sum is sampled)."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            total = rss_mb(self.pid) + sum(rss_mb(c) for c in children(self.pid))
            self.peak = max(self.peak, total)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "default.onnx")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    inputs = {
        "scan_jpeg": [hostile.scan_repeating_jpeg(54, (6000, 6000))],
        "tiff32": [hostile.wide_tiff("I", (6300, 6300))],
        "png16x5": [hostile.sixteen_bit_png((6300, 6300))] * 5,
        # Issue 29: each is refused (413 by the decode worker's limits, 415 by the allowlist).
        "stray_byte_jpeg": [hostile.stray_byte_jpeg(3000, (2000, 2000))],
        "webp_lossless_bomb": [hostile.lossless_webp_bomb((6300, 6300))],
        "png_rgba_bomb": [hostile.flat("PNG", (6300, 6300), "RGBA")],
        "gif_bomb": [hostile.flat("GIF", (6300, 6300), "L")],
        "bmp_rle_bomb": [hostile.rle_bmp_bomb((6000, 6000))],
        "ico_13000px_png": [hostile.ico_with_huge_png(13000)],
        "tga": [hostile.flat("TGA", (6000, 6000), compression="tga_rle")],
        "jpeg_comment_flood_8mb": [hostile.comment_flood_jpeg(8)],
        "png_empty_chunks_8mb": [hostile.empty_chunk_png(8)],
    }
    http_port, grpc_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        env = {
            **os.environ,
            "PYTHONPATH": f"{REPO / 'service'}:{REPO / 'service' / 'client'}:{REPO / 'trainer'}",
            "FEWSHOT_MODEL": str(args.model),
            "FEWSHOT_HOST": "127.0.0.1",
            "FEWSHOT_HTTP_PORT": str(http_port),
            "FEWSHOT_GRPC_PORT": str(grpc_port),
            "FEWSHOT_DATA_DIR": data_dir,
            "FEWSHOT_LOG_LEVEL": "warning",
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "fewshot_common.cli", "serve"], env=env, cwd=data_dir
        )
        try:
            result = run_phases(server.pid, f"http://127.0.0.1:{http_port}", inputs, args.concurrency)
        finally:
            server.terminate()
            server.wait(30)
    result["cpu"] = cpu_model()
    result["cores"] = len(os.sched_getaffinity(0))
    print(json.dumps(result))
    return 0


def run_phases(pid: int, url: str, inputs: dict[str, list[bytes]], concurrency: int) -> dict:
    with httpx.Client(base_url=url, timeout=300) as client:
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.2)
        idle_rss = peak_rss_mb(pid)

        def add(number: int, images: list[bytes]) -> int:
            files = [("files", (f"f{i}", data, "application/octet-stream")) for i, data in enumerate(images)]
            reply = client.post(f"/v1/classes/c{number}/examples", params={"namespace": "bench"}, files=files)
            return reply.status_code

        phases = {name: [images] * concurrency for name, images in inputs.items()}
        phases["mixed"] = [images for images in inputs.values() for _ in range(concurrency)]
        report: dict = {"idle_rss_mb": round(idle_rss), "phases": {}}
        number = 0
        for name, requests in phases.items():
            reset_peak(pid)
            sampler = TotalRssSampler(pid)
            cpu_before, started = cpu_seconds(pid), time.monotonic()
            with ThreadPoolExecutor(len(requests)) as pool:
                futures = [pool.submit(add, number + i, images) for i, images in enumerate(requests)]
                statuses = [future.result() for future in futures]
            number += len(requests)
            answered = max(1, sum(status == 201 for status in statuses))
            report["phases"][name] = {
                "requests": len(requests),
                "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
                "peak_rss_mb": round(peak_rss_mb(pid)),
                "peak_rss_with_workers_mb": round(sampler.stop()),
                "cpu_s_per_request": round((cpu_seconds(pid) - cpu_before) / len(requests), 2),
                "cpu_s_per_accepted_request": round((cpu_seconds(pid) - cpu_before) / answered, 2),
                "wall_s": round(time.monotonic() - started, 1),
            }
        report["peak_rss_mb"] = max(p["peak_rss_mb"] for p in report["phases"].values())
        return report


if __name__ == "__main__":
    sys.exit(main())
