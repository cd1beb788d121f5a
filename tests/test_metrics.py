"""Exact metrics against independent references: scipy densities and distances, NumPy loops,
quadrature, closed forms written out here, and Monte-Carlo behaviour (never a metric against itself)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats
from scipy.spatial.distance import jensenshannon
from scipy.special import logsumexp

from cfgzero_theory import CFG, CFGStar, CFGZeroStar, GaussianMixture, make_rule, metrics
from cfgzero_theory.guidance import exact_guided_velocity
from cfgzero_theory.sampling import sample, time_grid


# Every test runs in float64 (tests/conftest.py's ``x64`` fixture restores the setting afterwards).
pytestmark = pytest.mark.usefixtures("x64")


def rot(theta):
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


def cov(theta, a, b):
    r = rot(theta)
    return r @ np.diag([a, b]) @ r.T


@pytest.fixture()
def two_class(x64):
    """Two classes, unequal weights, full covariances."""
    weights = np.array([0.2, 0.3, 0.15, 0.35])
    means = np.array([[-3.0, 0.5], [-2.0, 2.5], [3.0, -1.0], [2.0, 2.0]])
    covs = np.stack([cov(0.3, 0.3, 0.1), cov(-0.7, 0.2, 0.05), cov(1.1, 0.25, 0.15), cov(0.0, 0.1, 0.1)])
    labels = np.array([0, 0, 1, 1])
    return GaussianMixture(weights, means, covs, labels), (weights, means, covs, labels)


def scipy_log_prob(params, x, label=None):
    weights, means, covs, labels = params
    keep = np.ones_like(labels, bool) if label is None else labels == label
    w = weights[keep] / weights[keep].sum()
    terms = [np.log(wk) + stats.multivariate_normal(m, c).logpdf(x) for wk, m, c in zip(w, means[keep], covs[keep])]
    return logsumexp(np.stack(terms), axis=0)


# ----------------------------------------------------------------------------- JSD
def test_jensen_shannon_matches_scipy():
    rng = np.random.default_rng(0)
    p = rng.random(50)
    q = rng.random(50)
    p[:7] = 0.0  # zero cells on either side
    q[5:12] = 0.0
    expected = jensenshannon(p, q) ** 2  # scipy: natural log, square root of the divergence
    assert float(metrics.jensen_shannon(p, q)) == pytest.approx(expected, rel=1e-10)
    assert float(metrics.jensen_shannon(p, p)) == pytest.approx(0.0, abs=1e-15)


def test_jensen_shannon_disjoint_is_log2_even_with_subnormal_masses():
    p = np.array([1.0, 0.0, 0.0])
    q = np.array([0.0, 1.0, 5e-324])  # a subnormal mass must not make log M = −inf
    assert float(metrics.jensen_shannon(p, q)) == pytest.approx(math.log(2), abs=1e-12)


def test_histogram_on_grid_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 2)) * 2.0
    x[:3] = [[4.0, 0.0], [-4.0, -4.0], [4.0, 4.0]]  # points on the edges count, as in numpy
    lo, hi, bins = (-4.0, -3.0), (4.0, 5.0), (20, 16)
    hist, inside = metrics.histogram_on_grid(x, lo, hi, bins)
    counts, _, _ = np.histogram2d(x[:, 0], x[:, 1], bins=bins, range=[[lo[0], hi[0]], [lo[1], hi[1]]])
    np.testing.assert_allclose(np.asarray(hist), counts / counts.sum(), atol=1e-15)
    assert float(inside) == pytest.approx(counts.sum() / len(x))


def test_density_on_grid_matches_scipy(two_class):
    mix, params = two_class
    lo, hi, bins = -6.0, 6.0, 30
    dens = np.asarray(metrics.density_on_grid(lambda x: mix.log_prob(x, 1), lo, hi, bins))
    c = lo + (np.arange(bins) + 0.5) * (hi - lo) / bins
    gx, gy = np.meshgrid(c, c, indexing="ij")
    p = np.exp(scipy_log_prob(params, np.stack([gx.ravel(), gy.ravel()], -1), label=1)).reshape(bins, bins)
    np.testing.assert_allclose(dens, p / p.sum(), rtol=1e-9, atol=1e-300)


def test_jsd_to_density_matches_independent_pipeline(two_class):
    mix, params = two_class
    x = np.asarray(mix.sample(jax.random.PRNGKey(0), 5000, 0))
    lo, hi, bins = -6.0, 6.0, 40
    got = float(metrics.jsd_to_density_on_grid(x, lambda z: mix.log_prob(z, 0), lo, hi, bins))
    counts, _, _ = np.histogram2d(x[:, 0], x[:, 1], bins=bins, range=[[lo, hi], [lo, hi]])
    c = lo + (np.arange(bins) + 0.5) * (hi - lo) / bins
    gx, gy = np.meshgrid(c, c, indexing="ij")
    p = np.exp(scipy_log_prob(params, np.stack([gx.ravel(), gy.ravel()], -1), label=0))
    assert got == pytest.approx(jensenshannon(counts.ravel(), p) ** 2, rel=1e-8)


def test_jsd_of_own_samples_is_small_and_shrinks_with_n(two_class):
    mix, _ = two_class
    log_p = lambda z: mix.log_prob(z)  # noqa: E731
    values = [
        float(metrics.jsd_to_density_on_grid(mix.sample(jax.random.PRNGKey(n), n), log_p, -6, 6, 40))
        for n in (500, 5000, 40000)
    ]
    assert values[0] > values[1] > values[2]
    assert values[2] < 0.01


def test_jsd_of_disjoint_distribution_is_log2():
    far = GaussianMixture([1.0], [[-5.0, 0.0]], [0.09 * np.eye(2)])
    x = np.random.default_rng(2).normal(size=(2000, 2)) * 0.3 + np.array([5.0, 0.0])
    jsd = float(metrics.jsd_to_density_on_grid(x, far.log_prob, -8, 8, 64))
    assert jsd == pytest.approx(math.log(2), abs=1e-6)


def test_jsd_counts_off_grid_samples_in_an_outside_cell(two_class):
    mix, _ = two_class
    x = np.full((10, 2), 100.0)
    assert float(metrics.jsd_to_density_on_grid(x, mix.log_prob, -6, 6, 10)) == pytest.approx(math.log(2))
    hist, inside = metrics.histogram_on_grid(x, -6, 6, 10)
    assert float(inside) == 0.0
    # half the samples escape: JSD against scipy over grid cells + the outside cell
    good = np.asarray(mix.sample(jax.random.key(3), 400))
    both = np.concatenate([good, np.full((400, 2), 100.0)])
    hist, inside = metrics.histogram_on_grid(both, -6, 6, 10)
    p = np.append(np.asarray(hist).ravel() * float(inside), 1 - float(inside))
    q = np.append(np.asarray(metrics.density_on_grid(mix.log_prob, -6, 6, 10)).ravel(), 0.0)
    want = jensenshannon(p, q) ** 2
    assert float(metrics.jsd_to_density_on_grid(both, mix.log_prob, -6, 6, 10)) == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------- NLL
def test_mean_nll_single_component_matches_scipy():
    mean, c = np.array([1.0, -2.0]), cov(0.4, 0.8, 0.2)
    mix = GaussianMixture([1.0], [mean], [c])
    x = np.random.default_rng(3).normal(size=(200, 2)) * 1.5
    expected = -np.mean(stats.multivariate_normal(mean, c).logpdf(x))
    assert float(metrics.mean_nll(mix, x)) == pytest.approx(expected, rel=1e-10)


def test_mean_nll_class_and_whole_mixture_match_scipy(two_class):
    mix, params = two_class
    x = np.random.default_rng(4).normal(size=(300, 2)) * 3.0
    for label in (None, 0, 1):
        expected = -np.mean(scipy_log_prob(params, x, label))
        assert float(metrics.mean_nll(mix, x, label)) == pytest.approx(expected, rel=1e-10)


def test_mean_nll_of_own_samples_estimates_entropy():
    c = cov(0.2, 0.5, 0.25)
    mix = GaussianMixture([1.0], [[0.0, 0.0]], [c])
    x = mix.sample(jax.random.PRNGKey(5), 40000)
    assert float(metrics.mean_nll(mix, x)) == pytest.approx(stats.multivariate_normal(np.zeros(2), c).entropy(), abs=0.02)


# ----------------------------------------------------------------------------- MMD
def numpy_mmd_unbiased(x, y, h):
    def k(a, b):
        return math.exp(-np.sum((a - b) ** 2) / (2 * h * h))

    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2 * kxy


def test_mmd_matches_numpy_double_loop(monkeypatch):
    monkeypatch.setattr(metrics, "KERNEL_CHUNK_ROWS", 7)  # several padded chunks
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(23, 3)), rng.normal(size=(17, 3)) + 0.5
    for h in (0.5, 2.0):
        assert float(metrics.mmd_rbf(x, y, h)) == pytest.approx(numpy_mmd_unbiased(x, y, h), rel=1e-10, abs=1e-14)


def test_mmd_identical_distributions_near_zero_and_unbiased_can_be_negative():
    rng = np.random.default_rng(7)
    values = [float(metrics.mmd_rbf(rng.normal(size=(1000, 2)), rng.normal(size=(1000, 2)), 1.0)) for _ in range(4)]
    assert max(abs(v) for v in values) < 3e-3
    # unbiased: the estimates scatter around zero rather than sitting above it
    assert min(values) < max(values)


@pytest.mark.parametrize("d,h", [(1, 1.0), (2, 0.7)])
def test_mmd_shifted_gaussians_closed_form(d, h):
    # X ~ N(0, I), Y ~ N(δ, I), k = exp(−‖·‖²/(2h²)):
    # MMD² = 2 (h²/(h²+2))^{d/2} (1 − exp(−‖δ‖² / (2(h²+2)))).
    delta = np.full(d, 1.0 / math.sqrt(d)) * 1.5
    closed = 2 * (h * h / (h * h + 2)) ** (d / 2) * (1 - math.exp(-np.sum(delta**2) / (2 * (h * h + 2))))
    rng = np.random.default_rng(8)
    est = float(metrics.mmd_rbf(rng.normal(size=(3000, d)), rng.normal(size=(3000, d)) + delta, h))
    assert est == pytest.approx(closed, abs=0.012)


def test_mmd_to_mixture_matches_1d_quadrature():
    weights, means, sds = np.array([0.3, 0.7]), np.array([-1.0, 2.0]), np.array([0.5, 0.8])
    mix = GaussianMixture(weights, means[:, None], (sds**2)[:, None, None])
    x = np.random.default_rng(9).normal(size=(25, 1)) * 2.0
    h = 0.9
    k = lambda a, b: np.exp(-((a - b) ** 2) / (2 * h * h))  # noqa: E731
    # E k(Y, Y') and E k(x_i, Y) by numerical integration against scipy's normal pdfs: the
    # trapezoid rule on a fine grid (spectrally accurate for these smooth, decaying integrands).
    y = np.linspace(-12.0, 12.0, 2401)
    p = sum(w * stats.norm(m, s).pdf(y) for w, m, s in zip(weights, means, sds))
    k_pp = integrate.trapezoid(integrate.trapezoid(k(y[:, None], y[None, :]) * p[:, None] * p[None, :], y, axis=1), y)
    k_xp = np.mean(integrate.trapezoid(k(x[:, :1], y[None, :]) * p[None, :], y, axis=1))
    n = len(x)
    k_xx = sum(k(x[i, 0], x[j, 0]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    expected = k_xx + k_pp - 2 * k_xp
    assert float(metrics.mmd_rbf_to_mixture(x, mix, None, h)) == pytest.approx(expected, rel=1e-7, abs=1e-9)


def test_mmd_to_mixture_agrees_with_sample_mmd(two_class):
    mix, _ = two_class
    x = mix.sample(jax.random.PRNGKey(10), 1500, 0)
    exact = float(metrics.mmd_rbf_to_mixture(x, mix, 1, 1.0))  # wrong class: clearly positive
    reference = mix.sample(jax.random.PRNGKey(11), 4000, 1)
    assert exact > 0.1
    assert exact == pytest.approx(float(metrics.mmd_rbf(x, reference, 1.0)), rel=0.03)
    assert abs(float(metrics.mmd_rbf_to_mixture(x, mix, 0, 1.0))) < 3e-3  # right class: about zero


# ----------------------------------------------------------------------------- mode coverage
def test_mode_coverage_of_mixture_samples_matches_weights(two_class):
    mix, (weights, *_) = two_class
    x = mix.sample(jax.random.PRNGKey(12), 40000)
    cov_all = metrics.mode_coverage(mix, x)
    np.testing.assert_allclose(np.asarray(cov_all.weights), weights / weights.sum(), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(cov_all.shares), weights, atol=0.012)
    assert float(cov_all.total_variation) < 0.02
    assert float(cov_all.off_class) == 0.0 and float(cov_all.unassigned) == 0.0


def test_mode_coverage_per_class_and_off_class(two_class):
    mix, (weights, *_) = two_class
    x0 = mix.sample(jax.random.PRNGKey(13), 20000, 0)
    c = metrics.mode_coverage(mix, x0, 0)
    np.testing.assert_allclose(np.asarray(c.weights), [0.4, 0.6, 0.0, 0.0], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(c.shares), [0.4, 0.6, 0.0, 0.0], atol=0.015)
    wrong = metrics.mode_coverage(mix, x0, 1)  # every sample sits on the other class's modes
    assert float(wrong.off_class) == pytest.approx(1.0, abs=1e-3)
    assert float(wrong.total_variation) == pytest.approx(1.0, abs=1e-3)


def test_mode_coverage_assignment_is_scipy_bayes_classifier(two_class):
    mix, (weights, means, covs, labels) = two_class
    x = np.random.default_rng(14).uniform(-5, 5, size=(500, 2))
    log_joint = np.stack(
        [np.log(w / weights.sum()) + stats.multivariate_normal(m, c).logpdf(x) for w, m, c in zip(weights, means, covs)], 1
    )
    log_resp = log_joint - logsumexp(log_joint, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(mix.log_responsibilities(x, 1.0)), log_resp, rtol=1e-9, atol=1e-9)
    expected = np.bincount(np.argmax(log_joint, 1), minlength=4) / len(x)
    np.testing.assert_allclose(np.asarray(metrics.mode_coverage(mix, x).shares), expected, atol=1e-15)


def test_mode_coverage_non_finite_samples_are_unassigned(two_class):
    mix, _ = two_class
    x = np.array([[-3.0, 0.5], [np.nan, 0.0], [np.inf, 1.0], [-2.0, 2.5]])
    c = metrics.mode_coverage(mix, x, 0)
    assert float(c.unassigned) == pytest.approx(0.5)
    np.testing.assert_allclose(np.asarray(c.shares), [0.25, 0.25, 0.0, 0.0])
    # ½ (|0.25 − 0.4| + |0.25 − 0.6| + 0.5)
    assert float(c.total_variation) == pytest.approx(0.5 * (0.15 + 0.35 + 0.5))


# ----------------------------------------------------------------------------- guidance bias
def test_cfg_first_step_bias_matches_exact_fields(two_class):
    mix, _ = two_class
    x0 = jax.random.normal(jax.random.PRNGKey(15), (64, 2))
    for w in (0.0, 1.0, 3.5):
        measured = exact_guided_velocity(mix, x0, 0.0, 1, CFG(w)) - mix.velocity(x0, 0.0, 1)
        closed = metrics.cfg_first_step_bias(mix, 1, w)
        np.testing.assert_allclose(np.asarray(measured), np.broadcast_to(np.asarray(closed), (64, 2)), atol=1e-12)


def test_bias_along_trajectory_matches_sampler_records(two_class):
    mix, _ = two_class
    x0 = jax.random.normal(jax.random.PRNGKey(16), (128, 2))
    times = time_grid(12)
    for rule in (CFG(3.0), CFGStar(3.0), make_rule("zero-init", 3.0, 2), CFGZeroStar(3.0, 1), CFG(1.0)):
        for solver in ("euler", "heun"):
            out = sample(GaussianMixture.velocity, mix, x0, times, 1, rule, solver=solver, return_trajectory=True)
            bias = np.asarray(metrics.guidance_bias_along_trajectory(mix, out.trajectory, times, 1, rule))
            recorded = np.linalg.norm(np.asarray(out.guided - out.v_cond), axis=-1)
            assert bias.shape == (12, 128)
            np.testing.assert_allclose(bias, recorded, atol=1e-11)
    # a zeroed step's bias is ‖u_c(x0)‖ = ‖μ_c − x0‖ at t = 0
    mu_c = np.asarray(mix.mean(1))
    bias = metrics.guidance_bias_along_trajectory(mix, out.trajectory[:-1], times, 1, CFGZeroStar(3.0, 1))
    np.testing.assert_allclose(np.asarray(bias[0]), np.linalg.norm(mu_c - np.asarray(x0), axis=-1), rtol=1e-12)
    assert float(jnp.max(metrics.guidance_bias_along_trajectory(mix, out.trajectory, times, 1, CFG(1.0)))) < 1e-12


# ----------------------------------------------------------------------------- validation
def test_value_errors_name_the_argument(two_class):
    mix, _ = two_class
    x = np.zeros((10, 2))
    log_p = mix.log_prob
    cases = [
        (lambda: metrics.jsd_to_density_on_grid(np.zeros((10, 3)), log_p, -1, 1, 8), "samples"),
        (lambda: metrics.jsd_to_density_on_grid(np.zeros(10), log_p, -1, 1, 8), "samples"),
        (lambda: metrics.jsd_to_density_on_grid(x, log_p, 1, -1, 8), "hi must exceed lo"),
        (lambda: metrics.jsd_to_density_on_grid(x, log_p, -1, 1, 0), "bins"),
        (lambda: metrics.jsd_to_density_on_grid(x, log_p, -1, 1, 2.5), "bins"),
        (lambda: metrics.jsd_to_density_on_grid(x, log_p, -1, 1, True), "bins"),
        (lambda: metrics.jsd_to_density_on_grid(x, log_p, (-1, 0, 1), 1, 8), "lo"),
        (lambda: metrics.jsd_to_density_on_grid(x, log_p, -1, np.inf, 8), "hi"),
        (lambda: metrics.jsd_to_density_on_grid(x, "not callable", -1, 1, 8), "log_density_fn"),
        (lambda: metrics.density_on_grid(lambda z: z, -1, 1, 8), "log_density_fn"),
        (lambda: metrics.jensen_shannon([1.0, 0.0], [1.0, 0.0, 0.0]), "p and q"),
        (lambda: metrics.jensen_shannon([1.0, -0.5], [1.0, 0.0]), "p must"),
        (lambda: metrics.jensen_shannon([1.0, 1.0], [0.0, 0.0]), "q must"),
        (lambda: metrics.mean_nll(mix, np.zeros((5, 3))), "samples"),
        (lambda: metrics.mean_nll(mix, x, 7), "label"),
        (lambda: metrics.mmd_rbf(x, np.zeros((10, 3)), 1.0), "y"),
        (lambda: metrics.mmd_rbf(np.zeros((1, 2)), x, 1.0), "x needs at least 2"),
        (lambda: metrics.mmd_rbf(x, x, 0.0), "bandwidth"),
        (lambda: metrics.mmd_rbf(x, x, float("nan")), "bandwidth"),
        (lambda: metrics.mmd_rbf(x, x, "wide"), "bandwidth"),
        (lambda: metrics.mmd_rbf_to_mixture(np.zeros((10, 3)), mix, 0, 1.0), "samples"),
        (lambda: metrics.mmd_rbf_to_mixture(x, mix, 0, -1.0), "bandwidth"),
        (lambda: metrics.mode_coverage(mix, np.zeros((4, 1))), "samples"),
        (lambda: metrics.mode_coverage(mix, x, 5), "label"),
        (lambda: metrics.cfg_first_step_bias(mix, None, 2.0), "label"),
        (lambda: metrics.guidance_bias_along_trajectory(mix, np.zeros((3, 4, 2)), time_grid(8), 0, CFG(2.0)), "trajectory"),
        (lambda: metrics.guidance_bias_along_trajectory(mix, np.zeros((9, 4, 2)), np.zeros(1), 0, CFG(2.0)), "times"),
        (lambda: metrics.guidance_bias_along_trajectory(mix, np.zeros((9, 4, 2)), time_grid(8), None, CFG(2.0)), "label"),
    ]
    for fn, needle in cases:
        with pytest.raises(ValueError, match=needle):
            fn()


def test_numbers_follow_the_validation_rules(two_class):
    """bool is never a number, NumPy numbers are, and an empty sample set is a ValueError (not NaN)."""
    mix, _ = two_class
    x = np.random.default_rng(0).normal(size=(10, 2))
    log_p = mix.log_prob
    for bad, needle in ((True, "bandwidth"), (np.inf, "bandwidth")):
        with pytest.raises(ValueError, match=needle):
            metrics.mmd_rbf(x, x, bad)
        with pytest.raises(ValueError, match=needle):
            metrics.mmd_rbf_to_mixture(x, mix, 0, bad)
    for bad in ((8, True), (8, 2.0), (np.float64(8.0), 8)):
        with pytest.raises(ValueError, match="bins"):
            metrics.histogram_on_grid(x, -1, 1, bad)
    with pytest.raises(ValueError, match="lo"):
        metrics.histogram_on_grid(x, True, 1, 8)
    with pytest.raises(ValueError, match="num_reference"):
        metrics.hdr_log_density_threshold(mix, 0, key=jax.random.key(0), num_reference=True)
    hist, _ = metrics.histogram_on_grid(x, np.float32(-1), 1, (np.int64(4), np.int32(5)))
    assert hist.shape == (4, 5)
    assert float(metrics.mmd_rbf(x, x, np.float32(1.0))) == pytest.approx(float(metrics.mmd_rbf(x, x, 1.0)))
    empty = np.zeros((0, 2))
    for fn in (lambda: metrics.mean_nll(mix, empty), lambda: metrics.mode_coverage(mix, empty),
               lambda: metrics.hdr_precision(mix, empty, threshold=0.0),
               lambda: metrics.jsd_to_density_on_grid(empty, log_p, -1, 1, 8)):
        with pytest.raises(ValueError, match=r"samples needs at least 1 row\(s\), got 0"):
            fn()


def test_singular_mixture_refused_by_mode_coverage():
    singular = GaussianMixture([1.0, 1.0], [[0.0, 0.0], [3.0, 0.0]], [np.diag([1.0, 0.0]), np.eye(2)])
    with pytest.raises(ValueError, match="singular"):
        metrics.mode_coverage(singular, np.zeros((3, 2)))



# ----------------------------------------------------------------------------- Fréchet distance
def random_spd(rng, d, jitter=0.1):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + jitter * np.eye(d)


def scipy_frechet(m1, c1, m2, c2):
    """The FID formula with scipy's general (non-symmetric) matrix square root of ``C₁C₂``."""
    from scipy import linalg

    root = linalg.sqrtm(c1 @ c2)
    return float(np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.real(np.trace(root)))


