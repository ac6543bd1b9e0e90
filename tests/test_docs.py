"""The documentation cannot drift (issue 16, item 6): every runnable example in docs/*.md and README.md runs here,
every CLI verb has a page (docs/<verb>.md) with an example of it that runs by default, and the flags a page lists
under "## Options" are that verb's.

What runs (the convention is documented for writers in docs/api.md, "Examples that run"):

- a ```console block: each line starting with ``$ `` is a command (a line ending in ``\\`` continues on the
  next); the other lines are output, shown for illustration and not compared (latency and timings differ from
  machine to machine). Each command runs on its own and must exit with an accepted status;
- a ```bash or ```sh block: the whole block is one script (heredocs work), run with ``set -eo pipefail``;
- a ```python block: one script, run by the interpreter running these tests;
- other blocks (```toml, ```json, plain fences) are not run.

An HTML comment on the line before a block (blank lines between allowed) changes that: ``<!-- not run -->`` (shown
only: installation, GPUs; a reason may follow, ``<!-- not run: installs packages -->``), ``<!-- slow -->`` (run
only with ``-m slow``), ``<!-- status 0 4 -->`` (the exit statuses accepted; default 0, e.g. 0 or 4 for a speed-up
target on a busy machine); combined with ``;``. Slow blocks' onnxprune commands are still parsed by default.

How: each page runs in a fresh temporary folder holding ``models``, a symbolic link to the repository's models/, so
the pages' relative paths (models/resnet20.onnx, out/...) work there as they do from the repository root; its blocks
run in order, so a block may use what an earlier block of the same page wrote. Commands run with bash, where
``onnxprune`` is ``python -m onnxprune`` and ``python`` is the interpreter running the tests, with this checkout
first on PYTHONPATH: the checkout is what runs, installed or not. The default run leaves out slow blocks (a page
keeps its slow blocks' outputs to itself); ``-m slow`` runs every block of each page that has a slow one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from onnxprune.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
RUNNABLE = {"console", "bash", "sh", "python"}
PRELUDE = 'onnxprune() { "$ONNXPRUNE_PYTHON" -m onnxprune "$@"; }\npython() { "$ONNXPRUNE_PYTHON" "$@"; }\n'


@dataclass(frozen=True)
class Block:
    """A runnable fenced block of a page."""

    page: str
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    statuses: tuple[int, ...] = (0,)
    slow: bool = False

    def commands(self) -> list[str]:
        """What runs, one item per status check: a console block's commands, else the whole block."""
        if self.language != "console":
            return [self.text]
        commands, current = [], None
        for line in self.text.splitlines():
            if current is not None:
                current += "\n" + line
            elif line.startswith("$ "):
                current = line[2:]
            if current is not None and not current.endswith("\\"):
                commands.append(current)
                current = None
        return commands


def marker(lines: list[str], fence: int) -> str | None:
    """The HTML comment on the line before ``fence`` (blank lines between allowed), without its delimiters."""
    i = fence - 1
    while i >= 0 and not lines[i].strip():
        i -= 1
    match = re.fullmatch(r"\s*<!--(.*)-->\s*", lines[i]) if i >= 0 else None
    return match.group(1).strip() if match else None


def blocks(page: Path) -> list[Block]:
    """The page's runnable blocks, in order (``<!-- not run -->`` ones left out)."""
    lines, found, i = page.read_text().splitlines(), [], 0
    while i < len(lines):
        opening = re.fullmatch(r"(```+)\s*([\w+-]*).*", lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(opening.group(1)))
        language, words = opening.group(2).lower(), [w.strip() for w in (marker(lines, i) or "").split(";")]
        if language in RUNNABLE and not any(w.startswith("not run") for w in words):
            statuses = next((tuple(int(s) for s in w.split()[1:]) for w in words if w.startswith("status")), (0,))
            found.append(Block(page.name, i + 1, language, "\n".join(lines[i + 1:end]), statuses, "slow" in words))
        i = end + 1
    return found


def run_block(block: Block, folder: Path) -> None:
    env = {**os.environ, "ONNXPRUNE_PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for command in block.commands():
        if block.language == "python":
            script = folder / f"example_{block.line}.py"
            script.write_text(command + "\n")
            argv = [sys.executable, str(script)]
        else:
            options = "set -eo pipefail\n" if block.language != "console" else "set -o pipefail\n"
            argv = ["bash", "-c", PRELUDE + options + command]
        done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True)
        assert done.returncode in block.statuses, (
            f"{block.page}, block at line {block.line}: exit status {done.returncode}, not "
            f"{' or '.join(map(str, block.statuses))}:\n{command}\n--- stdout:\n{done.stdout[-3000:]}\n"
            f"--- stderr:\n{done.stderr[-3000:]}")


