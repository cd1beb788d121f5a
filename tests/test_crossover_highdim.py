"""The high-dimensional turning-point study end to end on its smoke preset (plumbing, not the science)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = "experiments.crossover_highdim"
RULES = ("cfg", "cfg_zero_init", "cfg_zero_star")
METRICS = ("nll", "frechet", "mmd", "mode_tv", "precision")


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", MODULE, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_smoke_run_writes_table_json_and_figures(tmp_path):
    out = tmp_path / "hd"
    proc = _run("--preset", "smoke", "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "crossover_highdim.json").read_text())

    epochs = result["epochs"]
    assert epochs == [0, 1, 2, 4]  # the doubling grid of the smoke preset
    num_seeds = 2

    # per-rule, per-epoch metrics (seed means) with per-seed arrays, benefit and references
    assert result["primary_metric"] == "nll"
    for metric in METRICS:
        row = result["table"][metric]
        for name in RULES:
            assert len(row[name]) == len(epochs) and all(math.isfinite(v) for v in row[name])
            per_seed = row["per_seed"][name]
            assert len(per_seed) == num_seeds and all(len(s) == len(epochs) for s in per_seed)
            assert row[name][0] == pytest.approx(sum(s[0] for s in per_seed) / num_seeds, rel=1e-5, abs=1e-7)
            assert math.isfinite(row["exact"][name])
        assert len(row["zero_init_benefit"]) == len(epochs)
        assert len(row["zero_init_benefit_per_seed"]) == num_seeds
        assert all(0 <= k <= num_seeds for k in row["zero_init_helps_seeds"])
        assert math.isfinite(row["data"]) and math.isfinite(row["exact_zero_init_benefit"])
        # benefit = CFG − (CFG + zero-init), sign flipped for precision (higher is better)
        sign = 1 if row["lower_is_better"] else -1
        assert row["zero_init_benefit"][-1] == pytest.approx(sign * (row["cfg"][-1] - row["cfg_zero_init"][-1]), abs=1e-4)
    assert result["table"]["precision"]["lower_is_better"] is False
    assert all(0 <= v <= 1 for v in result["table"]["precision"]["cfg"])

    # turning point: primary and per metric; an epoch of the grid with an interval, or none found
    tp = result["turning_point"]
    assert tp["metric"] == "nll"
    for point in (tp, *result["turning_points"].values()):
        assert set(point) >= {"epoch", "low", "high", "fraction", "found"}
        assert point["found"] == (point["epoch"] is not None)
        if point["found"]:
            assert point["epoch"] in epochs and point["low"] in epochs
        assert 0.0 <= point["fraction"] <= 1.0
    assert set(result["turning_points"]) == set(METRICS)
    assert "turning point" in result["verdict"].lower()

    # first-step errors against the zero baseline
    fs = result["first_step"]
    for name in ("cfg", "cfg_star"):
        assert len(fs[f"err_{name}"]) == len(epochs) and len(fs[f"err_{name}_per_seed"]) == num_seeds
        assert fs["err_zero"][name] > 0 and name in fs["crossover"]

    # configuration, seeds and versions
    config = result["config"]
    assert config["cfgzero_theory_version"] and config["jax_version"]
    assert config["seeds"] == {"root": 0, "data": 0, "num_seeds": num_seeds, "evaluation": 1000}
    assert config["dim"] == 64 and config["scale"] == 4.0 and config["zero_init_steps"] == 1
    assert config["preset"] == "smoke" and config["network"]["dim"] == 64
    assert set(config["rules"]) == set(RULES)
    assert len(result["training_loss"]) == 4 and result["loss_floor"] > 0

    for name in ("turning_point", "sample_quality", "first_step_error", "training_loss"):
        for ext in ("png", "pdf"):
            assert (out / f"{name}.{ext}").stat().st_size > 0
    assert "Table 1 analogue" in proc.stdout and "turning point" in proc.stdout


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--scale", "-1"], "--scale"),
        (["--label", "7"], "--label"),
        (["--zero-init-steps", "0"], "--zero-init-steps"),
        (["--preset", "smoke", "--zero-init-steps", "8"], "--zero-init-steps"),
        (["--dim", "1"], "--dim"),
        (["--seeds", "0"], "--seeds"),
        (["--eval-every", "-1"], "--eval-every"),
        (["--batch-size", "4096"], "--batch-size"),
        (["--metric", "fid"], "--metric"),
        (["--preset", "huge"], "--preset"),
    ],
)
def test_bad_arguments_exit_with_code_2(args, flag):
    proc = _run(*args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert flag in proc.stderr


def test_evaluation_grid():
    from experiments.crossover_highdim import evaluation_epochs

    assert evaluation_epochs(256, 0) == (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert evaluation_epochs(100, 0) == (0, 1, 2, 4, 8, 16, 32, 64, 100)
    assert evaluation_epochs(1, 0) == (0, 1)
    assert evaluation_epochs(10, 4) == (0, 4, 8, 10)


def test_help_exits_cleanly():
    proc = _run("--help", timeout=120)
    assert proc.returncode == 0 and "--zero-init-steps" in proc.stdout and "--metric" in proc.stdout
