import doctest
import importlib
import os
import pkgutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import soflow_core

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(soflow_core.__path__, "soflow_core."))


def test_every_public_name_resolves():
    assert len(soflow_core.__all__) == len(set(soflow_core.__all__))
    for name in soflow_core.__all__:
        assert getattr(soflow_core, name) is not None, name
    from soflow_core import SolutionConsistencyLoss  # the documented import

    assert SolutionConsistencyLoss.__module__ == "soflow_core.losses"


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module):
    mod = importlib.import_module(module)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(mod, module, globs=dict(vars(mod))):
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} docstring example(s) failed in {module}"


def test_public_functions_have_docstrings():
    for name in soflow_core.__all__:
        obj = getattr(soflow_core, name)
        if callable(obj) and typing.get_origin(obj) is None:  # type aliases such as Backend carry no docstring
            assert obj.__doc__ and obj.__doc__.strip(), name


def test_validation_holds_without_the_jaxtyping_hook():
    """Production code has no runtime type checker: our own checks must catch the same bad input."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            str(ROOT / "tests" / "test_validation.py"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
