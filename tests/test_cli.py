"""The command lines explain themselves: every flag of every script has help, its default and its choices.

The flags of the trainers, the latent extractor and the benchmarks come from their config dataclasses through
``examples/_cli.py``; these tests hold the mechanism and each script's ``--help`` to that.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
import sys
from pathlib import Path
from typing import Literal

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import _cli  # noqa: E402

# Scripts whose parser is still written by hand, flag by flag, and not yet built by _cli.config_parser.
HAND_WRITTEN: set[str] = set()
SCRIPTS = sorted(
    str(p.relative_to(ROOT))
    for folder in ("examples", "benchmarks")
    for p in (ROOT / folder).glob("*.py")
    if not p.name.startswith("_") and p.name != "meanflow.py"
)
RECIPES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "examples" / "recipes").glob("*.py") if p.name[0] != "_")


def _load(script: str):
    spec = importlib.util.spec_from_file_location(f"cli_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # inspect.getsource finds the config classes through it
    spec.loader.exec_module(module)
    return module


def _help_of(script: str, capsys: pytest.CaptureFixture) -> str:
    module = _load(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _options(help_text: str) -> dict[str, str]:
    """``{flag: its help}`` from the ``options:`` part of an argparse ``--help``."""
    body = help_text.split("\noptions:\n", 1)[1]
    entries: dict[str, str] = {}
    flag = None
    for line in body.splitlines():
        match = re.match(r"^  (-\S+)(.*)$", line)
        if match:
            flag = match.group(1).rstrip(",")
            entries[flag] = match.group(2)
        elif flag is not None:
            entries[flag] += " " + line.strip()
    return {flag: re.sub(r"\s+", " ", text) for flag, text in entries.items()}


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s not in HAND_WRITTEN])
def test_every_flag_has_help_and_default(script: str, capsys: pytest.CaptureFixture) -> None:
    options = _options(_help_of(script, capsys))
    hand_written = ("sample.py", "export_pretrained.py", "fid.py", "fid_reference.py")  # no config dataclass
    hand_written = tuple(f"examples/{name}" for name in hand_written)
    assert "--preset" in options or script in hand_written
    for flag, text in options.items():
        if flag == "-h":
            continue
        # the metavar or choices come first, then at least a few words of help, then the default
        words = re.sub(r"^(\s*[A-Z_,.{}\[\]|-]+|\s*\{[^}]*\}|\s*A,B,\.\.\.)", "", text).strip()
        assert len(words.split()) >= 2, f"{script} {flag}: no help ({text!r})"
        assert "default" in text, f"{script} {flag}: no default shown ({text!r})"


@pytest.mark.parametrize("script", RECIPES)
def test_recipe_flags_have_help_and_default(script: str) -> None:
    import subprocess

    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "No module named" in done.stderr:
        pytest.skip(f"{script} needs a package that is not installed: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-2000:]
    for flag, text in _options(done.stdout).items():
        if flag != "-h":
            assert "default" in text or "required" in text or flag in ("--out",), f"{script} {flag}: {text!r}"
            assert len(text.split()) >= 3, f"{script} {flag}: no help ({text!r})"


def test_paper_presets_say_their_size(capsys: pytest.CaptureFixture) -> None:
    text = re.sub(r"\s+", " ", _help_of("examples/train_dit_imagenet.py", capsys))
    assert "400 000 steps at global batch 256" in text
    text = re.sub(r"\s+", " ", _help_of("benchmarks/jvp_vs_soflow.py", capsys))
    assert "DiT-B/2, batch 256, bf16" in text


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Base:
    """A base config.

    Attributes:
        steps: How many steps, described
            over two lines.
    """

    steps: int = 10
    name: str = "a"  # what it is called


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Child(_Base):
    """A config with its own fields."""

    # where it runs
    device: Literal["cpu", "cuda"] = "cpu"
    sizes: tuple[int, ...] = (1, 2)  # sizes measured
    fast: bool = False  # take the short cut
    label: str | None = None  # an optional label
    name: str = "b"
    rounds: int | None = (
        None  # a comment long enough to make the formatter wrap the field in parentheses, kept as the field's doc
    )


_PRESETS = {"big": _Child(), "small": _Child(steps=2, sizes=(1,))}


def test_field_docs_reads_comments_docstrings_and_bases() -> None:
    docs = _cli.field_docs(_Child)
    assert docs == {
        "steps": "How many steps, described over two lines.",
        "name": "what it is called",
        "device": "where it runs",
        "sizes": "sizes measured",
        "fast": "take the short cut",
        "label": "an optional label",
        "rounds": "a comment long enough to make the formatter wrap the field in parentheses, kept as the field's doc",
    }


def test_parser_types_choices_and_presets() -> None:
    parser = _cli.config_parser("demo", _Child, _PRESETS, "big")
    resolve = lambda argv: _cli.resolve_config(parser.parse_args(argv), _Child, _PRESETS)  # noqa: E731
    assert resolve([]) == _Child()
    assert resolve(["--preset", "small"]).steps == 2
    assert resolve(["--config", "small"]).steps == 2  # the old name of --preset
    config = resolve(["--preset", "small", "--steps", "7", "--sizes", "3,4", "--fast", "--device", "cuda"])
    assert config == _Child(steps=7, sizes=(3, 4), fast=True, device="cuda")
    assert resolve(["--label", "x"]).label == "x"
    help_text = re.sub(r"\s+", " ", parser.format_help())
    assert "--device {cpu,cuda}" in help_text and "where it runs; default: cpu" in help_text
    assert "How many steps, described over two lines; default: 10 (preset big; small: 2)" in help_text
    assert "--fast, --no-fast take the short cut; default: False" in help_text


def test_parser_rejects_values_outside_the_choices(capsys: pytest.CaptureFixture) -> None:
    parser = _cli.config_parser("demo", _Child, _PRESETS, "big", choices={"sizes": (1, 2, 3)})
    with pytest.raises(SystemExit):
        parser.parse_args(["--sizes", "1,5"])
    assert "argument --sizes: unknown '5'; choose from 1, 2, 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "tpu"])
    assert "argument --device: unknown 'tpu'" in capsys.readouterr().err


def test_undocumented_field_is_an_error() -> None:
    @dataclasses.dataclass(frozen=True)
    class Bare:
        steps: int = 1

    with pytest.raises(TypeError, match=r"Bare.steps has no documentation"):
        _cli.config_parser("demo", Bare, {"only": Bare()}, "only")


def test_optional_import_names_the_extra() -> None:
    assert _cli.optional_import("json", "reading").dumps([]) == "[]"
    with pytest.raises(ModuleNotFoundError, match=r'the grids needs no_such_pkg_soflow, from the "examples" extra'):
        _cli.optional_import("no_such_pkg_soflow", "the grids")
    assert isinstance(argparse.ArgumentParser(formatter_class=_cli.HelpFormatter), argparse.ArgumentParser)


def test_jvp_benchmark_without_arguments_on_a_cpu_runs_the_tiny_preset(capsys: pytest.CaptureFixture) -> None:
    import torch

    module = _load("benchmarks/jvp_vs_soflow.py")
    expected = "paper" if torch.cuda.is_available() else "tiny"
    assert module.parse_config([]) == module.PRESETS[expected]
    assert f"jvp_vs_soflow: preset {expected}" in capsys.readouterr().out  # says what it runs before it starts


def test_benchmark_results_go_outside_the_tracked_tree() -> None:
    common = _load("benchmarks/_common.py")
    assert common.RESULTS == ROOT / "runs" / "benchmarks"
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "runs/" in ignored
    assert common.PUBLISHED_RESULTS == ROOT / "benchmarks" / "results"


# ------------------------------------------------------------------ docstrings against parsers, default outputs


def _docstring(script: str) -> str:
    import ast

    return ast.get_docstring(ast.parse((ROOT / script).read_text(encoding="utf-8"))) or ""


_HELP_TEXTS: dict[str, str] = {}


def _full_help(script: str, capsys: pytest.CaptureFixture) -> str:
    """The script's ``--help`` (each script's is made once per session)."""
    if script not in _HELP_TEXTS:
        _HELP_TEXTS[script] = _make_help(script, capsys)
    return _HELP_TEXTS[script]


def _make_help(script: str, capsys: pytest.CaptureFixture) -> str:
    if script in RECIPES:
        import subprocess

        done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        if done.returncode != 0 and "No module named" in done.stderr:
            pytest.skip(f"{script} needs a package that is not installed: {done.stderr.strip().splitlines()[-1]}")
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout
    return _help_of(script, capsys)


def _shown_default(help_text: str) -> str | None:
    """The last ``default: VALUE`` of a flag's help, as --help shows it (None when it shows none)."""
    found = list(re.finditer(r"\bdefault: ", help_text))
    if not found:
        return None
    rest = help_text[found[-1].end() :]
    closing = "(" in help_text[max(0, found[-1].start() - 1) : found[-1].start()]
    value = re.split(r";| \(preset " + (r"|\)(?=\s|$)" if closing else ""), rest, maxsplit=1)[0].strip()
    return None if value in ("None", "none") else value


