"""Benchmark the exact Gaussian-mixture velocity (``GaussianMixture.velocity``) against NumPy/SciPy.

Run ``python -m experiments.bench_exact`` (``--help`` for options).  For each configuration
``(d, K)`` it times, in float32 with a scalar ``t``:

* the jitted JAX velocity (median over repeats, after warm-up, ``block_until_ready`` on every
  call), as throughput in (points × components)/s, as GFLOP/s under the flop model
  ``4·n·K·d²`` (the two matrix products ``x @ [Q_1 … Q_K]`` and ``y @ [Q_1 … Q_K]ᵀ``,
  ``2·n·K·d²`` each, nothing else counted), and as a fraction of the machine's measured
  float32 matmul peak (jitted ``jnp.dot`` of two 2048×2048 matrices);
* a plain NumPy/SciPy reference written the straightforward way: per component, Cholesky of
  ``S_k(t) = t²Σ_k + (1 − t)²I`` at that ``t``, ``cho_solve`` for all residuals, log-det from
  the Cholesky diagonal, softmax of the log-responsibilities, and
  ``u = Σ_k w_k (μ_k + (tΣ_k − (1 − t)I) S_k⁻¹ r_k)`` — also in float32, timed with the BLAS's
  default threading and with one BLAS thread (the faster is reported: many small
  multi-threaded solves on a few cores can be much slower than serial ones);

and checks that the two agree (normwise max relative error, also against a float64 run of the
reference).  The last stdout line is one JSON object with every number, the environment and
the targets (``meets_speedup_target`` / ``meets_peak_target``: booleans, never asserted).
Each timing also records ``background_cores``, the CPU used by other processes meanwhile: on a
shared machine, timings taken while it is large are contaminated.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import scipy.linalg

import jax
import jax.numpy as jnp

from cfgzero_theory.mixture import DEFAULT_CHUNK_ELEMENTS, GaussianMixture
from experiments._common import usage_error
from experiments.bench_common import (
    LoadMeter, environment, format_number, loadavg, openblas_libraries, print_report,
)

FLOP_MODEL = (
    "useful flops = 4*n*K*d^2: the two matrix products x @ [Q_1..Q_K] and y @ [Q_1..Q_K]^T "
    "(2*n*K*d^2 each); nothing else (element-wise work, softmax, means term, Cholesky) is counted"
)
AGREEMENT_METRIC = "max |u_a - u_b| / max |u_b| over all points and coordinates (normwise, inf-norm)"
TARGET = {"d": 64, "K": 64, "n": 4096, "speedup_min": 15.0, "fraction_of_peak_min": 0.6}
DEFAULT_CONFIGS = "2x8,64x64"
PEAK_SIZE = 2048
QUICK_N = 64
QUICK_PEAK_SIZE = 512


# --------------------------------------------------------------------------- problem
def make_problem(d: int, k: int, n: int, t: float, seed: int):
    """A random mixture (float64 NumPy) and ``n`` points drawn from ``x_t`` at time ``t``."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.ones(k)) + 1e-3
    weights /= weights.sum()
    means = rng.normal(scale=2.0, size=(k, d))
    q, _ = np.linalg.qr(rng.normal(size=(k, d, d)))
    lam = np.exp(rng.uniform(np.log(0.05), np.log(1.0), size=(k, d)))
    covs = np.einsum("kij,kj,klj->kil", q, lam, q)
    covs = 0.5 * (covs + np.swapaxes(covs, -1, -2))
    comp = rng.choice(k, size=n, p=weights)
    x1 = means[comp] + np.einsum("nij,nj->ni", q[comp], np.sqrt(lam[comp]) * rng.normal(size=(n, d)))
    x0 = rng.normal(size=(n, d))
    x = t * x1 + (1 - t) * x0
    return weights, means, covs, x


