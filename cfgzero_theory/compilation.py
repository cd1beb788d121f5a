"""JAX's persistent compilation cache, on by default in the pipelines and command lines.

A sampling loop of a real model takes tens of seconds to compile (SD3-medium on an H100:
about 40 s); with the cache a second process loads the compiled program from disk instead.
:func:`enable_compilation_cache` points JAX's ``jax_compilation_cache_dir`` at a folder:

* the ``path`` argument, else the environment variable ``CFGZERO_COMPILATION_CACHE``, else
  ``$XDG_CACHE_HOME/cfgzero_theory/jax`` (``~/.cache/cfgzero_theory/jax``);
* opt out with ``CFGZERO_COMPILATION_CACHE=off`` (or ``0``, ``false``, ``no``), with the
  pipelines' ``compilation_cache=False`` or with the command lines' ``--no-compilation-cache``;
* a cache folder the user already configured for JAX (``jax_compilation_cache_dir``,
  e.g. via ``JAX_COMPILATION_CACHE_DIR``) is left as it is.

Only programs that took at least ``min_compile_seconds`` to compile are stored, so the many
small programs of the exact theory do not fill the disk.
"""

from __future__ import annotations

import os

import jax

__all__ = ["ENV_VAR", "default_cache_dir", "enable_compilation_cache"]

#: The environment variable holding the cache folder, or ``off`` to disable the cache.
ENV_VAR = "CFGZERO_COMPILATION_CACHE"

_OFF = ("off", "0", "false", "no")


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/cfgzero_theory/jax``, ``~/.cache/cfgzero_theory/jax`` without it."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "cfgzero_theory", "jax")


def enable_compilation_cache(path: str | os.PathLike | None = None, *, min_compile_seconds: float = 1.0
                             ) -> str | None:
    """Turn on JAX's persistent compilation cache; returns the folder in use, ``None`` if off.

    See the module docstring for how the folder is chosen and how to opt out.  Call it
    before the first compilation of the programs to be cached.
    """
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return configured
    if path is None:
        setting = os.environ.get(ENV_VAR, "").strip()
        if setting.lower() in _OFF:
            return None
        path = setting or default_cache_dir()
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None  # an unusable cache folder must never stop sampling
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_compilation_cache_dir", path)
    return path
