"""Shared test fixtures.

* ``x64``: run a test with ``jax_enable_x64`` on (build mixtures inside the test).
* the persistent compilation cache is off (``CFGZERO_COMPILATION_CACHE=off``).
* ``torch`` / ``diffusers`` / ``peft``: the parity references.  Outside CI they skip when missing; in CI
  (``CI`` set) a missing reference is a failure, and a run in which a ``parity`` test was
  skipped fails the session, so parity can never pass by being skipped.
"""

import importlib
import os

import jax
import pytest

IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")

# Pipelines turn JAX's persistent compilation cache on by default; tests must not write
# into the user's cache folder (tests/test_compilation.py checks the mechanism itself).
os.environ.setdefault("CFGZERO_COMPILATION_CACHE", "off")


@pytest.fixture
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def _reference(name):
    try:
        return importlib.import_module(name)
    except ImportError as err:
        if IN_CI:
            pytest.fail(f"parity reference {name!r} is not installed in CI: {err}")
        pytest.skip(f"{name} not installed (pip install -e '.[test]')")


@pytest.fixture(scope="session")
def torch():
    module = _reference("torch")
    module.set_num_threads(1)
    return module


@pytest.fixture(scope="session")
def diffusers():
    return _reference("diffusers")


@pytest.fixture(scope="session")
def peft():
    """diffusers loads LoRA files through peft."""
    return _reference("peft")


_skipped_parity = []


def pytest_runtest_logreport(report):
    if report.skipped and "parity" in report.keywords:
        _skipped_parity.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if IN_CI and _skipped_parity:
        print(f"\nCI: {len(_skipped_parity)} parity test(s) were skipped: {_skipped_parity[:5]}")
        session.exitstatus = 1
