"""One server per data folder: an ``flock``-ed file in the folder that names the process holding it.

Two ``fewshot serve`` on one folder would start two private Redis servers on one append-only file:
each sees only its own writes, both hand out the same example ids, and a restart merges them. The
kernel drops an ``flock`` when the last descriptor of the file closes, so a killed holder leaves no
stale lock; the PID in the file is only there to name the holder in the error message.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

LOCK_FILE_NAME = "serve.lock"
# A SIGKILLed server's private Redis (which shares the lock's descriptor) still gets SIGTERM and
# flushes its append-only file before it lets go: wait that long for a lock whose named holder is gone.
_DEAD_HOLDER_WAIT_S = 10.0


class DataDirInUse(RuntimeError):
    """Another live process holds the data folder."""


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True


class DataDirLock:
    """Exclusive lock on ``folder`` for this process (and the children it hands :attr:`fd` to).

    >>> with DataDirLock(Path(".fewshot/redis")):
    ...     ...  # start the server that writes there
    """

    def __init__(self, folder: Path | str, dead_holder_wait_s: float = _DEAD_HOLDER_WAIT_S) -> None:
        self.folder = Path(folder).resolve()
        self.path = self.folder / LOCK_FILE_NAME
        self.dead_holder_wait_s = dead_holder_wait_s
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write our PID into it; :class:`DataDirInUse` if someone else has it."""
        if self.fd is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.dead_holder_wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self._read_holder(fd)
                holder_alive = holder is not None and _process_exists(holder)
                if holder_alive or time.monotonic() >= deadline:
                    os.close(fd)
                    raise DataDirInUse(self._in_use_message(holder, holder_alive)) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        """Close our descriptor; the lock goes once every child that inherited it has exited too."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    @staticmethod
    def _read_holder(fd: int) -> int | None:
        try:
            return int(os.pread(fd, 32, 0).decode().strip())
        except (OSError, ValueError):
            return None

    def _in_use_message(self, holder: int | None, holder_alive: bool) -> str:
        who = f"process {holder}" if holder is not None else "another process"
        if holder_alive:
            return (
                f"the data folder {self.folder} is in use by {who} (another fewshot serve?): "
                "stop it, or give this server its own --data-dir"
            )
        return (
            f"the data folder {self.folder} is still locked {self.dead_holder_wait_s:.0f}s after "
            f"{who}, which held it, exited: a Redis server it started may still be running there"
        )
