"""Every command and code block of README.md and docs/*.md runs as written, so the documentation cannot rot.

Blocks are the fenced ``bash``/``sh``/``console``/``python`` blocks.  A comment on the line before a block marks it:
``<!-- doc-test: slow -->`` (run with ``-m slow``), ``<!-- doc-test: cuda -->`` (skipped without a GPU), or both
(``slow, cuda``).  Shell blocks run with ``bash -e`` in a temporary copy of the repository (they write files), with
``reparam`` on the PATH running this checkout; ``console`` blocks run their ``$ `` lines.  Python blocks are exec'd
in that copy.  Two kinds of line are environment set-up, not documentation to test, and are not run: ``pip install
...`` (this test runs in the installed environment) and ``python -m pytest ...`` (the suite itself).  The links of
the documents must stay inside the repository.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
MARK = re.compile(r"<!--\s*doc-test:\s*([\w, ]+?)\s*-->")
SETUP = re.compile(r"^\s*(pip install|python -m pytest)\b")
LANGUAGES = {"bash": "shell", "sh": "shell", "console": "console", "python": "python"}


def blocks(path: Path) -> list[tuple[int, str, str, set[str]]]:
    """(line, kind, code, marks) of every runnable fenced block of ``path``."""
    found, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        start, language = i, match.group(1)
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        marks = set()
        previous = lines[start - 1] if start else ""
        if MARK.search(previous):
            marks = {m.strip() for m in MARK.search(previous).group(1).split(",")}
        assert language in LANGUAGES, f"{path.name}:{start + 1}: a code block needs a language (bash, python ...)"
        found.append((start + 1, LANGUAGES[language], "\n".join(body), marks))
    return found


def _params():
    params = []
    for path in DOCS:
        for line, kind, code, marks in blocks(path):
            pytest_marks = [pytest.mark.slow] if "slow" in marks else []
            if "cuda" in marks:
                pytest_marks.append(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))
            params.append(pytest.param(kind, code, id=f"{path.relative_to(ROOT)}:{line}", marks=pytest_marks))
    return params


def _shell_script(kind: str, code: str) -> str:
    """The lines to run: ``$ `` lines of a console block; set-up lines dropped (continuations kept together)."""
    lines = code.splitlines()
    if kind == "console":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    commands, current = [], ""
    for line in lines:
        current += line + "\n"
        if not line.rstrip().endswith("\\"):
            commands.append(current)
            current = ""
    return "".join(c for c in commands if not SETUP.match(c))


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A copy of the repository (no .git), and a ``reparam`` command that runs it."""
    copy = tmp_path / "repo"
    shutil.copytree(
        ROOT, copy, symlinks=True, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".reparam-staging-*")
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "reparam"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m reparam.cli "$@"\n')
    script.chmod(0o755)
    return copy


def _env(copy: Path) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(copy),
        "PATH": f"{copy.parent / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "COLUMNS": "80",
    }


@pytest.mark.parametrize("kind, code", _params())
def test_block_runs(kind, code, checkout, monkeypatch):
    if kind == "python":
        monkeypatch.chdir(checkout)
        monkeypatch.syspath_prepend(str(checkout))
        exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_block__"})
        return
    script = _shell_script(kind, code)
    if not script.strip():
        pytest.skip("only set-up lines (pip install / pytest)")
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=checkout,
        env=_env(checkout),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert done.returncode == 0, (
        f"exit {done.returncode}\n--- script\n{script}\n--- stdout\n{done.stdout[-3000:]}"
        f"\n--- stderr\n{done.stderr[-3000:]}"
    )


LINK = re.compile(r"\]\(([^)\s]+)\)|`(\.\./[^`]+)`")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_in_the_repository(path):
    for match in LINK.finditer(path.read_text(encoding="utf-8")):
        target = match.group(1) or match.group(2)
        if re.match(r"^[a-z]+://", target) or target.startswith("#"):
            continue
        resolved = (path.parent / target.split("#")[0]).resolve()
        assert resolved.is_relative_to(ROOT), f"{path.name} links outside the repository: {target}"
        assert resolved.exists(), f"{path.name} links to a missing file: {target}"


def test_every_document_has_its_blocks_found():
    """The collector sees the blocks (a renamed fence language would silently skip them otherwise)."""
    assert len(blocks(ROOT / "README.md")) >= 4
    assert any(kind == "python" for _, kind, _, _ in blocks(ROOT / "README.md"))


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_describe_the_project_not_who_measured(path):
    """Measurements are described by machine, versions, load and method; not by the session that made them."""
    text = path.read_text(encoding="utf-8").lower()
    for phrase in ("this session", "lent to", "this task", "agents'", "../shared"):
        assert phrase not in text, f"{path.name} says {phrase!r}"
