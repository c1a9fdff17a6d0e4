"""A TCP proxy on loopback in front of a real Redis that holds every reply for ``delay_s``: a Redis
that is slow but answers (each command within the socket timeout), which a frozen one is not."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType


class SlowRedisProxy:
    """``with SlowRedisProxy("127.0.0.1", port) as proxy:`` then connect to ``proxy.url``; set
    ``proxy.delay_s`` at any time (0: pass replies straight through)."""

    def __init__(self, host: str, port: int, password: str | None = None) -> None:
        self._upstream = (host, port)
        self._password = password
        self.delay_s = 0.0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        auth = f":{self._password}@" if self._password else ""
        return f"redis://{auth}127.0.0.1:{self._listener.getsockname()[1]}/0"

    def __enter__(self) -> SlowRedisProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, delayed: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if delayed and self.delay_s:
                    time.sleep(self.delay_s)
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
