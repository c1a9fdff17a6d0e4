"""examples/quickstart.py runs end to end against a live `fewshot serve`, with the stdlib only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT


def test_quickstart_script_adds_five_shots_and_classifies(serve_process, tmp_path: Path) -> None:
    server = serve_process(["--model", REPO_ROOT / "models" / "default.onnx", "--data-dir", tmp_path / "data"])
    server.wait_ready()
    # -I: isolated mode, so the script cannot lean on this project's packages or PYTHONPATH.
    run = subprocess.run(
        [sys.executable, "-I", str(REPO_ROOT / "examples" / "quickstart.py"), "--url", server.http_url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "model vit_tiny_d6_p8_64-cfc47f764064" in lines[0]
    assert "class 'red discs': 5 examples" in lines and "class 'blue stripes': 5 examples" in lines
    assert any(line.startswith("new red discs: red discs ") for line in lines), run.stdout
    assert any(line.startswith("new blue stripes: blue stripes ") for line in lines), run.stdout
    # Run twice: the script starts its classes afresh instead of piling up examples.
    again = subprocess.run(
        [sys.executable, "-I", str(REPO_ROOT / "examples" / "quickstart.py"), "--url", server.http_url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 0 and "class 'red discs': 5 examples" in again.stdout.splitlines()
