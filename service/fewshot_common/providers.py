"""Which ONNX Runtime execution providers a server runs on, decided once at start-up.

ONNX Runtime falls back to the CPU by itself when a GPU provider cannot start (no GPU visible, a
driver or CUDA library missing), and says so only on stdout. Here that fallback becomes explicit:
with providers chosen automatically the server logs which one it fell back to; with providers
asked for by name (``--providers cuda``) it refuses to start rather than serve on the CPU.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import onnx
import onnxruntime as ort

log = logging.getLogger(__name__)

# Fastest first; the first ones that this onnxruntime build offers are used.
PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
# Short names accepted by --providers / FEWSHOT_PROVIDERS, besides ONNX Runtime's own.
ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
AUTO = "auto"


class ProviderUnavailable(RuntimeError):
    """A provider asked for by name cannot run here."""


def provider_names(values: Sequence[str]) -> list[str]:
    """``--providers`` as given (short or full names, ``auto``) -> ONNX Runtime's names; an
    empty list means automatic. Raises ValueError for a name that is neither."""
    names = [ALIASES.get(value.lower(), value) for value in values]
    if [name.lower() for name in names] == [AUTO]:
        return []
    unknown = [name for name in names if not name.endswith("ExecutionProvider")]
    if unknown:
        raise ValueError(
            f"unknown execution provider {', '.join(unknown)}: use auto, {', '.join(ALIASES)} "
            "or an ONNX Runtime provider name such as CUDAExecutionProvider"
        )
    return names


def default_providers() -> list[str]:
    available = set(ort.get_available_providers())
    return [name for name in PREFERRED_PROVIDERS if name in available]


def preload_gpu_libraries() -> bool:
    """Load the CUDA and cuDNN libraries of NVIDIA's PyPI wheels (onnxruntime-gpu[cuda,cudnn]):
    ONNX Runtime's CUDA provider finds them only after this, as they are not on the loader's
    path. Does nothing where this onnxruntime has no CUDA provider. True if it preloaded."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime-gpu >= 1.21
    if preload is None:
        return False
    preload()  # on Linux: the nvidia-* packages in site-packages, then the loader's own path
    return True


def _probe_model() -> bytes:
    """One Identity node: enough for a provider to initialise on, nothing to compute."""
    value = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    out = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe", [value], [out])
    opsets = [onnx.helper.make_opsetid("", 17)]
    # The oldest IR version for the opset: onnx's newest may be beyond this onnxruntime's.
    ir_version = onnx.helper.find_min_ir_version_for(opsets)
    return onnx.helper.make_model(graph, opset_imports=opsets, ir_version=ir_version).SerializeToString()


def why_unusable(provider: str) -> str | None:
    """None if ``provider`` starts here; else the reason, in one line."""
    if provider not in ort.get_available_providers():
        hint = " (install onnxruntime-gpu)" if provider in GPU_PROVIDERS else ""
        return f"this onnxruntime ({ort.__version__}) has no {provider}{hint}"
    if provider in GPU_PROVIDERS:
        try:  # the driver's library: ONNX Runtime only logs its absence and carries on without
            ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            return (
                f"no NVIDIA driver ({exc}); a container needs the NVIDIA Container Toolkit "
                "and a GPU passed in (docker run --gpus all)"
            )
    try:
        # Without fallback ONNX Runtime raises the provider's own error instead of going to the CPU.
        session = ort.InferenceSession(_probe_model(), providers=[provider], enable_fallback=0)
    except Exception as exc:  # noqa: BLE001 -- ONNX Runtime's errors are untyped
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return (lines[-1] if lines else type(exc).__name__)[:300]
    if provider not in session.get_providers():  # some failures are logged, not raised
        return "ONNX Runtime could not create it (its log above says why)"
    return None


@dataclass(frozen=True)
class ProviderChoice:
    providers: list[str]  # what the server runs on, in ONNX Runtime's order of preference
    fell_back_from: str | None = None  # the first provider that could not start (automatic choice)
    reason: str | None = None  # why it could not


def choose_providers(requested: Sequence[str]) -> ProviderChoice:
    """``requested``: ONNX Runtime names (empty: automatic). The first of an explicit list must
    start, or :class:`ProviderUnavailable`; chosen automatically, see :func:`usable_providers`.
    A GPU provider's libraries are preloaded first (onnxruntime-gpu's CUDA/cuDNN wheels)."""
    providers = list(requested) or default_providers()
    if any(name in GPU_PROVIDERS for name in providers):
        preload_gpu_libraries()
    if not requested:
        return usable_providers(providers)
    reason = why_unusable(providers[0])
    if reason is not None:
        raise ProviderUnavailable(
            f"--providers asks for {providers[0]}, which cannot start here: {reason}. "
            "Pass --providers auto (or cpu) to serve on the CPU"
        )
    return ProviderChoice(providers)


def usable_providers(candidates: Sequence[str]) -> ProviderChoice:
    """The candidates that start here, the CPU last; each one that cannot is logged with why."""
    dropped: list[tuple[str, str]] = []
    usable: list[str] = []
    for name in candidates:
        reason = None if name == "CPUExecutionProvider" else why_unusable(name)
        if reason is None:
            usable.append(name)
        else:
            dropped.append((name, reason))
    if "CPUExecutionProvider" not in usable:
        usable.append("CPUExecutionProvider")
    for name, reason in dropped:
        log.warning("%s cannot start (%s); serving on %s", name, reason, usable[0])
    return ProviderChoice(usable, *(dropped[0] if dropped else (None, None)))
