"""The persistent compilation cache: where it goes, how to opt out, and that it is used.

Each case runs in a fresh interpreter: JAX's cache configuration is process-wide.
"""

import json
import os
import subprocess
import sys

PROBE = """
import json, os, sys
import jax, jax.numpy as jnp
from cfgzero_theory.compilation import enable_compilation_cache
folder = enable_compilation_cache(*sys.argv[1:], min_compile_seconds=0.0)
jax.jit(lambda x: jnp.sin(x) * 2 + 1)(jnp.ones(7))
print(json.dumps({"folder": folder, "config": jax.config.jax_compilation_cache_dir}))
"""


def _probe(tmp_path, *args, **env):
    run_env = {k: v for k, v in os.environ.items() if k not in ("CFGZERO_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    run_env.update(env, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    out = subprocess.run([sys.executable, "-c", PROBE, *args], env=run_env, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _entries(folder):
    return [f for f in os.listdir(folder) if not f.startswith(".")] if os.path.isdir(folder) else []


def test_default_folder_is_filled_with_compiled_programs(tmp_path):
    got = _probe(tmp_path)
    expected = str(tmp_path / "xdg" / "cfgzero_theory" / "jax")
    assert got == {"folder": expected, "config": expected}
    assert _entries(expected), "the compiled program was not written to the cache"


def test_environment_variable_chooses_or_disables_the_cache(tmp_path):
    chosen = str(tmp_path / "chosen")
    assert _probe(tmp_path, CFGZERO_COMPILATION_CACHE=chosen)["folder"] == chosen and _entries(chosen)
    off = _probe(tmp_path, CFGZERO_COMPILATION_CACHE="off")
    assert off == {"folder": None, "config": None}
    assert not _entries(str(tmp_path / "xdg" / "cfgzero_theory" / "jax"))


def test_a_folder_the_user_configured_for_jax_is_kept(tmp_path):
    theirs = str(tmp_path / "theirs")
    got = _probe(tmp_path, str(tmp_path / "ours"), JAX_COMPILATION_CACHE_DIR=theirs)
    assert got == {"folder": theirs, "config": theirs}
