"""Which image a decode worker is on, in a page of memory it shares with the server.

The server restarts a job's wall-clock deadline each time the worker moves on to another image,
and names that image if the worker dies. Telling it through the worker's pipe cost a write and a
wake-up of the server per image (two per upload, which is decoded twice): on a machine whose
cores run the model, that was CPU taken from the model on every image of a bulk import. Here
the worker only stores two numbers; the server reads them when it looks anyway (each poll of
the pipe, and once the worker is gone).

The page is a ``memfd`` the worker inherits (``pass_fds``), Linux like the rest of the decode
isolation. Two 8-byte slots: a step counter, bumped on every step, and the image's index (-1:
the job's header checks). A read that races a write can only see the step move (the worker is
making progress, so restarting its deadline is right) or name the image before; once the worker
is gone nothing writes, so the image an error names is the one it died on.
"""

from __future__ import annotations

import mmap
import os
import struct

_SLOTS = struct.Struct("<qq")  # step, image index


class DecodeProgress:
    """The shared page, from either side: the server creates it, the worker attaches by fd."""

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            fd = os.memfd_create("fewshot-decode-progress", os.MFD_CLOEXEC)
            os.ftruncate(fd, _SLOTS.size)
        self.fd = fd
        self._page = mmap.mmap(fd, _SLOTS.size)

    # -- the worker's side ---------------------------------------------------------------------

    def on_image(self, index: int) -> None:
        step, _ = _SLOTS.unpack_from(self._page)
        # Index first: a server that sees the new step also sees the image it belongs to.
        struct.pack_into("<q", self._page, 8, index)
        struct.pack_into("<q", self._page, 0, step + 1)

    # -- the server's side ---------------------------------------------------------------------

    def new_job(self) -> None:
        """Before a job is sent: no image yet (its header checks run first)."""
        struct.pack_into("<q", self._page, 8, -1)

    @property
    def step(self) -> int:
        return int(_SLOTS.unpack_from(self._page)[0])

    @property
    def image(self) -> int | None:
        """The image being decoded, or None while the job's headers are checked."""
        index = int(_SLOTS.unpack_from(self._page)[1])
        return index if index >= 0 else None

    def close(self) -> None:
        self._page.close()
        os.close(self.fd)
