"""The packages' import rules, read from the source (ast), so no import can sneak in:

- ``fewshot_trainer`` and ``fewshot_service`` never import each other;
- ``fewshot_common`` imports neither (both depend on it, never the reverse);
- ``fewshot_api`` (generated gRPC code, typed errors) imports no project package, and
  ``fewshot_client`` only ``fewshot_api``: the two are the small client distribution
  (``service/client/``), which must install and run without the rest; only the
  ``fewshot_service.client`` re-export imports the client on the server's side;
- what ``fewshot serve`` and ``fewshot eval`` load never imports torch (the serving install has none);
- inside ``fewshot_service``, the groups stack without a circle: ``classify`` imports nothing from
  ``registry``, ``core`` or ``transport``; ``registry`` nothing from ``core`` or ``transport``;
  ``core`` nothing from ``transport``; and no module import cycle anywhere in the package
  (``tools/import_layers.py`` prints the floors).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIENT_DIST = ROOT / "service" / "client"
PACKAGE_DIRS = {
    "fewshot_api": CLIENT_DIST / "fewshot_api",
    "fewshot_client": CLIENT_DIST / "fewshot_client",
    "fewshot_common": ROOT / "service" / "fewshot_common",
    "fewshot_service": ROOT / "service" / "fewshot_service",
    "fewshot_trainer": ROOT / "trainer" / "fewshot_trainer",
}
FORBIDDEN = {
    "fewshot_api": {"fewshot_client", "fewshot_common", "fewshot_service", "fewshot_trainer"},
    "fewshot_client": {"fewshot_common", "fewshot_service", "fewshot_trainer"},
    "fewshot_common": {"fewshot_client", "fewshot_service", "fewshot_trainer"},
    "fewshot_service": {"fewshot_client", "fewshot_trainer"},
    "fewshot_trainer": {"fewshot_client", "fewshot_service"},
}
# The one module allowed past FORBIDDEN: the old import path of the client, a re-export.
CLIENT_REEXPORT = "fewshot_service.client"
TORCH_FAMILY = {"torch", "torchvision", "timm", "onnxscript"}
# onnx (the protobuf schema, no torch) is a serving dependency since the int8 top-k scan builds its
# graph in the server (fewshot_service/classify/int8_scan.py); only that module may import it, and the
# execution-provider probe, which builds a one-node graph for a provider to start on (providers.py).
ONNX_BUILDERS = {"fewshot_service.classify.int8_scan", "fewshot_common.providers"}
TORCH_FREE_COMMANDS = ("fewshot_service.cli.serve", "fewshot_common.eval_cli")


def _module_name(path: Path) -> str:
    for package, folder in PACKAGE_DIRS.items():
        if path.is_relative_to(folder):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            return ".".join((package, *parts))
    raise ValueError(path)


def _load_import_layers():
    """tools/import_layers.py, the layering report: its import scanner is the one this test uses."""
    spec = importlib.util.spec_from_file_location("import_layers", ROOT / "tools" / "import_layers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_imports_of = _load_import_layers().imports_of


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth (function-level included;
    ``from pkg import sub`` counts ``pkg.sub``: a submodule it may import, a name is harmless extra)."""
    return _imports_of(path, _module_name(path))


MODULES = {
    _module_name(path): path for folder in PACKAGE_DIRS.values() for path in sorted(folder.rglob("*.py"))
}


def test_every_package_has_modules() -> None:
    found = {name.split(".")[0] for name in MODULES}
    assert found == set(PACKAGE_DIRS) and len(MODULES) > 30


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_package_it_must_not(module: str) -> None:
    forbidden = FORBIDDEN[module.split(".")[0]] - ({"fewshot_client"} if module == CLIENT_REEXPORT else set())
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
    onnx_users = {m for m, external in closure.items() if any(i.split(".")[0] == "onnx" for i in external)}
    assert onnx_users <= ONNX_BUILDERS, onnx_users


def test_the_checker_sees_relative_and_nested_imports() -> None:
    # The rule is only as good as the parser: a function-level relative import must be seen.
    path = PACKAGE_DIRS["fewshot_trainer"] / "train.py"
    imports = _imports(path)
    assert "fewshot_trainer.probe" in imports  # `from .probe import ...` inside a method
    assert "torch" in imports


# Import name -> distribution, for what the client distribution may import beyond the stdlib.
CLIENT_DEPENDENCIES = {"grpc": "grpcio", "google": "protobuf", "httpx": "httpx", "numpy": "numpy"}


