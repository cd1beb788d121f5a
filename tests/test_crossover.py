"""The crossover study end to end on its smoke preset (tiny: checks plumbing, not the science)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_crossover_smoke_run_writes_json_and_figures(tmp_path):
    out = tmp_path / "cx"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.crossover", "--preset", "smoke", "--out", str(out), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "crossover.json").read_text())
    epochs = result["epochs"]
    assert epochs == [0, 1, 2, 3]
    for key in ("err_cfg", "err_cfg_star"):
        assert len(result[key]) == len(epochs)
        assert len(result[f"{key}_per_seed"]) == 2 and len(result[f"{key}_per_seed"][0]) == len(epochs)
    assert result["err_zero"] > 0 and "crossover_epoch_cfg" in result and "crossover_epoch_cfg_star" in result
    for name in ("cfg", "cfg_star", "cfg_zero_init", "cfg_zero_star"):
        assert len(result["jsd"][name]) == len(epochs)
        assert all(0 <= v <= 0.6932 for v in result["jsd"][name])
    assert result["config"]["cfgzero_theory_version"] and result["config"]["seeds"]["num_seeds"] == 2
    for name in ("first_step_error", "jsd", "trajectories", "training_loss"):
        assert (out / f"{name}.png").exists() and (out / f"{name}.pdf").exists()
    assert "crossover" in proc.stdout


def test_crossover_rejects_bad_arguments():
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.crossover", "--scale", "-1"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "--scale" in proc.stderr
