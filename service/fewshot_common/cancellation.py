"""A cancellation handle the transports set and the work for a request checks.

gRPC sets it when the call's deadline passes or the client goes away; the core checks it between
image decodes and before a request's batch leaves the batcher queue, so abandoned work stops at
the next checkpoint instead of running to completion for nobody.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from .errors import Cancelled


class CancellationCheck(Protocol):
    """Anything with ``is_cancelled()``: a :class:`Cancellation` or an adapter of the caller's."""

    def is_cancelled(self) -> bool: ...


class Cancellation:
    """Cancelled once :meth:`cancel` is called or the optional monotonic ``deadline`` passes."""

    def __init__(self, deadline: float | None = None) -> None:
        self._event = threading.Event()
        self.deadline = deadline

    @classmethod
    def after(cls, seconds: float | None) -> Cancellation:
        """A handle that cancels itself ``seconds`` from now (None: only by :meth:`cancel`)."""
        return cls(None if seconds is None else time.monotonic() + seconds)

    def cancel(self) -> None:
        self._event.set()

    def is_cancelled(self) -> bool:
        return self._event.is_set() or self.deadline_passed()

    def deadline_passed(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


def raise_if_cancelled(cancellation: CancellationCheck | None, what: str) -> None:
    """Raise :class:`Cancelled` naming the stage (``what``) that was skipped."""
    if cancellation is not None and cancellation.is_cancelled():
        raise Cancelled(f"the request was cancelled (deadline passed or client gone) before {what}")