def _requirement_names(requirements: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!~\[ ;]", requirement)[0] for requirement in requirements}


def _client_pyproject() -> dict:
    import tomllib

    return tomllib.loads((CLIENT_DIST / "pyproject.toml").read_text())


@pytest.mark.parametrize(
    "start", ["fewshot_client", "fewshot_api.fewshot.v1.fewshot_pb2_grpc", "fewshot_api.errors"]
)
def test_the_client_distribution_needs_only_its_own_dependencies(start: str) -> None:
    import sys

    closure = _project_closure(start)
    if start == "fewshot_client":
        assert {"fewshot_client.client", "fewshot_api.errors", "fewshot_api.fewshot.v1.fewshot_pb2"} <= set(
            closure
        )
    outside = sorted(m for m in closure if m.split(".")[0] not in ("fewshot_client", "fewshot_api"))
    assert not outside, f"{start} reaches {outside}, which the client distribution does not ship"
    external = {name.split(".")[0] for imports in closure.values() for name in imports} - {""}
    beyond = sorted(external - set(CLIENT_DEPENDENCIES) - set(sys.stdlib_module_names) - {"__future__"})
    assert not beyond, f"{start} imports {beyond}, which the client distribution does not install"


def test_the_client_distribution_declares_exactly_those_dependencies_and_packages() -> None:
    import tomllib

    project = _client_pyproject()["project"]
    assert _requirement_names(project["dependencies"]) == set(CLIENT_DEPENDENCIES.values())
    # The main pyproject's `client` extra is the same list (the client inside the server install).
    main = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert main["project"]["optional-dependencies"]["client"] == project["dependencies"]
    # ... and both distributions ship fewshot_client and fewshot_api from the same folder (one copy),
    # found as setuptools finds them for each build.
    from setuptools import find_namespace_packages

    def top_level(folder: Path, find: dict) -> dict[str, Path]:
        found = {}
        for where in find.get("where", ["."]):
            for package in find_namespace_packages(folder / where, include=find["include"]):
                found.setdefault(package.split(".")[0], folder / where)
        return found

    client_find = _client_pyproject()["tool"]["setuptools"]["packages"]["find"]
    shipped_alone = top_level(CLIENT_DIST, client_find)
    assert shipped_alone == {"fewshot_client": CLIENT_DIST, "fewshot_api": CLIENT_DIST}
    shipped_with_server = top_level(ROOT, main["tool"]["setuptools"]["packages"]["find"])
    assert shipped_with_server == {package: folder.parent for package, folder in PACKAGE_DIRS.items()}


def test_the_server_imports_the_shared_api_package_and_never_the_client() -> None:
    closure = _project_closure("fewshot_service.cli.serve")
    assert "fewshot_api.fewshot.v1.fewshot_pb2_grpc" in closure and "fewshot_api.errors" in closure
    assert not [m for m in closure if m.startswith("fewshot_client")]


# fewshot_service's groups: what each must not import (the floors, bottom up: classify, registry,
# core, transport; app and cli on top).
GROUP_FORBIDDEN = {
    "fewshot_service.classify": {
        "fewshot_service.registry",
        "fewshot_service.core",
        "fewshot_service.transport",
        "fewshot_service.app",
        "fewshot_service.cli",
        "fewshot_service.settings",
    },
    "fewshot_service.registry": {
        "fewshot_service.core",
        "fewshot_service.transport",
        "fewshot_service.app",
        "fewshot_service.cli",
        "fewshot_service.settings",
    },
    "fewshot_service.core": {"fewshot_service.transport", "fewshot_service.app", "fewshot_service.cli"},
    "fewshot_service.transport": {"fewshot_service.app", "fewshot_service.cli"},
    "fewshot_service.names": {"fewshot_service"},  # a leaf: checked without loading anything of ours
}


def _group(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _group(m) in GROUP_FORBIDDEN))
def test_no_service_group_imports_a_group_above_it(module: str) -> None:
    forbidden = GROUP_FORBIDDEN[_group(module)]
    bad = sorted(
        name
        for name in _imports(MODULES[module])
        if any(_is_under(name, f) for f in forbidden) and not _is_under(name, _group(module))
    )
    assert not bad, f"{module} imports {bad}"


def test_the_groups_exist() -> None:
    # A renamed group would make the rule above vacuous.
    groups = {_group(m) for m in MODULES if m.startswith("fewshot_service.")}
    assert set(GROUP_FORBIDDEN) <= groups


def _service_graph() -> dict[str, set[str]]:
    service = {m for m in MODULES if _is_under(m, "fewshot_service")}
    return {m: {i for i in _imports(MODULES[m]) if i in service and i != m} for m in service}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (a path back to its start), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return []


def test_the_service_has_no_import_cycle() -> None:
    # TYPE_CHECKING and function-level imports count: they are arrows a reader follows too.
    assert not (cycle := _cycle(_service_graph())), " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_keygen_loads_neither_the_core_nor_onnx_runtime() -> None:
    closure = _project_closure("fewshot_service.cli.keygen")
    assert "fewshot_service.names" in closure
    assert not [m for m in closure if _is_under(m, "fewshot_service.core")]
    external = {name.split(".")[0] for imports in closure.values() for name in imports}
    assert not external & {"onnxruntime", "openvino", "onnx"}
