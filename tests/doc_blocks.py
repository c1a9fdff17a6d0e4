"""The fenced code blocks of the Markdown files a user reads, and how the doc tests run them.

``tests/test_docs_examples.py`` runs every block against one live ``fewshot serve``; the rules
(also in ``docs/writing-docs.md``):

* Which files: every ``*.md`` under the repository (README.md, docs/ at any depth, deploy/,
  service/client/, models/, and any file added later), except hidden, build and virtualenv folders.
* Every fenced block (````` or ``~~~``) is run, unless the last non-blank line before its opening
  fence is ``<!-- not-run: REASON -->`` with a reason a reader can check (it starts the main
  server, needs Docker, a GPU, weights from outside, hours of training...). A block that is
  neither run nor marked fails the suite, and so does a marker without a reason.
* ``bash``/``sh``/``shell`` blocks run with ``bash -euo pipefail``; ``python``/``py`` blocks with
  the test venv's python. Any other language must be marked not-run.
* ``<!-- continues-previous -->`` before a fence joins that block to the previous block of the same
  file (same language): they run as one script, e.g. a fragment that uses a variable set earlier.
* Each unit (a block, or blocks joined) starts from a server with no classes (every namespace is
  deleted before it), in a folder holding the images the examples name (cat1.jpg, query.jpg...).
* ``localhost:8000`` and ``localhost:50051`` are rewritten to the live server's ports, and inside
  bash blocks ``curl`` fails on an HTTP error (``--fail-with-body``), so a 404 fails the test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

NOT_RUN = re.compile(r"^<!--\s*not-run:(?P<reason>.*?)-->\s*$")
CONTINUES = re.compile(r"^<!--\s*continues-previous\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
RUNNERS = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
# Folders that hold no user-facing docs: hidden ones (.git, .venv...), builds and installs.
SKIPPED_DIRS = {"node_modules", "build", "dist", "__pycache__"}


@dataclass(frozen=True)
class Block:
    path: Path  # relative to the repository root
    line: int  # 1-based line of the opening fence
    language: str
    source: str
    not_run: str | None  # the reason, when marked not-run ("" when the marker gives none)
    continues: bool

    @property
    def name(self) -> str:
        return f"{self.path.as_posix()}:{self.line}"

    @property
    def runner(self) -> str | None:
        return RUNNERS.get(self.language.lower())


@dataclass
class Unit:
    """What runs as one script: a block and the blocks that continue it."""

    blocks: list[Block] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.blocks[0].name

    @property
    def runner(self) -> str:
        runner = self.blocks[0].runner
        assert runner is not None
        return runner

    @property
    def source(self) -> str:
        return "\n".join(b.source for b in self.blocks)


def doc_files(root: Path) -> list[Path]:
    """Every Markdown file a user reads, relative to ``root``, sorted."""
    found = []
    for path in root.rglob("*.md"):
        relative = path.relative_to(root)
        folders = relative.parts[:-1]
        if any(p.startswith(".") or p in SKIPPED_DIRS or p.endswith(".egg-info") for p in folders):
            continue
        found.append(relative)
    return sorted(found)


def parse_blocks(text: str, path: Path) -> list[Block]:
    """The fenced code blocks of one Markdown text, with the marker before each."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence = opening["fence"]
        closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = i + 1
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        marker = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        not_run = NOT_RUN.match(marker)
        blocks.append(
            Block(
                path=path,
                line=i + 1,
                language=opening["info"],
                source="\n".join(lines[i + 1 : end]) + "\n",
                not_run=not_run["reason"].strip() if not_run else None,
                continues=bool(CONTINUES.match(marker)),
            )
        )
        i = end + 1
    return blocks


def problems(blocks: list[Block]) -> list[str]:
    """Why blocks break the rules above (empty when none do)."""
    found = []
    previous: Block | None = None
    for block in blocks:
        if block.not_run == "":
            found.append(f"{block.name}: 'not-run' needs a reason: <!-- not-run: WHY -->")
        elif block.not_run is None and block.runner is None:
            found.append(
                f"{block.name}: a {block.language or 'plain'!r} block can't be run: mark it "
                "<!-- not-run: WHY --> on the line before the fence, or make it bash/python"
            )
        elif block.continues and (
            previous is None
            or previous.path != block.path
            or previous.not_run is not None
            or previous.runner != block.runner
        ):
            found.append(
                f"{block.name}: 'continues-previous' needs a run block of the same language before it"
            )
        previous = block
    return found


def units(blocks: list[Block]) -> list[Unit]:
    """The run blocks, each joined with the blocks marked as continuing it."""
    found: list[Unit] = []
    for block in blocks:
        if block.not_run is not None or block.runner is None:
            continue
        if block.continues and found and found[-1].blocks[-1].path == block.path:
            found[-1].blocks.append(block)
        else:
            found.append(Unit([block]))
    return found


def localize(source: str, http_port: int, grpc_port: int) -> str:
    """The documented default addresses rewritten to the live server's ports."""
    source = source.replace("localhost:8000", f"127.0.0.1:{http_port}")
    return source.replace("localhost:50051", f"127.0.0.1:{grpc_port}")


# Put before every bash block: curl as the docs write it, but an HTTP error fails the script
# (with the error's JSON body shown) instead of passing silently.
BASH_PRELUDE = 'curl() { command curl --silent --show-error --fail-with-body "$@" || return; echo; }\n'
