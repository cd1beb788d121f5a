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
    proc = subprocess.run(  # from another directory than the repository's: the installed package runs anywhere
        [sys.executable, "-m", "experiments.crossover", "--preset", "smoke", "--out", str(out), "--no-progress"],
        cwd=out.parent, capture_output=True, text=True, timeout=900,
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
    for name in ("cfg", "cfg-star"):
        per_net = np.asarray(result["err_per_network"][name])
        assert per_net.shape == (networks, len(epochs))
        np.testing.assert_allclose(result["err"][name], per_net.mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(result["frac_above_zero"][name], (per_net > result["err_zero"]).mean(axis=0))
        assert len(result["err_guided_target"][name]) == len(epochs)
        assert result["crossover_epoch"][name] == result["crossover"][name]["epoch"]
        assert len(result["crossover_epoch_interval"][name]) == 2
    # every key naming a rule is a guidance kind
    assert set(result["config"]["rules"]) == set(result["jsd"]) == {"cfg", "cfg-star", "zero-init", "cfg-zero-star"}
    for name in ("cfg", "cfg-star", "zero-init", "cfg-zero-star"):
        assert len(result["jsd"][name]) == len(result["nll"][name]) == len(epochs)
        assert all(0 <= v <= 0.6932 for v in result["jsd"][name])
        assert 0 <= result["jsd_exact"][name] <= 0.6932 and np.isfinite(result["nll_exact"][name])
    assert np.asarray(result["training_loss"]).shape == (4, networks) and result["loss_floor"] > 0
    assert set(result["convergence"]) >= {"loss_gap", "jsd_gap", "nll_gap", "passed"}
    assert set(result["convergence"]["nll_gap"]) == {"cfg-zero-star"}
    for m in ("jsd", "nll"):
        row = result["sample_level"][m]["zero-init"]
        benefit = np.asarray(result[f"{m}_per_network"]["cfg"]) - np.asarray(result[f"{m}_per_network"]["zero-init"])
        np.testing.assert_allclose(row["mean"], benefit.mean(axis=0), rtol=1e-5, atol=1e-6)
        assert np.all(np.asarray(row["low"]) <= np.asarray(row["high"]))
    assert "NOT" in result["verdict"] or "REPRODUCED" in result["verdict"]
    first, last = stdout.splitlines()[0], stdout.strip().splitlines()[-1]
    assert first.startswith("crossover (smoke): 3 networks") and str(out) in first  # printed before any work
    assert last.startswith(f"wrote {out}/: crossover, first_step_error") and "checkpoints/ (" in last
    assert "X>line: share of networks" in stdout  # the table's legend
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


def test_crossover_verdict_reads_the_json(smoke):
    """The study's verdict is verdicts.crossover_verdict of its own JSON curves (the rules are tested in test_verdicts)."""
    from cfgzero_theory import verdicts
    from experiments.crossover import rule_verdict

    _, result, _ = smoke
    for name in ("cfg", "cfg-star"):
        expected = verdicts.crossover_verdict(result["epochs"], result["err"][name], result["err_zero"],
                                              result["crossover"][name]["epoch"])
        assert rule_verdict(result, name) == {**expected, "crossover": result["crossover"][name]}
        above = [e for e, v in zip(result["epochs"], result["err"][name]) if e >= 1 and v > result["err_zero"]]
        assert expected["above_epochs"] == above


def test_evaluation_epochs_grid():
    from experiments.crossover import evaluation_epochs

    assert evaluation_epochs(4) == (0, 1, 2, 3, 4)
    grid = evaluation_epochs(480)
    assert grid[:9] == tuple(range(9)) and grid[-1] == 480 and grid[9:13] == (11, 16, 23, 32)


@pytest.mark.parametrize("args, word", [(["--scale", "-1"], "--scale"), (["--data-offset", "20"], "--data-offset"),
                                        (["--zero-init-steps", "16"], "--zero-init-steps"), (["--preset", "huge"], "--preset"),
                                        (["--epochs", "x"], "--epochs")])
def test_crossover_rejects_bad_arguments(args, word, tmp_path, capsys):
    from experiments.crossover import main

    with pytest.raises(SystemExit) as exit_:
        main([*args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and word in err and err.count("\n") == 1
    assert err.startswith("python -m experiments.crossover: error: ")
    assert not (tmp_path / "out").exists()  # nothing was created
