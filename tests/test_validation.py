"""Unit tests of :mod:`cfgzero_theory.validation`, the one meaning of "an integer" and "a number".

Rules under test: ``bool`` is never a number; NumPy scalars count as the numbers they hold;
NaN and ±inf are refused unless ``finite=False``; bounds are inclusive; a failure is a
``ValueError`` whose message starts with the argument's name; tracers pass through the
``*_leaf`` checks inside ``jax.jit``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfgzero_theory.validation import (
    check_choice,
    check_fraction,
    check_int,
    check_int_leaf,
    check_leaf,
    check_open_fraction,
    check_real,
    concrete_number,
)


# ----------------------------------------------------------------------------- concrete_number
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (3, 3), (np.int64(8), 8), (np.uint8(7), 7), (np.int32(-2), -2), (2.5, 2.5), (np.float32(0.5), 0.5),
        (np.array(4), 4), (jnp.asarray(3), 3), (jnp.asarray(1.5), 1.5),
    ],
)
def test_concrete_number_reads_python_numpy_and_jax_scalars(value, expected):
    number = concrete_number(value)
    assert number == expected and type(number) is type(expected)


@pytest.mark.parametrize("value", [True, False, np.bool_(True), "3", b"3", None, object(), [1], np.array(True)])
def test_concrete_number_refuses_non_numbers(value):
    assert concrete_number(value) is None


# ----------------------------------------------------------------------------- check_int
def test_check_int_accepts_python_and_numpy_integers_as_python_int():
    for value in (8, np.int64(8), np.int32(8), np.uint16(8), np.array(8), jnp.asarray(8)):
        out = check_int("steps", value)
        assert out == 8 and type(out) is int


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 2.0, np.float64(3.0), 2.5, "2", None, float("nan")])
def test_check_int_refuses_bools_floats_and_strings(value):
    with pytest.raises(ValueError, match=r"^steps must be an integer"):
        check_int("steps", value)


def test_check_int_bounds_are_inclusive_and_named():
    assert check_int("k", 0, minimum=0) == 0 and check_int("k", 5, maximum=5) == 5
    with pytest.raises(ValueError, match=r"^k must be an integer >= 1, got 0$"):
        check_int("k", 0, minimum=1)
    with pytest.raises(ValueError, match=r"^k must be an integer <= 5, got 6$"):
        check_int("k", 6, maximum=5)
    with pytest.raises(ValueError, match=r"^k must be an integer in \[0, 3\], got np\.int64\(4\)|^k must be an integer in \[0, 3\], got 4"):
        check_int("k", np.int64(4), minimum=0, maximum=3)


# ----------------------------------------------------------------------------- check_real
def test_check_real_accepts_ints_and_numpy_floats_as_python_float():
    for value, expected in ((3, 3.0), (np.int64(3), 3.0), (np.float32(0.25), 0.25), (2.5, 2.5), (jnp.asarray(2.0), 2.0)):
        out = check_real("scale", value)
        assert out == expected and type(out) is float


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), np.float32("nan"), np.float64("inf")])
def test_check_real_refuses_nan_and_inf(value):
    with pytest.raises(ValueError, match=r"^scale must be a finite number"):
        check_real("scale", value)


def test_check_real_finite_false_allows_inf_never_nan():
    assert check_real("limit", float("inf"), finite=False) == math.inf
    with pytest.raises(ValueError, match="^limit"):
        check_real("limit", float("nan"), finite=False)


@pytest.mark.parametrize("value", [True, False, np.bool_(False), "1.0", None, [1.0], object()])
def test_check_real_refuses_bools_and_non_numbers(value):
    with pytest.raises(ValueError, match=r"^scale must be a finite number"):
        check_real("scale", value)


def test_check_real_bounds_and_positive():
    assert check_real("x", 0.0, minimum=0.0) == 0.0 and check_real("x", 1.0, maximum=1.0) == 1.0
    with pytest.raises(ValueError, match=r"^x must be a finite number >= 0\.0, got -0\.1$"):
        check_real("x", -0.1, minimum=0.0)
    with pytest.raises(ValueError, match=r"^x must be a finite number <= 1\.0"):
        check_real("x", 1.5, maximum=1.0)
    with pytest.raises(ValueError, match=r"^x must be a finite positive number, got 0\.0$"):
        check_real("x", 0.0, positive=True)
    assert check_real("x", 1e-300, positive=True) == 1e-300


def test_fractions():
    assert check_fraction("p", 0) == 0.0 and check_fraction("p", np.float32(1.0)) == 1.0
    for bad in (-0.01, 1.01, float("nan"), True):
        with pytest.raises(ValueError, match="^p must be"):
            check_fraction("p", bad)
    assert check_open_fraction("mass", 0.95) == 0.95
    for bad in (0.0, 1.0, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="^mass must be"):
            check_open_fraction("mass", bad)


# ----------------------------------------------------------------------------- check_choice
def test_check_choice_names_the_argument_and_lists_the_choices():
    assert check_choice("solver", "euler", ("euler", "heun")) == "euler"
    assert check_choice("qk_norm", None, (None, "rms_norm")) is None
    with pytest.raises(ValueError, match=r"^solver must be one of \('euler', 'heun'\), got 'rk4'$"):
        check_choice("solver", "rk4", ("euler", "heun"))
    with pytest.raises(ValueError, match="^solver must be one of"):
        check_choice("solver", ["euler"], ("euler", "heun"))  # unhashable values are compared, not hashed


# ----------------------------------------------------------------------------- leaves
def test_check_leaf_converts_concrete_scalars_and_checks_arrays():
    positive = (lambda x: x > 0, "a positive number")
    assert type(check_leaf("w", 4, *positive)) is float and check_leaf("w", np.int64(4), *positive) == 4.0
    array = np.array([1.0, 2.0])
    assert check_leaf("w", array, *positive) is array  # arrays come back unchanged
    for bad in (0.0, np.array([1.0, -1.0]), float("nan"), np.array([1.0, np.inf]), True, "4"):
        with pytest.raises(ValueError, match="^w must be a positive number"):
            check_leaf("w", bad, *positive)


def test_check_leaf_scalar_refuses_arrays_even_traced():
    with pytest.raises(ValueError, match=r"^shift must be a scalar, got shape \(2,\)"):
        check_leaf("shift", np.ones(2), lambda x: x > 0, "positive", scalar=True)
    with pytest.raises(ValueError, match="^shift must be a scalar"):
        jax.jit(lambda s: check_leaf("shift", s, lambda x: x > 0, "positive", scalar=True))(jnp.ones(2))


def test_leaf_checks_let_tracers_through_under_jit():
    seen = {}

    def f(scale, steps):
        seen["scale"] = check_leaf("scale", scale, lambda x: x > 0, "a positive number")
        seen["steps"] = check_int_leaf("steps", steps, minimum=1)
        return scale * steps

    # -1 and 0 would be refused if concrete: the tracers are not inspected
    assert float(jax.jit(f)(jnp.float32(-1.0), jnp.int32(0))) == 0.0
    assert isinstance(seen["scale"], jax.core.Tracer) and isinstance(seen["steps"], jax.core.Tracer)


def test_check_int_leaf_concrete_values():
    assert check_int_leaf("k", np.int64(2)) == 2 and type(check_int_leaf("k", np.int64(2))) is int
    array = np.array([0, 3])
    assert check_int_leaf("k", array) is array
    for bad in (True, 1.0, -1, np.array([1, -1]), np.array([1.0, 2.0]), "2"):
        with pytest.raises(ValueError, match="^k must be"):
            check_int_leaf("k", bad)
    with pytest.raises(ValueError, match=r"^k must be an integer >= 2, got 1$"):
        check_int_leaf("k", 1, minimum=2)
