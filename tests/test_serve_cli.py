"""`fewshot serve` as a user runs it: a subprocess, settings from flags and environment, the default
model resolved from the working directory, clear errors, and a clean exit on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from fewshot_service.cli.serve import add_arguments, settings_from_args
from fewshot_service.registry.redis_client import redacted_url
from fewshot_service.registry.redis_server import ManagedRedis
from fewshot_service.registry.registry import Registry


def managed_redis_pid(server) -> int:
    """The pid of the Valkey that ``fewshot serve`` started: its child listening on the port in
    the banner (the banner's URL hides the password, so it is found by parentage, not asked)."""
    port = int(re.search(r"Redis redis://\S*127\.0\.0\.1:(\d+)", server.banner).group(1))
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == server.process.pid:  # the parent pid
            children.append(int(stat.parent.name))
    servers = [pid for pid in children if f":{port}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(servers) == 1, (children, servers)
    return servers[0]


def gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def run_serve(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A `fewshot serve` expected to fail at start-up."""
    return subprocess.run(
        [sys.executable, "-m", "fewshot_common.cli", "serve", "--host", "127.0.0.1", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if not k.startswith(("FEWSHOT_", "REDIS_URL"))},
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_server_and_its_managed_redis(
    serve_process, tiny_model_path: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    server = serve_process(["--model", tiny_model_path, "--data-dir", tmp_path / "data"]).wait_ready()
    redis_pid = managed_redis_pid(server)
    assert httpx.get(f"{server.http_url}/readyz").json()["ready"] is True
    assert server.stop(sig) == 0, server.output()
    assert gone(redis_pid), "the managed Redis outlived fewshot serve"
    assert f"{sig.name}, shutting down" in server.stdout_tail


def test_default_model_is_models_default_onnx_in_the_working_directory(
    serve_process, tiny_model_path: Path, tmp_path: Path
) -> None:
    (tmp_path / "models").mkdir()
    shutil.copy(tiny_model_path, tmp_path / "models" / "default.onnx")
    server = serve_process([], cwd=tmp_path).wait_ready()
    assert "vit_test_p8_32-" in server.banner
    # The banner says what runs the model: the fp32 file (it has no variants) on ONNX Runtime.
    assert "(precision fp32, engine onnxruntime CPUExecutionProvider)" in server.banner
    ready = httpx.get(f"{server.http_url}/readyz").json()
    assert ready["model_id"].startswith("vit_test_p8_32-")
    # The default data dir is ./.fewshot, with the append-only file under it.
    assert (tmp_path / ".fewshot" / "redis").is_dir()


def test_settings_come_from_the_environment(
    serve_process, tiny_model_path: Path, redis_url: str, tmp_path: Path
) -> None:
    env = {
        "FEWSHOT_MODEL": str(tiny_model_path),
        "REDIS_URL": redis_url,
        "FEWSHOT_REDIS_KEY_PREFIX": "fromenv",
        "FEWSHOT_MAX_IMAGES": "1",
    }
    server = serve_process([], env=env, cwd=tmp_path).wait_ready()
    assert f"Redis {redacted_url(redis_url)}" in server.banner  # no private server was started
    png = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (20, 20), (200, 10, 10)).save(png)
    one = [("files", ("x.png", png.read_bytes(), "image/png"))]
    assert httpx.post(f"{server.http_url}/v1/classes/red/examples", files=one).status_code == 201
    assert httpx.post(f"{server.http_url}/v1/classes/red/examples", files=one * 2).status_code == 413
    registry = Registry(redis.Redis.from_url(redis_url), key_prefix="fromenv")
    assert [c.label for c in registry.list_classes("default")] == ["red"]


def test_a_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    result = run_serve("--model", str(tmp_path / "nope.onnx"), "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert "model file not found" in result.stderr and "nope.onnx" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_settings_are_refused_before_anything_starts(tmp_path: Path) -> None:
    result = run_serve("--grpc-port", "70000", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "invalid settings" in result.stderr and "grpc_port" in result.stderr
    assert not (tmp_path / "redis").exists()


def test_a_taken_http_port_fails_cleanly_and_leaves_no_redis_behind(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve(
            "--model",
            str(tiny_model_path),
            "--data-dir",
            str(tmp_path),
            "--grpc-port",
            "0",
            "--http-port",
            str(port),
        )
    assert result.returncode == 1
    assert f"cannot listen for HTTP on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
    # Valkey prefixes each log line with its pid: that process must be gone.
    log = (tmp_path / "redis" / ManagedRedis(tmp_path).log_path.name).read_text()
    redis_pid = int(log.strip().splitlines()[0].split(":", 1)[0])
    assert gone(redis_pid)


def test_flags_win_over_the_environment_which_wins_over_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.setenv("FEWSHOT_HTTP_PORT", "8123")
    monkeypatch.setenv("FEWSHOT_GRPC_PORT", "50123")
    monkeypatch.setenv("REDIS_URL", "redis://from-env:6379/0")
    monkeypatch.setenv("FEWSHOT_PROVIDERS", "CUDAExecutionProvider, CPUExecutionProvider")
    settings = settings_from_args(parser.parse_args(["--http-port", "9000", "--model", "m.onnx"]))
    assert settings.http_port == 9000  # flag over environment
    assert settings.grpc_port == 50123  # environment over default
    assert settings.redis_url == "redis://from-env:6379/0"
    assert settings.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert str(settings.model) == "m.onnx" and settings.max_images == 64  # default
    monkeypatch.delenv("REDIS_URL")
    assert settings_from_args(parser.parse_args([])).redis_url is None  # none: a managed Redis


@pytest.mark.slow
def test_a_second_server_on_the_same_data_dir_refuses_to_start_until_the_first_is_gone(
    serve_process, tiny_model_path: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    first = serve_process(["--model", tiny_model_path, "--data-dir", data]).wait_ready()
    png = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (20, 20), (200, 10, 10)).save(png)
    one = [("files", ("x.png", png.read_bytes(), "image/png"))]
    assert httpx.post(f"{first.http_url}/v1/classes/red/examples", files=one).status_code == 201

    second = run_serve(
        "--model", str(tiny_model_path), "--data-dir", str(data), "--grpc-port", "0", "--http-port", "0"
    )
    assert second.returncode == 1
    assert f"{(data / 'redis').resolve()} is in use by process {first.process.pid}" in second.stderr

    first.stop(signal.SIGKILL)  # no clean shutdown: the kernel releases the lock
    third = serve_process(["--model", tiny_model_path, "--data-dir", data]).wait_ready()
    # Its Redis flushed on the way out: the new server has the first one's class.
    assert [c["label"] for c in httpx.get(f"{third.http_url}/v1/classes").json()["classes"]] == ["red"]


def test_every_setting_is_a_flag_generated_from_its_field(monkeypatch: pytest.MonkeyPatch) -> None:
    from fewshot_service.settings import Settings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {option for action in parser._actions for option in action.option_strings}
    for field in Settings.model_fields:
        assert "--" + field.replace("_", "-") in flags, field
    # The flags older releases had keep their names.
    assert {
        "--grpc-port",
        "--http-port",
        "--host",
        "--model",
        "--redis-url",
        "--data-dir",
        "--providers",
        "--max-batch-size",
        "--max-images",
        "--max-image-bytes",
        "--log-level",
        "--no-batching",
    } <= flags
    help_text = " ".join(parser.format_help().split())
    assert "env FEWSHOT_MAX_REQUEST_BYTES; default 67108864" in help_text
    assert "env FEWSHOT_MAX_BATCH_SIZE)" in help_text and "on a CPU, 8" in help_text
    assert "env REDIS_URL or FEWSHOT_REDIS_URL" in help_text

    monkeypatch.setenv("FEWSHOT_BATCHING", "false")
    monkeypatch.setenv("FEWSHOT_MAX_QUEUE_DELAY_MS", "7.5")
    assert settings_from_args(parser.parse_args([])).batching is False  # environment
    args = parser.parse_args(
        [
            "--batching",
            "--max-queue-delay-ms",
            "1.5",
            "--batch-workers",
            "3",
            "--intra-op-threads",
            "2",
            "--redis-key-prefix",
            "p",
            "--log-level",
            "debug",
        ]
    )
    settings = settings_from_args(args)
    assert settings.batching is True and settings.max_queue_delay_ms == 1.5  # flags over environment
    assert (settings.batch_workers, settings.intra_op_threads, settings.redis_key_prefix) == (3, 2, "p")
    assert settings.log_level == "debug"
    assert settings_from_args(parser.parse_args(["--no-batching"])).batching is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-level", "loud"])


def test_invalid_flag_values_are_refused_before_starting(tiny_model_path: Path) -> None:
    result = run_serve("--model", str(tiny_model_path), "--batch-workers", "0")
    assert result.returncode == 2
    assert "batch_workers" in result.stderr
