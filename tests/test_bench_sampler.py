"""Smoke test of ``python -m experiments.bench_sampler --quick``: it runs, reports, and agrees.

No timing thresholds: the numbers depend on the machine and its load; only the report's
structure, the signs of the timings and (with torch and diffusers installed) the agreement
of our final samples with the diffusers-driven loop's are checked.
"""

import importlib.util
import math
import pathlib
import subprocess
import sys

import pytest
from bench_helpers import last_line_report, positive, strict_loads

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAVE_PEER = all(importlib.util.find_spec(name) is not None for name in ("torch", "diffusers"))


def _check_side(side):
    for key in ("total_per_step_seconds", "model_per_step_seconds", "overhead_per_step_seconds",
                "overhead_floor_seconds"):
        assert positive(side[key]), (key, side[key])
    assert math.isfinite(side["overhead_raw_per_step_seconds"])
    assert isinstance(side["overhead_clipped"], bool)
    # The clipped estimate is the raw one or the floor, whichever is larger.
    assert side["overhead_per_step_seconds"] == max(side["overhead_raw_per_step_seconds"],
                                                    side["overhead_floor_seconds"])
    assert side["rounds"] == 1 and side["pairs"] == side["pairs_per_round"] == 1  # --quick: one pair
    assert positive(side["loop_call_seconds"]["median"]) and positive(side["model_call_seconds"]["median"])


def test_bench_sampler_quick_reports_and_agrees(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_sampler", "--quick", "--json-out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = last_line_report(proc.stdout, "bench_sampler")
    assert strict_loads(out.read_text()) == report  # --json-out writes the same object

    for key in (
        "benchmark", "jax_version", "torch_version", "diffusers_version", "torch_num_threads", "cpu_cores",
        "platform", "dtype", "settings", "overhead_definition", "peer_definition", "peer_available",
        "peer_unavailable_reason", "cases", "min_overhead_ratio", "max_abs_diff_final", "targets",
        "meets_target", "max_background_cores",
    ):
        assert key in report, key
    assert report["benchmark"] == "bench_sampler" and report["dtype"] == "float32"
    assert report["settings"]["quick"] is True and report["settings"]["batch"] == 64
    assert report["targets"] == {"overhead_ratio_min": 5.0}
    assert report["peer_available"] is HAVE_PEER

    cases = report["cases"]
    assert {(c["workload"], c["scheduler"]) for c in cases} == {
        (w, s) for w in ("mixture", "network") for s in ("flow_match_euler", "unipc")
    }
    for case in cases:
        assert case["num_steps"] == {"flow_match_euler": 28, "unipc": 50}[case["scheduler"]]
        assert case["ours_final_finite"] is True
        _check_side(case["ours"])
        if not HAVE_PEER:
            assert case["peer"] is None and case["overhead_ratio"] is None and case["meets_target"] is None
            continue
        _check_side(case["peer"])
        assert positive(case["peer"]["set_timesteps_seconds"])
        assert case["peer"]["num_threads"] == 1  # --quick times one PyTorch thread
        assert case["peer_final_finite"] is True
        # Same schedule, guidance and model on both sides, both in float32.
        assert 0 <= case["max_abs_diff_final"] < 1e-3, case["max_abs_diff_final"]
        assert positive(case["overhead_ratio"]) and positive(case["total_ratio"])
        assert math.isclose(case["overhead_ratio"],
                            case["peer"]["overhead_per_step_seconds"] / case["ours"]["overhead_per_step_seconds"])
        assert isinstance(case["meets_target"], bool)
        assert case["meets_target"] == (case["overhead_ratio"] >= 5.0)

    if HAVE_PEER:
        assert report["torch_version"] and report["diffusers_version"]
        assert report["network_parity_max_abs_diff"] < 1e-4
        assert isinstance(report["meets_target"], bool)
        assert report["min_overhead_ratio"] == min(c["overhead_ratio"] for c in cases)
    else:
        assert report["meets_target"] is None and report["peer_unavailable_reason"]


def test_bench_sampler_bad_argument_is_one_line_and_exit_2(capsys):
    from experiments import bench_sampler

    with pytest.raises(SystemExit) as exit_info:
        bench_sampler.main(["--batch", "0"])
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == ("python -m experiments.bench_sampler: error: --batch and --repeats must be positive, --warmup and "
                    "--min-time non-negative")
