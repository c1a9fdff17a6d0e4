"""The Dockerfile's images, built and run (issue 34): the cpu image serves REST and gRPC and stops
on SIGTERM; docker-compose.yml's default profile comes up and serves; the gpu image has one ONNX
Runtime with its CUDA provider's libraries loadable, and without a GPU says so and falls back
(or refuses, when CUDA is asked for by name).

Podman builds and runs them (tests/container_engine.py: the bases, the host's PyPI access, the
engine settings). `make test` installs podman where it can (root with apt-get); where it cannot,
these tests skip and say why.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import REPO_ROOT
from container_engine import PYTHON_BASE, VALKEY_BASE, Podman, free_port

pytestmark = pytest.mark.slow

ENGINE = Podman.find()
if ENGINE is None:
    pytest.skip(
        "no container engine: needs podman, runc, tini and mmdebstrap "
        "(`make install-containers` as root, or apt-get install podman buildah runc tini mmdebstrap)",
        allow_module_level=True,
    )

# Per test run, so two runs on one machine never use each other's images or compose project.
RUN_ID = f"{os.getpid()}"
CPU_TAG = f"localhost/fewshot-ci:cpu-{RUN_ID}"
GPU_TAG = f"localhost/fewshot-ci:gpu-{RUN_ID}"
PROJECT = f"fewshot-ci-{RUN_ID}"
PINNED = dict(
    line.split("==")
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines()
    if line and not line.startswith("#")
)


def load_quickstart():
    from test_quickstart import load_quickstart as load

    return load()


@pytest.fixture(scope="module")
def podman() -> Podman:
    assert ENGINE is not None
    for recipe in (PYTHON_BASE, VALKEY_BASE):
        print(f"{recipe.image}: {ENGINE.ensure_base(recipe)}")
    return ENGINE


def keep_as_latest(podman: Podman, tag: str) -> None:
    """The run's tag becomes the target's stable one: the latest image and its layers (the next
    run's build cache) stay tagged, so `podman image prune` removes only older builds."""
    podman.run("tag", tag, tag.rsplit("-", 1)[0], check=False)
    podman.run("untag", tag, tag, check=False)  # only this name: without one, untag drops them all


@pytest.fixture(scope="module")
def cpu_image(podman: Podman) -> Iterator[str]:
    seconds = podman.build("cpu", CPU_TAG, REPO_ROOT)
    print(f"cpu image: built in {seconds:.0f} s, {podman.size_mb(CPU_TAG):.0f} MB")
    yield CPU_TAG
    keep_as_latest(podman, CPU_TAG)


@pytest.fixture(scope="module")
def gpu_image(podman: Podman) -> Iterator[str]:
    seconds = podman.build("gpu", GPU_TAG, REPO_ROOT, timeout=3600)
    print(f"gpu image: built in {seconds:.0f} s, {podman.size_mb(GPU_TAG):.0f} MB")
    yield GPU_TAG
    keep_as_latest(podman, GPU_TAG)


class Container:
    """One `podman run -d` of an image, its ports published on loopback; removed afterwards."""

    def __init__(self, podman: Podman, image: str, *env: str) -> None:
        self.podman = podman
        self.http_port, self.grpc_port = free_port(), free_port()
        settings = [arg for pair in (("--env", item) for item in env) for arg in pair]
        self.id = podman.run(
            "run",
            "--detach",
            "--publish",
            f"127.0.0.1:{self.http_port}:8000",
            "--publish",
            f"127.0.0.1:{self.grpc_port}:50051",
            "--env",
            "FEWSHOT_ALLOW_UNAUTHENTICATED=true",
            *settings,
            image,
        ).stdout.strip()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def logs(self) -> str:
        result = self.podman.run("logs", self.id, check=False)
        return result.stdout + result.stderr

    def state(self) -> dict:
        return json.loads(self.podman.run("inspect", "--format", "{{json .State}}", self.id).stdout)

    def remove(self) -> None:
        self.podman.run("rm", "--force", "--volumes", self.id, check=False)


@pytest.fixture
def run_container(podman: Podman) -> Iterator:
    started: list[Container] = []

    def start(image: str, *env: str) -> Container:
        started.append(Container(podman, image, *env))
        return started[-1]

    yield start
    for container in started:
        container.remove()


def add_and_classify(http_url: str, grpc_target: str) -> None:
    """examples/quickstart.py's two classes added over REST, and an image classified over REST
    (by the script) and over gRPC (by fewshot_client)."""
    from fewshot_client import FewShotClient

    run = subprocess.run(
        [sys.executable, "-I", str(REPO_ROOT / "examples" / "quickstart.py"), "--url", http_url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "class 'red discs': 5 examples" in run.stdout and "new blue stripes: blue stripes  (" in run.stdout
    quickstart = load_quickstart()
    with FewShotClient(grpc_target) as client:
        [result] = client.classify([quickstart.blue_stripes(11)], namespace="quickstart")
    assert result.predictions[0].label == "blue stripes", result


def test_the_cpu_image_serves_rest_and_grpc_and_stops_cleanly_on_sigterm(
    podman: Podman, cpu_image: str, run_container
) -> None:
    checks = podman.run(
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        cpu_image,
        "-c",
        "pip check && python -c 'import onnxruntime; print(onnxruntime.__version__)'",
    )
    assert "No broken requirements" in checks.stdout and PINNED["onnxruntime"] in checks.stdout
    started = time.monotonic()
    server = run_container(cpu_image)
    podman.wait_ready(server.url, server.id)
    print(f"cpu container ready in {time.monotonic() - started:.1f} s")
    # The image's HEALTHCHECK (kept by --format docker) asks /readyz.
    assert podman.run("healthcheck", "run", server.id, check=False).returncode == 0, server.logs()
    add_and_classify(server.url, f"127.0.0.1:{server.grpc_port}")
    started = time.monotonic()
    podman.run("stop", "--time", "30", server.id, timeout=60)
    stopped = time.monotonic() - started
    print(f"cpu container stopped by SIGTERM in {stopped:.1f} s")
    assert server.state()["ExitCode"] == 0, server.logs()
    assert stopped < 25 and "SIGTERM, shutting down" in server.logs()


def test_compose_default_profile_comes_up_and_serves_without_the_gpu_service(
    podman: Podman, cpu_image: str
) -> None:
    compose = [str(Path(sys.executable).with_name("podman-compose")), "--project-name", PROJECT]
    ports = {"FEWSHOT_HTTP_PORT": free_port(), "FEWSHOT_GRPC_PORT": free_port()}
    env = {**podman.env, **{name: str(port) for name, port in ports.items()}}
    podman.run("tag", cpu_image, "localhost/fewshot:cpu")  # compose's image name, so it builds nothing

    def compose_run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*compose, *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
        )

    up = compose_run("up", "--detach", "--no-build")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        names = podman.run(
            "ps", "--filter", f"label=io.podman.compose.project={PROJECT}", "--format", "{{.Names}}"
        ).stdout.split()
        assert sorted(name.removeprefix(f"{PROJECT}_").rsplit("_", 1)[0] for name in names) == [
            "fewshot",
            "redis",
        ]
        http_url = f"http://127.0.0.1:{ports['FEWSHOT_HTTP_PORT']}"
        podman.wait_ready(http_url, next(name for name in names if "_fewshot_" in name))
        assert httpx.get(http_url + "/readyz").json()["redis"] is True
        add_and_classify(http_url, f"127.0.0.1:{ports['FEWSHOT_GRPC_PORT']}")
    finally:
        volumes = [
            mount["Name"]
            for name in podman.run(
                "ps",
                "--all",
                "--filter",
                f"label=io.podman.compose.project={PROJECT}",
                "--format",
                "{{.ID}}",
                check=False,
            ).stdout.split()
            for mount in json.loads(
                podman.run("inspect", "--format", "{{json .Mounts}}", name, check=False).stdout or "[]"
            )
            if mount.get("Type") == "volume"
        ]
        down = compose_run("down", "--volumes")
        for volume in volumes:  # the image's anonymous /data volume too, which `down -v` leaves
            podman.run("volume", "rm", "--force", volume, check=False)
    assert down.returncode == 0, down.stderr


GPU_CHECK = r"""
import json, onnxruntime as ort
from fewshot_common.providers import preload_gpu_libraries, why_unusable
preloaded = preload_gpu_libraries()
maps = open("/proc/self/maps").read()
libraries = sorted({line.rsplit("/", 1)[-1].split(".so")[0] for line in maps.splitlines()
                    if "/site-packages/nvidia/" in line and ".so" in line})
print(json.dumps({"version": ort.__version__, "available": ort.get_available_providers(),
                  "preloaded": preloaded, "libraries": libraries,
                  "cuda": why_unusable("CUDAExecutionProvider")}))
"""


def test_the_gpu_image_loads_cuda_and_without_a_gpu_falls_back_or_refuses_clearly(
    podman: Podman, gpu_image: str, run_container
) -> None:
    checks = podman.run("run", "--rm", "--entrypoint", "pip", gpu_image, "check")
    assert "No broken requirements" in checks.stdout
    found = json.loads(podman.run("run", "--rm", "--entrypoint", "python", gpu_image, "-c", GPU_CHECK).stdout)
    assert found["version"] == PINNED["onnxruntime-gpu"] == PINNED["onnxruntime"]
    assert "CUDAExecutionProvider" in found["available"] and found["preloaded"] is True
    # NVIDIA's wheels: the CUDA runtime, cuBLAS and cuDNN are loaded, from site-packages.
    for library in ("libcudart", "libcublas", "libcublasLt", "libcudnn"):
        assert library in found["libraries"], found["libraries"]
    # With its libraries loaded, what stops CUDA here is the missing GPU (its driver), nothing else.
    reason = found["cuda"]
    assert reason is not None and re.search(r"libcuda\.so|driver|CUDA-capable device", reason), reason
    assert not re.search(r"libcu(blas|dnn|fft|rand)|libcudart", reason), reason
    print(f"gpu image, no GPU: CUDA provider: {reason}")

    auto = run_container(gpu_image)
    podman.wait_ready(auto.url, auto.id, timeout=120)
    logs = auto.logs()
    assert re.search(r"CUDAExecutionProvider cannot start \(.+\); serving on CPUExecutionProvider", logs), (
        logs
    )
    assert "fewshot serve: model" in logs  # and it serves, on the CPU

    named = run_container(gpu_image, "FEWSHOT_PROVIDERS=cuda")
    deadline = time.monotonic() + 90
    while named.state()["Status"] not in ("exited", "stopped") and time.monotonic() < deadline:
        time.sleep(0.5)
    logs = named.logs()
    assert named.state()["ExitCode"] == 1, logs
    assert "fewshot serve: --providers asks for CUDAExecutionProvider, which cannot start here" in logs
    assert "Traceback" not in logs
