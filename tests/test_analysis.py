"""Analysis of learned models against the exact truth, tested with models whose errors are known.

The "models" are mixtures: the exact mixture (learning error 0) and mixtures with every mean
shifted by ``δ`` (at ``t = 0``, ``u_0 = Σπμ − x``, so both branches are off by exactly ``δ``).
References are NumPy recomputations from the raw weights and means, never the code under test.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfgzero_theory import CFG, CFGStar, CFGZeroStar, GaussianMixture, analysis, make_rule, metrics, mixtures
from cfgzero_theory.guidance import exact_guided_velocity
from cfgzero_theory.sampling import sample, time_grid

pytestmark = pytest.mark.usefixtures("x64")

velocity = GaussianMixture.velocity
W = 3.0
LABEL = 1


def rot(theta):
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


def cov(theta, a, b):
    r = rot(theta)
    return r @ np.diag([a, b]) @ r.T


RAW = dict(
    weights=np.array([0.2, 0.3, 0.15, 0.35]),
    means=np.array([[-3.0, 0.5], [-2.0, 2.5], [3.0, -1.0], [2.0, 2.0]]),
    covs=np.stack([cov(0.3, 0.3, 0.1), cov(-0.7, 0.2, 0.05), cov(1.1, 0.25, 0.15), cov(0.0, 0.1, 0.1)]),
    labels=np.array([0, 0, 1, 1]),
)
DELTAS = np.array([[0.0, 0.0], [0.3, -0.4], [-1.0, 0.5]])


def build(shift=(0.0, 0.0)):
    return GaussianMixture(RAW["weights"], RAW["means"] + np.asarray(shift), RAW["covs"], RAW["labels"])


def stack(mixtures):
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *mixtures)


def numpy_moments():
    w, m, lab = RAW["weights"], RAW["means"], RAW["labels"]
    mu_bar = w @ m / w.sum()
    keep = lab == LABEL
    mu_c = w[keep] @ m[keep] / w[keep].sum()
    return mu_c, mu_bar


def numpy_rule(name, v_c, v_u, w):
    if name == "cfg":
        return v_u + w * (v_c - v_u)
    s = np.sum(v_c * v_u, axis=1, keepdims=True) / (np.sum(v_u * v_u, axis=1, keepdims=True) + 1e-8)
    return s * v_u + w * (v_c - s * v_u)


@pytest.fixture()
def setup(x64):
    truth = build()
    models = stack([build(d) for d in DELTAS])
    x0 = jax.random.normal(jax.random.PRNGKey(0), (64, 2))
    return truth, models, x0


RULES = {"cfg": CFG(W), "cfg*": CFGStar(W), "cfg-zero*": CFGZeroStar(W, 1), "zero-init cfg": make_rule("zero-init", W, 2)}


# ----------------------------------------------------------------------------- first step
def test_first_step_exact_model_zero_learning_error_and_closed_form_bias(setup):
    truth, _, x0 = setup
    out = analysis.first_step_errors(velocity, stack([truth, truth]), truth, LABEL, RULES, x0)
    mu_c, mu_bar = numpy_moments()
    bias = abs(W - 1) * np.linalg.norm(mu_c - mu_bar)
    for name, errs in out.items():
        assert errs.learning_error.shape == (2,) and errs.zero_error.shape == ()
        np.testing.assert_allclose(errs.learning_error, 0.0, atol=1e-12)
    for name in ("cfg", "zero-init cfg"):  # zero-init rules are reported through their inner rule
        np.testing.assert_allclose(out[name].total_error, bias, rtol=1e-12)
        assert float(out[name].guidance_bias) == pytest.approx(bias, rel=1e-12)
    x = np.asarray(x0)
    for name in ("cfg", "cfg*"):
        target = numpy_rule(name, mu_c - x, mu_bar - x, W)
        assert float(out[name].zero_error) == pytest.approx(np.linalg.norm(target, axis=1).mean(), rel=1e-12)
        assert float(out[name].guidance_bias) == pytest.approx(np.linalg.norm(target - (mu_c - x), axis=1).mean(), rel=1e-12)
        assert float(out[name].zero_error_cond) == pytest.approx(np.linalg.norm(mu_c - x, axis=1).mean(), rel=1e-12)
    for field in out["cfg*"]._fields:
        np.testing.assert_array_equal(getattr(out["cfg-zero*"], field), getattr(out["cfg*"], field))


def test_first_step_shifted_models_match_numpy_closed_forms(setup):
    truth, models, x0 = setup
    out = analysis.first_step_errors(velocity, models, truth, LABEL, {"cfg": CFG(W), "cfg*": CFGStar(W)}, x0)
    mu_c, mu_bar = numpy_moments()
    x = np.asarray(x0)
    # CFG: model branches are exact + δ, so ṽθ − ṽ* = δ at every x0
    np.testing.assert_allclose(out["cfg"].learning_error, np.linalg.norm(DELTAS, axis=1), rtol=1e-12, atol=1e-12)
    for s, delta in enumerate(DELTAS):
        total = np.linalg.norm((W - 1) * (mu_c - mu_bar) + delta)
        assert float(out["cfg"].total_error[s]) == pytest.approx(total, rel=1e-12)
        # CFG*: s* depends on x0; recompute both fields in NumPy
        exact = numpy_rule("cfg*", mu_c - x, mu_bar - x, W)
        model = numpy_rule("cfg*", mu_c + delta - x, mu_bar + delta - x, W)
        assert float(out["cfg*"].learning_error[s]) == pytest.approx(np.linalg.norm(model - exact, axis=1).mean(), rel=1e-10, abs=1e-12)
        assert float(out["cfg*"].total_error[s]) == pytest.approx(np.linalg.norm(model - (mu_c - x), axis=1).mean(), rel=1e-10)


def tiny_net(key, d=2, hidden=16, classes=3):
    """A generic (non-mixture) velocity function: params a dict, NULL_LABEL mapped to its own embedding."""
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (d, hidden)) / math.sqrt(d),
        "emb": jax.random.normal(k2, (classes + 1, hidden)),
        "w2": jax.random.normal(k3, (hidden, d)) / math.sqrt(hidden),
    }


def net_velocity(params, x, t, label):
    h = jnp.tanh(x @ params["w1"] + params["emb"][label + 1] + t)
    return h @ params["w2"] - x


def test_vmap_over_seeds_equals_looping_seeds(setup):
    truth, models, x0 = setup
    # mixtures' per-seed values are checked against per-seed NumPy references above; here a
    # generic pytree of network weights (the training use case)
    nets = stack([tiny_net(jax.random.PRNGKey(s)) for s in range(3)])
    times = time_grid(6)
    for fn, params in ((net_velocity, nets),):
        rules = {"cfg": CFG(W), "cfg-zero*": CFGZeroStar(W)}
        first = analysis.first_step_errors(fn, params, truth, LABEL, rules, x0)
        steps = analysis.per_step_errors(fn, params, truth, LABEL, CFGZeroStar(W), x0, times)
        for s in range(3):
            one = jax.tree_util.tree_map(lambda a: a[s : s + 1], params)
            first_s = analysis.first_step_errors(fn, one, truth, LABEL, rules, x0)
            for name in rules:
                np.testing.assert_allclose(first[name].learning_error[s], first_s[name].learning_error[0], rtol=1e-12)
                np.testing.assert_allclose(first[name].total_error[s], first_s[name].total_error[0], rtol=1e-12)
            steps_s = analysis.per_step_errors(fn, one, truth, LABEL, CFGZeroStar(W), x0, times)
            for field in ("learning_error", "zero_error", "applied_error", "total_error", "guidance_bias", "samples"):
                np.testing.assert_allclose(getattr(steps, field)[s], getattr(steps_s, field)[0], rtol=1e-11, atol=1e-13)


# ----------------------------------------------------------------------------- along the trajectory
def test_per_step_exact_and_shifted_models(setup):
    truth, models, x0 = setup
    times = time_grid(8)
    mu_c, mu_bar = numpy_moments()
    x = np.asarray(x0)
    out = analysis.per_step_errors(velocity, stack([truth, truth]), truth, LABEL, CFGZeroStar(W, 2), x0, times)
    assert out.learning_error.shape == (2, 8) and out.samples.shape == (2, 64, 2)
    np.testing.assert_array_equal(out.zeroed, [True, True] + [False] * 6)
    np.testing.assert_allclose(out.learning_error, 0.0, atol=1e-10)
    # zeroed steps: the applied velocity is 0, its error is the zero baseline; elsewhere it is the learning error
    np.testing.assert_allclose(out.applied_error[:, :2], out.zero_error[:, :2], rtol=1e-12)
    np.testing.assert_allclose(out.applied_error[:, 2:], 0.0, atol=1e-10)
    # step 0 (t = 0, x = x0): zero baseline is the exact CFG* field, total error ‖u_c‖ = ‖μ_c − x0‖
    target = numpy_rule("cfg*", mu_c - x, mu_bar - x, W)
    np.testing.assert_allclose(out.zero_error[:, 0], np.linalg.norm(target, axis=1).mean(), rtol=1e-12)
    np.testing.assert_allclose(out.total_error[:, 0], np.linalg.norm(mu_c - x, axis=1).mean(), rtol=1e-12)
    np.testing.assert_allclose(out.guidance_bias[:, 0], np.linalg.norm(target - (mu_c - x), axis=1).mean(), rtol=1e-12)
    # plain CFG with the shifted models (seed 0 exact): no step is zeroed, step-0 bias is
    # |w − 1|·‖μ_c − μ̄‖ and step-0 learning error ‖δ‖ exactly
    cfg = analysis.per_step_errors(velocity, models, truth, LABEL, CFG(W), x0, times)
    assert not np.any(cfg.zeroed)
    np.testing.assert_allclose(cfg.guidance_bias[:, 0], abs(W - 1) * np.linalg.norm(mu_c - mu_bar), rtol=1e-12)
    np.testing.assert_allclose(cfg.learning_error[:, 0], np.linalg.norm(DELTAS, axis=1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cfg.learning_error[0], 0.0, atol=1e-10)
    np.testing.assert_allclose(cfg.applied_error, cfg.learning_error, atol=1e-12)


def test_per_step_samples_and_errors_match_the_sampler_per_seed(setup):
    truth, models, x0 = setup
    times = time_grid(6)
    rule = CFGStar(W)
    for solver in ("euler", "heun"):
        out = analysis.per_step_errors(velocity, models, truth, LABEL, rule, x0, times, solver=solver)
        for s, delta in enumerate(DELTAS):
            model = build(delta)
            ref = sample(velocity, model, x0, times, LABEL, rule, solver=solver, return_trajectory=True)
            np.testing.assert_allclose(out.samples[s], ref.samples, rtol=1e-12, atol=1e-12)
            if solver == "heun":
                continue
            for i in (0, 3, 5):
                x_i = ref.trajectory[i]
                exact = np.asarray(exact_guided_velocity(truth, x_i, times[i], LABEL, rule))
                model_v = np.asarray(exact_guided_velocity(model, x_i, times[i], LABEL, rule))
                u_c = np.asarray(truth.velocity(x_i, times[i], LABEL))
                assert float(out.learning_error[s, i]) == pytest.approx(np.linalg.norm(model_v - exact, axis=1).mean(), rel=1e-9, abs=1e-12)
                assert float(out.zero_error[s, i]) == pytest.approx(np.linalg.norm(exact, axis=1).mean(), rel=1e-9)
                assert float(out.total_error[s, i]) == pytest.approx(np.linalg.norm(model_v - u_c, axis=1).mean(), rel=1e-9)


def test_validation(setup):
    truth, models, x0 = setup
    times = time_grid(4)
    ragged = {"a": jnp.zeros((2, 3)), "b": jnp.zeros((3, 3))}
    cases = [
        (lambda: analysis.first_step_errors(velocity, models, truth, LABEL, {}, x0), "rules"),
        (lambda: analysis.first_step_errors(velocity, models, truth, LABEL, {"cfg": 3.0}, x0), "rules"),
        (lambda: analysis.first_step_errors(velocity, models, truth, LABEL, RULES, x0[None]), "x0"),
        (lambda: analysis.first_step_errors(velocity, models, truth, 7, RULES, x0), "label"),
        (lambda: analysis.first_step_errors(net_velocity, ragged, truth, LABEL, RULES, x0), "seed axis"),
        (lambda: analysis.per_step_errors(velocity, models, truth, LABEL, CFG(W), x0, times, solver="rk4"), "solver"),
        (lambda: analysis.per_step_errors(velocity, models, truth, LABEL, CFG(W), x0, times[:1]), "times"),
    ]
    for fn, needle in cases:
        with pytest.raises(ValueError, match=needle):
            fn()


def test_rule_helpers():
    assert analysis.without_zero_init(CFGZeroStar(2.0, 3)) == CFGStar(2.0)
    assert analysis.without_zero_init(make_rule("zero-init", 2.0, 2)) == CFG(2.0)
    assert analysis.without_zero_init(CFG(2.0)) == CFG(2.0)
    assert int(analysis.zero_init_steps(CFGZeroStar(2.0, 2))) == 2 and analysis.zero_init_steps(CFGStar(1.0)) == 0


# ----------------------------------------------------------------------------- crossover epoch
EPOCHS = np.arange(15)
ZERO = 14.18


def test_crossover_noise_free_curves():
    model = np.tile(15.0 - 0.1 * EPOCHS, (4, 1))  # below 14.18 from epoch 9 (15 − 0.9 = 14.1)
    res = analysis.crossover_epoch(EPOCHS, model, np.full((4, 15), ZERO), num_bootstrap=100)
    assert res == analysis.Crossover(9.0, 9.0, 9.0, 1.0)
    # a scalar / (E,) baseline broadcasts over seeds; evaluated epochs need not be consecutive
    assert analysis.crossover_epoch(2 * EPOCHS, model, ZERO, num_bootstrap=100).epoch == 18.0
    # a dip below that is undone does not count
    dip = model.copy()
    dip[:, 3] = ZERO - 1
    dip[:, 11] = ZERO + 1
    assert analysis.crossover_epoch(EPOCHS, dip, np.full(15, ZERO), num_bootstrap=100).epoch == 12.0
    # never below at the end: NaN, no replicate crosses, the interval is unbounded
    never = analysis.crossover_epoch(EPOCHS, model + 5.0, ZERO, num_bootstrap=100)
    assert math.isnan(never.epoch) and never.fraction == 0.0 and never.low == never.high == math.inf
    # ties are not "below"
    assert math.isnan(analysis.crossover_epoch(EPOCHS, np.full((4, 15), ZERO), ZERO, num_bootstrap=100).epoch)


def test_crossover_bootstrap_over_heterogeneous_seeds():
    # seed A crosses at epoch 5, seed B never: the mean crosses at 5; replicates drawing only B never cross
    a = np.where(EPOCHS >= 5, ZERO - 1.0, ZERO + 1.0)
    b = np.full(15, ZERO + 0.5)
    res = analysis.crossover_epoch(EPOCHS, np.stack([a, b]), ZERO, num_bootstrap=4000, key=jax.random.PRNGKey(1))
    assert res.epoch == 5.0 and res.low == 5.0 and res.high == math.inf
    assert res.fraction == pytest.approx(0.75, abs=0.03)  # P(not both draws B) = 1 − 1/4
    # noisy seeds around a known crossing: interval brackets it, is reproducible with the key
    rng = np.random.default_rng(0)
    model = 15.0 - 0.1 * EPOCHS + rng.normal(scale=0.05, size=(16, 15))
    res = analysis.crossover_epoch(EPOCHS, model, ZERO, key=jax.random.PRNGKey(2))
    assert res.low <= 9.0 <= res.high and res.high - res.low <= 2 and res.fraction == 1.0
    assert res == analysis.crossover_epoch(EPOCHS, model, ZERO, key=jax.random.PRNGKey(2))


def test_crossover_validation():
    model = np.ones((3, 15))
    cases = [
        (lambda: analysis.crossover_epoch(EPOCHS[::-1], model, ZERO), "increasing"),
        (lambda: analysis.crossover_epoch(EPOCHS, model[:, :5], ZERO), "err_model"),
        (lambda: analysis.crossover_epoch(EPOCHS, model, np.ones(4)), "err_zero"),
        (lambda: analysis.crossover_epoch(EPOCHS, model, ZERO, level=1.5), "level"),
        (lambda: analysis.crossover_epoch(EPOCHS, model, ZERO, num_bootstrap=0), "num_bootstrap"),
    ]
    for fn, needle in cases:
        with pytest.raises(ValueError, match=needle):
            fn()


# ----------------------------------------------------------------------------- sample quality
def test_sample_quality_exact_near_floor_shifted_clearly_worse(setup):
    truth, _, _ = setup
    n = 4000  # = num_reference: the reference draw and the samples share compiled shapes
    exact = truth.sample(jax.random.key(5), n, LABEL)  # typed key like the default: one compile
    shifted = exact + jnp.array([0.8, -0.6])  # ‖δ‖ = 1
    good = analysis.sample_quality(truth, exact, LABEL, num_reference=n)
    bad = analysis.sample_quality(truth, shifted, LABEL, num_reference=n)
    assert set(good) == {"nll", "nll_floor", "frechet", "mmd", "mode_tv", "precision", "jsd"}
    assert abs(float(good["nll"] - good["nll_floor"])) < 0.1
    assert float(good["precision"]) == pytest.approx(0.95, abs=0.02)
    assert float(good["frechet"]) < 0.02 and abs(float(good["mmd"])) < 2e-3 and float(good["mode_tv"]) < 0.05
    assert float(good["jsd"]) < 0.1
    assert float(bad["nll"]) > float(good["nll"]) + 3
    assert float(bad["precision"]) < 0.3
    assert float(bad["frechet"]) == pytest.approx(1.0, abs=0.1)
    assert float(bad["mmd"]) > 10 * abs(float(good["mmd"])) + 0.01
    assert float(bad["jsd"]) > float(good["jsd"]) + 0.2
    # per-seed input (S, n, d) gives per-seed values equal to single calls (one HDR threshold for all)
    both = analysis.sample_quality(truth, jnp.stack([exact, shifted]), LABEL, num_reference=n)
    for name in good:
        np.testing.assert_allclose(both[name], [good[name], bad[name]], rtol=1e-12)


def test_sample_quality_high_dimension():
    d = 16
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, d, d))
    covs = a @ np.swapaxes(a, 1, 2) / d + 0.1 * np.eye(d)
    truth = GaussianMixture([1.0, 2.0, 1.0], rng.normal(size=(3, d)), covs, [0, 0, 1])
    n = 2000  # = num_reference: the reference draw and the samples share compiled shapes
    exact = truth.sample(jax.random.key(1), n, 0)
    good = analysis.sample_quality(truth, exact, 0, num_reference=n)
    bad = analysis.sample_quality(truth, exact + 0.5, 0, num_reference=n)
    assert "jsd" not in good
    assert float(good["precision"]) == pytest.approx(0.95, abs=0.03)
    assert abs(float(good["nll"] - good["nll_floor"])) < 0.2
    for name in ("nll", "frechet", "mmd"):
        assert float(bad[name]) > float(good[name]) + 0.01
    assert float(bad["frechet"]) == pytest.approx(d * 0.25, rel=0.1)
    assert float(bad["precision"]) < float(good["precision"]) - 0.2
    assert analysis.default_bandwidth(truth, 0) > 0


def test_sample_quality_validation(setup):
    truth, _, _ = setup
    with pytest.raises(ValueError, match="samples"):
        analysis.sample_quality(truth, np.zeros((5, 3)), LABEL)
    with pytest.raises(ValueError, match="label"):
        analysis.sample_quality(truth, np.zeros((5, 2)), 9)
    singular = GaussianMixture([1.0], [[0.0, 0.0]], [np.diag([1.0, 0.0])])
    with pytest.raises(ValueError, match="singular"):
        analysis.sample_quality(singular, np.zeros((5, 2)), None)


def test_sample_scorer_equals_sample_quality():
    gm = mixtures.class_conditional_2d()
    key = jax.random.key(3)
    x = jax.random.normal(jax.random.key(1), (3, 400, 2)) * 2.0 + gm.sample(jax.random.key(2), 400, 1)[None]
    score = analysis.make_sample_scorer(gm, 1, key)
    scores, again = score(x), score(x[::-1])  # a second call reuses the compiled program
    np.testing.assert_allclose(again["nll"], scores["nll"][::-1], rtol=1e-6)
    # against the metrics' own (eager, argument-checking) functions, with the same HDR reference
    threshold = metrics.hdr_log_density_threshold(gm, 1, key=key)
    lo, hi = analysis.jsd_grid(gm)
    for i, s in enumerate(x):
        assert float(scores["nll"][i]) == pytest.approx(float(metrics.mean_nll(gm, s, 1)), rel=1e-5)
        assert float(scores["precision"][i]) == pytest.approx(float(metrics.hdr_precision(gm, s, 1, threshold=threshold)))
        jsd = metrics.jsd_to_density_on_grid(s, lambda p: gm.log_prob(p, 1), lo, hi, 40)
        assert float(scores["jsd"][i]) == pytest.approx(float(jsd), rel=1e-5, abs=1e-6)
    reference = gm.sample(key, metrics.HDR_NUM_REFERENCE, 1)
    assert float(scores["nll_floor"]) == pytest.approx(-float(jnp.mean(gm.log_prob(reference, 1))), rel=1e-6)
    with pytest.raises(ValueError, match="samples"):
        analysis.make_sample_scorer(gm, 1, key)(x[0])


def test_bootstrap_mean_interval_covers_the_mean_and_shrinks():
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 1.0, (8, 3)), rng.normal(1.0, 1.0, (200, 3))
    lo_s, hi_s = analysis.bootstrap_mean_interval(small, key=jax.random.key(0))
    lo_l, hi_l = analysis.bootstrap_mean_interval(large, key=jax.random.key(0))
    assert np.all(lo_s <= small.mean(0)) and np.all(small.mean(0) <= hi_s)
    assert np.all(hi_l - lo_l < hi_s - lo_s)
    # the 90% interval of a mean of n normals is about ±1.645/√n
    np.testing.assert_allclose(hi_l - lo_l, 2 * 1.645 * large.std(0) / np.sqrt(200), rtol=0.25)
    constant = analysis.bootstrap_mean_interval(np.full((5, 2), 3.0))
    np.testing.assert_allclose(constant, 3.0)
    with pytest.raises(ValueError, match="values"):
        analysis.bootstrap_mean_interval(np.array([1.0, np.nan])[None])
