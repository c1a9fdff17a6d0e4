"""A decode worker process: untrusted image bytes in, model input (and stored copies) out.

Header checks have been escaped twice (a scan counter fooled by one stray byte, a 34-byte WebP
whose decoder took 1 GB), so every decode of a client's bytes runs here, in a long-lived process
under hard limits the decoder cannot escape, the way browsers isolate their image decoders:

- ``RLIMIT_AS``: address space beyond the worker's own at start-up, re-set before each job
  (an allocation over it fails: MemoryError, or the decoder dies);
- CPU: re-armed before each image (a CPU-time timer, and RLIMIT_CPU behind it: that limit is
  cumulative per process), so an image gets ``max_decode_cpu_s`` seconds of CPU, then the worker
  is killed (SIGPROF, or the kernel's SIGXCPU).

The parent (decode_isolation.py) adds a wall-clock deadline, replaces a worker that died, and
answers 413. This module imports only Pillow and numpy (never ONNX Runtime: the worker stays
small, and starts in a fraction of a second). The full decoded image never leaves it: the parent
gets the preprocessed float32 input, or the bounded stored copies.

Wire format, both ways: ``>II`` (header length, payload length), a JSON header, the payload. The
parent trusts nothing it reads (sizes and shapes are checked), and nothing is pickled: one frame
each way per job. Which image the job is on goes through a shared page instead (decode_progress.py),
and a job's output (pixels, copies) through an in-memory file (``memfd``), whose length the reply
states; their file descriptors are the worker's two arguments.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import struct
import sys
from typing import IO, Any

import numpy as np
from PIL import Image

from fewshot_common.errors import FewshotError, ImageError, InvalidInput, TooLarge, UnsupportedFormat
from fewshot_common.images import ImageLimits, OpenedImage, load_batch
from fewshot_common.modelmeta import Preprocess

from .decode_progress import DecodeProgress
from .stored_images import bounded_copy, kept_as_uploaded

_FRAME = struct.Struct(">II")
MAX_HEADER_BYTES = 1 << 20
# A worker whose address space grew this far past its start-up size (fragmentation after a large
# image) exits after its reply, and the parent starts a fresh one.
RECYCLE_GROWTH = 64 * 1024 * 1024
ERROR_KINDS: dict[str, type[FewshotError]] = {
    "ImageError": ImageError,
    "UnsupportedFormat": UnsupportedFormat,
    "InvalidInput": InvalidInput,
    "TooLarge": TooLarge,
}


def write_frame(stream: IO[bytes], header: dict[str, Any], *payload: bytes) -> None:
    """One frame; the payload is its parts one after another, written as they are (not joined
    into new bytes first)."""
    encoded = json.dumps(header).encode()
    stream.write(_FRAME.pack(len(encoded), sum(len(part) for part in payload)))
    stream.write(encoded)
    for part in payload:
        if part:
            stream.write(part)
    stream.flush()


def _read_exact(stream: IO[bytes], size: int) -> bytes | None:
    data = stream.read(size)
    return data if data is not None and len(data) == size else None


def read_frame(stream: IO[bytes]) -> tuple[dict[str, Any], bytes] | None:
    """The next frame, or None at end of input (the parent went away)."""
    head = _read_exact(stream, _FRAME.size)
    if head is None:
        return None
    header_len, payload_len = _FRAME.unpack(head)
    header = _read_exact(stream, header_len)
    payload = _read_exact(stream, payload_len) if payload_len else b""
    if header is None or payload is None:
        return None
    return json.loads(header), payload


def vm_size() -> int:
    """This process's address space now (what RLIMIT_AS counts), in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


_cpu_soft_limit: list[int | None] = [None]  # RLIMIT_CPU's soft value as last set here


def arm_cpu(seconds: float, now: float | None = None) -> None:
    """Let the next ``seconds`` of CPU run, then die. ITIMER_PROF counts this process's CPU time
    exactly and its SIGPROF (never handled here) kills; RLIMIT_CPU, whole seconds of the
    process's total and so a second or two later, is the kernel's backstop (SIGXCPU).
    ``now``: :func:`cpu_seconds` if the caller just read it. The whole-second backstop is only
    set when it moves (small images are armed three times each, within one second)."""
    signal.setitimer(signal.ITIMER_PROF, seconds)
    soft = math.ceil((cpu_seconds() if now is None else now) + seconds) + 1
    if soft != _cpu_soft_limit[0]:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.RLIM_INFINITY))
        _cpu_soft_limit[0] = soft


def _limits(header: dict[str, Any]) -> ImageLimits:
    raw = dict(header["limits"])
    raw["formats"] = tuple(raw["formats"])
    return ImageLimits(**raw)


