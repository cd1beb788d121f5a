"""The crossover study end to end on its smoke preset (tiny: checks plumbing and the JSON contract, not the science)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("cx") / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.crossover", "--preset", "smoke", "--out", str(out), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "crossover.json").read_text()), proc.stdout


def test_crossover_json_has_the_protocol_keys(smoke):
    out, result, stdout = smoke
    epochs = result["epochs"]
    assert epochs == [0, 1, 2, 3, 4] and result["target"] == "true_velocity"
    assert result["steps_per_epoch"] == 4 and result["optimizer_steps"] == [4 * e for e in epochs]
    networks = 3  # 3 data seeds x 1 network
    assert result["config"]["seeds"]["data"] == [0, 1, 2] and result["config"]["seeds"]["num_networks"] == networks
    for name in ("cfg", "cfg_star"):
        per_net = np.asarray(result[f"err_{name}_per_network"])
        assert per_net.shape == (networks, len(epochs))
        np.testing.assert_allclose(result[f"err_{name}"], per_net.mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(result[f"frac_above_zero_{name}"], (per_net > result["err_zero"]).mean(axis=0))
        assert len(result[f"err_{name}_guided_target"]) == len(epochs)
        assert f"crossover_epoch_{name}" in result and len(result[f"crossover_epoch_{name}_interval"]) == 2
    for name in ("cfg", "cfg_star", "cfg_zero_init", "cfg_zero_star"):
        assert len(result["jsd"][name]) == len(result["nll"][name]) == len(epochs)
        assert all(0 <= v <= 0.6932 for v in result["jsd"][name])
        assert 0 <= result["jsd_exact"][name] <= 0.6932 and np.isfinite(result["nll_exact"][name])
    assert np.asarray(result["training_loss"]).shape == (4, networks) and result["loss_floor"] > 0
    assert set(result["convergence"]) >= {"loss_gap", "jsd_gap", "nll_gap_cfg_zero_star", "passed"}
    assert "NOT" in result["verdict"] or "REPRODUCED" in result["verdict"]
    assert "wrote" in stdout and "MB" in stdout
    for name in ("first_step_error", "sample_quality", "trajectories", "training_loss"):
        assert (out / f"{name}.png").exists() and (out / f"{name}.pdf").exists()


def test_crossover_json_reproduces_its_numbers(smoke):
    """The zero line and the bias follow from the mixture stored in the JSON (as numbers), independently."""
    _, result, _ = smoke
    mix = result["config"]["mixture"]
    means, weights, labels = (np.asarray(mix[k], np.float64) for k in ("means", "weights", "labels"))
    label, w = result["config"]["label"], result["config"]["scale"]
    mu_c = np.average(means[labels == label], axis=0, weights=weights[labels == label])
    mu_bar = np.average(means, axis=0, weights=weights)
    # E‖μ_c − x0‖ for x0 ~ N(0, I) by Monte Carlo; the study uses its own 4096 noise points
    x0 = np.random.default_rng(0).standard_normal((200_000, 2))
    assert result["err_zero"] == pytest.approx(np.linalg.norm(mu_c - x0, axis=1).mean(), rel=0.02)
    assert result["guidance_bias"]["cfg"] == pytest.approx((w - 1) * np.linalg.norm(mu_c - mu_bar), rel=1e-4)


def test_crossover_verdict_ignores_epoch_zero():
    from experiments.crossover import rule_verdict

    cross = {"epoch": 1.0, "low": 1.0, "high": 1.0, "fraction": 1.0, "found": True}
    payload = {"epochs": [0, 1, 2], "err_cfg": [15.0, 13.0, 12.0], "err_zero": 14.0, "crossover": {"cfg": cross}}
    v = rule_verdict(payload, "cfg")
    assert not v["zero_beats_early"] and not v["reproduced"]  # above only at epoch 0: not "early"
    payload["err_cfg"] = [13.0, 15.0, 12.0]
    payload["crossover"]["cfg"] = {**cross, "epoch": 2.0}
    assert rule_verdict(payload, "cfg")["reproduced"]


def test_evaluation_epochs_grid():
    from experiments.crossover import evaluation_epochs

    assert evaluation_epochs(4) == (0, 1, 2, 3, 4)
    grid = evaluation_epochs(480)
    assert grid[:9] == tuple(range(9)) and grid[-1] == 480 and grid[9:13] == (11, 16, 23, 32)


def test_crossover_rejects_bad_arguments():
    for args, word in ((["--scale", "-1"], "--scale"), (["--data-offset", "20"], "--data-offset"),
                       (["--zero-init-steps", "16"], "--zero-init-steps")):
        proc = subprocess.run([sys.executable, "-m", "experiments.crossover", *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2 and word in proc.stderr
