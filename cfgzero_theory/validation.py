"""Argument checks at the API boundary: one place, one meaning of "an integer" and "a number".

Every public constructor and function of the toolkit validates its arguments with these
helpers, so they all agree:

* ``bool`` is not a number: ``True`` is refused where an integer or a real is expected;
* NumPy scalars and 0-d arrays count as the Python number they hold (``np.int64(8)`` is 8);
* real numbers are finite unless a check says otherwise (NaN and ±inf are refused);
* a failed check raises ``ValueError`` whose message starts with the argument's name and
  says what was expected and what was given.

Values inside ``jit`` are tracers, not numbers: the ``*_leaf`` checks (for pytree leaves
such as a guidance scale, which may be traced) check concrete values and let tracers
through, so code under ``jit`` stays branch-free.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable

import numpy as np

__all__ = [
    "concrete_number",
    "check_int",
    "check_real",
    "check_float_dtype",
    "check_fraction",
    "check_open_fraction",
    "check_choice",
    "check_leaf",
    "check_int_leaf",
    "limited_list",
]


def concrete_number(value) -> int | float | None:
    """``value`` as a Python ``int`` or ``float`` if it is a concrete real scalar, else ``None``.

    Concrete means a Python or NumPy number, or a NumPy / JAX array with one element that is
    not a tracer.  Booleans, strings, tracers and placeholder objects give ``None``.
    """
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "dtype") and getattr(value, "size", None) == 1 and not _is_tracer(value):
        kind = np.dtype(value.dtype).kind
        item = np.asarray(value).reshape(()).item()
        if kind in "iu":
            return int(item)
        if kind == "f":
            return float(item)
    return None


def _is_tracer(value) -> bool:
    import jax

    return isinstance(value, jax.core.Tracer)


def _fail(name: str, requirement: str, value) -> ValueError:
    return ValueError(f"{name} must be {requirement}, got {value!r}")


def _bounds_text(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python ``int`` within ``[minimum, maximum]`` (either bound optional).

    Accepts Python and NumPy integers (not ``bool``, not floats such as ``2.0``).
    """
    number = concrete_number(value)
    if not isinstance(number, int) or (minimum is not None and number < minimum) or (
            maximum is not None and number > maximum):
        raise _fail(name, "an integer" + _bounds_text(minimum, maximum), value)
    return number


def check_real(name: str, value, *, minimum: float | None = None, maximum: float | None = None,
               positive: bool = False, finite: bool = True) -> float:
    """``value`` as a Python ``float``: a real number, finite unless ``finite=False``.

    ``minimum``/``maximum`` are inclusive bounds; ``positive`` asks for ``value > 0``.
    Integers are accepted (``3`` → ``3.0``); ``bool`` is not.
    """
    number = concrete_number(value)
    requirement = ("a finite " if finite else "a ") + ("positive " if positive else "") + "number"
    requirement += _bounds_text(minimum, maximum)
    if number is None:
        raise _fail(name, requirement, value)
    number = float(number)
    if math.isnan(number) or (finite and math.isinf(number)) or (positive and not number > 0) or (
            minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise _fail(name, requirement, value)
    return number


def check_fraction(name: str, value) -> float:
    """``value`` as a ``float`` in ``[0, 1]``."""
    return check_real(name, value, minimum=0.0, maximum=1.0)


def check_open_fraction(name: str, value) -> float:
    """``value`` as a ``float`` strictly between 0 and 1 (a probability mass such as an HDR's)."""
    number = check_real(name, value)
    if not 0.0 < number < 1.0:
        raise _fail(name, "a number strictly between 0 and 1", value)
    return number


def check_float_dtype(name: str, dtype):
    """``dtype`` as a NumPy floating dtype (``"bfloat16"``, ``jnp.float32``, …); anything that
    is not a dtype, or not a floating one, is a ``ValueError`` (not NumPy's ``TypeError``)."""
    import jax.numpy as jnp

    try:
        resolved = jnp.dtype(dtype)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a floating dtype such as 'float32' or 'bfloat16', got {dtype!r}") from None
    if not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"{name} must be a floating dtype such as 'float32' or 'bfloat16', got {dtype!r}")
    return resolved


def check_choice(name: str, value, choices: Iterable):
    """``value`` if it is one of ``choices`` (compared with ``==``), else a ``ValueError`` listing them."""
    choices = tuple(choices)
    if isinstance(value, str) and value in choices:
        return value
    if not isinstance(value, str) and any(value is c or value == c for c in choices):
        return value
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_leaf(name: str, value, ok: Callable[[float], bool], requirement: str, *, scalar: bool = False):
    """Check a pytree leaf that may be traced: concrete values must be finite reals with ``ok(x)``.

    Tracers pass unchecked (they are checked where they were made); arrays of several
    values are checked element by element.  ``scalar=True`` also asks for a 0-d value, and
    checks that much of a tracer too (its shape is known).  Returns ``value`` unchanged,
    except that a concrete Python / NumPy scalar is returned as a Python ``float`` (so
    ``CFG(4)`` and ``CFG(4.0)`` give the same pytree leaf type and share one compiled program).
    """
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise _fail(name, requirement, value)
    if scalar and np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
    if not _is_checkable(value):
        return value
    number = concrete_number(value)
    if number is not None:
        if not (math.isfinite(number) and ok(float(number))):
            raise _fail(name, requirement, value)
        return float(number) if not hasattr(value, "shape") or isinstance(value, np.generic) else value
    try:
        array = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise _fail(name, requirement, value) from None
    if not (np.all(np.isfinite(array)) and all(ok(float(x)) for x in array.reshape(-1))):
        raise _fail(name, requirement, value)
    return value


def check_int_leaf(name: str, value, *, minimum: int = 0):
    """Like :func:`check_leaf` for integer leaves (e.g. zero-init steps): concrete values must be
    integers ``>= minimum`` and come back as Python ``int``; tracers pass unchecked."""
    if isinstance(value, (str, bytes)):
        raise _fail(name, f"an integer >= {minimum}", value)
    if not _is_checkable(value):
        return value
    if hasattr(value, "shape") and not isinstance(value, np.generic) and np.ndim(value) > 0:
        array = np.asarray(value)
        if array.dtype.kind not in "iu" or np.any(array < minimum):
            raise _fail(name, f"integers >= {minimum}", value)
        return value
    return check_int(name, value, minimum=minimum)


def _is_checkable(value) -> bool:
    """Whether a leaf holds concrete numbers: a Python / NumPy number, a NumPy array or a JAX
    array that is not a tracer.  Inside transformations ``jax`` rebuilds pytrees with tracers,
    ``object()`` or shape placeholders as leaves; those pass unchecked."""
    import jax

    if isinstance(value, (numbers.Number, np.generic, np.ndarray)):
        return True
    return isinstance(value, jax.Array) and not _is_tracer(value)


def limited_list(items, show=repr, most: int = 12) -> str:
    """``[a, b, …]`` for an error message: the first ``most`` items (each through ``show``) and
    how many more there are."""
    items = list(items)
    shown = ", ".join(show(item) for item in items[:most])
    return f"[{shown}{f', … ({len(items) - most} more)' if len(items) > most else ''}]"
