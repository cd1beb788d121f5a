"""The high-dimensional turning-point study end to end on its smoke preset (plumbing, not the science).

One smoke run (3 tiny mixtures × 2 seeds, module-scoped) feeds every check of the JSON; the
verdict's logic is also checked on edited copies of that JSON, where the answer is known.
"""

import copy
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = "experiments.crossover_highdim"
RULES = ("cfg", "zero-init", "cfg-zero-star")
METRICS = ("nll", "frechet", "mmd", "mode_tv", "precision")
HEADLINE_TITLES = {"nll": "NLL", "frechet": "Fréchet distance²"}
EPOCHS = [0, 1, 2, 4]  # the doubling grid of the smoke preset
NUM_SEEDS = 2
DATA_SEEDS = [0, 1, 2]


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", MODULE, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("highdim")
    proc = _run("--preset", "smoke", "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, json.loads((out / "crossover_highdim.json").read_text())


def test_three_mixtures_with_their_own_data_seeds_and_checkpoints(smoke):
    out, _, result = smoke
    config = result["config"]
    assert result["epochs"] == EPOCHS
    assert config["seeds"] == {"root": 0, "data": DATA_SEEDS, "num_seeds": NUM_SEEDS, "evaluation": 1000}
    assert [m["data_seed"] for m in config["mixtures"]] == DATA_SEEDS
    assert [m["data_seed"] for m in result["mixtures"]] == DATA_SEEDS
    for seed, m in zip(DATA_SEEDS, config["mixtures"]):
        assert f"random_class_conditional(fold_in(key({seed}), 1), dim=64" in m["description"]
    assert config["headline_metrics"] == ["nll", "frechet"]
    assert set(config["headline_metrics"]) | set(config["secondary_metrics"]) == set(METRICS)
    assert config["dim"] == 64 and config["scale"] == 4.0 and config["zero_init_steps"] == 1 and config["label"] == 0
    assert config["preset"] == "smoke" and config["network"]["dim"] == 64 and config["network"]["architecture"] == "mlp"
    assert config["cfgzero_theory_version"] and config["jax_version"]
    assert set(config["rules"]) == set(RULES)
    for seed in DATA_SEEDS:
        folder = out / "checkpoints" / f"mixture_{seed}"
        assert (folder / "training_state.safetensors").is_file()
        assert sorted(p.name for p in folder.glob("epoch_*.safetensors")) == [f"epoch_{e:06d}.safetensors" for e in EPOCHS]


def test_tables_per_mixture_shapes_means_and_benefits(smoke):
    _, _, result = smoke
    # the mixtures differ, so their numbers must too
    assert len({m["table"]["nll"]["cfg"][-1] for m in result["mixtures"]}) == len(DATA_SEEDS)
    for entry in result["mixtures"]:
        assert len(entry["training_loss"]) == EPOCHS[-1] and all(len(r) == NUM_SEEDS for r in entry["training_loss"])
        assert entry["loss_floor"] > 0 and entry["nll_floor"] > 0
        for metric in METRICS:
            row = entry["table"][metric]
            sign = 1 if row["lower_is_better"] else -1
            assert row["lower_is_better"] == (metric != "precision")
            per_seed = {name: np.asarray(row["per_seed"][name]) for name in RULES}
            for name in RULES:
                assert per_seed[name].shape == (NUM_SEEDS, len(EPOCHS)) and np.all(np.isfinite(per_seed[name]))
                np.testing.assert_allclose(row[name], per_seed[name].mean(axis=0), rtol=1e-5, atol=1e-6)
                assert math.isfinite(row["exact"][name])
            assert set(row["benefit"]) == {"zero-init", "cfg-zero-star"}
            gain = row["benefit"]["zero-init"]
            benefit = np.asarray(gain["per_seed"])
            assert benefit.shape == (NUM_SEEDS, len(EPOCHS))
            np.testing.assert_allclose(benefit, sign * (per_seed["cfg"] - per_seed["zero-init"]), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(gain["mean"], benefit.mean(axis=0), rtol=1e-5, atol=1e-6)
            assert gain["helps_seeds"] == (benefit > 0).sum(axis=0).tolist()
            low, high, mean = (np.asarray(gain[k]) for k in ("low", "high", "mean"))
            assert np.all(low <= mean + 1e-6) and np.all(mean <= high + 1e-6)
            assert gain["exact"] == pytest.approx(sign * (row["exact"]["cfg"] - row["exact"]["zero-init"]), abs=1e-5)
            np.testing.assert_allclose(row["benefit"]["cfg-zero-star"]["mean"],
                                       (sign * (per_seed["cfg"] - per_seed["cfg-zero-star"])).mean(axis=0),
                                       rtol=1e-5, atol=1e-5)
            assert math.isfinite(row["data"])
        assert all(0 <= v <= 1 for v in entry["table"]["precision"]["cfg"])
        assert all(0 <= v <= 1 for v in entry["table"]["mode_tv"]["cfg"])
        for name in RULES:
            assert np.asarray(entry["per_step_learning_error"][name]).shape == (len(EPOCHS), 8)


def test_turning_points_and_summary_agree(smoke):
    _, _, result = smoke
    for entry in result["mixtures"]:
        assert set(entry["turning_points"]) == set(METRICS)
        for metric, point in entry["turning_points"].items():
            assert point["found"] == (point["epoch"] is not None)
            assert 0.0 <= point["fraction"] <= 1.0
            benefit = entry["table"][metric]["benefit"]["zero-init"]["mean"]
            assert point["helped_epochs"] == [e for e, b in zip(EPOCHS, benefit) if b > 0]
            if point["found"]:
                assert point["epoch"] in EPOCHS and point["low"] in EPOCHS
                # from the turning point on, CFG + zero-init is worse than CFG (benefit < 0) at every epoch
                assert all(b < 0 for e, b in zip(EPOCHS, benefit) if e >= point["epoch"])
            assert point["turning_point"] == (point["found"] and any(e < point["epoch"] for e in point["helped_epochs"]))
    for metric in METRICS:
        sm = result["summary"][metric]
        points = [e["turning_points"][metric] for e in result["mixtures"]]
        exact = [e["table"][metric]["benefit"]["zero-init"]["exact"] for e in result["mixtures"]]
        assert sm["headline"] == (metric in HEADLINE_TITLES)
        assert sm["num_mixtures"] == len(DATA_SEEDS) and sm["data_seeds"] == DATA_SEEDS
        assert sm["found"] == [p["turning_point"] for p in points] and sm["num_found"] == sum(sm["found"])
        assert sm["turning_points"] == [p["epoch"] if p["turning_point"] else None for p in points]
        assert sm["exact_benefit"] == {"zero-init": exact}
        assert sm["exact_hurts"] == sum(b < 0 for b in exact)
        assert sm["claim"] == ("holds" if sm["num_found"] == len(DATA_SEEDS) else
                               "holds in some" if sm["num_found"] else "fails")
        assert sm["against_prediction"] == [s for s, f, b in zip(DATA_SEEDS, sm["found"], exact) if f and b >= 0]


def test_verdict_states_counts_and_exact_limit_signs(smoke):
    _, _, result = smoke
    text = result["verdict"]
    total = len(DATA_SEEDS)
    for metric, title in HEADLINE_TITLES.items():
        sm = result["summary"][metric]
        line = next(l for l in text.splitlines() if l.startswith(f"{title}: "))
        assert f"turning point in {sm['num_found']} of {total} mixtures" in line
        assert f"in the exact-field limit zero-init hurts in {sm['exact_hurts']} of {total} mixtures" in line
        for entry in result["mixtures"]:
            assert f"exact {entry['table'][metric]['benefit']['zero-init']['exact']:+.3g})" in line
        # the sign of the exact-limit benefit decides the explanation
        assert ("helps even the exact field" in line) == (sm["exact_hurts"] == 0)
        assert ("a turning point is possible once the models are good enough" in line) == (sm["exact_hurts"] == total)
        state = "HOLDS" if sm["num_found"] == total else ("HOLDS IN SOME MIXTURES" if sm["num_found"] else "FAILS")
        assert f"the paper's claim {state} on this metric" in line
    which = next(l for l in text.splitlines() if l.startswith("Which metric shows a turning point:"))
    shows, lacks = which.split("; which does not: ")
    for metric, title in HEADLINE_TITLES.items():
        found = result["summary"][metric]["num_found"] > 0
        assert (title in shows) == found and (title in lacks) == (not found)
    for name in ("CFG (w=4)", "CFG* (w=4)"):
        assert f"First step of {name} against v*₀ = u_c(x0)" in text


def _edited(result, outcome: dict) -> dict:
    """A copy of the smoke result where, per metric, every mixture has the given (turning epoch or None, exact benefit)."""
    from experiments.crossover_highdim import summarize

    payload = copy.deepcopy(result)
    for entry in payload["mixtures"]:
        for metric, (epoch, exact) in outcome.items():
            entry["table"][metric]["benefit"]["zero-init"]["exact"] = exact
            found = epoch is not None
            entry["turning_points"][metric] = {"epoch": epoch, "low": epoch, "high": epoch, "fraction": 1.0 if found else 0.0,
                                               "found": found, "helped_epochs": [0] if found else [0, 1, 2, 4],
                                               "turning_point": found}
    payload["summary"] = summarize(payload["mixtures"])
    return payload


def test_verdict_logic_on_known_outcomes(smoke):
    from experiments.crossover_highdim import verdict

    _, _, result = smoke
    # the protocol's prediction: NLL turns (exact limit hurt), Fréchet never does (exact limit helped)
    text = verdict(_edited(result, {"nll": (2.0, -3.0), "frechet": (None, 0.6)}))
    assert "NLL: turning point in 3 of 3 mixtures — the paper's claim HOLDS" in text
    assert "Fréchet distance²: turning point in 0 of 3 mixtures — the paper's claim FAILS" in text
    assert re.search(r"Which metric shows a turning point: NLL \(3/3 mixtures; exact limit hurt by zero-init in 3/3\); "
                     r"which does not: Fréchet distance² \(0/3; exact limit hurt by zero-init in 0/3, i\.e\. zero-init "
                     r"helps even a perfect model\)", text)
    assert "undoes part of it" in text and "Against the prediction" not in text and "Not reached" not in text
    # outcomes against the prediction are named, with their data seeds
    text = verdict(_edited(result, {"nll": (None, -3.0), "frechet": (4.0, 0.6)}))
    assert "NLL: turning point in 0 of 3" in text and "Not reached in data seeds [0, 1, 2]" in text
    assert "Against the prediction in data seeds [0, 1, 2]" in text
    assert "Which metric shows a turning point: Fréchet distance²" in text


def test_first_step_against_the_true_velocity(smoke):
    _, _, result = smoke
    for entry in result["mixtures"]:
        fs = entry["first_step"]
        assert fs["target"] == "true_velocity"
        assert isinstance(fs["err_zero"], float) and fs["err_zero"] > 0  # one grey line E‖v*₀‖ for every rule
        for key in ("err", "err_per_seed", "crossover", "err_guided_target", "err_per_seed_guided_target",
                    "err_zero_guided_target", "guidance_bias"):
            assert set(fs[key]) == {"cfg", "cfg-star"}, key  # keyed by guidance kind
        for name in ("cfg", "cfg-star"):
            per_seed = np.asarray(fs["err_per_seed"][name])
            assert per_seed.shape == (NUM_SEEDS, len(EPOCHS)) and np.all(per_seed > 0)
            np.testing.assert_allclose(fs["err"][name], per_seed.mean(axis=0), rtol=1e-5)
            guided = np.asarray(fs["err_per_seed_guided_target"][name])
            assert guided.shape == (NUM_SEEDS, len(EPOCHS))
            np.testing.assert_allclose(fs["err_guided_target"][name], guided.mean(axis=0), rtol=1e-5)
            assert fs["err_zero_guided_target"][name] > 0 and fs["guidance_bias"][name] > 0
            c = fs["crossover"][name]
            assert c["found"] == (c["epoch"] is not None)
            if c["found"]:  # below the grey line from the crossover on
                assert all(v < fs["err_zero"] for e, v in zip(EPOCHS, fs["err"][name]) if e >= c["epoch"])


def test_outputs_figures_and_final_line(smoke):
    out, proc, result = smoke
    names = ("turning_point", "sample_quality", "first_step_error", "training_loss")
    for name in names:
        for ext in ("png", "pdf"):
            assert (out / f"{name}.{ext}").stat().st_size > 0
    assert sorted(result["figures"]) == sorted(f"{n}.{e}" for n in names for e in ("png", "pdf"))
    runtime = result["runtime_s"]
    assert runtime["total"] >= runtime["training"] + runtime["evaluation"] > 0
    assert all(e["runtime_s"]["training"] > 0 and e["runtime_s"]["evaluation"] > 0 for e in result["mixtures"])
    assert "Table 1 analogue" in proc.stdout and "headline metrics side by side" in proc.stdout
    assert proc.stdout.startswith("crossover_highdim (smoke): 3 mixtures in d = 64 × 2 networks")  # before any work
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"wrote {out}/: crossover_highdim, first_step_error") and "(9 files," in last
    assert re.search(r"and checkpoints/ \(\d+\.\d MB\)", last)
    text = (out / "crossover_highdim.json").read_text()
    assert "NaN" not in text and "Infinity" not in text


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--scale", "-1"], "--scale"),
        (["--label", "7"], "--label"),
        (["--zero-init-steps", "0"], "--zero-init-steps"),
        (["--preset", "smoke", "--zero-init-steps", "8"], "--zero-init-steps"),
        (["--dim", "1"], "--dim"),
        (["--seeds", "0"], "--seeds"),
        (["--num-mixtures", "0"], "--num-mixtures"),
        (["--eval-every", "-1"], "--eval-every"),
        (["--batch-size", "4096"], "--batch-size"),
        (["--metric", "nll"], "--metric"),  # no primary metric any more: NLL and Fréchet are both headline metrics
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


def test_presets_use_three_mixtures_and_help_exits_cleanly():
    from experiments.crossover_highdim import PRESETS

    assert all(p["num_mixtures"] >= 3 for p in PRESETS.values())
    proc = _run("--help", timeout=120)
    assert proc.returncode == 0 and "--zero-init-steps" in proc.stdout and "--num-mixtures" in proc.stdout