# --------------------------------------------------------------------------- reference
def numpy_velocity(x, t, log_pi, means, covs):
    """Straightforward NumPy/SciPy velocity: per-component Cholesky at this ``t``; dtype of ``x`` kept."""
    n, d = x.shape
    k_total = means.shape[0]
    dtype = x.dtype
    t = float(t)
    eye = np.eye(d, dtype=dtype)
    log_joint = np.empty((n, k_total), dtype=dtype)
    u_k = np.empty((k_total, n, d), dtype=dtype)
    for k in range(k_total):
        s_k = t * t * covs[k] + (1 - t) ** 2 * eye
        chol = scipy.linalg.cho_factor(s_k, lower=True)
        r = x - t * means[k]
        sol = scipy.linalg.cho_solve(chol, r.T).T  # S_k⁻¹ r_k for every point, (n, d)
        log_det = 2.0 * np.sum(np.log(np.diag(chol[0])))
        quad = np.einsum("ij,ij->i", r, sol)
        log_joint[:, k] = log_pi[k] - 0.5 * log_det - 0.5 * quad - 0.5 * d * math.log(2 * math.pi)
        u_k[k] = means[k] + sol @ (t * covs[k] - (1 - t) * eye)  # the matrix is symmetric
    log_joint -= log_joint.max(axis=1, keepdims=True)
    w = np.exp(log_joint)
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("nk,knd->nd", w, u_k)


# --------------------------------------------------------------------------- BLAS threads
@contextlib.contextmanager
def limit_blas_threads(n: int | None):
    """Temporarily set every loaded OpenBLAS to ``n`` threads (``None``: leave as is)."""
    libs = openblas_libraries() if n is not None else []
    before = [int(getter()) for _, _, getter in libs]
    try:
        for _, setter, _ in libs:
            setter(ctypes.c_int(n))
        yield
    finally:
        for (_, setter, _), old in zip(libs, before):
            setter(ctypes.c_int(old))


# --------------------------------------------------------------------------- timing
def time_call(fn: Callable[[], object], repeats: int, min_time: float, warmup: int = 2) -> dict:
    """Median seconds per call of ``fn`` (which must block until its result is ready).

    After ``warmup`` calls, each repeat runs ``fn`` enough times in a row to last at least
    ``min_time`` seconds (calibrated once) and records the mean per call; the median of the
    repeats is returned with the spread and the CPU load of other processes meanwhile.
    """
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    fn()
    single = time.perf_counter() - start
    inner = max(1, math.ceil(min_time / max(single, 1e-9)))
    samples = []
    with LoadMeter() as load:
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - start) / inner)
    return {
        "seconds": statistics.median(samples),
        "min_seconds": min(samples),
        "max_seconds": max(samples),
        "calls_per_repeat": inner,
        "repeats": repeats,
        "background_cores": load.background_cores,
    }


def measure_peak(size: int, repeats: int, min_time: float, with_numpy: bool, warmup: int = 2) -> dict:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    flops = 2.0 * size**3
    dot = jax.jit(jnp.dot)
    a_j, b_j = jnp.asarray(a), jnp.asarray(b)
    jax_t = time_call(lambda: dot(a_j, b_j).block_until_ready(), repeats, min_time, warmup)
    out = {
        "size": size,
        "dtype": "float32",
        "jax_gflops": flops / jax_t["seconds"] / 1e9,
        "jax_timing": jax_t,
    }
    if with_numpy:
        np_t = time_call(lambda: a @ b, repeats, min_time, warmup)
        out["numpy_gflops"] = flops / np_t["seconds"] / 1e9
        out["numpy_timing"] = np_t
    return out