def _effective_default(flag: str, help_text: str) -> str | None:
    """Where a flag's default points: an empty ``--out-dir`` means ``runs/benchmarks`` (benchmarks/_common.py)."""
    value = _shown_default(help_text)
    derived = re.search(r"\bNone: ((?:runs|/)[^\s,;]*)", help_text)  # a default derived from other flags
    if value is None and derived:
        return derived.group(1)
    if flag == "--out-dir" and value in ("", "''", '""', None):
        assert "runs/benchmarks" in help_text, f"--out-dir's help does not say where an empty value writes: {help_text}"
        return "runs/benchmarks"
    return value


def _ignored_by_git(path: str) -> bool:
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a checkout to read .gitignore")
    done = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, capture_output=True)
    return done.returncode == 0


ALL_SCRIPTS = SCRIPTS + RECIPES
_OUTPUT_WORDS = re.compile(r"\b(?:write|writes|written|go to|goes to|saved?)\b", re.I)
_PATH = re.compile(r"(?<![\w/<>.-])((?:[\w.-]+|<[^>\s]+>)(?:/(?:[\w.*-]+|<[^>]+>))+/?)")
_MODEL_NAME = re.compile(r"(?:DiT|SiT|SoFlow)-[A-Z]+/\d+")  # DiT-XL/2, SiT-B/4: a size, not a path


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_default_outputs_stay_outside_the_tracked_tree(script: str, capsys: pytest.CaptureFixture) -> None:
    options = _options(_full_help(script, capsys))
    outputs = {flag: _effective_default(flag, options[flag]) for flag in ("--out", "--out-dir") if flag in options}
    assert outputs, f"{script}: no --out or --out-dir flag"
    for flag, value in outputs.items():
        if value is None:  # no default: the flag is required (export_pretrained.py, the recipes)
            assert "required" in options[flag] or re.search(rf"\[{flag} ", _full_help(script, capsys)) is None
            continue
        if flag == "--out" and "--out-dir" in outputs:
            continue  # a file stem inside --out-dir
        folder = value.split("<", 1)[0]  # runs/samples/<checkpoint name>-nfe<N>.npz -> runs/samples/
        assert not Path(folder).is_absolute(), f"{script} {flag} defaults to an absolute path {value}"
        assert _ignored_by_git(folder.rstrip("/") + "/x"), (
            f"{script} writes into the tracked tree by default: {flag} {value}"
        )


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_docstring_agrees_with_the_parser(script: str, capsys: pytest.CaptureFixture) -> None:
    doc = _docstring(script)
    full_help = _full_help(script, capsys)
    options = _options(full_help)
    flat = re.sub(r"\s+", " ", doc)
    # every flag the docstring names exists (torchrun's own flags are skipped)
    for flag in sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?![\w])", doc))):
        if flag in ("--nproc", "--standalone", "--multi", "--num-processes", "--cpu", "--index-url"):
            continue
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", full_help), f"{script}: docstring names {flag}"
    # every default the docstring states for a flag is the parser's
    stated = re.finditer(r"``(--[\w-]+)``((?:(?!``--)[^;.])*?)\bdefault:? (``[^`]+``|[^\s`);:,]+)", flat)
    for match in stated:
        flag, value = match.group(1), match.group(3).strip("`")
        assert flag in options, f"{script}: the docstring states a default for {flag}, which does not exist"
        assert value == _effective_default(flag, options[flag]), (
            f"{script}: the docstring says {flag} defaults to {value!r}; --help says {options[flag]!r}"
        )
    # where outputs go: a path of the tracked tree in such a sentence is only ever a flag's explicit value
    prose = re.sub(r"\s+", " ", "\n".join(line for line in doc.splitlines() if not line.startswith("    ")))
    for sentence in re.split(r"(?<=\.)\s+(?=[A-Z`])", prose):
        if not _OUTPUT_WORDS.search(sentence):
            continue
        for path in _PATH.finditer(sentence):
            value = path.group(1)
            if (
                value.startswith(("<", "/"))
                or value.endswith(".py")
                or _MODEL_NAME.fullmatch(value)
                or "://" in sentence[path.start() - 8 : path.end()]
            ):
                continue
            before = sentence[max(0, path.start() - 16) : path.start()]
            if re.search(r"--[\w-]+[ =`]*$", before) or _ignored_by_git(value.split("<", 1)[0].rstrip("/") + "/x"):
                continue
            raise AssertionError(f"{script}: the docstring says outputs go to {value}, in the tracked tree: {sentence}")
    # a command line without flags says, if it names a preset, the one the parser picks
    if "--preset" in options:
        presets = re.search(r"\{([^}]*)\}", options["--preset"]).group(1).split(",")
        picked = _shown_default(options["--preset"])
        lines = doc.splitlines()
        for row, line in enumerate(lines):
            bare = re.match(rf"^\s*python {re.escape(script)}\s*(?:#\s*(.*))?$", line)
            if bare and bare.group(1):
                comment = bare.group(1)
                for more in lines[row + 1 :]:  # the comment may go on over lines of its own
                    if not re.match(r"^\s+#", more):
                        break
                    comment += " " + more.strip().lstrip("#")
                named = [p for p in presets if re.search(rf"\b{re.escape(p)}\b", comment)]
                assert not named or picked in named, (
                    f"{script}: without flags it runs preset {picked}, but its docstring says {named}: {comment}"
                )


def test_a_field_value_given_to_preset_points_to_its_flag(capsys: pytest.CaptureFixture) -> None:
    module = _load("examples/train_toy_2d.py")
    with pytest.raises(SystemExit):
        module.parse_config(["--preset", "imagenet"])  # a recipe, not a run size
    pointer = "choose from default, tiny. 'imagenet' is a value of --recipe: pass --recipe imagenet"
    assert f"unknown preset 'imagenet'; {pointer}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        module.parse_config(["--preset", "huge"])
    error = capsys.readouterr().err
    assert "unknown preset 'huge'; choose from default, tiny" in error and "--recipe" not in error.split("error:")[1]
    assert module.parse_config(["--preset", "tiny", "--recipe", "imagenet"]).recipe == "imagenet"
