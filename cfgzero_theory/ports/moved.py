"""Old import paths of names that moved into the shared port modules keep working, with a warning.

* :func:`alias_module` ``(old, new)`` — make the module ``old`` the module ``new`` (used by a
  stub file left at the old path);
* :func:`moved_attributes` ``(module, moves)`` — a module ``__getattr__`` that resolves the
  names of ``moves`` (``name -> "package.module:new_name"``) in their new home.

Both warn with a :class:`DeprecationWarning` that says where the name lives now.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable, Mapping

__all__ = ["alias_module", "moved_attributes"]


def alias_module(old: str, new: str) -> None:
    """Replace the module ``old`` (being imported) by the module ``new`` in ``sys.modules``."""
    warnings.warn(f"{old} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)


def moved_attributes(module: str, moves: Mapping[str, str]) -> Callable[[str], object]:
    """A module-level ``__getattr__`` for ``module`` that finds the names in ``moves`` where they moved."""

    def __getattr__(name: str):
        if name not in moves:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target_module, target_name = moves[name].split(":")
        warnings.warn(f"{module}.{name} moved to {target_module}.{target_name}; import it from there",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(target_module), target_name)

    return __getattr__