# --------------------------------------------------------------------------- one config
def bench_config(d, k, n, t, seed, repeats, min_time, chunk_elements, peak_gflops, blas_settings=(None, 1), warmup=2) -> dict:
    weights, means, covs, x = make_problem(d, k, n, t, seed)
    mix = GaussianMixture(weights, means, covs, chunk_elements=chunk_elements)
    velocity = jax.jit(lambda m, x_, t_: m.velocity(x_, t_))
    x32 = x.astype(np.float32)
    x_j = jnp.asarray(x32)
    t_j = jnp.asarray(t, jnp.float32)  # traced scalar t: the sampler's situation
    u_jax = np.asarray(velocity(mix, x_j, t_j).block_until_ready())
    if u_jax.dtype != np.float32:
        raise RuntimeError(f"expected a float32 velocity, got {u_jax.dtype}")
    jax_t = time_call(lambda: velocity(mix, x_j, t_j).block_until_ready(), repeats, min_time, warmup)

    log_pi = np.log(weights / weights.sum())
    args32 = (log_pi.astype(np.float32), means.astype(np.float32), covs.astype(np.float32))
    u_np = numpy_velocity(x32, t, *args32)
    if u_np.dtype != np.float32:
        raise RuntimeError(f"NumPy reference is not float32 but {u_np.dtype}")
    # The reference is timed with the BLAS's default threading and with one BLAS thread (tiny
    # multi-threaded solves can be slower than serial ones); the faster one is reported.
    np_runs = {}
    if not openblas_libraries():
        blas_settings = (None,)
    for threads in blas_settings:
        with limit_blas_threads(threads):
            np_runs["default" if threads is None else str(threads)] = time_call(
                lambda: numpy_velocity(x32, t, *args32), repeats, min_time, min(warmup, 1)
            )
    np_setting = min(np_runs, key=lambda key: np_runs[key]["seconds"])
    np_t = np_runs[np_setting]
    u_64 = numpy_velocity(x, t, log_pi, means, covs)

    def rel(a, b):
        return float(np.max(np.abs(a.astype(np.float64) - b)) / np.max(np.abs(b)))

    flops = 4.0 * n * k * d * d
    pairs = float(n * k)
    jax_gflops = flops / jax_t["seconds"] / 1e9
    return {
        "name": f"d{d}_K{k}",
        "d": d,
        "K": k,
        "n": n,
        "t": t,
        "chunk_elements": chunk_elements,
        "chunk_rows": min(n, mix._chunk_rows()) if hasattr(mix, "_chunk_rows") else None,
        "useful_gflop_per_call": flops / 1e9,
        "jax_seconds": jax_t["seconds"],
        "jax_throughput": pairs / jax_t["seconds"],
        "jax_gflops": jax_gflops,
        "jax_fraction_of_peak": jax_gflops / peak_gflops,
        "jax_timing": jax_t,
        "numpy_seconds": np_t["seconds"],
        "numpy_throughput": pairs / np_t["seconds"],
        "numpy_gflops": flops / np_t["seconds"] / 1e9,
        "numpy_timing": np_t,
        "numpy_blas_threads_used": np_setting,
        "numpy_seconds_by_blas_threads": {key: run["seconds"] for key, run in np_runs.items()},
        "speedup": np_t["seconds"] / jax_t["seconds"],
        "speedup_vs_numpy_default_threads": np_runs["default"]["seconds"] / jax_t["seconds"]
        if "default" in np_runs
        else None,
        # The largest speed-up any implementation of the same flops could reach on this machine.
        "speedup_if_jax_ran_at_peak": np_t["seconds"] * peak_gflops * 1e9 / flops,
        "max_rel_err": rel(u_jax, u_np),
        "max_rel_err_jax_vs_float64_ref": rel(u_jax, u_64),
        "max_rel_err_numpy32_vs_float64_ref": rel(u_np, u_64),
    }


# --------------------------------------------------------------------------- CLI
def parse_configs(text: str) -> list[tuple[int, int]]:
    configs = []
    for item in text.split(","):
        try:
            d, k = (int(v) for v in item.lower().strip().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"config {item!r} is not of the form DxK (e.g. 64x64)") from None
        if d < 1 or k < 1:
            raise argparse.ArgumentTypeError(f"config {item!r}: d and K must be positive")
        configs.append((d, k))
    return configs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.bench_exact",
        description=(
            "Throughput of the jitted exact mixture velocity (float32, scalar t) against a "
            "straightforward NumPy/SciPy Cholesky reference, and against the machine's matmul "
            "peak. The last stdout line is a JSON object with all results."
        ),
    )
    p.add_argument("--n", type=int, default=4096, help="points per call (default 4096)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats; the median is reported (default 7)")
    p.add_argument(
        "--configs",
        type=parse_configs,
        default=parse_configs(DEFAULT_CONFIGS),
        help=f"comma-separated DxK list (default {DEFAULT_CONFIGS})",
    )
    p.add_argument("--t", type=float, default=0.5, help="the (scalar) time, in (0, 1) (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--chunk-elements",
        type=int,
        default=DEFAULT_CHUNK_ELEMENTS,
        help=f"GaussianMixture chunk_elements (default {DEFAULT_CHUNK_ELEMENTS})",
    )
    p.add_argument(
        "--min-time",
        type=float,
        default=0.1,
        help="each repeat loops the call for at least this many seconds (default 0.1)",
    )
    p.add_argument("--no-numpy-peak", action="store_true", help="skip NumPy's matmul peak (reference only)")
    p.add_argument(
        "--blas-threads",
        choices=("both", "default", "1"),
        default="both",
        help="BLAS threading for the NumPy reference: its default, one thread, or both with the "
        "faster reported (default both)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run (a few seconds): n={QUICK_N}, 1 repeat, no warm-up loops, "
        f"{QUICK_PEAK_SIZE}x{QUICK_PEAK_SIZE} peak, one BLAS thread",
    )
    return p