@pytest.mark.parametrize("d", [1, 3, 8])
def test_frechet_distance_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    for _ in range(3):
        m1, m2 = rng.normal(size=d), rng.normal(size=d)
        c1, c2 = random_spd(rng, d), random_spd(rng, d)
        got = float(metrics.frechet_distance(m1, c1, m2, c2))
        assert got == pytest.approx(scipy_frechet(m1, c1, m2, c2), rel=1e-9, abs=1e-10)
        assert float(metrics.frechet_distance(m2, c2, m1, c1)) == pytest.approx(got, rel=1e-9)  # symmetric


def test_frechet_distance_identical_moments_is_zero_and_closed_forms():
    rng = np.random.default_rng(0)
    m, c = rng.normal(size=5), random_spd(rng, 5)
    assert float(metrics.frechet_distance(m, c, m, c)) == pytest.approx(0.0, abs=1e-10)
    # a pure shift costs ‖δ‖²; scaling an isotropic covariance σ₁²I → σ₂²I costs d(σ₁ − σ₂)²
    assert float(metrics.frechet_distance(m, c, m + 0.5, c)) == pytest.approx(5 * 0.25, rel=1e-9)
    assert float(metrics.frechet_distance(m, 4 * np.eye(5), m, 9 * np.eye(5))) == pytest.approx(5.0, rel=1e-12)
    # singular covariances are fine: N(0, diag(1, 0)) vs N(0, diag(0, 1)) → tr = 2
    assert float(metrics.frechet_distance(np.zeros(2), np.diag([1.0, 0.0]), np.zeros(2), np.diag([0.0, 1.0]))) == pytest.approx(2.0)


