"""The Makefile's entry points pass flags through (``ARGS``), and ``make keygen >> keys.toml``
writes nothing but the TOML entry. The serving venv is stood in for by one whose ``fewshot`` is
this test install's and whose install stamp is fresh, so make runs the real recipes, no pip."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fewshot_service.transport.access import AccessControl, Action

from conftest import REPO_ROOT


@pytest.fixture
def serve_venv(tmp_path: Path) -> Path:
    assert shutil.which("make"), "make is needed (README's entry points)"
    venv = tmp_path / "venv-serve"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "fewshot").symlink_to(Path(sys.executable).with_name("fewshot"))
    (venv / ".installed").touch()  # newer than every source: install-serve has nothing to do
    return venv


def make(target: str, venv: Path, args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", target, f"SERVE_VENV={venv}", f"ARGS={args}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,  # type: ignore[arg-type]
    )


def test_make_keygen_appends_a_valid_entry_and_nothing_else(serve_venv: Path, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.toml"
    done = make("keygen", serve_venv, "--name bot --role write --namespace team-a", check=True)
    keys_file.write_text(done.stdout)
    [entry] = tomllib.loads(keys_file.read_text())["keys"]  # stdout parses: no recipe echo, no prose
    assert entry["name"] == "bot" and entry["namespaces"] == ["team-a"]
    lines = done.stderr.splitlines()  # after make's own notes, if any
    key = lines[next(i for i, line in enumerate(lines) if line.startswith("API key")) + 1].strip()
    assert key not in done.stdout  # the key is on stderr only
    assert AccessControl(keys_file).check(key, Action.ADD, "team-a").name == "bot"


def test_make_serve_passes_its_flags_to_fewshot_serve(serve_venv: Path) -> None:
    # A flag that makes serve refuse before starting anything: its message proves it arrived.
    done = make("serve", serve_venv, "--host 0.0.0.0 --http-port 9000")
    assert done.returncode != 0
    assert "refusing to listen on 0.0.0.0" in done.stderr, done.stderr
