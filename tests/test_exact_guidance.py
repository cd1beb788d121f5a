"""End-to-end run of ``python -m experiments.exact_guidance --quick`` in a subprocess."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
RULES = ("conditional", "cfg", "cfg-star", "zero-init", "cfg-zero-star")  # guidance kinds
FIGURES = ("bias", "samples", "metrics", "errata")


def run_experiment(*args, check=True):
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.exact_guidance", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("exact_guidance")
    proc = run_experiment("--quick", "--out", str(out))
    with open(out / "exact_guidance.json") as f:
        return out, json.load(f), proc.stdout


def test_json_config_and_structure(quick_run):
    _, result, _ = quick_run
    cfg = result["config"]
    for key in ("scale", "steps", "n", "seed", "label", "solver", "zero_init_steps", "bins", "bandwidth", "dtype", "quick",
                "cfgzero_theory_version", "jax_version", "grid", "mixture_params"):
        assert key in cfg, key
    assert cfg["quick"] is True and cfg["steps"] == 8 and cfg["n"] == 256
    import cfgzero_theory

    assert cfg["cfgzero_theory_version"] == cfgzero_theory.__version__
    assert len(result["times"]) == cfg["steps"] + 1
    assert list(result["rules"]) == list(RULES) and list(cfg["rules"]) == list(RULES)
    for key in RULES:
        r = result["rules"][key]
        assert len(r["bias"]["mean"]) == cfg["steps"]
        assert all(math.isfinite(v) and v >= 0 for v in r["bias"]["mean"])
        # the bias recomputed from the mixture equals the sampler's own recorded velocities
        assert r["bias_recorded_vs_recomputed_max_abs"] < 1e-9
        m = r["metrics"]
        assert 0 <= m["jsd"] <= math.log(2) + 1e-12
        for name in ("mean_nll", "mmd2_vs_samples", "mmd2_vs_exact"):
            assert math.isfinite(m[name])
        cov = m["mode_coverage"]
        assert len(cov["shares"]) == len(cov["weights"]) == len(cfg["mixture_params"]["weights"])
        assert 0 <= cov["total_variation"] <= 1
    assert "metrics" in result["true_samples"]
    assert result["runtime_s"]["total"] > 0


def test_figures_exist(quick_run):
    out, result, _ = quick_run
    for name in FIGURES:
        png, pdf = out / f"{name}.png", out / f"{name}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert pdf.read_bytes()[:5] == b"%PDF-", pdf
    assert sorted(result["figures"]) == sorted(f"{n}.{e}" for n in FIGURES for e in ("png", "pdf"))


def test_first_step_closed_form(quick_run):
    _, result, stdout = quick_run
    check = result["first_step_check"]
    assert check["passed"] is True
    # (w − 1)(μ_c − μ̄) recomputed here from the mixture parameters in the JSON, with NumPy
    cfg = result["config"]
    params = cfg["mixture_params"]
    w, mu, lab = np.array(params["weights"]), np.array(params["means"]), np.array(params["labels"])
    in_class = lab == cfg["label"]
    mu_c = (w[in_class] @ mu[in_class]) / w[in_class].sum()
    mu_bar = (w @ mu) / w.sum()
    expected = (cfg["scale"] - 1) * (mu_c - mu_bar)
    np.testing.assert_allclose(check["closed_form_vector"], expected, rtol=1e-9, atol=1e-9)
    # every sample's first-step CFG bias has that norm, so the mean does too
    first = result["rules"]["cfg"]["bias"]
    assert first["mean"][0] == pytest.approx(np.linalg.norm(expected), rel=1e-9)
    assert first["std"][0] == pytest.approx(0.0, abs=1e-9)
    assert check["max_abs_vector_deviation"] <= check["tolerance"]
    assert "OK" in stdout


def test_cfg_zero_star_first_step_is_exactly_zero(quick_run):
    _, result, _ = quick_run
    zero = result["first_step_check"]["zero_init_first_step_exactly_zero"]
    assert zero == {"cfg-zero-star": True, "zero-init": True}
    # a zero velocity's bias is ‖u_c(x0)‖ whatever the rule, so both zero-init rules agree at step 0
    rules = result["rules"]
    assert rules["cfg-zero-star"]["bias"]["mean"][0] == rules["zero-init"]["bias"]["mean"][0]
    # ... and differ from plain CFG / CFG* there
    assert rules["cfg-zero-star"]["bias"]["mean"][0] != pytest.approx(rules["cfg"]["bias"]["mean"][0])
    # the conditional-only baseline has no guidance bias at all
    assert result["first_step_check"]["conditional_bias_max"] < 1e-9


def test_errata_counterexample(quick_run):
    _, result, _ = quick_run
    e = result["errata"]
    assert e["v_cond"] == [2.0, 1.0] and e["v_uncond"] == [1.0, 0.0] and e["scale"] == 2.0 and e["v_true"] == [3.0, 2.0]
    np.testing.assert_allclose(e["guided"]["cfg"], [3.0, 2.0], atol=1e-12)
    np.testing.assert_allclose(e["guided"]["cfg-star"], [2.0, 2.0], atol=1e-6)  # s* carries the 1e-8 of its denominator
    assert e["error"]["cfg"] == pytest.approx(0.0, abs=1e-12)
    assert e["error"]["cfg-star"] == pytest.approx(1.0, abs=1e-6)


def test_help_and_bad_label(tmp_path):
    proc = run_experiment("--help")
    assert "--quick" in proc.stdout and "--scale" in proc.stdout
    text = " ".join(proc.stdout.split())  # argparse wraps the help text
    assert "--zero-init-steps" in text and "zero_steps is K − 1" in text and "--zero-steps" not in text
    bad = run_experiment("--quick", "--label", "9", "--out", str(tmp_path / "bad"), check=False)
    assert bad.returncode == 2
    assert bad.stderr.startswith("python -m experiments.exact_guidance: error: --label") and bad.stderr.count("\n") == 1
    assert not (tmp_path / "bad").exists()


def test_sample_scores_against_numpy_and_scipy():
    """The metrics of a sample set (analysis.sample_quality plus the extras) recomputed independently."""
    import jax
    from scipy.spatial.distance import jensenshannon
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal

    from cfgzero_theory import mixtures
    from experiments.exact_guidance import MIXTURE, sample_scores

    mixture = mixtures.class_conditional_2d(**MIXTURE)
    label, lo, hi, bins = 2, -8.0, 8.0, 12
    samples = np.concatenate([np.asarray(mixture.sample(jax.random.key(1), 300, label), np.float64),
                              [[9.0, 0.0], [0.0, -12.0]]])  # two points off the grid
    reference = np.asarray(mixture.sample(jax.random.key(2), 300, label))
    scores = sample_scores(mixture, samples, reference, label, (lo, hi), bins, 1.0)

    weights, means, covs, labels = (np.asarray(a, np.float64) for a in (mixture.weights, mixture.means, mixture.covs,
                                                                        mixture.labels))
    keep = labels == label
    log_density = lambda x: logsumexp([np.log(w) + multivariate_normal(m, c).logpdf(x)  # noqa: E731
                                       for w, m, c in zip(weights[keep] / weights[keep].sum(), means[keep], covs[keep])],
                                      axis=0)
    assert scores["mean_nll"] == pytest.approx(-np.mean(log_density(samples)), rel=1e-4)
    inside = np.all((samples >= lo) & (samples <= hi), axis=1)
    assert scores["fraction_on_grid"] == pytest.approx(inside.mean())
    hist, xe, ye = np.histogram2d(samples[inside, 0], samples[inside, 1], bins=bins, range=[[lo, hi], [lo, hi]])
    centres = (xe[:-1] + xe[1:]) / 2
    gx, gy = np.meshgrid(centres, (ye[:-1] + ye[1:]) / 2, indexing="ij")
    masses = np.exp(log_density(np.stack([gx.ravel(), gy.ravel()], axis=-1)))
    p = np.append(hist.ravel() / len(samples), 1 - inside.mean())  # the outside cell holds the escaped samples
    q = np.append(masses / masses.sum(), 0.0)
    assert scores["jsd"] == pytest.approx(jensenshannon(p, q) ** 2, rel=1e-4)
    # modes: each sample to its most responsible component of the whole mixture; TV against the class weights
    joint = np.stack([np.log(w) + multivariate_normal(m, c).logpdf(samples) for w, m, c in zip(weights, means, covs)])
    shares = np.bincount(joint.argmax(axis=0), minlength=len(weights)) / len(samples)
    target = np.where(keep, weights, 0.0) / weights[keep].sum()
    coverage = scores["mode_coverage"]
    np.testing.assert_allclose(coverage["shares"], shares, atol=1e-12)
    assert coverage["total_variation"] == pytest.approx(0.5 * np.abs(shares - target).sum(), rel=1e-5)
    assert coverage["off_class"] == pytest.approx(shares[~keep].sum())
