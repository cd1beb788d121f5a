"""The jitted ODE sampler: convergence against a closed-form flow map, target recovery, conventions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfgzero_theory import CFG, NULL_LABEL, CFGStar, CFGZeroStar, GaussianMixture, make_rule
from cfgzero_theory.sampling import (
    sample,
    shift_sigmas,
    sigma_velocity_fn,
    sigmas_to_times,
    theory_velocity_fn,
    time_grid,
)

velocity = GaussianMixture.velocity


def gaussian(seed=0, d=3):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    return rng.normal(size=d), a @ a.T / d + 0.1 * np.eye(d)


def test_time_grid():
    ts = time_grid(8)
    np.testing.assert_allclose(ts, np.linspace(0, 1, 9), atol=1e-7)
    shifted = np.asarray(time_grid(8, shift=3.0))
    assert shifted[0] == 0.0 and shifted[-1] == 1.0 and np.all(np.diff(shifted) > 0)
    sigma = 1 - np.linspace(0, 1, 9)
    np.testing.assert_allclose(1 - shifted, 3 * sigma / (1 + 2 * sigma), atol=1e-6)
    assert np.diff(shifted)[0] < np.diff(ts)[0]  # shift > 1 refines the noise end
    np.testing.assert_allclose(shift_sigmas(jnp.array([0.0, 1.0]), 5.0), [0.0, 1.0])
    with pytest.raises(ValueError, match="num_steps"):
        time_grid(0)
    with pytest.raises(ValueError, match="shift"):
        time_grid(4, shift=0.0)


def test_solvers_converge_to_the_exact_flow_map(x64):
    """For one Gaussian the flow map is ``x_1 = μ + Σ^{1/2} x0`` (symmetric root); Euler is O(h), Heun O(h²)."""
    mean, cov = gaussian()
    gm = GaussianMixture([1.0], mean[None], cov[None])
    lam, q = np.linalg.eigh(cov)
    x0 = np.random.default_rng(1).normal(size=(32, 3))
    exact = mean + x0 @ (q * np.sqrt(lam)) @ q.T
    errors = {}
    for solver in ("euler", "heun"):
        errors[solver] = [
            float(np.abs(sample(velocity, gm, x0, time_grid(n), None, CFG(1.0), solver=solver).samples - exact).max())
            for n in (16, 32, 64)
        ]
    euler, heun = np.array(errors["euler"]), np.array(errors["heun"])
    np.testing.assert_allclose(euler[:-1] / euler[1:], 2.0, rtol=0.15)
    np.testing.assert_allclose(heun[:-1] / heun[1:], 4.0, rtol=0.15)
    assert heun[-1] < 5e-4


def test_sampler_reproduces_the_class_distribution(x64):
    """Conditional sampling (w = 1) on exact fields gives samples as likely as true class samples."""
    means = np.array([[3.0, 0.0], [3.0, 2.0], [-3.0, 0.0], [-3.0, -2.0]])
    covs = np.stack([np.diag([0.3, 0.1]), np.diag([0.1, 0.3]), 0.2 * np.eye(2), np.diag([0.4, 0.1])])
    gm = GaussianMixture([1.0, 2.0, 1.0, 1.0], means, covs, [0, 0, 1, 1])
    x0 = jax.random.normal(jax.random.key(0), (4000, 2), jnp.float64)
    for label, rule in ((0, CFG(1.0)), (1, CFGStar(1.0)), (NULL_LABEL, CFG(0.0))):
        out = sample(velocity, gm, x0, time_grid(48), label, rule, solver="heun").samples
        lab = None if label == NULL_LABEL else label
        truth = gm.sample(jax.random.key(1), 4000, lab)
        nll_model, nll_true = -float(jnp.mean(gm.log_prob(out, lab))), -float(jnp.mean(gm.log_prob(truth, lab)))
        assert abs(nll_model - nll_true) < 0.06, (label, nll_model, nll_true)
        np.testing.assert_allclose(out.mean(axis=0), truth.mean(axis=0), atol=0.1)


def test_trajectory_outputs_and_zero_init():
    gm = GaussianMixture(np.ones(4), np.array([[2.0, 0], [0, 2], [-2, 0], [0, -2]]), np.tile(0.1 * np.eye(2), (4, 1, 1)), [0, 0, 1, 1])
    x0 = jax.random.normal(jax.random.key(2), (16, 2))
    ts = time_grid(10, shift=2.0)
    res = sample(velocity, gm, x0, ts, 1, CFGZeroStar(3.0, 2), return_trajectory=True)
    assert res.trajectory.shape == (11, 16, 2) and res.guided.shape == (10, 16, 2)
    np.testing.assert_array_equal(res.trajectory[0], x0)
    np.testing.assert_array_equal(res.trajectory[2], x0)  # two zero-init steps leave x0 in place
    np.testing.assert_array_equal(res.guided[:2], 0.0)
    np.testing.assert_allclose(res.trajectory[-1], res.samples)
    for i in (2, 7):  # recorded branches are the exact fields at (x_i, t_i)
        np.testing.assert_allclose(res.v_cond[i], gm.velocity(res.trajectory[i], ts[i], 1), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(res.v_uncond[i], gm.velocity(res.trajectory[i], ts[i]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(res.guided[i], CFGStar(3.0)(res.v_cond[i], res.v_uncond[i]), rtol=1e-5, atol=1e-5)
    # Euler step by hand
    h = ts[3] - ts[2]
    np.testing.assert_allclose(res.trajectory[3], res.trajectory[2] + h * res.guided[2], rtol=1e-5, atol=1e-6)
    # zero-init composes with any rule
    plain = sample(velocity, gm, x0, ts, 1, make_rule("zero-init", 3.0, 1), return_trajectory=True)
    np.testing.assert_array_equal(plain.trajectory[1], x0)


def test_generic_latent_shapes_and_vmap_over_scales():
    def linear_field(target, x, t, label):  # dx/dt = target − x, so x(1) = target + (x0 − target)/e
        return jnp.where((label == NULL_LABEL).reshape(-1, 1, 1, 1), 0.0, target) - x

    x0 = jax.random.normal(jax.random.key(3), (2, 3, 4, 4))
    target = jnp.ones((3, 4, 4))
    res = sample(linear_field, target, x0, time_grid(20), 0, CFG(1.0), solver="heun")
    assert res.samples.shape == x0.shape
    np.testing.assert_allclose(res.samples, target + (x0 - target) / np.e, atol=2e-3)  # Heun, h = 0.05
    scales = jnp.array([1.0, 2.0, 3.0])
    batched = jax.vmap(lambda w: sample(linear_field, target, x0, time_grid(20), 0, CFG(w)).samples)(scales)
    for i, w in enumerate(scales):
        one = sample(linear_field, target, x0, time_grid(20), 0, CFG(float(w))).samples
        np.testing.assert_allclose(batched[i], one, rtol=1e-6, atol=1e-6)


def test_sigma_convention_adapter():
    """Euler in diffusers' σ convention with the adapted field equals the theory-convention sampler."""
    gm = GaussianMixture(np.ones(3), np.array([[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]]), np.tile(0.2 * np.eye(2), (3, 1, 1)), [0, 1, 1])
    v_sigma = sigma_velocity_fn(velocity)
    x = jax.random.normal(jax.random.key(4), (8, 2))
    np.testing.assert_allclose(v_sigma(gm, x, 0.3, 1), -gm.velocity(x, 0.7, 1))
    np.testing.assert_allclose(theory_velocity_fn(v_sigma)(gm, x, 0.7, 1), gm.velocity(x, 0.7, 1))
    sigmas = np.asarray(shift_sigmas(jnp.linspace(1.0, 0.0, 13), 3.0))
    labels = jnp.full((8,), 1)
    xs = x
    for i in range(12):
        v_c = v_sigma(gm, xs, sigmas[i], labels)
        v_u = v_sigma(gm, xs, sigmas[i], jnp.full((8,), NULL_LABEL))
        xs = xs + (sigmas[i + 1] - sigmas[i]) * CFGZeroStar(2.0, 1)(v_c, v_u, i)
    ours = sample(velocity, gm, x, sigmas_to_times(sigmas), 1, CFGZeroStar(2.0, 1)).samples
    np.testing.assert_allclose(ours, xs, rtol=1e-5, atol=1e-5)


def test_sampler_argument_errors():
    gm = GaussianMixture([1.0], np.zeros((1, 2)), np.eye(2)[None])
    x0 = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="solver"):
        sample(velocity, gm, x0, time_grid(4), 0, CFG(1.0), solver="rk4")
    with pytest.raises(ValueError, match="x0"):
        sample(velocity, gm, np.zeros(2), time_grid(4), 0, CFG(1.0))
    with pytest.raises(ValueError, match="times"):
        sample(velocity, gm, x0, jnp.zeros((2, 2)), 0, CFG(1.0))
    with pytest.raises(ValueError, match="label"):
        sample(velocity, gm, x0, time_grid(4), 3, CFG(1.0))
