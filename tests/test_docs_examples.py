"""Every code block in the docs runs as written against a live server, or says why it can't.

The rules (which files, the not-run and continues-previous markers, the address rewriting) are in
tests/doc_blocks.py and docs/writing-docs.md. One ``fewshot serve`` (the tiny test model, its own
embedded Redis) serves every block; each block starts from a server with no classes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from conftest import REPO_ROOT, ServeProcess
from doc_blocks import BASH_PRELUDE, Block, Unit, doc_files, localize, parse_blocks, problems, units

# The files a user is pointed at; the harness finds them (and any new .md) by itself, and this
# list only checks that the search did not lose one.
MUST_FIND = ["README.md", "deploy/README.md", "service/client/README.md", "models/MODEL_CARD.md"]

BLOCKS: list[Block] = [
    b for path in doc_files(REPO_ROOT) for b in parse_blocks((REPO_ROOT / path).read_text(), path)
]
UNITS: list[Unit] = units(BLOCKS)

# What key examples must print, beyond exiting with 0: (file, a line of the block) -> patterns.
EXPECTED_OUTPUT: dict[tuple[str, str], list[str]] = {
    ("README.md", "curl http://localhost:8000/v1/classes/cat "): [
        r'"label":"cat","count":2,',  # GET /v1/classes/cat: both examples were added
        r'"results":\[\[\{"label":"cat"',  # classify: the only class
        r'"embeddings":\[\[',
        r'"deleted_classes":1,',  # the namespace "shop" held one class
    ],
    ("README.md", "[result] = client.classify"): [r"^(True|False) (cat|dog) "],
    ("docs/api.md", "added = client.add_examples(right, image)"): [r"^predicted (cat|dog) \d+%"],
    ("deploy/README.md", "fewshot keygen --name ingest-bot"): [
        r'name = "ingest-bot"',
        r'namespaces = \[\s*"\*",?\s*\]',
    ],  # tomli-w may wrap the array
}


def make_images(folder: Path) -> None:
    """The image files the examples name: two red cats, a dog, a query, two for embedding."""

    def draw(name: str, background: str, shape: str, box: tuple[int, int, int, int]) -> None:
        image = Image.new("RGB", (96, 96), background)
        ImageDraw.Draw(image).ellipse(box, fill=shape)
        image.save(folder / name, quality=95)

    draw("cat1.jpg", "white", "red", (10, 10, 70, 70))
    draw("cat2.jpg", "ivory", "firebrick", (20, 25, 85, 80))
    draw("dog1.jpg", "navy", "yellow", (30, 5, 90, 60))
    draw("query.jpg", "white", "crimson", (15, 20, 75, 82))
    draw("a.jpg", "black", "green", (0, 0, 50, 50))
    draw("b.jpg", "grey", "orange", (40, 40, 95, 95))


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path
) -> Iterator[tuple[ServeProcess, Path]]:
    """One server for every block, and the working folder the blocks run in."""
    root = tmp_path_factory.mktemp("docs")
    workdir = root / "work"
    workdir.mkdir()
    make_images(workdir)
    server = ServeProcess(
        ["--model", str(tiny_model_path), "--data-dir", str(root / "data")], None, root / "serve.log"
    )
    try:
        yield server.wait_ready(), workdir
    finally:
        server.stop()


def namespaces(http_url: str) -> list[str]:
    with urllib.request.urlopen(f"{http_url}/v1/namespaces", timeout=30) as response:
        return [n["namespace"] for n in json.load(response)["namespaces"]]


def delete_every_namespace(http_url: str) -> None:
    """A server with no classes, as a new user's is (example ids keep counting: read them from answers)."""
    for name in namespaces(http_url):
        request = urllib.request.Request(
            f"{http_url}/v1/namespaces/{urllib.parse.quote(name, safe='')}", method="DELETE"
        )
        urllib.request.urlopen(request, timeout=30).close()
    assert namespaces(http_url) == []


