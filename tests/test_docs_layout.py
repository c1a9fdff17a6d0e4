"""The docs' shape: a short README, relative links that resolve, a configuration page that is current.

The rules are the developers' guide's (docs/development.md, docs/writing-docs.md): README.md is the
front door (at most 300 lines), the rest lives in docs/, and docs/configuration.md is generated from
``Settings`` by tools/gen_config_doc.py, so it cannot drift from what ``fewshot serve`` accepts.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import urllib.parse
from pathlib import Path
from types import ModuleType

import pytest

from conftest import REPO_ROOT
from doc_blocks import doc_files

README_MAX_LINES = 300
# Inline links and images, [text](target) / ![alt](target), outside code; reference-style links
# are not used in these docs.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"`[^`]*`")


def _gen_config_doc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_config_doc", REPO_ROOT / "tools" / "gen_config_doc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def relative_links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every link that points into the repository (no scheme, not a bare anchor)."""
    found = []
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            if urllib.parse.urlsplit(target).scheme or target.startswith(("#", "//")):
                continue
            found.append((number, target))
    return found


def broken_links(root: Path, path: Path) -> list[str]:
    """The relative links of ``path`` (relative to ``root``) whose file or folder does not exist."""
    broken = []
    for number, target in relative_links((root / path).read_text()):
        file_part = urllib.parse.unquote(target.split("#", 1)[0])
        resolved = (root / path).parent / file_part
        if not resolved.exists():
            broken.append(f"{path.as_posix()}:{number}: {target}")
    return broken


LINKED_DOCS = [
    p for p in doc_files(REPO_ROOT) if p.parts[0] in ("docs", "deploy") or p.as_posix() == "README.md"
]


def test_the_readme_is_the_front_door_of_at_most_300_lines() -> None:
    lines = (REPO_ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    # The two set-up commands a fresh machine needs, both real Makefile targets.
    makefile = (REPO_ROOT / "Makefile").read_text()
    for command in ("make serve", "make test"):
        assert f"\n{command}\n" in "\n".join(lines), command
        assert re.search(rf"^{command.split()[1]}:", makefile, re.MULTILINE), command


def test_the_link_check_covers_readme_docs_and_deploy() -> None:
    names = {p.as_posix() for p in LINKED_DOCS}
    assert {"README.md", "docs/configuration.md", "deploy/README.md", "docs/benchmarks/README.md"} <= names


@pytest.mark.parametrize("path", LINKED_DOCS, ids=[p.as_posix() for p in LINKED_DOCS])
def test_every_relative_link_resolves(path: Path) -> None:
    assert broken_links(REPO_ROOT, path) == []


def test_a_broken_link_is_reported_and_urls_anchors_and_code_are_not(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "here.md").write_text("# x\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/here.md#x) ![img](docs/here.md) [gone](docs/gone.md) [up](../outside.md)\n"
        "[web](https://example.com/a.md) [anchor](#set-up) `[code](nowhere.md)`\n"
        "```\n[fenced](nowhere.md)\n```\n"
        "[spaced](docs/here%2Emd)\n"
    )
    assert broken_links(tmp_path, Path("README.md")) == [
        "README.md:1: docs/gone.md",
        "README.md:1: ../outside.md",
    ]


def test_configuration_page_is_what_the_generator_writes_from_settings() -> None:
    generator = _gen_config_doc()
    committed = (REPO_ROOT / "docs" / "configuration.md").read_text()
    assert committed == generator.render(), (
        "docs/configuration.md is stale: run python tools/gen_config_doc.py"
    )
    assert generator.main(["--check"]) == 0


def test_the_generated_page_names_every_setting_with_its_flag_environment_and_default() -> None:
    from fewshot_common.settings_flags import env_names, flag_name
    from fewshot_service.settings import Settings

    page = _gen_config_doc().render()
    for field, info in Settings.model_fields.items():
        row = next((line for line in page.splitlines() if line.startswith(f"| `{flag_name(field)}`")), None)
        assert row is not None, field
        for env in env_names(Settings, field, info):
            assert f"`{env}`" in row, (field, env)
    assert "| `--http-port` | `FEWSHOT_HTTP_PORT` | `8000` |" in page
    assert "| `--redis-url` | `REDIS_URL` or `FEWSHOT_REDIS_URL` | — |" in page
    assert "| `--batching` / `--no-batching` | `FEWSHOT_BATCHING` | on |" in page
    assert "`268435456` (256 MiB)" in page  # max_decoded_bytes, readable


def test_every_benchmark_table_names_its_date_cpu_and_command() -> None:
    """A table in docs/benchmarks/ is preceded, within its section, by a paragraph 'Date: ...
    CPU: ... Reproduce: ...' (the index page's table of pages excepted)."""
    missing = []
    for path in sorted((REPO_ROOT / "docs" / "benchmarks").glob("*.md")):
        if path.name == "README.md":
            continue
        lines = path.read_text().splitlines()
        meta_seen = False
        in_table = False
        for number, line in enumerate(lines, 1):
            if line.startswith("#"):
                meta_seen = False
            if line.startswith("Date:"):
                paragraph = " ".join(itertools.takewhile(str.strip, lines[number - 1 :]))
                meta_seen = "CPU:" in paragraph and "Reproduce:" in paragraph
            if line.lstrip().startswith("|") and not in_table and not meta_seen:
                missing.append(f"{path.relative_to(REPO_ROOT)}:{number}")
            in_table = line.lstrip().startswith("|")
    assert missing == []
