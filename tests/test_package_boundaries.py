"""The three packages' import rules, read from the source (ast), so no import can sneak in:

- ``fewshot_trainer`` and ``fewshot_service`` never import each other;
- ``fewshot_common`` imports neither (both depend on it, never the reverse);
- what ``fewshot serve`` and ``fewshot eval`` load never imports torch (the serving install has none).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {
    "fewshot_common": ROOT / "service" / "fewshot_common",
    "fewshot_service": ROOT / "service" / "fewshot_service",
    "fewshot_trainer": ROOT / "trainer" / "fewshot_trainer",
}
FORBIDDEN = {
    "fewshot_common": {"fewshot_service", "fewshot_trainer"},
    "fewshot_service": {"fewshot_trainer"},
    "fewshot_trainer": {"fewshot_service"},
}
TORCH_FAMILY = {"torch", "torchvision", "timm", "onnx", "onnxscript"}
TORCH_FREE_COMMANDS = ("fewshot_service.serve_cli", "fewshot_common.eval_cli")


def _module_name(path: Path) -> str:
    for package, folder in PACKAGE_DIRS.items():
        if path.is_relative_to(folder):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            return ".".join((package, *parts))
    raise ValueError(path)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth (function-level included)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            # `from pkg import sub` may import a submodule: count it, a name is harmless extra.
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


MODULES = {
    _module_name(path): path
    for folder in PACKAGE_DIRS.values()
    for path in sorted(folder.rglob("*.py"))
}


def test_every_package_has_modules() -> None:
    found = {name.split(".")[0] for name in MODULES}
    assert found == set(PACKAGE_DIRS) and len(MODULES) > 30


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_package_it_must_not(module: str) -> None:
    forbidden = FORBIDDEN[module.split(".")[0]]
    bad = sorted(name for name in _imports(MODULES[module]) if name.split(".")[0] in forbidden)
    assert not bad, f"{module} imports {bad}"


def _project_closure(start: str) -> dict[str, set[str]]:
    """Every project module reachable by imports from ``start``, with its external imports."""
    seen: dict[str, set[str]] = {}
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in MODULES:
            continue
        imports = _imports(MODULES[name])
        seen[name] = {i for i in imports if i.split(".")[0] not in PACKAGE_DIRS}
        # Importing a.b.c runs a/__init__ and a/b/__init__ too.
        for imported in imports:
            parts = imported.split(".")
            todo += [".".join(parts[:n]) for n in range(1, len(parts) + 1)]
    return seen


@pytest.mark.parametrize("command_module", TORCH_FREE_COMMANDS)
def test_serve_and_eval_never_import_torch(command_module: str) -> None:
    closure = _project_closure(command_module)
    assert command_module in closure and "fewshot_common.embedder" in closure
    offenders = {
        module: sorted(i for i in external if i.split(".")[0] in TORCH_FAMILY)
        for module, external in closure.items()
    }
    assert not {m: i for m, i in offenders.items() if i}, offenders


def test_the_checker_sees_relative_and_nested_imports() -> None:
    # The rule is only as good as the parser: a function-level relative import must be seen.
    path = PACKAGE_DIRS["fewshot_trainer"] / "train.py"
    imports = _imports(path)
    assert "fewshot_trainer.probe" in imports  # `from .probe import ...` inside a method
    assert "torch" in imports


# What `pip install 'fewshot[client]'` installs (pyproject's `client` extra), plus the stdlib.
CLIENT_DEPENDENCIES = {"grpc", "google", "httpx", "numpy"}


def test_the_client_needs_only_its_own_dependencies() -> None:
    import sys

    closure = _project_closure("fewshot_service.client")
    assert "fewshot_service.client.fewshot_client" in closure and "fewshot_common.errors" in closure
    project = sorted(m for m in closure if m.startswith("fewshot_service.") and
                     not m.startswith(("fewshot_service.client", "fewshot_service._proto")))  # fmt: skip
    assert not project, f"the client imports server modules: {project}"
    external = {name.split(".")[0] for imports in closure.values() for name in imports} - {""}
    beyond = sorted(external - CLIENT_DEPENDENCIES - set(sys.stdlib_module_names) - {"__future__"})
    assert not beyond, f"the client imports {beyond}, which the client extra does not install"


def test_the_client_extra_lists_exactly_the_client_dependencies() -> None:
    import re
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["client"]
    names = {re.split(r"[<>=!~\[ ]", requirement)[0] for requirement in extra}
    assert names == {"grpcio", "protobuf", "httpx", "numpy"}