def run_unit(unit: Unit, server: ServeProcess, workdir: Path) -> subprocess.CompletedProcess[str]:
    source = localize(unit.source, server.http_port, server.grpc_port)
    venv_bin = str(Path(sys.executable).parent)
    # The user's shell: the venv's `fewshot` and `python3` first, none of the caller's server settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEWSHOT_", "REDIS_URL"))}
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    if unit.runner == "bash":
        script = workdir / "block.sh"
        script.write_text(BASH_PRELUDE + source)
        command = ["bash", "-euo", "pipefail", str(script)]
    else:
        script = workdir / "block.py"
        script.write_text(source)
        command = [sys.executable, str(script)]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=120)


def test_the_docs_are_found_and_every_block_is_run_or_says_why_not() -> None:
    found = {p.as_posix() for p in doc_files(REPO_ROOT)}
    assert set(MUST_FIND) <= found, f"doc files not found: {set(MUST_FIND) - found}"
    assert problems(BLOCKS) == []
    assert UNITS, "no runnable block found"


def test_every_expected_output_names_a_run_block() -> None:
    for path, line in EXPECTED_OUTPUT:
        assert any(u.blocks[0].path.as_posix() == path and line in u.source for u in UNITS), (path, line)


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_doc_block_runs_as_written(unit: Unit, live: tuple[ServeProcess, Path]) -> None:
    server, workdir = live
    delete_every_namespace(server.http_url)
    run = run_unit(unit, server, workdir)
    shown = (
        f"--- {unit.name} ({unit.runner}) ---\n{unit.source}\n"
        f"--- stdout ---\n{run.stdout}\n--- stderr ---\n{run.stderr}"
    )
    assert run.returncode == 0, shown
    for (path, line), patterns in EXPECTED_OUTPUT.items():
        if unit.blocks[0].path.as_posix() == path and line in unit.source:
            for pattern in patterns:
                assert re.search(pattern, run.stdout, re.MULTILINE), f"{pattern!r} not in the output\n{shown}"


# --- the harness's own rules, on made-up Markdown --------------------------------------------------

SAMPLE = """# Sample

```bash
echo one
```

<!-- continues-previous -->
```bash
echo two
```

<!-- not-run: needs Docker -->

```sh
docker compose up
```

```text
output, not a command
```

<!-- not-run:   -->
```python
print()
```

~~~python
print("tildes")
~~~
"""


def test_markers_join_and_exclude_blocks_and_unmarked_or_reasonless_blocks_are_reported() -> None:
    blocks = parse_blocks(SAMPLE, Path("sample.md"))
    assert [(b.line, b.language, b.not_run, b.continues) for b in blocks] == [
        (3, "bash", None, False),
        (8, "bash", None, True),
        (14, "sh", "needs Docker", False),
        (18, "text", None, False),
        (23, "python", "", False),
        (27, "python", None, False),
    ]
    assert [(u.name, u.runner, u.source) for u in units(blocks)] == [
        ("sample.md:3", "bash", "echo one\n\necho two\n"),
        ("sample.md:27", "python", 'print("tildes")\n'),
    ]
    found = problems(blocks)
    assert len(found) == 2
    assert found[0].startswith("sample.md:18: a 'text' block can't be run")
    assert found[1].startswith("sample.md:23: 'not-run' needs a reason")


def test_a_continuation_after_a_not_run_block_is_reported() -> None:
    text = "<!-- not-run: needs Docker -->\n```bash\ndocker ps\n```\n<!-- continues-previous -->\n```bash\nls\n```\n"
    assert problems(parse_blocks(text, Path("x.md"))) == [
        "x.md:6: 'continues-previous' needs a run block of the same language before it"
    ]


def test_doc_files_take_new_docs_at_any_depth_and_skip_hidden_and_installed_folders(tmp_path: Path) -> None:
    for name in [
        "README.md",
        "docs/a.md",
        "docs/deep/er/b.md",
        ".venv/lib/x.md",
        "pkg.egg-info/y.md",
        "notes.txt",
    ]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("# x\n")
    assert [p.as_posix() for p in doc_files(tmp_path)] == ["README.md", "docs/a.md", "docs/deep/er/b.md"]


def test_localize_points_the_documented_addresses_at_the_live_server() -> None:
    source = 'curl http://localhost:8000/v1/info\nFewShotClient("localhost:50051", http_url="http://localhost:8000")\n'
    assert localize(source, 41234, 42345) == (
        'curl http://127.0.0.1:41234/v1/info\nFewShotClient("127.0.0.1:42345", http_url="http://127.0.0.1:41234")\n'
    )
