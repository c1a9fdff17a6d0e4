"""The server's side of a decode worker (decode_worker.py): one long-lived process per decode slot.

Started with ``subprocess`` (fork + exec of a fresh interpreter: the server has many threads,
gRPC's and ONNX Runtime's, and is never forked as it is), lazily on a slot's first job and again
at once when one dies. A job that kills its worker (CPU or memory limit) or outlives the wall-clock
deadline (the backstop for a decoder that sleeps or spins in a way RLIMIT_CPU does not see) is
answered with :class:`TooLarge` (413 / RESOURCE_EXHAUSTED) naming the image.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fewshot_common.cancellation import CancellationCheck
from fewshot_common.errors import Cancelled, FewshotError, ImageError, TooLarge, Unavailable
from fewshot_common.images import ImageLimits
from fewshot_common.modelmeta import Preprocess

from .decode_progress import DecodeProgress
from .decode_worker import _FRAME, ERROR_KINDS, MAX_HEADER_BYTES, write_frame

log = logging.getLogger(__name__)
WORKER_MODULE = "fewshot_service.core.decode_worker"

# Wall-clock seconds an image may take per CPU second of its budget: slack for a busy machine
# (the CPU limit is the real bound; this catches what it cannot, e.g. a decoder that blocks).
WALL_PER_CPU_SECOND = 5
PIPE_BYTES = 1 << 20
MAX_OUTPUT_BYTES = 1 << 34  # a sanity bound only: the batch's shape and the copies' sizes are checked
_POLL_S = 0.1  # how often a waiting job looks at its request's cancellation
# One BLAS/OpenMP thread: the worker runs one decode, and each thread's buffers count in RLIMIT_AS.
_WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class _WorkerGone(Exception):
    """The worker died, broke the protocol, or ran out of wall-clock time."""


class DecodeWorker:
    """One worker process, used by one request at a time (the decode pool's slot)."""

    def __init__(self, module: str = WORKER_MODULE) -> None:
        self._module = module  # the worker's code (``python -m``); tests give a broken one
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # the pool gives a slot to one thread; this is a guard
        self._progress: DecodeProgress | None = None  # kept across restarts of the process
        self._output_fd: int | None = None  # the jobs' output file (decode_worker.write_output)
        self.started = 0  # processes started so far (tests, metrics)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def current_image(self) -> int | None:
        """The image the running (or last) job is on, by its index; None while its headers are checked."""
        return self._progress.image if self._progress is not None else None

    def start(self) -> None:
        """Start the process unless it runs (it imports Pillow and numpy while the caller goes on)."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self._reap()
        if self._progress is None:
            self._progress = DecodeProgress()
        if self._output_fd is None:
            # Kept at its largest job's size: its pages are reused, not allocated per job.
            self._output_fd = os.memfd_create("fewshot-decode-output", os.MFD_CLOEXEC)
        fds = (self._progress.fd, self._output_fd)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", self._module, *map(str, fds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=PIPE_BYTES,  # a job's images reach the worker in one write, not one per 8 KiB
            close_fds=True,
            pass_fds=fds,
            env={**os.environ, **_WORKER_ENV},
        )
        _widen_pipe(self._proc.stdin.fileno())  # type: ignore[union-attr]
        self.started += 1

    def stop(self) -> None:
        if self._proc is None:
            return
        try:
            self._proc.stdin.close()  # type: ignore[union-attr]  # EOF: the worker exits
            self._proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self._reap()
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self._output_fd is not None:
            os.close(self._output_fd)
            self._output_fd = None

    def _reap(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                stream.close()
        self._proc = None

    # -- jobs --------------------------------------------------------------------------------

    def load_batch(
        self,
        images: Sequence[bytes],
        pre: Preprocess,
        limits: ImageLimits,
        cancellation: CancellationCheck | None = None,
    ) -> np.ndarray:
        """:func:`images.load_batch`, in the worker: ``[N, 3, S, S]`` float32."""
        header, payload = self._call(
            {"op": "load_batch", "preprocess": dataclasses.asdict(pre)}, images, limits, cancellation
        )
        batch = self._batch(header, payload, len(images), pre)
        if batch.nbytes != len(payload):
            raise self._protocol_error("a batch of the wrong size")
        return batch

    def load_batch_and_copies(
        self,
        images: Sequence[bytes],
        pre: Preprocess,
        limits: ImageLimits,
        cancellation: CancellationCheck | None = None,
    ) -> tuple[np.ndarray, list[bytes]]:
        """:meth:`load_batch` and the stored copies (stored_images.py) in one job: each image's two decodes
        share its CPU budget (an example upload must not cost twice an image's limit)."""
        header, payload = self._call(
            {"op": "load_batch_and_copies", "preprocess": dataclasses.asdict(pre)},
            images,
            limits,
            cancellation,
        )
        batch = self._batch(header, payload, len(images), pre)
        return batch, self._copies(header, payload[batch.nbytes :], len(images))

    def _batch(self, header: dict[str, Any], payload: np.ndarray, count: int, pre: Preprocess) -> np.ndarray:
        shape = tuple(header.get("shape", ()))
        if shape != (count, 3, pre.input_size, pre.input_size) or len(payload) < 4 * np.prod(shape):
            raise self._protocol_error("a batch of the wrong shape")
        return np.frombuffer(payload, dtype=np.float32, count=int(np.prod(shape))).reshape(shape)

    def _copies(self, header: dict[str, Any], payload: np.ndarray, count: int) -> list[bytes]:
        sizes = header.get("sizes")
        if not isinstance(sizes, list) or len(sizes) != count or sum(sizes) != len(payload):
            raise self._protocol_error("copies of the wrong size")
        copies, offset = [], 0
        for size in sizes:
            copies.append(bytes(payload[offset : offset + size]))
            offset += size
        return copies

    def _protocol_error(self, what: str) -> FewshotError:
        """A reply the protocol does not allow: a bug, or a decoder an image subverted. Not
        the image's fault to report, nor to trust: the process is replaced and the request may
        be retried (503), as when a worker stops unexpectedly."""
        log.error("decode worker answered %s: replaced", what)
        self._reap()
        self.start()
        return Unavailable("the image decoder answered out of protocol; retry")

    def _call(
        self,
        header: dict[str, Any],
        images: Sequence[bytes],
        limits: ImageLimits,
        cancellation: CancellationCheck | None,
    ) -> tuple[dict[str, Any], np.ndarray]:
        with self._lock:
            self.start()
            assert self._proc is not None and self._progress is not None
            proc, progress = self._proc, self._progress
            header = {**header, "limits": _limits_dict(limits), "sizes": [len(i) for i in images]}
            try:
                progress.new_job()
                write_frame(proc.stdin, header, *images)  # type: ignore[arg-type]
                clock = _ImageClock(progress, WALL_PER_CPU_SECOND * limits.max_decode_cpu_s)
                reply = self._read_reply(clock, cancellation)
            except Cancelled:
                self._reap()  # it may be deep in a decode: stop it, and have a fresh one ready
                self.start()
                raise
            except _WorkerGone as exc:
                if str(exc) == "protocol":
                    raise self._protocol_error("a frame out of protocol") from None
                raise self._died(progress.image, limits, timed_out=str(exc) == "deadline") from None
            except (OSError, ValueError):
                raise self._died(progress.image, limits, timed_out=False) from None
            if reply.get("exiting"):
                self._reap()
                self.start()
            if reply.get("t") == "error":
                raise self._error_from(reply)
            return reply, self._output(reply)

    def _error_from(self, reply: dict[str, Any]) -> FewshotError:
        """The error the worker reported (the worker names only ERROR_KINDS, with an int index)."""
        cls = ERROR_KINDS.get(str(reply.get("kind")))
        if cls is None:
            return self._protocol_error("an error of no known kind")
        if issubclass(cls, ImageError):
            index = reply.get("index")
            if not isinstance(index, int):
                return self._protocol_error("an image error naming no image")
            return cls(index, str(reply.get("reason", "")))
        return cls(str(reply.get("message", "")))

    def _output(self, reply: dict[str, Any]) -> np.ndarray:
        """The job's output, from the output file: as many bytes as the reply states."""
        size = reply.get("output_bytes")
        if not isinstance(size, int) or not 0 <= size <= MAX_OUTPUT_BYTES or self._output_fd is None:
            raise self._protocol_error("an output of an impossible size")
        output = np.empty(size, dtype=np.uint8)
        if os.preadv(self._output_fd, [output], 0) != size:
            raise self._protocol_error("less output than it said")
        return output

    def _died(self, index: int | None, limits: ImageLimits, *, timed_out: bool) -> FewshotError:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        code = proc.wait() if proc is not None else None
        self._reap()
        self.start()  # the replacement starts while this request is answered
        which = f"image {index}" if index is not None else "the images' headers"
        if timed_out:
            return TooLarge(
                f"{which}: decoding took longer than {WALL_PER_CPU_SECOND * limits.max_decode_cpu_s} s"
            )
        if code in (-signal.SIGXCPU, -signal.SIGPROF):
            return TooLarge(
                f"{which}: decoding needs more than {limits.max_decode_cpu_s} s of CPU, the limit"
            )
        if code is not None and code < 0:
            return TooLarge(
                f"{which}: decoding needs more than the {limits.max_decode_memory // (1 << 20)} MiB "
                "of memory an image may use (the decoder was stopped)"
            )
        return Unavailable("the image decoder stopped unexpectedly; retry")

    def _read_reply(self, clock: _ImageClock, cancellation: CancellationCheck | None) -> dict[str, Any]:
        """The job's reply: one frame of a header and no payload (the output is in its file)."""
        head = self._read(_FRAME.size, clock, cancellation)
        header_len, payload_len = _FRAME.unpack(head)
        if header_len > MAX_HEADER_BYTES or payload_len:
            raise _WorkerGone("protocol")
        try:
            header = json.loads(self._read(header_len, clock, cancellation))
        except ValueError:  # not JSON (UnicodeDecodeError included)
            raise _WorkerGone("protocol") from None
        if not isinstance(header, dict):
            raise _WorkerGone("protocol")
        return header

    def _read(self, size: int, clock: _ImageClock, cancellation: CancellationCheck | None) -> bytearray:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        buffer = bytearray(size)
        view, got = memoryview(buffer), 0
        while got < size:
            left = clock.left()
            if left <= 0:
                raise _WorkerGone("deadline")
            ready, _, _ = select.select([fd], [], [], min(left, _POLL_S))
            if not ready:
                if cancellation is not None and cancellation.is_cancelled():
                    raise Cancelled("the request was cancelled while decoding its images")
                continue
            n = os.readv(fd, [view[got:]])
            if n == 0:
                raise _WorkerGone("exited")
            got += n
        return buffer


def _widen_pipe(fd: int) -> None:
    """A job's images reach the worker in one write, not one wake-up of the worker per 64 KiB
    (Linux's default pipe size); an unprivileged process may ask for up to
    ``/proc/sys/fs/pipe-max-size`` (1 MiB by default), and a smaller pipe still works. (Replies
    are a small frame; a job's output goes through the output file.)"""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        pass


class _ImageClock:
    """A job's wall-clock deadline, restarted whenever the worker has moved on to another image
    (seen at each poll: at most ``_POLL_S`` after the move)."""

    def __init__(self, progress: DecodeProgress, wall_per_image: float) -> None:
        self._progress, self._wall = progress, wall_per_image
        self._step = progress.step
        self._deadline = time.monotonic() + wall_per_image

    def left(self) -> float:
        now, step = time.monotonic(), self._progress.step
        if step != self._step:
            self._step, self._deadline = step, now + self._wall
        return self._deadline - now


def _limits_dict(limits: ImageLimits) -> dict[str, Any]:
    return {
        "max_image_bytes": limits.max_image_bytes,
        "max_pixels": limits.max_pixels,
        "max_images": limits.max_images,
        "max_jpeg_scans": limits.max_jpeg_scans,
        "max_decoded_bytes": limits.max_decoded_bytes,
        "max_request_pixels": limits.max_request_pixels,
        "formats": list(limits.formats),
        "max_decode_cpu_s": limits.max_decode_cpu_s,
        "max_decode_memory": limits.max_decode_memory,
    }