def test_class_moments_match_monte_carlo(two_class):
    mix, (weights, means, covs, labels) = two_class
    x = np.asarray(mix.sample(jax.random.PRNGKey(20), 200_000, 1))
    mean, cov = metrics.class_moments(mix, 1)
    np.testing.assert_allclose(np.asarray(mean), x.mean(0), atol=0.02)
    np.testing.assert_allclose(np.asarray(cov), np.cov(x.T), atol=0.03)


def test_frechet_to_mixture_uses_sample_moments_and_exact_class_moments(two_class):
    mix, (weights, means, covs, labels) = two_class
    keep = labels == 0
    w = weights[keep] / weights[keep].sum()
    mu = w @ means[keep]
    sigma = sum(wk * (ck + np.outer(mk - mu, mk - mu)) for wk, mk, ck in zip(w, means[keep], covs[keep]))
    x = np.random.default_rng(3).normal(size=(50, 2)) * [1.0, 2.0] + [0.5, -1.0]
    expected = scipy_frechet(x.mean(0), np.cov(x.T), mu, sigma)
    assert float(metrics.frechet_to_mixture(x, mix, 0)) == pytest.approx(expected, rel=1e-9)
    exact = mix.sample(jax.random.PRNGKey(21), 4000, 0)
    assert float(metrics.frechet_to_mixture(exact, mix, 0)) < 0.02
    # a shift δ leaves the sample covariance alone: FD(x + δ) = FD(x) + ‖δ‖² + 2δ·(m̂ − μ)
    delta = np.array([1.0, -0.5])
    shifted = float(metrics.frechet_to_mixture(exact + delta, mix, 0))
    expected = float(metrics.frechet_to_mixture(exact, mix, 0)) + delta @ delta + 2 * delta @ (np.asarray(exact).mean(0) - mu)
    assert shifted == pytest.approx(expected, rel=1e-9)