def run_page(page: Path, folder: Path, slow: bool) -> None:
    (folder / "models").symlink_to(ROOT / "models", target_is_directory=True)
    for block in blocks(page):
        if slow or not block.slow:
            run_block(block, folder)


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.name)
def test_the_examples_of_a_page_run(page, tmp_path):
    run_page(page, tmp_path, slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if any(b.slow for b in blocks(p))], ids=lambda p: p.name)
def test_the_slow_examples_of_a_page_run(page, tmp_path):
    run_page(page, tmp_path, slow=True)


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.slow for b in blocks(p))], ids=lambda p: p.name)
def test_the_slow_examples_of_a_page_parse_by_default(page):
    """What the default run can check of a slow example without running it: its onnxprune commands parse."""
    import shlex

    from onnxprune.cli import parse_args

    for block in (b for b in blocks(page) if b.slow and b.language == "console"):
        for command in block.commands():
            argv = shlex.split(command.replace("\\\n", " "))
            if argv[0] == "onnxprune" and not set("|<>&;") & set(command):
                parse_args(argv[1:])  # argparse exits with status 2 on a flag the verb does not take


def verbs() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices


@pytest.mark.parametrize("verb", sorted(verbs()))
def test_every_verb_has_a_page_with_an_example_that_runs_by_default(verb):
    page = ROOT / "docs" / f"{verb}.md"
    assert page.exists(), f"no docs/{verb}.md"
    commands = [c for b in blocks(page) if not b.slow for c in b.commands()]
    assert any(re.search(rf"(^|\n|\s)onnxprune {re.escape(verb)}\s", c + " ") for c in commands), \
        f"docs/{verb}.md runs no 'onnxprune {verb}' by default"
    assert f"(docs/{verb}.md)" in (ROOT / "README.md").read_text(), f"README.md does not link docs/{verb}.md"


@pytest.mark.parametrize("verb", sorted(verbs()))
def test_the_options_a_page_lists_are_its_verbs(verb):
    page = (ROOT / "docs" / f"{verb}.md").read_text()
    section = re.search(r"^## Options\n(.*?)(?=^## |\Z)", page, re.S | re.M)
    assert section, f"docs/{verb}.md has no '## Options' section"
    flags = {s for a in verbs()[verb]._actions for s in a.option_strings} | {"--debug", "--quiet"}
    listed = set(re.findall(r"`(--[a-z][a-z0-9-]*)", section.group(1)))
    assert listed and listed <= flags, f"docs/{verb}.md lists flags {verb} does not take: {sorted(listed - flags)}"


@pytest.mark.parametrize("module", ["onnxprune.options", "onnxprune.results"])
def test_the_api_page_describes_every_option_and_result_field(module):
    import dataclasses
    import importlib

    page = (ROOT / "docs" / "api.md").read_text()
    classes = [c for c in vars(importlib.import_module(module)).values()
               if dataclasses.is_dataclass(c) and c.__module__ == module and c.__name__ != "Result"]
    for cls in classes:
        section = re.search(rf"^### `{cls.__name__}`\n(.*?)(?=^#|\Z)", page, re.S | re.M)
        assert section, f"docs/api.md has no section for {cls.__name__}"
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name != "record" and f"`{f.name}`" not in section.group(1)]
        assert not missing, f"docs/api.md does not describe {cls.__name__}.{', '.join(missing)}"


def test_markers_and_commands_are_read_as_documented(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- not run: installs -->\n```bash\npip install x\n```\n\n<!-- slow; status 0 4 -->\n\n"
                    "```console\n$ onnxprune a \\\n  --b\nout put\n$ onnxprune c\n```\n```toml\nx = 1\n```\n"
                    "```python\nprint(1)\n```\n")
    found = blocks(page)
    assert [(b.language, b.slow, b.statuses) for b in found] == [("console", True, (0, 4)), ("python", False, (0,))]
    assert found[0].commands() == ["onnxprune a \\\n  --b", "onnxprune c"] and found[1].commands() == ["print(1)"]
