"""Every shell and Python block of README.md runs as written after the quick start (issue 18 §4).

The blocks run in README order in one fresh working folder, the one where the session's
``demo_run`` (conftest.py) ran ``.venv/bin/kandinsky-trt demo``: ``.venv`` there is this
interpreter's environment and ``kandinsky-demo/`` the demo's output, as after the quick start.
The venv is not on PATH, so a bare ``kandinsky-trt`` or ``python`` fails as it would for a new
user. ``bash`` / ``sh`` blocks run under ``bash -eu -o pipefail``; ``python`` blocks in
``.venv/bin/python``.

A block that cannot run here is preceded by ``<!-- readme-test: skip REASON -->``; the reason is
required (the set-up itself, a GPU, a real checkpoint, a full-size run of hours, a server that runs
until Ctrl-C), and the skipped blocks are listed as skipped tests with their reasons (``-rs``).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import DEMO_COMMAND, REPO, user_environment

README = REPO / "README.md"
LANGUAGES = {"bash": "shell", "sh": "shell", "python": "python"}
SKIP = re.compile(r"^<!--\s*readme-test:\s*skip\b(?P<reason>.*?)-->\s*$")
BLOCK_TIMEOUT_S = 900


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    skip: str | None  # the reason, "" when the marker has none, None when the block runs

    @property
    def id(self) -> str:
        return f"line{self.line}-{self.language}"


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks in ``LANGUAGES``, with the skip marker on the closest non-blank line above."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        above = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP.match(above)
        if fence.group(1) in LANGUAGES:
            skip = marker.group("reason").strip() if marker else None
            blocks.append(Block(i + 1, fence.group(1), "\n".join(lines[i + 1:end]), skip))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def _commands(block: Block) -> list[str]:
    return [line.split("#")[0].strip() for line in block.text.splitlines() if line.split("#")[0].strip()]


def test_the_readme_has_blocks_and_the_parser_finds_markers():
    sample = "\n".join(["<!-- readme-test: skip needs a GPU -->", "```bash", "nvidia-smi", "```", "",
                        "<!-- readme-test: skip -->", "```python", "pass", "```", "```text", "x", "```",
                        "```sh", "ls", "```"])
    assert [(b.language, b.skip) for b in readme_blocks(sample)] == [("bash", "needs a GPU"), ("python", ""),
                                                                     ("sh", None)]
    assert len([b for b in BLOCKS if b.skip is None]) >= 5


def test_every_skip_names_its_reason():
    """A skip without a reason fails, and so does a marker this test does not understand."""
    assert not [b.id for b in BLOCKS if b.skip == ""], "<!-- readme-test: skip REASON -->: the reason is required"
    markers = [line for line in README.read_text(encoding="utf-8").splitlines() if "readme-test" in line]
    assert all(SKIP.match(line.strip()) for line in markers), markers


def test_no_bare_console_script():
    """After the quick start the venv is not on PATH: every command names ``.venv/bin/...``."""
    bare = [f"{b.id}: {c}" for b in BLOCKS if b.language != "python" for c in _commands(b)
            if re.match(r"^(kandinsky-trt|python3? -m kandinsky_trt|pip)\b", c)]
    assert not bare


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs_as_written(block, demo_run):
    if block.skip is not None:
        pytest.skip(f"README {block.id}: {block.skip}")
    if _commands(block) == [DEMO_COMMAND]:  # the quick start's demo: run once, shared (conftest.demo_run)
        assert demo_run.returncode == 0, "\n".join(demo_run.stderr[-30:])
        return
    assert demo_run.returncode == 0, "the quick start's demo failed; the README's blocks need its files"
    cwd = demo_run.cwd
    argv = ["bash", "-eu", "-o", "pipefail", "-c", block.text] if LANGUAGES[block.language] == "shell" \
        else [str(cwd / ".venv" / "bin" / "python"), "-c", block.text]
    done = subprocess.run(argv, cwd=cwd, env=user_environment(cwd), capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT_S)
    assert done.returncode == 0, f"README {block.id} failed ({done.returncode}):\n{block.text}\n" \
                                 f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"


def test_version_hints_match_the_code():
    """The README quotes the manifest reader's re-export hint for older schemas, and no stale one."""
    from kandinsky_trt.runtime.contract.manifest import REEXPORT_HINT

    text = " ".join(README.read_text(encoding="utf-8").split())  # the README wraps lines
    assert text.count(REEXPORT_HINT) >= 2, REEXPORT_HINT
    assert not re.findall(r"re-export with kandinsky-trt (?:>=|≥)", text)