# ----------------------------------------------------------------------------- HDR precision
@pytest.mark.parametrize("d", [1, 2, 6])
def test_hdr_threshold_of_a_gaussian_is_the_chi2_ellipsoid(d):
    """For one Gaussian the 95% HDR is ``{(x−μ)ᵀΣ⁻¹(x−μ) ≤ χ²_d(0.95)}``: ``τ = −½ log det(2πΣ) − ½ χ²_d(0.95)``."""
    rng = np.random.default_rng(d)
    mean, c = rng.normal(size=d), random_spd(rng, d)
    mix = GaussianMixture([1.0], mean[None], c[None])
    tau = float(metrics.hdr_log_density_threshold(mix, key=jax.random.PRNGKey(d), num_reference=100_000))
    closed = -0.5 * np.linalg.slogdet(2 * np.pi * c)[1] - 0.5 * stats.chi2.ppf(0.95, d)
    # the 5% quantile of log p moves by ≈ ½·χ²-density-scaled noise; 0.05 nats is ~4 standard errors
    assert tau == pytest.approx(closed, abs=0.05)


def test_hdr_precision_exact_far_and_non_finite_samples(two_class):
    mix, _ = two_class
    key = jax.random.PRNGKey(22)
    exact = mix.sample(jax.random.PRNGKey(23), metrics.HDR_NUM_REFERENCE, 1)  # same shapes as the reference: one compile
    for mass in (0.95, 0.5):
        assert float(metrics.hdr_precision(mix, exact, 1, key=key, mass=mass)) == pytest.approx(mass, abs=0.02)
    assert float(metrics.hdr_precision(mix, exact + 50.0, 1, key=key)) == 0.0
    # class 0's samples sit on the other class's modes: outside class 1's HDR
    other = mix.sample(jax.random.PRNGKey(24), metrics.HDR_NUM_REFERENCE, 0)
    assert float(metrics.hdr_precision(mix, other, 1, key=key)) < 0.01
    tau = metrics.hdr_log_density_threshold(mix, 1, key=key)
    x = np.asarray(exact[:4]).copy()
    x[0, 0] = np.nan
    inside = np.asarray(mix.log_prob(x[1:], 1)) >= float(tau)
    assert float(metrics.hdr_precision(mix, x, 1, threshold=tau)) == pytest.approx(inside.sum() / 4)


