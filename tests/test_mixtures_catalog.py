"""Tests of the ready-made mixtures in ``cfgzero_theory.mixtures``.

Monte-Carlo checks use fixed keys (so they are deterministic) and a tolerance of
``MC_SIGMAS`` standard errors, each standard error estimated from the same samples.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfgzero_theory import mixtures
from cfgzero_theory.mixture import NULL_LABEL, GaussianMixture

#: Monte-Carlo tolerance in standard errors (a correct sampler fails with probability ~1e-9).
MC_SIGMAS = 6.0
#: Samples per group (the whole mixture, or one class).
MC_SAMPLES = 10_000


def _random_small(num_classes=4, components_per_class=4, seed=0):
    """A 6-D random mixture (the tests share its shapes, so JAX compiles its draws once)."""
    return mixtures.random_class_conditional(jax.random.key(seed), 6, num_classes, components_per_class)


@pytest.fixture(scope="module")
def random_1024():
    """The default random mixture in 1024 dimensions (16 components); built once, it takes seconds."""
    return mixtures.random_class_conditional(jax.random.key(11), 1024)


# name -> (constructor, components, classes, dim)
PRESETS = {
    "class_conditional_2d": (mixtures.class_conditional_2d, 12, (0, 1, 2), 2),
    "class_conditional_2d(5, 2)": (lambda: mixtures.class_conditional_2d(5, 2), 10, tuple(range(5)), 2),
    "class_conditional_2d(1, 1)": (lambda: mixtures.class_conditional_2d(1, 1), 1, (0,), 2),
    "ring": (mixtures.ring, 8, tuple(range(8)), 2),
    "ring(5)": (lambda: mixtures.ring(5), 5, tuple(range(5)), 2),
    "grid": (mixtures.grid, 25, (0, 1), 2),
    "grid(1)": (lambda: mixtures.grid(1), 1, (0,), 2),
    "random_class_conditional": (_random_small, 16, (0, 1, 2, 3), 6),
    "random_class_conditional(6, 2, 3)": (lambda: _random_small(2, 3), 6, (0, 1), 6),
    "fractal_tree": (mixtures.fractal_tree, 504, (0, 1), 2),
    "fractal_tree(3, 2)": (lambda: mixtures.fractal_tree(depth=3, components_per_branch=2), 28, (0, 1), 2),
    "fractal_tree(1, 1)": (lambda: mixtures.fractal_tree(depth=1, components_per_branch=1), 2, (0, 1), 2),
}

# Presets whose samples are compared with the exact moments (one per geometry).
SAMPLED = ["class_conditional_2d", "ring", "grid", "random_class_conditional", "fractal_tree"]


def _np(a):
    return np.asarray(a, dtype=np.float64)


def _sorted_rows(points):
    """Rows in lexicographic order (after rounding), to compare point sets."""
    return points[np.lexsort(np.round(points, 5).T)]


@functools.partial(jax.jit, static_argnums=1)
def _exact_moments(gm: GaussianMixture, labels: tuple[int, ...]):
    """Per label: ``gm.mean(label)`` and the covariance ``Σ_k π_k (Σ_k + μ_k μ_kᵀ) − μ̄ μ̄ᵀ``.

    Jitted, like :data:`_sample`, because eager JAX compiles every small operation anew for
    each preset's shapes; one program per preset keeps the test fast.
    """
    moments = []
    for label in labels:
        w, mean = gm.class_weight(label), gm.mean(label)
        second = jnp.einsum("k,kij->ij", w, gm.covs) + jnp.einsum("k,ki,kj->ij", w, gm.means, gm.means)
        moments.append((mean, second - jnp.outer(mean, mean)))
    return moments


_sample = jax.jit(GaussianMixture.sample, static_argnums=2)


# --------------------------------------------------------------------------- every preset
@pytest.mark.parametrize("name", PRESETS)
def test_preset_shape_classes_dtype(name):
    make, components, classes, dim = PRESETS[name]
    gm = make()
    assert isinstance(gm, GaussianMixture)
    assert gm.num_components == components
    assert gm.dim == dim
    assert gm.classes == classes
    assert gm.dtype == (jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    assert np.all(_np(gm.eigvals) > 0), "every preset has nonsingular covariances"


@pytest.mark.parametrize("name", SAMPLED)
def test_sample_moments_match_exact(name):
    gm = PRESETS[name][0]()
    groups = (NULL_LABEL, *gm.classes[:4])  # the whole mixture and (up to) four classes
    labels = np.repeat(groups, MC_SAMPLES)
    samples = _np(_sample(gm, jax.random.key(100), labels.size, jnp.asarray(labels)))
    for label, (mean, cov) in zip(groups, _exact_moments(gm, groups), strict=True):
        x, mean, cov = samples[labels == label], _np(mean), _np(cov)

        mean_err = np.abs(x.mean(axis=0) - mean)
        mean_se = x.std(axis=0) / np.sqrt(MC_SAMPLES)
        np.testing.assert_array_less(mean_err, MC_SIGMAS * mean_se + 1e-5, err_msg=f"mean, label {label}")

        centred = x - mean
        products = centred[:, :, None] * centred[:, None, :]
        cov_err = np.abs(products.mean(axis=0) - cov)
        cov_se = products.std(axis=0) / np.sqrt(MC_SAMPLES)
        np.testing.assert_array_less(cov_err, MC_SIGMAS * cov_se + 1e-5, err_msg=f"cov, label {label}")


# --------------------------------------------------------------------------- 2-D presets
def test_class_conditional_2d_geometry():
    radius, cluster_radius, std = 5.0, 1.2, 0.35
    gm = mixtures.class_conditional_2d(3, 4, radius, cluster_radius, std)
    means, labels = _np(gm.means), np.asarray(gm.labels)
    centres = np.stack([_np(gm.mean(c)) for c in gm.classes])

    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), radius, rtol=1e-5)
    assert np.all(np.abs(centres) > 0.5), "no class centre on a coordinate axis"
    np.testing.assert_allclose(np.linalg.norm(means - centres[labels], axis=1), cluster_radius, rtol=1e-5)
    np.testing.assert_allclose(np.sqrt(_np(gm.eigvals)), np.tile([std / 2, std], (12, 1)), rtol=1e-5)
    long_axis = _np(gm.eigvecs)[:, :, 1]  # eigenvalues ascend: the last column is the long axis
    radial = (means - centres[labels]) / cluster_radius
    np.testing.assert_allclose(np.sum(long_axis * radial, axis=1), 0.0, atol=1e-5)  # tangential
    np.testing.assert_allclose(_np(gm.weights), 1 / 12, rtol=1e-6)


def test_class_conditional_2d_classes_are_well_separated():
    gm = mixtures.class_conditional_2d()
    means, labels = _np(gm.means), np.asarray(gm.labels)
    max_std = np.sqrt(_np(gm.eigvals).max())
    centres = [_np(gm.mean(c)) for c in gm.classes]
    centre_gap = min(np.linalg.norm(a - b) for a, b in itertools.combinations(centres, 2))
    assert centre_gap > 20 * max_std
    gaps = np.linalg.norm(means[:, None] - means[None, :], axis=-1)[labels[:, None] != labels[None, :]]
    assert gaps.min() > 10 * max_std, "even the closest components of different classes are far apart"


def test_class_conditional_2d_is_deterministic():
    a, b = mixtures.class_conditional_2d(), mixtures.class_conditional_2d()
    np.testing.assert_array_equal(_np(a.means), _np(b.means))
    np.testing.assert_array_equal(_np(a.covs), _np(b.covs))


def test_ring_geometry():
    gm = mixtures.ring(8, radius=4.0, std=0.3)
    means = _np(gm.means)
    np.testing.assert_allclose(np.linalg.norm(means, axis=1), 4.0, rtol=1e-6)
    np.testing.assert_allclose(means[0], [4.0, 0.0], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(gm.labels), np.arange(8))
    np.testing.assert_allclose(_np(gm.covs), np.broadcast_to(0.09 * np.eye(2), (8, 2, 2)), atol=1e-7)
    neighbour_gap = np.linalg.norm(means - np.roll(means, 1, axis=0), axis=1)
    np.testing.assert_allclose(neighbour_gap, 2 * 4.0 * np.sin(np.pi / 8), rtol=1e-5)


def test_grid_geometry_and_checkerboard():
    gm = mixtures.grid(5, spacing=2.0, std=0.3)
    means, labels = _np(gm.means), np.asarray(gm.labels)
    np.testing.assert_allclose(means.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(means.min(axis=0), -4.0, rtol=1e-6)
    np.testing.assert_allclose(means.max(axis=0), 4.0, rtol=1e-6)
    assert np.sum(labels == 0) == 13 and np.sum(labels == 1) == 12
    dist = np.linalg.norm(means[:, None] - means[None, :], axis=-1)
    neighbours = np.isclose(dist, 2.0)
    assert neighbours.sum() == 2 * 2 * 5 * 4, "each of the 40 grid edges seen twice"
    assert np.all(labels[:, None] != labels[None, :], where=neighbours), "neighbours differ in parity"
    diagonal = np.isclose(dist, 2.0 * np.sqrt(2))
    assert np.all(labels[:, None] == labels[None, :], where=diagonal)


# --------------------------------------------------------------------------- random preset
def test_random_class_conditional_is_reproducible_per_key():
    a, b, c = _random_small(2, 3, seed=7), _random_small(2, 3, seed=7), _random_small(2, 3, seed=8)
    for leaf in ("means", "covs", "weights"):
        np.testing.assert_array_equal(_np(getattr(a, leaf)), _np(getattr(b, leaf)))
        assert not np.allclose(_np(getattr(a, leaf)), _np(getattr(c, leaf))), leaf


def test_random_class_conditional_same_mixture_in_float64():
    single = _random_small(seed=3)
    with jax.enable_x64(True):
        double = _random_small(seed=3)
        assert double.dtype == jnp.float64
        np.testing.assert_allclose(_np(double.means), _np(single.means), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_np(double.covs), _np(single.covs), rtol=1e-5, atol=1e-6)


def test_random_class_conditional_scales_and_spectrum(random_1024):
    gm, separation, spread, (lo, hi) = random_1024, 4.0, 1.0, (0.1, 1.0)  # the defaults
    means, labels = _np(gm.means), np.asarray(gm.labels)
    np.testing.assert_array_equal(labels, np.repeat(np.arange(4), 4))

    centres = np.stack([_np(gm.mean(c)) for c in gm.classes])
    centre_gaps = [np.linalg.norm(a - b) for a, b in itertools.combinations(centres, 2)]
    np.testing.assert_allclose(centre_gaps, separation, rtol=0.15)  # ≈ separation, whatever dim
    pairs = [(i, j) for i, j in itertools.combinations(range(16), 2) if labels[i] == labels[j]]
    within = [np.linalg.norm(means[i] - means[j]) for i, j in pairs]
    np.testing.assert_allclose(within, spread, rtol=0.15)

    eigvals = _np(gm.eigvals)
    assert eigvals.min() >= lo * (1 - 1e-4) and eigvals.max() <= hi * (1 + 1e-4)
    log_eig = np.log(eigvals)  # log-uniform: mean of log λ is the midpoint of the log range
    np.testing.assert_allclose(log_eig.mean(), 0.5 * (np.log(lo) + np.log(hi)), atol=0.02)
    first_cov = _np(gm.covs[0])
    off_diagonal = first_cov - np.diag(np.diag(first_cov))
    assert np.abs(off_diagonal).max() > 1e-2, "covariances are full, not diagonal"
    weights = _np(gm.weights)
    assert np.all(weights > 0) and weights.max() / weights.min() <= 3.0 + 1e-5


def test_random_class_conditional_high_dimensional(random_1024):
    gm, dim = random_1024, 1024
    assert (gm.num_components, gm.dim) == (16, dim)
    x = jax.random.normal(jax.random.key(12), (3, dim))
    v = gm.velocity(x, jnp.array([0.0, 0.5, 0.9]), label=jnp.array([NULL_LABEL, 0, 3]))
    assert v.shape == (3, dim)
    assert np.all(np.isfinite(_np(v)))
    np.testing.assert_allclose(_np(v[0]), _np(gm.mean()) - _np(x[0]), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- fractal tree
def test_fractal_tree_two_trees_in_different_directions():
    gm = mixtures.fractal_tree()
    means, labels = _np(gm.means), np.asarray(gm.labels)
    assert np.sum(labels == 0) == np.sum(labels == 1) == 252
    np.testing.assert_allclose(_np(gm.class_weight(None))[labels == 0].sum(), 0.5, rtol=1e-5)
    assert np.all(means[labels == 0, 0] > 0), "class 0 grows to the right of the root"
    assert np.all(means[labels == 1, 0] < 0), "class 1 grows to the left of the root"
    assert np.all(means[:, 1] > -0.5) and np.mean(means[:, 1] > 0) > 0.95, "both grow upwards"
    # Mirror images: reflecting class 1 across the y-axis gives class 0 (as sets).
    mirrored = means[labels == 1] * [-1.0, 1.0]
    np.testing.assert_allclose(_sorted_rows(mirrored), _sorted_rows(means[labels == 0]), atol=1e-5)
    # Away from the root the trees stay apart, by more than five trunk widths.
    far_0 = means[(labels == 0) & (np.linalg.norm(means, axis=1) > 1.0)]
    far_1 = means[(labels == 1) & (np.linalg.norm(means, axis=1) > 1.0)]
    gap = np.linalg.norm(far_0[:, None] - far_1[None, :], axis=-1).min()
    assert gap > 5 * np.sqrt(_np(gm.eigvals)[:, 0].max())


def test_fractal_tree_branches_and_weights():
    depth, per_branch, length, decay = 4, 3, 2.0, 0.5
    gm = mixtures.fractal_tree(depth, per_branch, length, decay, branch_angle=0.4, width=0.05)
    assert gm.num_components == 2 * (2**depth - 1) * per_branch
    weights, std = _np(gm.weights), np.sqrt(_np(gm.eigvals))
    # Weight ∝ segment length and along-branch std ∝ segment length: uniform density per unit length.
    np.testing.assert_allclose(weights / std[:, 1], (weights / std[:, 1])[0], rtol=1e-4)
    np.testing.assert_allclose(weights.max() / weights.min(), decay ** -(depth - 1), rtol=1e-4)
    np.testing.assert_allclose(std[:, 1].max(), mixtures.TREE_ALONG_FRACTION * length / per_branch, rtol=1e-5)
    np.testing.assert_allclose(std[:, 0].max(), 0.05, rtol=1e-5)
    # The trunk's components are evenly spaced along its direction, starting near the root.
    trunk = _np(gm.means)[:per_branch]
    direction = np.array([np.cos(mixtures.TREE_TRUNK_ANGLES[0]), np.sin(mixtures.TREE_TRUNK_ANGLES[0])])
    expected = np.outer((np.arange(per_branch) + 0.5) / per_branch * length, direction)
    np.testing.assert_allclose(trunk, expected, atol=1e-6)
    # The tree spans the sum of the level lengths along its longest path, no further.
    reach = np.linalg.norm(_np(gm.means), axis=1).max()
    assert reach < length * (1 - decay**depth) / (1 - decay)


# --------------------------------------------------------------------------- validation
BAD_ARGUMENTS = [
    (mixtures.class_conditional_2d, {"num_classes": 0}, "num_classes"),
    (mixtures.class_conditional_2d, {"components_per_class": 0}, "components_per_class"),
    (mixtures.class_conditional_2d, {"num_classes": 2.0}, "num_classes"),
    (mixtures.class_conditional_2d, {"radius": -1.0}, "radius"),
    (mixtures.class_conditional_2d, {"cluster_radius": float("nan")}, "cluster_radius"),
    (mixtures.class_conditional_2d, {"std": 0.0}, "std"),
    (mixtures.ring, {"num_components": 0}, "num_components"),
    (mixtures.ring, {"std": -0.1}, "std"),
    (mixtures.ring, {"radius": float("inf")}, "radius"),
    (mixtures.grid, {"side": 0}, "side"),
    (mixtures.grid, {"spacing": 0.0}, "spacing"),
    (mixtures.grid, {"std": 0.0}, "std"),
    (mixtures.fractal_tree, {"depth": 0}, "depth"),
    (mixtures.fractal_tree, {"components_per_branch": 0}, "components_per_branch"),
    (mixtures.fractal_tree, {"branch_length": 0.0}, "branch_length"),
    (mixtures.fractal_tree, {"length_decay": -0.5}, "length_decay"),
    (mixtures.fractal_tree, {"branch_angle": float("nan")}, "branch_angle"),
    (mixtures.fractal_tree, {"width": 0.0}, "width"),
    # bool is never a number (True used to pass as 1 for the counts)
    (mixtures.class_conditional_2d, {"num_classes": True}, "num_classes"),
    (mixtures.ring, {"num_components": True}, "num_components"),
    (mixtures.ring, {"radius": True}, "radius"),
    (mixtures.grid, {"side": np.bool_(True)}, "side"),
    (mixtures.fractal_tree, {"depth": True}, "depth"),
    (mixtures.fractal_tree, {"branch_angle": False}, "branch_angle"),
]

BAD_RANDOM_ARGUMENTS = [
    ({"dim": 0}, "dim"),
    ({"dim": 3.0}, "dim"),
    ({"num_classes": 0}, "num_classes"),
    ({"components_per_class": 0}, "components_per_class"),
    ({"class_separation": -1.0}, "class_separation"),
    ({"component_spread": -1.0}, "component_spread"),
    ({"eig_range": (0.0, 1.0)}, "eig_range"),
    ({"eig_range": (1.0, 0.5)}, "eig_range"),
    ({"eig_range": (0.1, float("inf"))}, "eig_range"),
    ({"eig_range": (0.1,)}, "eig_range"),
    ({"eig_range": 0.5}, "eig_range"),
    ({"eig_range": (True, 1.0)}, "eig_range"),
    ({"dim": True}, "dim"),
]


@pytest.mark.parametrize(
    ("make", "kwargs", "name"), BAD_ARGUMENTS, ids=[f"{make.__name__}-{kwargs}" for make, kwargs, _ in BAD_ARGUMENTS]
)
def test_bad_arguments_raise(make, kwargs, name):
    with pytest.raises(ValueError, match=name):
        make(**kwargs)


@pytest.mark.parametrize(("kwargs", "name"), BAD_RANDOM_ARGUMENTS, ids=str)
def test_bad_random_arguments_raise(kwargs, name):
    kwargs = {"dim": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        mixtures.random_class_conditional(jax.random.key(0), **kwargs)


def test_numpy_integers_and_floats_are_accepted():
    gm = mixtures.ring(np.int64(4), radius=np.float32(2.0), std=np.float64(0.5))
    assert gm.num_components == 4
    np.testing.assert_allclose(np.linalg.norm(np.asarray(gm.means), axis=1), 2.0, rtol=1e-6)
    assert mixtures.grid(side=np.int32(2)).num_components == 4
    np.testing.assert_allclose(mixtures.class_axis(np.int64(1)), mixtures.class_axis(1))
    with pytest.raises(ValueError, match="label"):
        mixtures.class_axis(True)
    with pytest.raises(ValueError, match="distance"):
        mixtures.guided_class_2d(float("inf"), 1.0)


def test_class_conditional_2d_center_translates_everything():
    base = mixtures.class_conditional_2d()
    moved = mixtures.class_conditional_2d(center=(8.0, -1.0))
    np.testing.assert_allclose(np.asarray(moved.means) - np.asarray(base.means), np.tile([8.0, -1.0], (12, 1)), atol=1e-5)
    np.testing.assert_allclose(moved.covs, base.covs, atol=1e-6)
    np.testing.assert_allclose(moved.mean(), [8.0, -1.0], atol=1e-5)
    with pytest.raises(ValueError, match="center"):
        mixtures.class_conditional_2d(center=(np.nan, 0.0))


def test_class_axis_puts_the_class_between_noise_and_data_mean():
    axis = mixtures.class_axis(1)
    gm = mixtures.class_conditional_2d(center=tuple(-12.0 * axis), radius=5.0)
    np.testing.assert_allclose(np.asarray(gm.mean(1)), -7.0 * axis, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gm.mean(None)), -12.0 * axis, atol=1e-5)
    with pytest.raises(ValueError, match="label"):
        mixtures.class_axis(3)


def test_guided_class_2d_places_the_class_and_data_means():
    from cfgzero_theory import metrics

    gm = mixtures.guided_class_2d(14.0, 10.5, label=1)
    mu_c = np.asarray(metrics.class_moments(gm, 1)[0])
    mu_bar = np.asarray(metrics.class_moments(gm, None)[0])
    np.testing.assert_allclose(mu_c, 14.0 * mixtures.class_axis(1), atol=1e-4)
    np.testing.assert_allclose(mu_bar, 10.5 * mixtures.class_axis(1), atol=1e-4)
    at_origin = mixtures.guided_class_2d(7.0, 0.0, label=2)
    np.testing.assert_allclose(np.asarray(metrics.class_moments(at_origin, None)[0]), 0.0, atol=1e-5)
    for kwargs, word in ((dict(distance=5.0, data_offset=5.0), "data_offset"), (dict(distance=5.0, data_offset=1.0, radius=2.0), "radius")):
        with pytest.raises(ValueError, match=word):
            mixtures.guided_class_2d(**kwargs)
