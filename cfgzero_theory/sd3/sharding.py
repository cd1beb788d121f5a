"""Moved to :mod:`cfgzero_theory.ports.sharding` (shared by every model port); this path still imports it."""

from cfgzero_theory.ports.moved import alias_module

alias_module(__name__, "cfgzero_theory.ports.sharding")
