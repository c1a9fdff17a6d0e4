"""``fewshot --version`` names the release, the one packaging reads from ``fewshot_common``."""

from __future__ import annotations

import re
import subprocess
import sys

import fewshot_common

from conftest import REPO_ROOT


def test_version_flag_prints_the_package_version_and_exits_0() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fewshot_common.cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"fewshot {fewshot_common.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", fewshot_common.__version__)
    # pyproject.toml takes its version from there rather than stating a second one.
    assert 'attr = "fewshot_common.__version__"' in (REPO_ROOT / "pyproject.toml").read_text()
