"""The serving image's requirements, read from pyproject.toml (the one list of them), for the
Dockerfile: installed before the code is copied, so that layer is rebuilt only when they change.

    python image_requirements.py cpu pyproject.toml            # prints the requirements
    python image_requirements.py gpu pyproject.toml            # onnxruntime -> onnxruntime-gpu[cuda,cudnn]
    python image_requirements.py gpu pyproject.toml --rewrite  # the same, into pyproject.toml

``--rewrite`` is for the GPU image's wheel: it then declares the runtime it runs on, and `pip
check` passes (onnxruntime and onnxruntime-gpu install the same package, so never both).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

CPU_RUNTIME = re.compile(r"^onnxruntime(?=[<>=!~;\s]|$)")
# NVIDIA's CUDA runtime and cuDNN wheels from PyPI (CUDA 13, cuDNN 9 for 1.31): no CUDA base image.
GPU_RUNTIME = "onnxruntime-gpu[cuda,cudnn]"


def requirements(pyproject: Path, target: str) -> list[str]:
    listed: list[str] = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    if target == "cpu":
        return listed
    swapped = [CPU_RUNTIME.sub(GPU_RUNTIME, line) for line in listed]
    if sum(line != new for line, new in zip(listed, swapped)) != 1:
        raise SystemExit(f"{pyproject}: expected exactly one onnxruntime requirement to swap")
    return swapped


def rewrite(pyproject: Path) -> None:
    """The same swap, in the file: only the dependency's quoted string changes."""
    text = pyproject.read_text()
    new, count = re.subn(r'"onnxruntime(?=[<>=!~;\s"])', f'"{GPU_RUNTIME}', text)
    if count != 1:
        raise SystemExit(f"{pyproject}: expected exactly one onnxruntime requirement to swap")
    pyproject.write_text(new)
    listed = requirements(pyproject, "cpu")
    assert not any(CPU_RUNTIME.match(line) for line in listed) and f"{GPU_RUNTIME}" in "".join(listed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=["cpu", "gpu"])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--rewrite", action="store_true", help="rewrite the file (gpu only)")
    args = parser.parse_args(argv)
    if args.rewrite:
        if args.target != "gpu":
            parser.error("--rewrite is for the gpu target")
        rewrite(args.pyproject)
    else:
        sys.stdout.write("".join(f"{line}\n" for line in requirements(args.pyproject, args.target)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