def _run_job(
    header: dict[str, Any], payload: bytes, progress: DecodeProgress
) -> tuple[dict[str, Any], list[bytes | np.ndarray]]:
    limits = _limits(header)
    images, offset = [], 0
    for size in header["sizes"]:
        images.append(payload[offset : offset + size])
        offset += size
    # CPU each image has used so far, header parsing included: an example upload decodes an image
    # twice (model input, then the stored copy, at other scales), and all of it shares one budget.
    spent = [0.0] * len(images)
    current: list[Any] = [None, 0.0]  # the image being decoded, the CPU clock when it started

    def account() -> None:
        if current[0] is not None:
            spent[current[0]] += cpu_seconds() - current[1]
            current[0] = None

    def before_step(index: int) -> None:
        now = cpu_seconds()  # one clock read ends the last step and starts this one
        if current[0] is not None:
            spent[current[0]] += now - current[1]
        arm_cpu(max(limits.max_decode_cpu_s - spent[index], 0.01), now)
        current[:] = [index, now]
        progress.on_image(index)  # the parent's deadline restarts

    if header["op"] not in ("load_batch", "load_batch_and_copies"):
        raise InvalidInput(f"unknown decode job {header['op']!r}")
    arm_cpu(limits.max_decode_cpu_s)  # until the first image's step
    pre = Preprocess.from_dict(header["preprocess"])
    with_copies = header["op"] == "load_batch_and_copies"
    # A small upright JPEG is stored as it came, which its header opened for the model already
    # tells: no second parse of it (Pillow's JPEG header parsing is most of a small image's cost).
    kept: dict[int, bytes | None] = {}

    def keep_as_uploaded(opened: OpenedImage) -> None:
        kept[opened.index] = kept_as_uploaded(images[opened.index], opened)

    batch = load_batch(
        images, pre, limits, before_step=before_step, on_open=keep_as_uploaded if with_copies else None
    )
    account()
    reply: dict[str, Any] = {"t": "done", "shape": list(batch.shape)}
    if not with_copies:
        return reply, [batch]
    copies = []
    for index, image in enumerate(images):
        copy = kept.get(index)
        if copy is None:
            before_step(index)
            copy = bounded_copy(image, limits, index)
        copies.append(copy)
    reply["sizes"] = [len(c) for c in copies]
    return reply, [batch, *copies]


def _error_header(exc: FewshotError) -> dict[str, Any]:
    kind = type(exc).__name__ if type(exc).__name__ in ERROR_KINDS else "InvalidInput"
    header: dict[str, Any] = {"t": "error", "kind": kind, "message": str(exc)}
    if isinstance(exc, ImageError):
        header.update(index=exc.index, reason=exc.reason)
    return header


def write_output(fd: int, parts: list[bytes | np.ndarray]) -> int:
    """A job's pixels and copies, one after another from the start of the output file: the
    server reads them in one go once the reply says how many bytes (a pipe holds 1 MiB at most,
    so megabytes through it would wake both sides again and again). Returns the byte count."""
    offset = 0
    for start in range(0, len(parts), 512):  # pwritev takes at most IOV_MAX (1024) buffers
        group = [memoryview(part).cast("B") for part in parts[start : start + 512]]
        while group:
            written = os.pwritev(fd, group, offset)
            offset += written
            while group and written >= len(group[0]):
                written -= len(group.pop(0))
            if group and written:
                group[0] = group[0][written:]
    return offset


def serve(inp: IO[bytes], out: IO[bytes], progress: DecodeProgress, output_fd: int) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a killed decoder leaves no core file
    Image.init()  # every allowed plugin imported now, inside the start-up size
    base = vm_size()
    while (frame := read_frame(inp)) is not None:
        header, payload = frame
        limit = base + len(payload) + int(header["limits"]["max_decode_memory"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        exiting = False
        try:
            reply, data = _run_job(header, payload, progress)
        except FewshotError as exc:
            reply, data = _error_header(exc), []
        except MemoryError:
            reply, data = _error_header(TooLarge("decoding needs more memory than the limit")), []
        del payload
        if vm_size() > base + RECYCLE_GROWTH or reply.get("kind") == "TooLarge":
            reply["exiting"] = exiting = True
        signal.setitimer(signal.ITIMER_PROF, 0)  # idle between jobs costs nothing anyway
        if data:
            reply["output_bytes"] = write_output(output_fd, data)
        write_frame(out, reply)
        if exiting:
            return


def main() -> None:
    # Our own pipes, not sys.stdout: a stray print (a library's warning) cannot corrupt a frame.
    inp = os.fdopen(os.dup(0), "rb", buffering=1 << 16)
    out = os.fdopen(os.dup(1), "wb", buffering=1 << 16)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    np.seterr(all="ignore")
    serve(inp, out, DecodeProgress(int(sys.argv[1])), int(sys.argv[2]))


if __name__ == "__main__":
    sys.exit(main())
