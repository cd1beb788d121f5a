"""Exact sample-quality and guidance metrics, possible because the true density is known.

Every function here takes samples (or sampler trajectories) and the exact
:class:`~cfgzero_theory.GaussianMixture` (or any log-density), and returns numbers; nothing
is plotted and nothing is fitted.  Conventions (docs/design.md §2, §4): theory time ``t ∈ [0, 1]``,
data at ``t = 1``; logarithms are natural (JSD in nats, at most ``log 2``).

* :func:`jsd_to_density_on_grid` — Jensen–Shannon divergence between a 2-D sample
  histogram and the exact density on the same grid (the paper's Fig. 3, left), built from
  :func:`histogram_on_grid`, :func:`density_on_grid` and :func:`jensen_shannon`;
* :func:`mean_nll` — mean negative log-likelihood under the true (class) density;
* :func:`mmd_rbf` — unbiased squared MMD between two sample sets, Gaussian kernel;
  :func:`mmd_rbf_to_mixture` — the same against the exact mixture, whose
  Gaussian–Gaussian kernel expectations are closed form;
* :func:`mode_coverage` — share of samples per component against the class weights;
* :func:`cfg_first_step_bias` and :func:`guidance_bias_along_trajectory` — the guidance
  bias ``ṽ* − u_c`` of docs/design.md §4, in closed form at ``t = 0`` and measured along a
  sampler's own trajectory.

Inputs are validated eagerly (``ValueError`` naming the argument; numbers by
:mod:`cfgzero_theory.validation`); the numerical work is pure JAX.  An empty sample set is a
``ValueError`` (``samples needs at least 1 row(s)``), not a NaN: a mean over no samples is
undefined.  Results are JAX scalars/arrays; wrap them in ``float`` for reports.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cfgzero_theory.guidance import GuidanceRule, decompose_guidance_error, exact_guided_velocity
from cfgzero_theory.validation import check_int, check_open_fraction, check_real

Array = jax.Array

#: Rows of the first argument processed at once by the pairwise kernel sums.
KERNEL_CHUNK_ROWS = 512


# ----------------------------------------------------------------------------- validation
def _as_points(name: str, x, dim: int | None = None, min_rows: int = 1) -> Array:
    """``x`` as a float array ``(n, d)``; ``ValueError`` naming ``name`` otherwise."""
    try:
        arr = jnp.asarray(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an array of shape (n, d), got {type(x).__name__}") from None
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (n, d), got shape {arr.shape}")
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
        raise ValueError(f"{name} must be real-valued, got dtype {arr.dtype}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} must have shape (n, {dim}), got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} row(s), got {arr.shape[0]}")
    return arr.astype(jnp.result_type(arr.dtype, float))


def _pair(name: str, value, kind=float) -> np.ndarray:
    """A scalar or a length-2 sequence as a length-2 NumPy array: finite reals (``kind=float``)
    or integers ``>= 1`` (``kind=int``), each checked by :mod:`cfgzero_theory.validation`."""
    items = [value] if np.ndim(value) == 0 else list(np.asarray(value, dtype=object).reshape(-1))
    if len(items) not in (1, 2) or np.ndim(value) > 1:
        raise ValueError(f"{name} must be a scalar or a pair, got {value!r}")
    try:
        if kind is int:
            numbers = [check_int(name, item, minimum=1) for item in items]
        else:
            numbers = [check_real(name, item) for item in items]
    except ValueError:
        what = "a positive integer or a pair of them" if kind is int else "a finite scalar or a pair"
        raise ValueError(f"{name} must be {what}, got {value!r}") from None
    return np.asarray(numbers * (2 // len(numbers)), dtype=np.int64 if kind is int else np.float64)


def _grid(lo, hi, bins) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo_, hi_ = _pair("lo", lo), _pair("hi", hi)
    bins_ = _pair("bins", bins, kind=int)
    if np.any(hi_ <= lo_):
        raise ValueError(f"hi must exceed lo in both coordinates, got lo={lo!r}, hi={hi!r}")
    return lo_, hi_, bins_


# ----------------------------------------------------------------------------- JSD on a grid
def grid_centres(lo, hi, bins) -> tuple[Array, Array]:
    """Cell centres ``(cx (bx,), cy (by,))`` of the regular grid ``[lo, hi]²`` with ``bins`` cells per axis."""
    lo_, hi_, bins_ = _grid(lo, hi, bins)
    dtype = jnp.result_type(float)
    return tuple(
        jnp.asarray(lo_[a] + (np.arange(bins_[a]) + 0.5) * (hi_[a] - lo_[a]) / bins_[a], dtype) for a in range(2)
    )


def histogram_on_grid(samples, lo, hi, bins) -> tuple[Array, Array]:
    """Normalised 2-D histogram of ``samples`` on the grid, and the share of samples on it.

    Cell ``[i, j]`` covers ``[x_i, x_{i+1}) × [y_j, y_{j+1})`` (the last row/column also
    includes its upper edge), as :func:`numpy.histogram2d` with ``range=[[lo, hi], …]``.
    Samples outside the grid (or non-finite) are dropped; the histogram is normalised over
    the samples inside, so it is all-NaN when none is.

    Returns ``(probabilities (bx, by), fraction_inside)``.
    """
    x = _as_points("samples", samples, dim=2)
    lo_, hi_, bins_ = _grid(lo, hi, bins)
    lo_j, hi_j = jnp.asarray(lo_, x.dtype), jnp.asarray(hi_, x.dtype)
    return _histogram(x, lo_j, hi_j, tuple(int(b) for b in bins_))


@jax.jit
def _jensen_shannon(p: Array, q: Array) -> Array:
    # log M = log(p + q) − log 2, not log(0.5·(p + q)): halving a subnormal mass can underflow to 0.
    total = p + q

    def kl_to_m(a):
        safe_a = jnp.where(a > 0, a, 1.0)
        safe_total = jnp.where(a > 0, total, 1.0)
        return jnp.sum(jnp.where(a > 0, a * (jnp.log(safe_a) - jnp.log(safe_total) + math.log(2.0)), 0.0))

    return 0.5 * kl_to_m(p) + 0.5 * kl_to_m(q)


@functools.partial(jax.jit, static_argnums=(3,))
def _histogram(x: Array, lo: Array, hi: Array, bins: tuple[int, int]) -> tuple[Array, Array]:
    bins_arr = jnp.asarray(bins)
    inside = jnp.all((x >= lo) & (x <= hi), axis=1)
    idx = jnp.floor((x - lo) / (hi - lo) * bins_arr).astype(jnp.int32)
    idx = jnp.clip(jnp.where(inside[:, None], idx, 0), 0, bins_arr - 1)
    flat = idx[:, 0] * bins[1] + idx[:, 1]
    counts = jnp.zeros(bins[0] * bins[1], x.dtype).at[flat].add(inside.astype(x.dtype))
    total = jnp.sum(counts)
    probs = (counts / total).reshape(bins)  # all NaN when no sample is inside
    return probs, total / x.shape[0]


def density_on_grid(log_density_fn: Callable[[Array], Array], lo, hi, bins) -> Array:
    """Cell masses ``(bx, by)`` of a density on the grid, renormalised to sum to one over it.

    The mass of a cell is approximated by ``p(centre) × area``; since every cell has the
    same area, the normalised masses are ``softmax(log p(centres))``, computed in the log
    domain (no underflow in the tails).  ``log_density_fn`` maps points ``(m, 2)`` to
    log-densities ``(m,)`` (e.g. ``lambda x: mixture.log_prob(x, label)``); it need not be
    normalised.
    """
    if not callable(log_density_fn):
        raise ValueError(f"log_density_fn must be callable, got {type(log_density_fn).__name__}")
    cx, cy = grid_centres(lo, hi, bins)
    gx, gy = jnp.meshgrid(cx, cy, indexing="ij")
    points = jnp.stack([gx.ravel(), gy.ravel()], axis=-1)
    log_p = jnp.asarray(log_density_fn(points))
    if log_p.shape != (points.shape[0],):
        raise ValueError(f"log_density_fn must map points (m, 2) to shape (m,), got {log_p.shape} for m={points.shape[0]}")
    return jax.nn.softmax(log_p).reshape(gx.shape)


def jensen_shannon(p, q) -> Array:
    """Jensen–Shannon divergence in nats between two discrete distributions of the same shape.

    ``JSD(P, Q) = ½ KL(P ‖ M) + ½ KL(Q ‖ M)``, ``M = (P + Q)/2``, with ``0·log 0 = 0``;
    ``0 ≤ JSD ≤ log 2``.  ``p`` and ``q`` are normalised here (they must be non-negative
    with positive sums).  ``scipy.spatial.distance.jensenshannon(p, q)**2`` is the same number.
    """
    p, q = jnp.asarray(p), jnp.asarray(q)
    if p.shape != q.shape or p.size == 0:
        raise ValueError(f"p and q must be non-empty and share a shape, got {p.shape} and {q.shape}")
    for name, a in (("p", p), ("q", q)):
        if not bool(jnp.all(jnp.isfinite(a))) or bool(jnp.any(a < 0)) or not float(jnp.sum(a)) > 0:
            raise ValueError(f"{name} must be finite, non-negative and not all zero")
    dtype = jnp.result_type(p.dtype, q.dtype, float)
    p, q = p.astype(dtype).ravel(), q.astype(dtype).ravel()
    return _jensen_shannon(p / jnp.sum(p), q / jnp.sum(q))


def jsd_to_density_on_grid(samples, log_density_fn: Callable[[Array], Array], lo, hi, bins) -> Array:
    """Jensen–Shannon divergence (natural log, nats) between a 2-D sample histogram and a density.

    ``JSD(H, P) = ½ Σ_ij H_ij log(H_ij / M_ij) + ½ Σ_ij P_ij log(P_ij / M_ij)``,
    ``M = (H + P)/2``, over the ``bins`` cells per axis of the regular grid ``[lo, hi]²`` plus
    one *outside* cell: ``H`` is the share of ``samples`` in each cell (samples off the grid,
    or non-finite, fall in the outside cell) and ``P_ij ∝ p(centre_ij)·area`` are the exact
    cell masses, renormalised over the grid (:func:`density_on_grid`), with mass 0 outside:
    choose a grid that holds the density.  As in the paper's Fig. 3 (left), and defined
    for every sample set: samples that escape the grid count against it, up to ``log 2``
    when all do.  The value lies in ``[0, log 2]``; a finite sample has a positive floor
    (histogram noise) that shrinks as ``n`` grows: compare against samples of the density
    itself.

    Args:
      samples: ``(n, 2)``.
      log_density_fn: points ``(m, 2)`` → log-density ``(m,)``, e.g.
        ``lambda x: mixture.log_prob(x, label)``.
      lo, hi: grid bounds, scalars (square grid) or pairs ``(x, y)``.
      bins: cells per axis, an int or a pair.
    """
    x = _as_points("samples", samples, dim=2)
    lo_, hi_, bins_ = _grid(lo, hi, bins)
    masses = density_on_grid(log_density_fn, lo, hi, bins)
    return jsd_to_cell_masses(x, masses, jnp.asarray(lo_, x.dtype), jnp.asarray(hi_, x.dtype))


def jsd_to_cell_masses(x: Array, masses: Array, lo: Array, hi: Array) -> Array:
    """The JSD of :func:`jsd_to_density_on_grid` from precomputed cell masses ``(bx, by)``
    (:func:`density_on_grid`) on the grid ``[lo, hi]`` (pairs): traceable, no argument
    checks, for use inside ``jit``/``vmap`` where the density is fixed across calls."""
    hist, inside = _histogram(x, lo, hi, masses.shape)
    hist = jnp.nan_to_num(hist.ravel() * inside)  # shares of all samples (all-NaN when none is inside)
    dens = masses.ravel().astype(hist.dtype)
    zero = jnp.zeros(1, hist.dtype)
    return _jensen_shannon(jnp.concatenate([hist, 1 - inside[None]]), jnp.concatenate([dens, zero]))


# ----------------------------------------------------------------------------- likelihood
def mean_nll(mixture, samples, label=None) -> Array:
    """Mean negative log-likelihood ``−(1/n) Σ_i log p_1(x_i | label)`` under the true density.

    ``label``: a class (its components, weights renormalised), or ``None`` / ``NULL_LABEL``
    for the whole mixture.  Needs nonsingular covariances (a data density); NaN if a sample
    is non-finite.
    """
    x = _as_points("samples", samples, dim=mixture.dim)
    mixture.check_label(label)
    return -jnp.mean(mixture.log_prob(x, label))


# ----------------------------------------------------------------------------- MMD
def _kernel_sum(a: Array, b: Array, h) -> Array:
    """``Σ_ij exp(−‖a_i − b_j‖² / (2h²))`` in row chunks of ``a`` (difference form: exact diagonal)."""
    n = a.shape[0]
    rows = min(n, KERNEL_CHUNK_ROWS)
    chunks = -(-n // rows)
    pad = chunks * rows - n
    a_p = jnp.concatenate([a, jnp.zeros((pad, a.shape[1]), a.dtype)]) if pad else a
    mask = jnp.concatenate([jnp.ones(n, a.dtype), jnp.zeros(pad, a.dtype)])

    def block(args):
        a_c, m_c = args
        d2 = jnp.sum((a_c[:, None, :] - b[None, :, :]) ** 2, axis=-1)
        return jnp.sum(m_c[:, None] * jnp.exp(-d2 / (2 * h * h)))

    return jnp.sum(jax.lax.map(block, (a_p.reshape(chunks, rows, -1), mask.reshape(chunks, rows))))


@jax.jit
def _mmd_unbiased(x: Array, y: Array, h) -> Array:
    n, m = x.shape[0], y.shape[0]
    k_xx = (_kernel_sum(x, x, h) - n) / (n * (n - 1))  # diagonal terms are exactly exp(0) = 1
    k_yy = (_kernel_sum(y, y, h) - m) / (m * (m - 1))
    k_xy = _kernel_sum(x, y, h) / (n * m)
    return k_xx + k_yy - 2 * k_xy


def mmd_rbf(x, y, bandwidth) -> Array:
    """Unbiased estimate (U-statistic) of the squared MMD with a Gaussian kernel.

    ``k(a, b) = exp(−‖a − b‖² / (2h²))``, ``h = bandwidth``, and

    ``MMD²_u = 1/(n(n−1)) Σ_{i≠j} k(x_i, x_j) + 1/(m(m−1)) Σ_{i≠j} k(y_i, y_j) − 2/(nm) Σ_{i,j} k(x_i, y_j)``

    (Gretton et al. 2012, Eq. 3).  Unbiased, so it can be slightly negative when the two
    distributions agree.  ``x (n, d)`` and ``y (m, d)`` need ``n, m ≥ 2``; memory is
    ``O(KERNEL_CHUNK_ROWS · max(n, m))``, time ``O((n + m)²)``.
    """
    x = _as_points("x", x, min_rows=2)
    y = _as_points("y", y, dim=x.shape[1], min_rows=2)
    dtype = jnp.result_type(x.dtype, y.dtype)
    return _mmd_unbiased(x.astype(dtype), y.astype(dtype), check_real("bandwidth", bandwidth, positive=True))


def _gaussian_kernel_expectation(diff: Array, cov: Array, h) -> Array:
    """``E exp(−‖D‖²/(2h²))`` for ``D ~ N(diff, cov)``: ``h^d det(h²I + cov)^{−½} exp(−½ diffᵀ (h²I + cov)⁻¹ diff)``."""
    d = diff.shape[-1]
    a = h * h * jnp.eye(d, dtype=cov.dtype) + cov
    _, logdet = jnp.linalg.slogdet(a)
    quad = jnp.sum(diff * jnp.linalg.solve(a, diff[..., None])[..., 0], axis=-1)
    return jnp.exp(d * jnp.log(h) - 0.5 * logdet - 0.5 * quad)


@jax.jit
def _mmd_to_mixture(x: Array, weights: Array, means: Array, covs: Array, eigvals: Array, eigvecs: Array, h) -> Array:
    n = x.shape[0]
    k_xx = (_kernel_sum(x, x, h) - n) / (n * (n - 1))
    # E_{Y, Y' ~ p} k(Y, Y'): components j, k give Y − Y' ~ N(μ_j − μ_k, Σ_j + Σ_k).
    pair = _gaussian_kernel_expectation(
        means[:, None, :] - means[None, :, :], covs[:, None] + covs[None, :], h
    )
    k_pp = weights @ pair @ weights
    # E_{Y ~ p} k(x_i, Y): x_i − Y ~ N(x_i − μ_k, Σ_k); in the eigenbasis Σ_k = Q diag(λ) Qᵀ,
    # h²I + Σ_k = Q diag(h² + λ) Qᵀ, so no per-sample solve is needed.
    a = h * h + eigvals  # (K, d)
    z = jnp.einsum("kij,nki->nkj", eigvecs, x[:, None, :] - means[None])
    log_cross = x.shape[1] * jnp.log(h) - 0.5 * jnp.sum(jnp.log(a), axis=-1) - 0.5 * jnp.sum(z * z / a, axis=-1)
    k_xp = jnp.mean(jnp.exp(log_cross) @ weights)
    return k_xx + k_pp - 2 * k_xp


def mmd_rbf_to_mixture(samples, mixture, label, bandwidth) -> Array:
    """Unbiased squared MMD between ``samples`` and the exact (class) mixture, Gaussian kernel.

    As :func:`mmd_rbf` with the reference sample replaced by the mixture itself: the
    sample–sample term is the U-statistic, the other two are exact, because for
    ``D ~ N(m, C)``, ``E exp(−‖D‖²/(2h²)) = h^d det(h²I + C)^{−½} exp(−½ mᵀ(h²I + C)⁻¹ m)``:

    * ``E k(Y, Y') = Σ_jk π_j π_k · that with m = μ_j − μ_k, C = Σ_j + Σ_k``;
    * ``E k(x_i, Y) = Σ_k π_k · that with m = x_i − μ_k, C = Σ_k``.

    ``π`` are the class weights (``label=None`` for the whole mixture).  Free of reference
    sampling noise; memory ``O(n·K·d²)`` for the cross term.
    """
    x = _as_points("samples", samples, dim=mixture.dim, min_rows=2)
    h = check_real("bandwidth", bandwidth, positive=True)
    weights = mixture.class_weight(label)
    dtype = jnp.result_type(x.dtype, mixture.dtype)
    cast = lambda a: jnp.asarray(a).astype(dtype)  # noqa: E731
    return _mmd_to_mixture(
        cast(x), cast(weights), cast(mixture.means), cast(mixture.covs), cast(mixture.eigvals), cast(mixture.eigvecs), h
    )


# ----------------------------------------------------------------------------- mode coverage
class ModeCoverage(NamedTuple):
    """Result of :func:`mode_coverage` (arrays over all ``K`` components of the mixture).

    ``shares``: share of samples assigned to each component; ``weights``: the class weights
    (the target shares; zero for components of other classes); ``unassigned``: share of
    non-finite samples; ``off_class``: share assigned to components of other classes;
    ``total_variation``: ``½ (Σ_k |shares_k − weights_k| + unassigned)`` in ``[0, 1]``.
    """

    shares: Array
    weights: Array
    total_variation: Array
    off_class: Array
    unassigned: Array


def mode_coverage(mixture, samples, label=None) -> ModeCoverage:
    """Share of samples per mixture component against the class weights.

    Each finite sample is assigned to the component of largest responsibility under the
    *whole* mixture at ``t = 1``, ``argmax_k log π_k + log N(x; μ_k, Σ_k)`` (the Bayes
    classifier of the data distribution, i.e. nearest component in Mahalanobis distance
    corrected by ``log π_k − ½ log det Σ_k``), so samples landing on another class's mode
    count against the class.  The target shares are the class weights ``π_k / Σ_{j∈c} π_j``
    for ``k`` in class ``label`` and ``0`` otherwise (``label=None``: all weights).  Returns
    a :class:`ModeCoverage` whose ``total_variation`` summarises the mismatch (0: the
    shares match the weights exactly; 1: every sample on a zero-weight component).
    """
    x = _as_points("samples", samples, dim=mixture.dim)
    if mixture.is_singular:
        raise ValueError("mixture has a singular covariance: the component densities at t = 1 do not exist")
    return _mode_coverage(mixture, x, mixture.class_weight(label))


@jax.jit
def _mode_coverage(mixture, x: Array, weights: Array) -> ModeCoverage:
    finite = jnp.all(jnp.isfinite(x), axis=1)
    assigned = jnp.argmax(mixture.log_responsibilities(jnp.where(finite[:, None], x, 0.0), 1.0), axis=1)
    counts = jnp.zeros(mixture.num_components, x.dtype).at[assigned].add(finite.astype(x.dtype))
    shares = counts / x.shape[0]
    unassigned = jnp.sum(~finite) / x.shape[0]
    weights = weights.astype(shares.dtype)
    tv = 0.5 * (jnp.sum(jnp.abs(shares - weights)) + unassigned)
    off_class = jnp.sum(jnp.where(weights > 0, 0.0, shares))
    return ModeCoverage(shares, weights, tv, off_class, jnp.asarray(unassigned, shares.dtype))


# ----------------------------------------------------------------------------- guidance bias
def cfg_first_step_bias(mixture, label, scale) -> Array:
    """Closed-form guidance bias of exact CFG at ``t = 0``: ``ṽ*_0 − u_c = (w − 1)(μ_c − μ̄)``.

    At ``t = 0`` the exact fields are ``u_c = μ_c − x0`` and ``u_u = μ̄ − x0`` (docs/design.md §4),
    so ``v_u + w(v_c − v_u) − v_c = (w − 1)(μ_c − μ̄)`` for every noise ``x0``.  ``μ_c`` is
    the class mean, ``μ̄`` the whole mixture's mean.  Shape ``(d,)``.
    """
    label = mixture.check_label(label)
    if label is None:
        raise ValueError("label must be a class (the bias against the whole mixture is zero by definition)")
    return (jnp.asarray(scale, mixture.dtype) - 1) * (mixture.mean(label) - mixture.mean(None))


@jax.jit
def _bias_along(mixture, states, times, label, rule):
    def one(x, t, i):
        guided = exact_guided_velocity(mixture, x, t, label, rule, step=i)
        return decompose_guidance_error(guided, guided, mixture.velocity(x, t, label)).guidance_bias

    return jax.vmap(one)(states, times, jnp.arange(states.shape[0]))


def guidance_bias_along_trajectory(mixture, trajectory, times, label, rule: GuidanceRule) -> Array:
    """Guidance bias ``‖ṽ*(x_i, t_i) − u_c(x_i, t_i)‖`` at every step of a trajectory, ``(N, B)``.

    ``ṽ*`` is the exact guided field of ``rule`` at solver step ``i`` (so zero-init rules
    give ``‖u_c‖`` on their zeroed steps) and ``u_c`` the exact class velocity, both
    recomputed from the mixture at the states ``x_i`` a sampler visited (docs/design.md §4: the
    bias is what guidance adds on top of the true conditional field, separate from any
    learning error).  ``trajectory`` is ``(N + 1, B, d)`` (``x_0 … x_N`` as returned by
    :func:`~cfgzero_theory.sampling.sample` with ``return_trajectory=True``; the final state
    is not used) or ``(N, B, d)``; ``times`` the ``(N + 1,)`` grid; ``label`` an int class.
    """
    traj = jnp.asarray(trajectory)
    times = jnp.asarray(times)
    if times.ndim != 1 or times.shape[0] < 2:
        raise ValueError(f"times must be a 1-D grid with at least 2 entries, got shape {times.shape}")
    n_steps = times.shape[0] - 1
    if traj.ndim != 3 or traj.shape[0] not in (n_steps, n_steps + 1) or traj.shape[2] != mixture.dim:
        raise ValueError(
            f"trajectory must have shape (N + 1, B, {mixture.dim}) or (N, B, {mixture.dim}) with N = {n_steps}, "
            f"got {traj.shape}"
        )
    label = mixture.check_label(label)
    if label is None:
        raise ValueError("label must be a class")
    return _bias_along(mixture, traj[:n_steps], times[:n_steps].astype(traj.dtype), label, rule)


# ----------------------------------------------------------------------------- Fréchet distance
def class_moments(mixture, label=None) -> tuple[Array, Array]:
    """Exact mean ``(d,)`` and covariance ``(d, d)`` of the data distribution of class ``label``.

    ``μ = Σ_k π_k μ_k`` and ``Σ = Σ_k π_k (Σ_k + (μ_k − μ)(μ_k − μ)ᵀ)`` (law of total
    covariance), with ``π`` the class weights (``label=None``: the whole mixture).
    """
    return _class_moments(mixture.class_weight(label), mixture.means, mixture.eigvals, mixture.eigvecs)


@jax.jit
def _class_moments(weights: Array, means: Array, eigvals: Array, eigvecs: Array) -> tuple[Array, Array]:
    mean = weights @ means
    centred = means - mean
    # Σ_k π_k Q_k diag(λ_k) Q_kᵀ + Σ_k π_k (μ_k − μ)(μ_k − μ)ᵀ
    within = jnp.einsum("kij,kj,klj->il", eigvecs, weights[:, None] * eigvals, eigvecs)
    return mean, within + jnp.einsum("k,ki,kj->ij", weights, centred, centred)


def _psd_sqrt(a: Array) -> Array:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    lam, q = jnp.linalg.eigh(0.5 * (a + a.T))
    return (q * jnp.sqrt(jnp.clip(lam, 0.0, None))) @ q.T


@jax.jit
def _frechet(mean1: Array, cov1: Array, mean2: Array, cov2: Array) -> Array:
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    lam = jnp.linalg.eigvalsh(0.5 * (middle + middle.T))
    trace_sqrt = jnp.sum(jnp.sqrt(jnp.clip(lam, 0.0, None)))
    diff = mean1 - mean2
    value = jnp.sum(diff * diff) + jnp.trace(cov1) + jnp.trace(cov2) - 2 * trace_sqrt
    return jnp.maximum(value, 0.0)


def frechet_distance(mean1, cov1, mean2, cov2) -> Array:
    """Squared Fréchet (2-Wasserstein) distance between ``N(m₁, C₁)`` and ``N(m₂, C₂)``.

    ``‖m₁ − m₂‖² + tr(C₁ + C₂ − 2 (C₁^{½} C₂ C₁^{½})^{½})`` — the formula behind FID.  The
    trace of the inner square root is ``Σ √λ_i`` over the eigenvalues of the symmetric PSD
    matrix ``C₁^{½} C₂ C₁^{½}`` (the same as ``tr √(C₁C₂)``, without a non-symmetric
    ``sqrtm``); round-off below zero is clipped, so the result is ``>= 0``.  Covariances
    must be symmetric positive semi-definite (singular ones are fine).
    """
    m1, m2 = jnp.asarray(mean1), jnp.asarray(mean2)
    c1, c2 = jnp.asarray(cov1), jnp.asarray(cov2)
    if m1.ndim != 1 or m2.shape != m1.shape:
        raise ValueError(f"mean1 and mean2 must share a shape (d,), got {m1.shape} and {m2.shape}")
    d = m1.shape[0]
    for name, c in (("cov1", c1), ("cov2", c2)):
        if c.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}), got {c.shape}")
    dtype = jnp.result_type(m1, m2, c1, c2, float)
    return _frechet(m1.astype(dtype), c1.astype(dtype), m2.astype(dtype), c2.astype(dtype))


def frechet_to_mixture(samples, mixture, label=None) -> Array:
    """Squared Fréchet distance between the samples' moments and the exact class moments.

    ``‖m − μ‖² + tr(C + Σ − 2(C^{½} Σ C^{½})^{½})`` with ``m``, ``C`` the sample mean and
    covariance (``ddof = 1``, as ``numpy.cov`` and FID) and ``μ``, ``Σ`` the exact mean and
    covariance of class ``label`` (:func:`class_moments`; ``None``: whole mixture).  No
    reference sample enters, but the sample moments still carry a finite-``n`` bias
    (``E[FD] > 0`` for exact samples, shrinking like ``1/n``): compare models at equal ``n``.
    Needs ``n >= 2``.
    """
    x = _as_points("samples", samples, dim=mixture.dim, min_rows=2)
    mean, cov = class_moments(mixture, mixture.check_label(label))
    dtype = jnp.result_type(x.dtype, mixture.dtype)
    return _frechet_samples(x.astype(dtype), mean.astype(dtype), cov.astype(dtype))


@jax.jit
def _frechet_samples(x: Array, mean: Array, cov: Array) -> Array:
    m = jnp.mean(x, axis=0)
    centred = x - m
    return _frechet(m, centred.T @ centred / (x.shape[0] - 1), mean, cov)


# ----------------------------------------------------------------------------- HDR precision
#: Default number of exact class samples used to place the highest-density-region threshold.
HDR_NUM_REFERENCE = 20_000


def hdr_log_density_threshold(mixture, label=None, *, key, mass: float = 0.95, num_reference: int = HDR_NUM_REFERENCE) -> Array:
    """Log-density level ``τ`` whose super-level set ``{x: log p(x | label) >= τ}`` holds ``mass``.

    The highest-density region of probability ``mass`` is ``{log p >= τ}`` with ``τ`` the
    ``(1 − mass)`` quantile of ``log p(Y)``, ``Y ~ p(· | label)``; it is estimated from
    ``num_reference`` exact class samples drawn with ``key`` (quantile standard error in
    probability ``√(mass(1 − mass)/num_reference)``, ≈ 0.0015 at the defaults).  Needs
    nonsingular covariances.
    """
    if mixture.is_singular:
        raise ValueError("mixture has a singular covariance: its data distribution has no density")
    label = mixture.check_label(label)
    mass = check_open_fraction("mass", mass)
    num_reference = check_int("num_reference", num_reference, minimum=2)
    if key is None:
        raise ValueError("key is required to draw the reference samples")
    reference = mixture.sample(key, int(num_reference), label)
    return jnp.quantile(mixture.log_prob(reference, label), 1.0 - mass)


def hdr_precision(
    mixture,
    samples,
    label=None,
    *,
    key=None,
    mass: float = 0.95,
    num_reference: int = HDR_NUM_REFERENCE,
    threshold=None,
) -> Array:
    """Density-based precision: the share of samples inside the class's ``mass`` highest-density region.

    ``(1/n) Σ_i 1[log p(x_i | label) >= τ]`` with ``τ`` from :func:`hdr_log_density_threshold`
    (drawn with ``key``), or a precomputed ``threshold`` (reuse one ``τ`` across models,
    epochs and seeds so their precisions are comparable, and to skip the reference draw).
    Exact samples give ``≈ mass``; samples off the class's support give ``0``; non-finite
    samples count as outside.  It measures fidelity only: a sampler collapsed onto one mode
    scores ``1`` (pair it with :func:`mode_coverage`).
    """
    x = _as_points("samples", samples, dim=mixture.dim)
    label = mixture.check_label(label)
    if threshold is None:
        if key is None:
            raise ValueError("hdr_precision needs a key (to place the threshold) or a threshold")
        threshold = hdr_log_density_threshold(mixture, label, key=key, mass=mass, num_reference=num_reference)
    else:
        threshold = jnp.asarray(threshold)
        if threshold.shape != ():
            raise ValueError(f"threshold must be a scalar, got shape {threshold.shape}")
    finite = jnp.all(jnp.isfinite(x), axis=1)
    log_p = mixture.log_prob(jnp.where(finite[:, None], x, 0.0), label)
    inside = finite & (log_p >= threshold)
    return jnp.mean(inside.astype(log_p.dtype))
