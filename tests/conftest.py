"""Shared fixtures. Real parts only: a private Redis server, a real exported ONNX model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from fewshot_service.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "tiny-imagenet"
# Tiny ImageNet is not in the repository (non-commercial licence, 110 MB): tests that need it skip
# on a fresh clone and run on the team's machines and in CI, where the folder sits beside the repo.
SHARED_DATA_MISSING = (
    f"needs the Tiny ImageNet subsets at {SHARED_DATA} (pretrain/, fewshot-dev/), which are not in "
    "the repository: see 'Reproduce' in models/MODEL_CARD.md for how to get Tiny ImageNet"
)


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data/tiny-imagenet`` beside the repository; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(SHARED_DATA_MISSING)
    return SHARED_DATA


def stack_settings(model: Path, redis_url: str, **extra: object) -> Settings:
    """Server settings for an in-process :class:`ServerStack` on free loopback ports."""
    from fewshot_service.settings import Settings

    return Settings(model=model, redis_url=redis_url, host="127.0.0.1", grpc_port=0, http_port=0, **extra)


def _export_test_model(tmp_path_factory: pytest.TempPathFactory, name: str, seed: int) -> Path:
    """A real exported ONNX model: a randomly initialised ``vit_test_p8_32`` (seeded)."""
    import torch

    from fewshot_common.modelmeta import Preprocess
    from fewshot_trainer.export import export_onnx
    from fewshot_trainer.vit import build_vit, get_arch

    torch.manual_seed(seed)
    spec = get_arch("vit_test_p8_32")
    path = tmp_path_factory.mktemp("model") / f"{name}.onnx"
    export_onnx(build_vit(spec), spec, Preprocess(input_size=32, resize_size=36), path)
    return path


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test model, built once per run."""
    return _export_test_model(tmp_path_factory, "tiny", seed=0)


@pytest.fixture(scope="session")
def other_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture as ``tiny_model_path``, other weights: a different model id."""
    return _export_test_model(tmp_path_factory, "other", seed=1)


# --- Redis fixtures (registry/REST owner) ----------------------------------------------------------
# One private, non-persistent server per test run (never the shared 127.0.0.1:6379), emptied before
# each test that asks for it.


@pytest.fixture(scope="session")
def private_redis(tmp_path_factory: pytest.TempPathFactory):
    """A session-wide private Valkey/Redis server on a free loopback port."""
    from fewshot_service.registry.redis_server import ManagedRedis

    with ManagedRedis(tmp_path_factory.mktemp("redis"), persistent=False) as server:
        yield server


@pytest.fixture
def redis_url(private_redis) -> str:
    """URL of a clean database on the private server (flushing it is safe: nobody else uses it)."""
    import redis

    client = redis.Redis.from_url(private_redis.url)
    client.flushall()
    client.close()
    return private_redis.url


@pytest.fixture
def redis_client(redis_url: str):
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


class ServeProcess:
    """A ``fewshot serve`` subprocess on free loopback ports; ``stop()`` sends SIGTERM."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None, log_path: Path, cwd: Path | None = None
    ) -> None:
        import os
        import subprocess
        import sys

        self.log_path = log_path
        self._log = log_path.open("w")
        command = [
            sys.executable,
            "-m",
            "fewshot_common.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            *args,
        ]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            # Hermetic: the caller's own REDIS_URL / FEWSHOT_* settings must not leak in.
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith(("FEWSHOT_", "REDIS_URL"))},
                **(env or {}),
            },
            cwd=cwd,
        )
        self.banner = ""
        self.stdout_tail = ""
        self.grpc_port = self.http_port = 0

    def wait_ready(self, timeout: float = 60.0) -> ServeProcess:
        """Read stdout until the banner with the bound ports; fail with the log if it dies."""
        import re
        import select
        import time

        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.2)
            if ready:
                line = self.process.stdout.readline()
                if line.startswith("fewshot serve: model"):
                    self.banner = line
                    self.grpc_port = int(re.search(r"gRPC on [^ ]+:(\d+)", line).group(1))
                    self.http_port = int(re.search(r"HTTP on https?://[^ ]+:(\d+)", line).group(1))
                    return self
            if self.process.poll() is not None:
                break
        raise AssertionError(f"fewshot serve did not start: {self.output()}")

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def output(self) -> str:
        """What the process wrote to stderr (logs), and to stdout after its banner once stopped."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text() + self.stdout_tail

    def stop(self, sig: int | None = None) -> int:
        import signal
        import subprocess

        if self.process.poll() is None:
            self.process.send_signal(sig or signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None and not self.process.stdout.closed:
            self.stdout_tail += self.process.stdout.read()
            self.process.stdout.close()
        self._log.close()
        return self.process.returncode


@pytest.fixture
def serve_process(tmp_path: Path):
    """Factory: ``serve_process(["--model", path, ...], env={...}, cwd=...)`` -> a started
    ServeProcess (call ``.wait_ready()``). Every process it made is stopped after the test."""
    started: list[ServeProcess] = []

    def start(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> ServeProcess:
        log_path = tmp_path / f"serve-{len(started)}.log"
        process = ServeProcess([str(a) for a in args], env, log_path, cwd)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


# --- Redis Cluster fixtures (issue 16) -------------------------------------------------------------
# A real 3-master cluster (tests/redis_cluster.py), private to the test run and emptied per test.


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A session-wide private 3-master Redis Cluster on free loopback ports."""
    from redis_cluster import LocalCluster

    with LocalCluster(tmp_path_factory.mktemp("cluster"), masters=3) as cluster:
        yield cluster


@pytest.fixture
def cluster_url(redis_cluster) -> str:
    """URL of one node of the clean private cluster (every master flushed)."""
    from redis.cluster import RedisCluster

    client = RedisCluster.from_url(redis_cluster.url)
    client.flushall(target_nodes=RedisCluster.PRIMARIES)
    client.close()
    return redis_cluster.url


# --- test kinds: `pytest -m unit` is the developer's quick loop ------------------------------------
# Every test gets exactly one kind, from what it uses (the first that applies): ``browser`` (drives
# Chromium), ``live`` (starts a server: in-process ServerStack/gRPC server, or `fewshot serve`),
# ``redis`` (a real Redis, no server), ``unit`` (none of these). ``slow`` stays a separate marker.
_BROWSER_MODULE_NAMES = {"webdriver"}
_LIVE_MODULE_NAMES = {"ServerStack", "create_grpc_server", "ServeProcess", "serve_command"}
_LIVE_FIXTURES = {"serve_process"}
_REDIS_FIXTURES = {"private_redis", "redis_url", "redis_client", "redis_cluster", "cluster_url"}
TEST_KINDS = ("browser", "live", "redis", "unit")


def test_kind(item: pytest.Item) -> str:
    module_names = set(vars(item.module)) if getattr(item, "module", None) is not None else set()
    fixtures = set(getattr(item, "fixturenames", ()))
    if module_names & _BROWSER_MODULE_NAMES:
        return "browser"
    if module_names & _LIVE_MODULE_NAMES or fixtures & _LIVE_FIXTURES:
        return "live"
    if fixtures & _REDIS_FIXTURES:
        return "redis"
    return "unit"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(getattr(pytest.mark, test_kind(item)))