def _background_values(peak, results):
    yield peak["jax_timing"]["background_cores"]
    if "numpy_timing" in peak:
        yield peak["numpy_timing"]["background_cores"]
    for r in results:
        yield r["jax_timing"]["background_cores"]
        yield r["numpy_timing"]["background_cores"]


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", False)  # the benchmark is float32 throughout
    peak_size, warmup = PEAK_SIZE, 2
    if args.quick:
        args.n, args.repeats, args.min_time, args.blas_threads = QUICK_N, 1, 0.0, "1"
        peak_size, warmup = QUICK_PEAK_SIZE, 1
    blas_settings = {"both": (None, 1), "default": (None,), "1": (1,)}[args.blas_threads]
    if args.n < 1 or args.repeats < 1:
        usage_error(parser, "--n and --repeats must be positive")
    if not 0.0 < args.t < 1.0:
        usage_error(parser, "--t must lie strictly between 0 and 1")

    env = environment()
    print(f"jax {env['jax_version']} on {env['backend']} ({env['cpu_cores']} cores, {env['cpu_model']}), float32", flush=True)
    peak = measure_peak(peak_size, args.repeats, args.min_time, not args.no_numpy_peak, warmup)
    line = f"matmul peak ({peak_size}x{peak_size} float32): jax {peak['jax_gflops']:.1f} GFLOP/s"
    if "numpy_gflops" in peak:
        line += f", numpy {peak['numpy_gflops']:.1f} GFLOP/s"
    print(line, flush=True)

    results = []
    for d, k in args.configs:
        r = bench_config(
            d, k, args.n, args.t, args.seed, args.repeats, args.min_time, args.chunk_elements,
            peak["jax_gflops"], blas_settings, warmup,
        )
        results.append(r)
        print(
            f"d={d:3d} K={k:3d} n={args.n}: jax {r['jax_seconds'] * 1e3:9.3f} ms "
            f"({r['jax_throughput']:.3g} pts*comp/s, {r['jax_gflops']:.1f} GFLOP/s, "
            f"{100 * r['jax_fraction_of_peak']:.1f}% of peak) | numpy {r['numpy_seconds'] * 1e3:9.3f} ms "
            f"({r['numpy_throughput']:.3g} pts*comp/s) | speed-up {r['speedup']:.1f}x | "
            f"max rel err {r['max_rel_err']:.2e} | background load "
            f"{format_number(r['jax_timing']['background_cores'])}/"
            f"{format_number(r['numpy_timing']['background_cores'])} cores",
            flush=True,
        )

    target = next(
        (r for r in results if (r["d"], r["K"], r["n"]) == (TARGET["d"], TARGET["K"], TARGET["n"])), None
    )
    report = {
        "benchmark": "bench_exact",
        **env,
        "flop_model": FLOP_MODEL,
        "throughput_unit": "points*components per second (median of repeats)",
        "agreement_metric": AGREEMENT_METRIC,
        "speedup_definition": (
            "numpy_seconds / jax_seconds, where numpy_seconds is the faster of the reference's BLAS "
            "threadings tried (numpy_seconds_by_blas_threads); speedup_if_jax_ran_at_peak is the "
            "ceiling peak_gflops / numpy_gflops"
        ),
        "settings": {
            "n": args.n,
            "repeats": args.repeats,
            "min_time": args.min_time,
            "t": args.t,
            "seed": args.seed,
            "chunk_elements": args.chunk_elements,
            "quick": args.quick,
            "warmup_calls": warmup,
            "blas_threads": args.blas_threads,
            "t_kind": "traced float32 scalar",
        },
        "matmul_peak": peak,
        "peak_gflops": peak["jax_gflops"],
        "configs": results,
        "loadavg_at_end": loadavg(),
        "max_background_cores": max(
            (v for v in _background_values(peak, results) if v is not None), default=None
        ),
        "note": (
            "background_cores = CPU cores used by other processes during a timed section; "
            "timings taken while it is large are contaminated"
        ),
        "targets": TARGET,
        "meets_speedup_target": None if target is None else bool(target["speedup"] >= TARGET["speedup_min"]),
        "meets_peak_target": None
        if target is None
        else bool(target["jax_fraction_of_peak"] >= TARGET["fraction_of_peak_min"]),
    }
    print_report(report)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