def test_new_metrics_validate_arguments(two_class):
    mix, _ = two_class
    key = jax.random.PRNGKey(0)
    cases = [
        (lambda: metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3)), "mean1 and mean2"),
        (lambda: metrics.frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2)), "cov1"),
        (lambda: metrics.frechet_to_mixture(np.zeros((1, 2)), mix, 0), "samples needs at least 2"),
        (lambda: metrics.frechet_to_mixture(np.zeros((5, 3)), mix, 0), "samples"),
        (lambda: metrics.hdr_precision(mix, np.zeros((5, 2)), 0), "key"),
        (lambda: metrics.hdr_precision(mix, np.zeros((5, 2)), 0, key=key, mass=1.0), "mass"),
        (lambda: metrics.hdr_precision(mix, np.zeros((5, 2)), 0, key=key, num_reference=1), "num_reference"),
        (lambda: metrics.hdr_precision(mix, np.zeros((5, 2)), 0, threshold=np.zeros(2)), "threshold"),
        (lambda: metrics.hdr_precision(mix, np.zeros((5, 2)), 9, key=key), "label"),
    ]
    for fn, needle in cases:
        with pytest.raises(ValueError, match=needle):
            fn()
    singular = GaussianMixture([1.0], [[0.0, 0.0]], [np.diag([1.0, 0.0])])
    with pytest.raises(ValueError, match="singular"):
        metrics.hdr_log_density_threshold(singular, key=key)
