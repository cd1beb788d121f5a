"""Smoke test of ``python -m experiments.bench_training --quick``: it runs and reports.

No timing thresholds: the numbers depend on the machine and its load; only the report's
structure (and, with torch installed, that the PyTorch network computes the same function
as ours from the same parameters) is checked.
"""

import importlib.util
import math
import pathlib
import subprocess
import sys

import pytest
from bench_helpers import last_line_report, positive

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def test_bench_training_quick_reports():
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_training", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = last_line_report(proc.stdout, "bench_training")

    for key in (
        "jax_version", "jaxlib_version", "flax_version", "optax_version", "torch_version", "backend",
        "cpu_cores", "dtype", "settings", "flop_model", "gflop_per_step", "steps_per_s", "gflops",
        "peak_gflops", "fraction_of_peak", "matmul_peak", "torch_steps_per_s", "speedup_vs_torch",
        "targets", "meets_speedup_target", "meets_peak_target", "max_background_cores", "loadavg_at_start",
    ):
        assert key in report, key
    assert report["dtype"] == "float32"
    settings = report["settings"]
    assert settings["quick"] is True
    assert (settings["width"], settings["depth"], settings["batch"], settings["dim"]) == (64, 3, 256, 2)
    assert settings["num_classes"] == 3 and settings["seeds"] == 1
    assert "3 * forward" in report["flop_model"] and "Excluded" in report["flop_model"]
    # 30 = dim + 2 * time_frequencies + class_embedding; flops = 3 * 2 * B * sum(in * out).
    assert report["layer_sizes"] == [[30, 64], [64, 64], [64, 64], [64, 2]]
    assert math.isclose(report["gflop_per_step"], 3 * 2 * 256 * (30 * 64 + 2 * 64 * 64 + 64 * 2) / 1e9)

    for key in ("steps_per_s", "gflops", "peak_gflops", "fraction_of_peak"):
        assert positive(report[key]), (key, report[key])
    assert math.isclose(report["gflops"], report["steps_per_s"] * report["gflop_per_step"], rel_tol=1e-9)
    assert math.isclose(report["fraction_of_peak"], report["gflops"] / report["peak_gflops"], rel_tol=1e-9)
    timing = report["jax"]["timing"]
    assert timing["repeats"] == settings["repeats"] == 1 and positive(timing["seconds"])
    assert math.isfinite(report["jax"]["mean_loss_last_epoch"])
    # --quick is not a target configuration: no verdicts.
    assert report["meets_speedup_target"] is None and report["meets_peak_target"] is None

    if HAVE_TORCH:
        assert report["torch_version"]
        assert positive(report["torch_steps_per_s"]) and positive(report["speedup_vs_torch"])
        torch_report = report["torch"]
        assert set(torch_report["steps_per_s_by_num_threads"]) == {str(report["cpu_cores"]), "1"}
        assert report["torch_steps_per_s"] == max(torch_report["steps_per_s_by_num_threads"].values())
        assert torch_report["parity_max_abs_err"] < 1e-4
        assert math.isfinite(torch_report["mean_loss_last_epoch"])
    else:
        assert report["torch_steps_per_s"] is None and report["speedup_vs_torch"] is None


def test_bench_training_bad_argument_is_one_line_and_exit_2(capsys):
    from experiments import bench_training

    with pytest.raises(SystemExit) as exit_info:
        bench_training.main(["--width", "0"])
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == "python -m experiments.bench_training: error: --width must be positive"
