"""Smoke test of ``python -m experiments.bench_exact --quick``: it runs, reports, and agrees.

No timing thresholds: the numbers depend on the machine and its load; only the report's
structure and the NumPy/JAX agreement are checked.
"""

import math
import pathlib
import subprocess
import sys

import pytest
from bench_helpers import last_line_report

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_exact_quick_reports_and_agrees():
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_exact", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = last_line_report(proc.stdout, "bench_exact")

    for key in (
        "jax_version", "backend", "cpu_cores", "dtype", "flop_model", "matmul_peak", "peak_gflops",
        "configs", "targets", "meets_speedup_target", "meets_peak_target", "settings",
    ):
        assert key in report, key
    assert report["dtype"] == "float32"
    assert report["settings"]["quick"] is True
    assert "4*n*K*d^2" in report["flop_model"]
    assert report["peak_gflops"] > 0 and report["matmul_peak"]["jax_gflops"] > 0
    # --quick uses a tiny n, so the d=64, K=64, n=4096 target config is not run: no verdict.
    assert report["meets_speedup_target"] is None and report["meets_peak_target"] is None

    assert {(c["d"], c["K"]) for c in report["configs"]} == {(2, 8), (64, 64)}
    for c in report["configs"]:
        for key in (
            "jax_seconds", "jax_throughput", "jax_gflops", "jax_fraction_of_peak",
            "numpy_seconds", "numpy_throughput", "speedup",
        ):
            assert isinstance(c[key], float) and math.isfinite(c[key]) and c[key] > 0, (key, c[key])
        # float32 JAX (eigenbasis) vs float32 NumPy (Cholesky): same field to float32 accuracy.
        assert 0 <= c["max_rel_err"] < 1e-4, c["max_rel_err"]
        assert c["max_rel_err_jax_vs_float64_ref"] < 1e-4


def test_bench_exact_bad_argument_is_one_line_and_exit_2(capsys):
    from experiments import bench_exact

    with pytest.raises(SystemExit) as exit_info:
        bench_exact.main(["--n", "0"])
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == "python -m experiments.bench_exact: error: --n and --repeats must be positive"
