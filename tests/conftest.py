"""Settings of every test run, in one place, printed in the pytest header.

* **torch threads**: ``TORCH_THREADS`` intra-op threads (override with ``SOFLOW_TEST_THREADS``).
  A fixed count, not "as many as the machine has", because a CPU BLAS may split a matmul's
  reduction differently per thread count and so round differently: with a fixed count the
  numbers do not change with the machine's number of cores. (Processes that tests spawn as
  gloo ranks run one thread each: ``_helpers.spawn_gloo_ranks``.)
* **hypothesis profiles** (pick one with ``--hypothesis-profile=NAME``):

  - ``deterministic``, the default, also in CI: 40 examples per property, derandomized (the
    examples follow from the test's source and the code loaded, not from a clock or a stored
    database), so the same ``pytest`` command draws the same examples on every run and every
    machine and gives the same verdict.
  - ``explore``: 100 random examples per property, for hunting failures; CI runs it over the
    property tests with one fresh seed per run and prints the command that replays it.

  ``--hypothesis-seed=N`` turns derandomization off so the seed takes effect: the same command
  with the same seed draws the same examples again (hypothesis also mixes in constants found in
  the loaded modules, so replay with the same selection of test files).
  No profile keeps an example database: a failure stored in ``.hypothesis/`` would be replayed
  first on every later run of that checkout and make its verdict depend on its history. A
  failure is reproduced from the printed seed or the printed ``@reproduce_failure`` blob instead.
"""

import os
import sys
import types
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# torch-fidelity 0.4.0's wheel (the `fid` extra) installs its own test suite as a top-level package named
# `tests`. A regular package wins over this folder, a namespace package (no __init__.py, so that test modules
# also import `_helpers` by its bare name), and `tests._helpers` would then be looked up in site-packages.
# Bind the name to this folder before any test module imports through it.
_TESTS = str(Path(__file__).resolve().parent)
if list(getattr(sys.modules.get("tests"), "__path__", [])) != [_TESTS]:
    sys.modules["tests"] = types.ModuleType("tests", "this project's test suite")
    sys.modules["tests"].__path__ = [_TESTS]

_threads = os.environ.get("SOFLOW_TEST_THREADS", "2")
if not _threads.isdigit() or int(_threads) < 1:
    raise ValueError(f"SOFLOW_TEST_THREADS must be a positive integer; got {_threads!r}")
TORCH_THREADS = int(_threads)
torch.set_num_threads(TORCH_THREADS)

_COMMON = {"deadline": None, "database": None, "print_blob": True, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("deterministic", max_examples=40, derandomize=True, **_COMMON)
settings.register_profile("explore", max_examples=100, derandomize=False, **_COMMON)
settings.load_profile("deterministic")

# Without a GPU the Triton kernels run in Triton's CPU interpreter. Triton reads this variable
# when a kernel is decorated, so it must be set before anything imports soflow_kernels;
# backend="auto" never picks the interpreter, so the rest of the suite is unaffected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.hookimpl(trylast=True)  # after hypothesis' own plugin has loaded --hypothesis-profile and the seed
def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("hypothesis_seed", None) is not None and settings.default.derandomize:
        name = settings.get_current_profile_name()
        settings.register_profile(f"{name}-seeded", parent=settings.get_profile(name), derandomize=False)
        settings.load_profile(f"{name}-seeded")


def pytest_report_header(config: pytest.Config) -> list[str]:
    current = settings.default
    seed = config.getoption("hypothesis_seed", None)
    draws = "derandomized" if current.derandomize else f"random, seed {seed if seed is not None else 'unset'}"
    return [
        f"torch {torch.__version__}: {torch.get_num_threads()} intra-op threads (SOFLOW_TEST_THREADS)",
        f"hypothesis profile {settings.get_current_profile_name()!r}: {current.max_examples} examples, "
        f"{draws}, database {current.database}",
    ]
