"""examples/quickstart.py runs end to end against a live `fewshot serve`, with the stdlib only."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from conftest import REPO_ROOT

QUICKSTART = REPO_ROOT / "examples" / "quickstart.py"


def load_quickstart() -> ModuleType:
    """The script as a module, for its image generators and REST client (it is no package)."""
    spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_script_adds_five_shots_and_classifies(serve_process, tmp_path: Path) -> None:
    server = serve_process(
        ["--model", REPO_ROOT / "models" / "default.onnx", "--data-dir", tmp_path / "data"]
    )
    server.wait_ready()
    # -I: isolated mode, so the script cannot lean on this project's packages or PYTHONPATH.
    run = subprocess.run(
        [sys.executable, "-I", str(QUICKSTART), "--url", server.http_url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "model vit_tiny_d6_p8_64-cfc47f764064" in lines[0]
    assert "class 'red discs': 5 examples" in lines and "class 'blue stripes': 5 examples" in lines
    # Each query's line names the server's answer: "unknown" where /v1/classify flags the image
    # (its top-level "unknown" list), else the top class; the ranking shows the nearest classes.
    quickstart = load_quickstart()
    queries = [
        ("new red discs", quickstart.red_discs(7)),
        ("new blue stripes", quickstart.blue_stripes(9)),
        ("grey noise (neither)", quickstart.grey_noise(3)),
    ]
    answer = quickstart.Api(server.http_url, None, "quickstart").call(
        "POST", "/v1/classify", files=queries, top_k=3
    )
    assert answer["unknown"][2] is True, answer  # the noise matches neither class
    for (name, _), predictions, unknown, nearest in zip(
        queries, answer["results"], answer["unknown"], ["red discs", "blue stripes", None]
    ):
        shown = "unknown" if unknown else predictions[0]["label"]
        line = next(line for line in lines if line.startswith(f"{name}: "))
        assert line.startswith(f"{name}: {shown}  ("), run.stdout
        if nearest:
            assert line.split("  (", 1)[1].startswith(f"{nearest} "), run.stdout
    assert "grey noise (neither): unknown  (" in run.stdout
    # Run twice: the script starts its classes afresh instead of piling up examples.
    again = subprocess.run(
        [sys.executable, "-I", str(QUICKSTART), "--url", server.http_url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0 and "class 'red discs': 5 examples" in again.stdout.splitlines()
