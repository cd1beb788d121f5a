"""GaussianMixture against independent references: scipy densities, Monte Carlo, autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from cfgzero_theory import NULL_LABEL, GaussianMixture


def random_problem(seed=0, k=5, d=3, singular=False):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(k, d, d))
    covs = a @ a.transpose(0, 2, 1) / d + 0.05 * np.eye(d)
    if singular:
        b = rng.normal(size=(k, d, 1))
        covs[0] = b[0] @ b[0].T  # rank one
    means = 2.5 * rng.normal(size=(k, d))
    weights = rng.uniform(0.2, 1.0, size=k)
    labels = np.arange(k) % 3
    return weights, means, covs, labels


def scipy_log_prob_t(weights, means, covs, x, t, keep=None):
    keep = np.ones(len(weights), bool) if keep is None else keep
    w = np.where(keep, weights, 0.0)
    w = w / w.sum()
    d = means.shape[1]
    dens = sum(
        w[k] * multivariate_normal(t * means[k], t * t * covs[k] + (1 - t) ** 2 * np.eye(d)).pdf(x)
        for k in range(len(w))
        if keep[k]
    )
    return np.log(dens)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.75, 0.999, 1.0])
def test_log_prob_t_matches_scipy(x64, t):
    w, m, c, lab = random_problem()
    gm = GaussianMixture(w, m, c, lab)
    x = np.random.default_rng(1).normal(size=(20, 3)) * 2
    np.testing.assert_allclose(gm.log_prob_t(x, t), scipy_log_prob_t(w, m, c, x, t), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gm.log_prob_t(x, t, 1), scipy_log_prob_t(w, m, c, x, t, lab == 1), rtol=1e-10, atol=1e-10)


def test_log_prob_is_data_density(x64):
    w, m, c, lab = random_problem(2)
    gm = GaussianMixture(w, m, c, lab)
    x = np.random.default_rng(3).normal(size=(10, 3))
    np.testing.assert_allclose(gm.log_prob(x), scipy_log_prob_t(w, m, c, x, 1.0), rtol=1e-10)
    np.testing.assert_allclose(gm.log_prob(x, 2), scipy_log_prob_t(w, m, c, x, 1.0, lab == 2), rtol=1e-10)


def test_velocity_matches_monte_carlo():
    """``u_t(x) = E[x1 − x0 | x_t ≈ x]`` estimated from 4M simulated pairs (no mixture formulas)."""
    rng = np.random.default_rng(4)
    w, m, c, lab = random_problem(5, k=4, d=2)
    gm = GaussianMixture(w, m, c, lab)
    n, t, h = 4_000_000, 0.6, 0.06
    comp = rng.choice(len(w), size=n, p=w / w.sum())
    chol = np.linalg.cholesky(c)
    x1 = m[comp] + np.einsum("nij,nj->ni", chol[comp], rng.normal(size=(n, 2)))
    x0 = rng.normal(size=(n, 2))
    xt = t * x1 + (1 - t) * x0
    queries = t * m[:3] + np.array([[0.2, -0.1], [0.0, 0.3], [-0.3, 0.0]])
    for q, u in zip(queries, np.asarray(gm.velocity(queries, t))):
        near = np.sum((xt - q) ** 2, axis=1) < h * h
        assert near.sum() > 2000
        np.testing.assert_allclose((x1 - x0)[near].mean(axis=0), u, atol=0.08)


def test_continuity_equation_by_autodiff(x64):
    """``∂_t log p_t + ∇·u + u·∇log p_t = 0`` (i.e. ``∂_t p + ∇·(p u) = 0``), all by autodiff."""
    w, m, c, lab = random_problem(6, k=4, d=3)
    gm = GaussianMixture(w, m, c, lab)
    rng = np.random.default_rng(7)
    for x, t in zip(rng.normal(size=(6, 3)) * 2, [0.05, 0.2, 0.4, 0.6, 0.8, 0.95]):
        for label in (None, 1):
            dlogp_dt = jax.grad(lambda s: gm.log_prob_t(x, s, label))(t)
            grad_logp = jax.grad(lambda y: gm.log_prob_t(y, t, label))(x)
            div_u = jnp.trace(jax.jacfwd(lambda y: gm.velocity(y, t, label))(x))
            u = gm.velocity(x, t, label)
            residual = dlogp_dt + div_u + u @ grad_logp
            assert abs(float(residual)) < 1e-9 * (1 + abs(float(dlogp_dt)))


def test_score_is_gradient_and_velocity_score_identity(x64):
    w, m, c, lab = random_problem(8)
    gm = GaussianMixture(w, m, c, lab)
    x = np.random.default_rng(9).normal(size=(16, 3)) * 3
    for t in (0.1, 0.5, 0.9):
        autodiff_score = jax.vmap(jax.grad(lambda y: gm.log_prob_t(y, t)))(x)
        np.testing.assert_allclose(gm.score(x, t), autodiff_score, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(gm.velocity(x, t), (x + (1 - t) * autodiff_score) / t, rtol=1e-9, atol=1e-9)


def test_endpoints_and_posterior_means(x64):
    w, m, c, lab = random_problem(10)
    gm = GaussianMixture(w, m, c, lab)
    x = np.random.default_rng(11).normal(size=(8, 3)) * 2
    mean = (w / w.sum()) @ m
    np.testing.assert_allclose(gm.velocity(x, 0.0), mean - x, atol=1e-12)
    np.testing.assert_allclose(gm.velocity(x, 1.0), x, atol=1e-12)
    np.testing.assert_allclose(gm.posterior_mean_x1(x, 0.0), np.broadcast_to(mean, x.shape), atol=1e-12)
    np.testing.assert_allclose(gm.posterior_mean_x0(x, 0.0), x, atol=1e-12)
    np.testing.assert_allclose(gm.posterior_mean_x1(x, 1.0), x, atol=1e-12)
    for t in (0.2, 0.7):  # x = t·E[x1|x] + (1 − t)·E[x0|x] and u = E[x1|x] − E[x0|x]
        x1_hat, x0_hat = gm.posterior_mean_x1(x, t), gm.posterior_mean_x0(x, t)
        np.testing.assert_allclose(t * x1_hat + (1 - t) * x0_hat, x, atol=1e-12)
        np.testing.assert_allclose(x1_hat - x0_hat, gm.velocity(x, t), atol=1e-12)


def test_velocity_variance_law_of_total_variance(x64):
    """``E‖x1 − x0 − u(x_t)‖² = E[velocity_variance(x_t)]`` by Monte Carlo over simulated pairs."""
    w, m, c, lab = random_problem(12, k=3, d=2)
    gm = GaussianMixture(w, m, c, lab)
    key1, key2 = jax.random.split(jax.random.key(0))
    n, t = 400_000, 0.45
    x1 = gm.sample(key1, n)
    x0 = jax.random.normal(key2, x1.shape, x1.dtype)
    xt = t * x1 + (1 - t) * x0
    residual = jnp.mean(jnp.sum((x1 - x0 - gm.velocity(xt, t)) ** 2, axis=-1))
    predicted = jnp.mean(gm.velocity_variance(xt, t))
    np.testing.assert_allclose(residual, predicted, rtol=0.01)
    assert float(jnp.min(gm.velocity_variance(xt, t))) >= -1e-9


def test_float32_agrees_with_float64():
    w, m, c, lab = random_problem(13, k=8, d=4)
    x = np.random.default_rng(14).normal(size=(64, 4)) * 2
    gm32 = GaussianMixture(w, m, c, lab)
    assert gm32.dtype == jnp.float32
    with jax.enable_x64(True):
        gm64 = GaussianMixture(w, m, c, lab)
        assert gm64.dtype == jnp.float64
        ref = {t: (np.asarray(gm64.velocity(x, t)), np.asarray(gm64.log_prob_t(x, t))) for t in (0.0, 0.5, 0.99)}
    for t, (u64, lp64) in ref.items():
        u32 = gm32.velocity(x.astype(np.float32), t)
        assert u32.dtype == jnp.float32
        np.testing.assert_allclose(u32, u64, rtol=2e-4, atol=2e-4 * np.abs(u64).max())
        np.testing.assert_allclose(gm32.log_prob_t(x.astype(np.float32), t), lp64, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_far_points_and_extreme_times_stay_finite(dtype):
    with jax.enable_x64(dtype == "float64"):
        w, m, c, lab = random_problem(15)
        gm = GaussianMixture(w, m, c, lab)
        far = np.random.default_rng(16).normal(size=(10, 3)).astype(dtype) * 1e4
        mean = np.asarray(gm.mean())
        for t in (0.0, 1e-7, 0.5, 1 - 1e-6, 1.0):
            assert np.all(np.isfinite(gm.velocity(far, t))), t
            assert np.all(np.isfinite(gm.log_prob_t(far, t))), t
            assert np.all(np.isfinite(gm.score(far, t))), t
        # float32 logits of points 1e4 away carry absolute rounding of ~‖x‖²·1e-7, so the
        # responsibilities (and the O(‖μ‖) mean term) are only resolved in float64.
        tol = 1e-9 if dtype == "float64" else 1e-3
        scale = np.abs(far).max()
        np.testing.assert_allclose(gm.velocity(far, 0.0), mean - far, atol=tol * scale)
        np.testing.assert_allclose(gm.velocity(far, 1 - 1e-6), far, atol=1e-3 * scale)


def test_singular_covariance_is_valid_for_t_below_one(x64):
    w, m, c, lab = random_problem(17, singular=True)
    gm = GaussianMixture(w, m, c, lab)
    assert gm.is_singular
    regularised = GaussianMixture(w, m, c + 1e-12 * np.eye(3), lab)
    x = np.random.default_rng(18).normal(size=(12, 3))
    for t in (0.0, 0.5, 0.99):
        np.testing.assert_allclose(gm.velocity(x, t), regularised.velocity(x, t), rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(gm.log_prob_t(x, t), scipy_log_prob_t(w, m, c, x, t), rtol=1e-9)
    with pytest.raises(ValueError, match="singular"):
        gm.log_prob(x)


def test_class_label_equals_mixture_of_that_class(x64):
    w, m, c, lab = random_problem(19, k=6)
    gm = GaussianMixture(w, m, c, lab)
    keep = lab == 1
    sub = GaussianMixture(w[keep], m[keep], c[keep])
    x = np.random.default_rng(20).normal(size=(9, 3))
    for t in (0.0, 0.4, 1.0):
        np.testing.assert_allclose(gm.velocity(x, t, 1), sub.velocity(x, t), atol=1e-12)
        np.testing.assert_allclose(gm.log_prob_t(x, t, 1), sub.log_prob_t(x, t), atol=1e-12)
    np.testing.assert_allclose(gm.mean(1), sub.mean(), atol=1e-12)


def test_per_point_labels_and_null_label(x64):
    w, m, c, lab = random_problem(21, k=6)
    gm = GaussianMixture(w, m, c, lab)
    x = np.random.default_rng(22).normal(size=(6, 3))
    labels = np.array([0, 1, 2, NULL_LABEL, 1, 0])
    t = np.linspace(0.1, 0.9, 6)
    got = gm.velocity(x, t, labels)
    for i, y in enumerate(labels):
        want = gm.velocity(x[i], t[i], None if y == NULL_LABEL else int(y))
        np.testing.assert_allclose(got[i], want, atol=1e-12)
    traced = jax.jit(lambda lab_: gm.velocity(x, t, lab_))(labels)
    np.testing.assert_allclose(traced, got, atol=1e-12)


def test_unknown_or_empty_class_is_a_value_error():
    w, m, c, lab = random_problem(23, k=6)
    w[lab == 2] = 0.0
    gm = GaussianMixture(w, m, c, lab)
    assert gm.classes == (0, 1)
    x = np.zeros((2, 3))
    for bad in (2, 7, np.array([0, 7])):
        with pytest.raises(ValueError, match="label"):
            gm.velocity(x, 0.5, bad)
    with pytest.raises(ValueError, match="label"):
        gm.sample(jax.random.key(0), 3, 5)
    with pytest.raises(ValueError, match="label"):
        gm.velocity(x, 0.5, 1.5)


def test_jit_vmap_grad(x64):
    w, m, c, lab = random_problem(24)
    gm = GaussianMixture(w, m, c, lab)
    x = np.random.default_rng(25).normal(size=(5, 3))
    np.testing.assert_allclose(jax.jit(GaussianMixture.velocity)(gm, x, 0.3), gm.velocity(x, 0.3), atol=1e-12)
    ts = jnp.linspace(0.0, 1.0, 7)
    over_t = jax.vmap(lambda s: gm.velocity(x, s))(ts)
    for i, s in enumerate(ts):
        np.testing.assert_allclose(over_t[i], gm.velocity(x, float(s)), atol=1e-12)

    def nll(means):
        moved = jax.tree_util.tree_map(lambda a: a, gm)
        moved.means = means
        return -jnp.sum(moved.log_prob(x))

    grad = jax.grad(nll)(gm.means)
    eps = 1e-6
    bump = np.zeros_like(m)
    bump[1, 2] = eps
    fd = (nll(gm.means + bump) - nll(gm.means - bump)) / (2 * eps)
    np.testing.assert_allclose(grad[1, 2], fd, rtol=1e-6)


def test_chunked_evaluation_equals_single_pass(x64):
    w, m, c, lab = random_problem(26, k=4, d=3)
    whole = GaussianMixture(w, m, c, lab)
    chunked = GaussianMixture(w, m, c, lab, chunk_elements=1)  # 64-row chunks
    rng = np.random.default_rng(27)
    n = 1000  # not a multiple of 64: the last chunk is padded
    x, t = rng.normal(size=(n, 3)), rng.uniform(size=n)
    labels = rng.integers(-1, 3, size=n)
    for method in ("velocity", "log_prob_t", "score", "velocity_variance"):
        np.testing.assert_allclose(
            getattr(chunked, method)(x, t, labels), getattr(whole, method)(x, t, labels), rtol=1e-12, atol=1e-12
        )


def test_batch_shapes_and_broadcast_t():
    w, m, c, lab = random_problem(28)
    gm = GaussianMixture(w, m, c, lab)
    x = np.zeros((2, 4, 3), np.float32)
    assert gm.velocity(x, 0.5).shape == (2, 4, 3)
    assert gm.log_prob_t(x, np.full((2, 1), 0.5)).shape == (2, 4)
    assert gm.log_prob_t(x[0, 0], 0.5).shape == ()
    with pytest.raises(ValueError, match="x must have shape"):
        gm.velocity(np.zeros((4, 2)), 0.5)
    with pytest.raises(ValueError, match="t must lie"):
        gm.velocity(x, 1.5)
    with pytest.raises(ValueError, match="broadcast"):
        gm.velocity(x, np.ones(3) * 0.5)


def test_many_components_in_low_dimension(x64):
    rng = np.random.default_rng(29)
    k = 3000
    means = rng.uniform(-10, 10, size=(k, 2))
    covs = np.tile(0.05 * np.eye(2), (k, 1, 1))
    gm = GaussianMixture(np.ones(k), means, covs)
    x = rng.uniform(-10, 10, size=(500, 2))
    t = 0.7
    sq = np.sum((x[:, None, :] - t * means[None]) ** 2, axis=-1)
    var = t * t * 0.05 + (1 - t) ** 2
    direct = np.log(np.mean(np.exp(-0.5 * sq / var), axis=1) / (2 * np.pi * var))
    np.testing.assert_allclose(gm.log_prob_t(x, t), direct, rtol=1e-9)


def test_high_dimension_is_finite_and_consistent():
    rng = np.random.default_rng(30)
    k, d = 16, 1024
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    lam = rng.uniform(0.1, 1.0, size=(k, d))
    covs = (q * lam[:, None, :]) @ q.T
    gm = GaussianMixture(np.ones(k), 0.2 * rng.normal(size=(k, d)), covs, np.arange(k) % 2)
    x = rng.normal(size=(100, d)).astype(np.float32)
    for t in (0.0, 0.5, 0.99):
        u = gm.velocity(x, t, 1)
        assert np.all(np.isfinite(u))
        if t > 0:
            score = gm.score(x, t, 1)
            np.testing.assert_allclose(u, (x + (1 - t) * score) / t, rtol=1e-3, atol=1e-3 * float(jnp.abs(u).max()))


def test_sample_moments(x64):
    w, m, c, lab = random_problem(31, k=4, d=2)
    gm = GaussianMixture(w, m, c, lab)
    for label in (None, 1):
        keep = np.ones(4, bool) if label is None else lab == label
        p = np.where(keep, w, 0) / np.where(keep, w, 0).sum()
        mean = p @ m
        cov = np.einsum("k,kij->ij", p, c + np.einsum("ki,kj->kij", m, m)) - np.outer(mean, mean)
        xs = np.asarray(gm.sample(jax.random.key(1), 200_000, label))
        np.testing.assert_allclose(xs.mean(axis=0), mean, atol=0.03)
        np.testing.assert_allclose(np.cov(xs.T), cov, atol=0.06 * np.abs(cov).max())
    per_sample = np.array([0, 1] * 50)
    xs = gm.sample(jax.random.key(2), 100, per_sample)
    assert xs.shape == (100, 2)


@pytest.mark.parametrize(
    "weights, means, covs, labels, message",
    [
        ([1.0, -1.0], np.zeros((2, 2)), np.tile(np.eye(2), (2, 1, 1)), None, "non-negative"),
        ([1.0, np.nan], np.zeros((2, 2)), np.tile(np.eye(2), (2, 1, 1)), None, "NaN"),
        ([0.0, 0.0], np.zeros((2, 2)), np.tile(np.eye(2), (2, 1, 1)), None, "all zero"),
        ([1.0, 1.0], [[0.0, np.inf], [0, 0]], np.tile(np.eye(2), (2, 1, 1)), None, "means contain"),
        ([1.0, 1.0], np.zeros((2, 2)), np.tile([[1.0, np.nan], [np.nan, 1.0]], (2, 1, 1)), None, "covs contain"),
        ([1.0, 1.0, 1.0], np.zeros((2, 2)), np.tile(np.eye(2), (2, 1, 1)), None, "means must have shape"),
        ([1.0, 1.0], np.zeros((2, 2)), np.tile(np.eye(3), (2, 1, 1)), None, "covs must have shape"),
        ([1.0, 1.0], np.zeros((2, 2)), np.tile(np.eye(2), (2, 1, 1)), [0, 1, 2], "labels must have shape"),
        ([1.0, 1.0], np.zeros((2, 2)), np.tile(np.eye(2), (2, 1, 1)), [0, -1], "labels must be >= 0"),
        ([1.0, 1.0], np.zeros((2, 2)), np.tile([[1.0, 0.5], [0.0, 1.0]], (2, 1, 1)), None, "symmetric"),
        ([1.0, 1.0], np.zeros((2, 2)), np.tile([[1.0, 2.0], [2.0, 1.0]], (2, 1, 1)), None, "semi-definite"),
        ([[1.0]], np.zeros((1, 2)), np.tile(np.eye(2), (1, 1, 1)), None, "weights must have shape"),
    ],
)
def test_construction_errors(weights, means, covs, labels, message):
    with pytest.raises(ValueError, match=message):
        GaussianMixture(weights, means, covs, labels)


def test_unnormalised_weights_and_psd_singular_are_accepted():
    gm = GaussianMixture([2.0, 6.0], np.zeros((2, 2)), np.stack([np.eye(2), np.diag([1.0, 0.0])]))
    np.testing.assert_allclose(gm.weights, [0.25, 0.75], rtol=1e-6)
    assert gm.is_singular


def test_log_responsibilities_match_scipy(x64):
    w, m, c, lab = random_problem(32)
    gm = GaussianMixture(w, m, c, lab)
    x = np.random.default_rng(33).normal(size=(10, 3)) * 2
    t = 0.6
    joint = np.stack(
        [np.log(w[k] / w.sum()) + multivariate_normal(t * m[k], t * t * c[k] + (1 - t) ** 2 * np.eye(3)).logpdf(x) for k in range(5)],
        axis=1,
    )
    want = joint - np.log(np.exp(joint).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(gm.log_responsibilities(x, t), want, rtol=1e-9, atol=1e-9)
    in_class = gm.log_responsibilities(x, t, 1)
    assert np.all(np.isneginf(np.asarray(in_class)[:, lab != 1]))
    np.testing.assert_allclose(np.exp(in_class).sum(axis=1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("n", [4096, 8192])
def test_velocity_variance_float32_large_batches_match_float64(n):
    """Regression: in float32 the rows past ~2730 of a 4096-row batch came out wrong (even
    negative) when ‖u_k‖² was expanded as ‖μ_k‖² + 2⟨m_k, c⊙z⟩ + ‖c⊙z‖²."""
    from cfgzero_theory import mixtures

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 2)) * 4
    t = rng.uniform(0, 1, n)
    got = np.asarray(mixtures.class_conditional_2d().velocity_variance(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32)))
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        want = np.asarray(mixtures.class_conditional_2d().velocity_variance(jnp.asarray(x), jnp.asarray(t)))
    finally:
        jax.config.update("jax_enable_x64", previous)
    assert got.min() > -1e-3
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-2)


# ----------------------------------------------------------------------------- boundaries
def _eye_covs(k, d=2):
    return np.tile(np.eye(d), (k, 1, 1))


@pytest.mark.parametrize(
    "labels, message",
    [
        ([0, 2**32], r"labels must be <= 2147483647 \(stored as int32\)"),  # used to wrap to class 0
        ([0, 2**31], r"labels must be <= 2147483647"),
        ([0.0, 1e30], r"labels must be <= 2147483647"),
        ([0.0, np.inf], "labels must be integers"),
        ([True, False], "labels must be integers"),
    ],
)
def test_labels_must_fit_int32(labels, message):
    with pytest.raises(ValueError, match=message):
        GaussianMixture([1.0, 1.0], np.zeros((2, 2)), _eye_covs(2), labels)
    assert GaussianMixture([1.0, 1.0], np.zeros((2, 2)), _eye_covs(2), [0, 2**31 - 1]).classes == (0, 2**31 - 1)


def test_means_and_covs_must_be_finite_in_the_mixture_dtype():
    """1e39 is a finite float64 but inf in float32 (the default dtype): refused, not stored as inf."""
    with pytest.raises(ValueError, match="means contain values too large for float32"):
        GaussianMixture([1.0], [[1e39, 0.0]], _eye_covs(1))
    with pytest.raises(ValueError, match="covs contain values too large for float32"):
        GaussianMixture([1.0], [[0.0, 0.0]], 1e39 * _eye_covs(1))
    with pytest.raises(ValueError, match="weights must be an array of real numbers"):
        GaussianMixture([10**400, 1], np.zeros((2, 2)), _eye_covs(2))  # not even a float64


def test_means_finite_in_float64_are_accepted_under_x64(x64):
    assert np.isfinite(np.asarray(GaussianMixture([1.0], [[1e39, 0.0]], _eye_covs(1)).means)).all()


def test_huge_and_tiny_weights_normalise_without_overflow():
    """[1e308, 1e308] used to sum to inf in float64, giving NaN log-weights and NaN velocities."""
    x = np.array([[0.3, -0.2], [1.0, 2.0]])
    means = np.array([[0.0, 0.0], [2.0, 1.0]])
    reference = GaussianMixture([1.0, 1.0], means, _eye_covs(2))
    for weights in ([1e308, 1e308], [5e-324, 5e-324]):
        gm = GaussianMixture(weights, means, _eye_covs(2))
        np.testing.assert_allclose(gm.weights, [0.5, 0.5], rtol=1e-6)
        np.testing.assert_allclose(gm.velocity(x, 0.5), reference.velocity(x, 0.5), rtol=1e-6)
    np.testing.assert_allclose(GaussianMixture([1e308, 0.0], means, _eye_covs(2)).weights, [1.0, 0.0])


def test_empty_batches_give_empty_results():
    """Used to raise ZeroDivisionError (a reshape with -1 of zero rows) in the field quantities."""
    gm = GaussianMixture([1.0, 2.0], [[0.0, 0.0], [3.0, 1.0]], _eye_covs(2), [0, 1])
    for batch in ((0,), (3, 0)):
        x = np.zeros((*batch, 2))
        for t in (0.5, np.full(batch, 0.5)):
            for label in (None, 1, np.zeros(batch, int)):
                for method in (gm.velocity, gm.posterior_mean_x1, gm.posterior_mean_x0, gm.score):
                    assert method(x, t, label).shape == (*batch, 2)
                assert gm.log_prob_t(x, t, label).shape == batch
                assert gm.velocity_variance(x, t, label).shape == batch
                assert gm.log_responsibilities(x, t, label).shape == (*batch, 2)
        assert gm.log_prob(x).shape == batch
    key = jax.random.key(0)
    assert gm.sample(key, 0).shape == (0, 2) and gm.sample(key, 0, 1).shape == (0, 2)
    samples, labels = gm.sample_labelled(key, 0)
    assert samples.shape == (0, 2) and labels.shape == (0,)


def test_counts_and_labels_follow_the_validation_rules():
    gm = GaussianMixture([1.0, 1.0], [[0.0, 0.0], [3.0, 0.0]], _eye_covs(2), [0, 1])
    key = jax.random.key(0)
    assert gm.sample(key, np.int64(3)).shape == (3, 2)
    assert gm.check_label(np.int64(1)) == 1 and type(gm.check_label(np.int64(1))) is int
    for bad_n in (True, 2.0, -1):
        with pytest.raises(ValueError, match="^n must be an integer >= 0"):
            gm.sample(key, bad_n)
    with pytest.raises(ValueError, match="label must be None, an int or an integer array, got dtype bool"):
        gm.velocity(np.zeros((2, 2)), 0.5, True)
    with pytest.raises(ValueError, match=r"label values \[4294967296\]"):  # checked before the cast to int32
        gm.velocity(np.zeros((1, 2)), 0.5, np.array([2**32]))
    with pytest.raises(ValueError, match="^chunk_elements must be an integer >= 1"):
        GaussianMixture([1.0], [[0.0, 0.0]], _eye_covs(1), chunk_elements=True)
