"""Print the import graph of a package: its layers, the arrows that point back up, its cycles.

A development tool (not shipped). Reads the source with ``ast`` (function-level imports included),
so it sees what the boundary test sees. Usage::

    python tools/import_layers.py [--root service/fewshot_service] [--package fewshot_service] [--verbose]

Layers: a module's floor is 0 when it imports no project module, else one more than the highest floor
it imports (cycles are collapsed to one node first). A *back arrow* is an import from a module in a
listed group (sub-package) into a group that sits on a higher floor than it. Groups are the first name
under the package; top-level modules are each their own group.
"""

from __future__ import annotations

import argparse
import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path, folder: Path, package: str) -> str:
    parts = path.relative_to(folder).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join((package, *parts))


def imports_of(path: Path, module: str) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth."""
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
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


def graph(folder: Path, package: str) -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package's ``__init__`` counts as a module)."""
    modules = {module_name(p, folder, package): p for p in sorted(folder.rglob("*.py"))}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in imports_of(path, name):
            if imported in modules and imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; returns every component (singletons included)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    return [c for c in strongly_connected(edges) if len(c) > 1]


def layers(edges: dict[str, set[str]]) -> dict[str, int]:
    """Floor of every module; the members of a cycle share one floor."""
    component_of = {m: tuple(c) for c in strongly_connected(edges) for m in c}
    floor: dict[tuple[str, ...], int] = {}

    def level(component: tuple[str, ...]) -> int:
        if component not in floor:
            floor[component] = 0  # guards re-entry; Tarjan's components make this a DAG
            below = {component_of[t] for m in component for t in edges[m]} - {component}
            floor[component] = 1 + max((level(c) for c in below), default=-1)
        return floor[component]

    return {m: level(component_of[m]) for m in edges}


def group(module: str, package: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else package


def group_graph(edges: dict[str, set[str]], package: str) -> dict[str, set[str]]:
    """The same graph between groups (sub-packages; a top-level module is a group of its own)."""
    group_edges: dict[str, set[str]] = defaultdict(set)
    for source, targets in edges.items():
        group_edges.setdefault(group(source, package), set())
        for target in targets:
            if group(source, package) != group(target, package):
                group_edges[group(source, package)].add(group(target, package))
    return dict(group_edges)


def back_arrows(edges: dict[str, set[str]], package: str) -> list[tuple[str, str]]:
    """Imports from a group to a group on its own floor or a higher one: only possible in a cycle
    of groups (a module cycle inside one group shows under ``cycles`` instead)."""
    group_edges = group_graph(edges, package)
    group_floor = layers(group_edges)
    return sorted(
        (s, t)
        for s, targets in edges.items()
        for t in targets
        if group(s, package) != group(t, package)
        and group_floor[group(t, package)] >= group_floor[group(s, package)]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT / "service" / "fewshot_service")
    parser.add_argument("--package", default="fewshot_service")
    parser.add_argument("--verbose", action="store_true", help="list every floor's modules")
    args = parser.parse_args()
    edges = graph(args.root, args.package)
    floors = layers(edges)
    found_cycles = cycles(edges)
    arrows = back_arrows(edges, args.package)
    print(f"{args.package}: {len(edges)} modules, {sum(map(len, edges.values()))} imports")
    print(f"module floors: {max(floors.values()) + 1}")
    if args.verbose:
        for n in range(max(floors.values()) + 1):
            print(f"  {n:2d}: {' '.join(sorted(m for m, f in floors.items() if f == n))}")
    group_floors = layers(group_graph(edges, args.package))
    print(f"group floors: {max(group_floors.values()) + 1} ({len(group_floors)} groups)")
    for n in range(max(group_floors.values()) + 1):
        print(f"  {n:2d}: {' '.join(sorted(g for g, f in group_floors.items() if f == n))}")
    print(f"cycles: {len(found_cycles)}")
    for c in found_cycles:
        print("  " + " <-> ".join(c))
    print(f"back arrows (between groups): {len(arrows)}")
    for s, t in arrows:
        print(f"  {s} -> {t}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
