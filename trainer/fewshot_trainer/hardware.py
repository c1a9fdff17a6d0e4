"""What the machine can do, and the settings that depend on it (``optimization.bf16: auto``,
``data.num_workers: auto``).

bf16 autocast pays only where the CPU multiplies bf16 natively: faster than fp32 on a Xeon with
AMX-BF16, several times slower on AVX2-only machines (docs/benchmarks/training.md).
Sessions run on machines that differ, so "auto" decides per machine from the CPU flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# Flags that say the CPU has bf16 dot-product instructions oneDNN uses for matrix products.
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
# The flags worth reporting next to a throughput figure.
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")

Bf16Setting = bool | Literal["auto"]
WorkersSetting = int | Literal["auto"]

# At most this many loader processes per GPU: enough to feed an H200 the default recipe
# (docs/benchmarks/training.md).
MAX_GPU_WORKERS = 14


@dataclass(frozen=True)
class CpuInfo:
    model_name: str = "unknown"
    flags: frozenset[str] = field(default_factory=frozenset)

    def reported_flags(self) -> dict[str, bool]:
        return {flag: flag in self.flags for flag in REPORTED_FLAGS}


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's ``model name`` and ``flags`` from ``/proc/cpuinfo`` text."""
    name, flags = "unknown", frozenset[str]()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "model name" and name == "unknown":
            name = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return CpuInfo(name, flags)


def cpu_info(path: str | Path = "/proc/cpuinfo") -> CpuInfo:
    """This machine's CPU; an empty :class:`CpuInfo` where there is no ``/proc/cpuinfo`` (macOS...)."""
    try:
        return parse_cpuinfo(Path(path).read_text())
    except OSError:
        return CpuInfo()


def has_native_bf16(flags: frozenset[str] | set[str]) -> bool:
    return bool(NATIVE_BF16_FLAGS & set(flags))


def resolve_bf16(
    setting: Bf16Setting, *, device_type: str, cpu_flags: frozenset[str] | set[str], cuda_bf16: bool = False
) -> bool:
    """``true``/``false`` as given; ``"auto"``: on a CPU with native bf16, or a GPU that supports it."""
    if setting != "auto":
        return bool(setting)
    if device_type == "cuda":
        return cuda_bf16
    return device_type == "cpu" and has_native_bf16(cpu_flags)


def resolve_num_workers(
    setting: WorkersSetting, *, device_type: str, cores: int, local_processes: int = 1
) -> int:
    """Data-loader processes per training process: an int as given; ``"auto"``:

    - on a GPU, the host's cores less one for each training process, shared among those processes
      (at most :data:`MAX_GPU_WORKERS` each): a GPU step is milliseconds, so decoding and
      augmenting the views on the CPU is what it waits for;
    - on a CPU, 0 (load in the training process): the compute threads already take every core,
      and on 2 cores a loader worker measured slower than none (docs/benchmarks/training.md).
    """
    if setting != "auto":
        return int(setting)
    if device_type != "cuda":
        return 0
    spare = max(cores - local_processes, 0) // max(local_processes, 1)
    return min(spare, MAX_GPU_WORKERS)
