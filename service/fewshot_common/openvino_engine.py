"""OpenVINO runs the bf16 variant: bf16 arithmetic on CPUs that have it (AMX, AVX-512 BF16).

ONNX Runtime's CPU provider has no bf16 kernels, so a bf16 graph would run there as fp32 with
bf16-rounded weights. OpenVINO reads the same ONNX file and, asked for bf16, runs its MatMuls on the
CPU's bf16 units: on a Xeon with AMX-BF16 it is the fastest engine for the shipped model, with a
higher cosine to fp32 than int8 (docs/benchmarks/engine.md).

``openvino`` is an optional import: without it, a bf16 variant is served by ONNX Runtime instead.
"""

from __future__ import annotations

import itertools
import os
import queue
from functools import cache
from pathlib import Path

import numpy as np

from .cores import intra_op_threads_per_batch, usable_cores
from .modelmeta import INPUT_NAME, OUTPUT_NAME

ENGINE_NAME = "openvino"


@cache
def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_flags(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> frozenset[str]:
    """The first CPU's feature flags as Linux lists them (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def bf16_is_fastest(flags: frozenset[str] | None = None) -> bool:
    """Whether this host should serve a bf16 variant before int8: its CPU has AMX-BF16 tiles and
    OpenVINO is installed. Only measured there; on AVX-512 BF16 without AMX (AMD EPYC) int8 under
    ONNX Runtime stays first until a benchmark says otherwise."""
    flags = cpu_flags() if flags is None else flags
    return "amx_bf16" in flags and openvino_available()


class OpenVinoRunner:
    """``concurrent_runs`` compiled copies of the model, one stream each; thread-safe: each
    concurrent run takes an idle infer request (of the copy whose run finished last).

    Each copy runs ``threads_per_run`` threads, so that, like the server's ONNX Runtime sessions,
    each batch worker's run gets its share of the cores. One copy per run rather than one
    compiled model of ``concurrent_runs`` streams measured faster both alone and two runs at once
    (docs/benchmarks/code-notes.md; likely because a multi-stream model hands each run to one of
    its own stream threads; not profiled further). Threads are not pinned to cores: the server's decode
    and gRPC threads share them.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, threads_per_run: int | None, concurrent_runs: int
    ) -> None:
        import openvino as ov

        if concurrent_runs <= 0:
            raise ValueError(f"concurrent_runs must be positive, got {concurrent_runs}")
        if threads_per_run is None:
            threads_per_run = intra_op_threads_per_batch(usable_cores(), concurrent_runs)
        config: dict[str, object] = {
            "INFERENCE_PRECISION_HINT": "bf16",
            "NUM_STREAMS": 1,
            "INFERENCE_NUM_THREADS": threads_per_run,
            "ENABLE_CPU_PINNING": False,
        }
        core = ov.Core()
        model = core.read_model(str(path))
        self._copies = [core.compile_model(model, "CPU", config) for _ in range(concurrent_runs)]
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        for compiled in self._copies:
            self._idle.put(compiled.create_infer_request())
        self._extra = itertools.count()  # spreads extra requests over the copies
        # What OpenVINO settled on: "bf16" where the CPU computes in bf16, "f32" where it cannot.
        self.precision = self._copies[0].get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.copies = len(self._copies)

    @property
    def description(self) -> str:
        return f"{ENGINE_NAME} CPU ({self.precision})"

    def run(self, pixels: np.ndarray) -> np.ndarray:
        try:
            request = self._idle.get_nowait()
        except queue.Empty:  # more runs at once than copies: one more request (cheap)
            compiled = self._copies[next(self._extra) % len(self._copies)]
            request = compiled.create_infer_request()
        try:
            # infer() releases the GIL while the model runs. The input is read in place (the call
            # is synchronous, so the array outlives the run); the result is copied out of the
            # request's own buffer before the request is reused.
            return request.infer({INPUT_NAME: pixels}, share_inputs=True)[OUTPUT_NAME]
        finally:
            self._idle.put(request)
