"""Every code block of README.md and docs/ runs as written.

The ``python`` blocks of one page run in order in one namespace (a later block may use what an earlier one
made), in a temporary working folder. The ``bash`` blocks are checked, not run (they train for hours, read
datasets or start GPU jobs): every ``examples/*.py`` or ``benchmarks/*.py`` they call exists, and every
``--flag`` they pass is one that script's ``--help`` lists.

Two HTML comments, on the line right above a block, adapt it; a reader of the rendered page does not see them:

* ``<!-- code: substitute OLD -> NEW; OLD2 -> NEW2 -->``: run with these text replacements (small sizes);
  each OLD must occur in the block.
* ``<!-- code: not run (REASON) -->``: skipped; the reason must be given (a released checkpoint, a file the
  reader brings). Keep these rare.

A block that trains (it calls ``.backward()`` or a compiled training step) states what it should reach in a
top-level ``assert`` a reader sees, e.g. ``assert score < 0.01  # 0.0051 measured``, and no substitution may touch
that line: the test runs the check as written, so the figure on the page is the one checked.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
_BLOCK = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
_MARK = re.compile(r"<!--\s*code:\s*(?P<what>substitute|not run)\s*(?P<arg>.*?)\s*-->\s*$")


def blocks(page: Path) -> list[tuple[int, str, str, str]]:
    """``(line, language, code, marker)`` of each fenced block; marker is the comment right above it, or ""."""
    text = page.read_text(encoding="utf-8")
    found = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = before.strip() if _MARK.search(before) else ""
        indent = match.group("indent")
        body = "\n".join(
            row[len(indent) :] if row.startswith(indent) else row for row in match.group("body").split("\n")
        )
        found.append((line, match.group("lang"), body, marker))
    return found


def _relative(page: Path) -> str:
    return str(page.relative_to(ROOT))


def prepared(page: Path, line: int, code: str, marker: str) -> str | None:
    """The code to run: substituted as its marker says, or None when it is marked not run."""
    if not marker:
        return code
    match = _MARK.search(marker)
    if match.group("what") == "not run":
        reason = match.group("arg").strip("() ")
        assert reason, f"{_relative(page)}:{line}: 'not run' needs a reason in parentheses"
        return None
    for pair in match.group("arg").split(";"):
        old, sep, new = pair.partition("->")
        assert sep, f"{_relative(page)}:{line}: substitution {pair!r} is not OLD -> NEW"
        old, new = old.strip(), new.strip()
        assert old in code, f"{_relative(page)}:{line}: {old!r} does not occur in the block"
        code = code.replace(old, new)
    return code


PYTHON_PAGES = [p for p in PAGES if any(lang == "python" for _, lang, _, _ in blocks(p))]


# Runs a page's blocks in order in one namespace, in a fresh interpreter (as a reader would, without the test
# suite's runtime type checking, which torch.compile cannot trace), and names the block that fails.
_DRIVER = """
import json as _json, sys as _sys, traceback as _traceback
for _where, _source in _json.load(open(_sys.argv[1])):
    try:  # in this module's namespace, as a script would run (torch.compile looks globals up in it)
        exec(compile(_source, _where, "exec"), globals())
    except BaseException:
        _traceback.print_exc()
        _sys.exit(f"the block at {_where} fails")
"""


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=_relative)
def test_python_blocks_run(page: Path, tmp_path: Path) -> None:
    runnable = []
    for line, lang, code, marker in blocks(page):
        source = prepared(page, line, code, marker) if lang == "python" else None
        if source is not None:
            runnable.append((f"{_relative(page)}:{line}", source))
    (tmp_path / "blocks.json").write_text(json.dumps(runnable))
    (tmp_path / "driver.py").write_text(_DRIVER)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [sys.executable, "driver.py", "blocks.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]


def _trains(code: str) -> bool:
    return ".backward(" in code or re.search(r"\bstep_fn(\.accumulate)?\(", code) is not None


TRAINING_BLOCKS = [
    (page, line, code, marker)
    for page in PYTHON_PAGES
    for line, lang, code, marker in blocks(page)
    if lang == "python" and _trains(code) and "not run" not in marker
]


@pytest.mark.parametrize(
    ("page", "line", "code", "marker"), TRAINING_BLOCKS, ids=[f"{_relative(p)}:{n}" for p, n, *_ in TRAINING_BLOCKS]
)
def test_training_blocks_state_what_they_reach(page: Path, line: int, code: str, marker: str) -> None:
    import ast

    checks = [node for node in ast.parse(code).body if isinstance(node, ast.Assert)]
    assert checks, f"{_relative(page)}:{line}: a block that trains needs a top-level assert of what it reaches"
    lines = code.splitlines()
    stated = {lines[node.lineno - 1] for node in checks}
    match = _MARK.search(marker)
    for pair in match.group("arg").split(";") if match else ():
        old = pair.partition("->")[0].strip()
        touched = [row for row in stated if old and old in row]
        assert not touched, f"{_relative(page)}:{line}: the substitution {old!r} changes the checked line {touched}"


_SCRIPT = re.compile(r"(?:^|\s)((?:examples|benchmarks)/[\w/]+\.py)(?=\s|$)")


@cache
def _help_of(script: str) -> str | None:
    """The script's ``--help``, or None when it needs an optional package that is not installed."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [sys.executable, script, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"PYTHONPATH": path},
    )
    if done.returncode != 0 and "ModuleNotFoundError" in done.stderr:
        return None
    assert done.returncode == 0, f"{script} --help fails: {done.stderr[-2000:]}"
    return done.stdout


def _commands(code: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", code)
    return [
        row.split(" #", 1)[0].strip() for row in joined.splitlines() if row.strip() and not row.lstrip().startswith("#")
    ]


SHELL_CALLS = sorted(
    {
        (_relative(page), line, command)
        for page in PAGES
        for line, lang, code, marker in blocks(page)
        if lang in ("bash", "sh", "shell", "console") and prepared(page, line, code, marker) is not None
        for command in _commands(code)
        if _SCRIPT.search(command)
    }
)


@pytest.mark.parametrize(("page", "line", "command"), SHELL_CALLS, ids=lambda v: str(v)[:60])
def test_shell_blocks_call_existing_scripts_with_existing_flags(page: str, line: int, command: str) -> None:
    for part in re.split(r"&&|\|\||;", command):
        found = _SCRIPT.search(part)
        if not found:
            continue
        script = found.group(1)
        assert (ROOT / script).is_file(), f"{page}:{line}: {script} does not exist"
        listed = _help_of(script)
        if listed is None:
            pytest.skip(f"{script} needs an optional package that is not installed here")
        words = shlex.split(part.split(script, 1)[1], comments=True)
        for word in words:
            flag = word.split("=", 1)[0]
            if flag.startswith("--") and flag != "--":
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", listed), (
                    f"{page}:{line}: {script} has no flag {flag} (see its --help)"
                )


def test_the_mechanism_finds_the_blocks() -> None:
    readme = blocks(ROOT / "README.md")
    assert sum(lang == "python" for _, lang, _, _ in readme) >= 2
    assert any("substitute" in marker for *_, marker in readme)
    assert len(SHELL_CALLS) >= 10
