"""Exact Gaussian mixtures on the linear flow-matching path.

Theory convention (docs/design.md §2, §4): ``t = 0`` is noise ``x0 ~ N(0, I)``, ``t = 1`` is data
``x1 ~ p1 = Σ_k π_k N(μ_k, Σ_k)``, and ``x_t = t·x1 + (1 − t)·x0``.  Given component ``k``,
``x_t ~ N(t·μ_k, S_k)`` with ``S_k(t) = t²Σ_k + (1 − t)²I``.  Every quantity below is a
responsibility-weighted sum over components, computed in each component's eigenbasis
``Σ_k = Q_k diag(λ_k) Q_kᵀ`` (factorised once, at construction), where
``S_k(t) = Q_k diag(s_k) Q_kᵀ`` with ``s_k = t²λ_k + (1 − t)²`` for every ``t``:

* ``z_k = Q_kᵀ (x − t·μ_k)`` (the residual ``r_k`` in the eigenbasis);
* log-joint ``ℓ_k = log π_k − ½ Σ log s_k − ½ Σ z_k²/s_k − (d/2) log 2π``,
  responsibilities ``w = softmax(ℓ)``, ``log p_t(x) = logsumexp_k ℓ_k``;
* a posterior-mean field ``f(x) = Σ_k w_k (a·μ_k + Q_k (c_k ⊙ z_k))``, where the
  eigen-coefficient ``c_k`` selects the quantity:

  =====================  ===  ===========================
  quantity               a    c (per eigen-direction)
  =====================  ===  ===========================
  velocity ``u_t``        1    ``(t·λ − (1 − t)) / s``
  ``E[x1 | x_t = x]``     1    ``t·λ / s``
  ``E[x0 | x_t = x]``     0    ``(1 − t) / s``
  score ``∇ log p_t``     0    ``−1 / s``
  =====================  ===  ===========================

The work is two matrix products per batch (``x @ [Q_1 … Q_K]`` and its transpose), done in
row chunks so memory stays bounded and the element-wise middle stays in cache.  Nothing
divides by ``t`` or ``1 − t``; at ``t = 0`` the velocity is ``Σ π_k μ_k − x`` and at ``t = 1``
it is ``x``.  Singular (positive semi-definite) covariances are valid: every field stays
finite for ``t < 1``; the data density (``t = 1``) of such a mixture is not a density and
``log_prob`` refuses it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cfgzero_theory.validation import check_int, concrete_number

Array = jax.Array

#: Label meaning "no class": the whole mixture (the unconditional branch of CFG).
NULL_LABEL = -1

#: Default number of ``(row, component, eigen-direction)`` entries evaluated at once.
DEFAULT_CHUNK_ELEMENTS = 1 << 20
#: Rows per chunk never drop below this, so the two matrix products stay efficient.
MIN_CHUNK_ROWS = 64

# Relative tolerances for the construction-time checks of covariance matrices.
_SYMMETRY_RTOL = 1e-6
_PSD_RTOL = 1e-6

#: Largest class label: labels are stored as int32.
_MAX_LABEL = np.iinfo(np.int32).max


def _is_concrete(a: Any) -> bool:
    return not isinstance(a, jax.core.Tracer)


@jax.tree_util.register_pytree_node_class
class GaussianMixture:
    """The mixture ``p1 = Σ_k π_k N(μ_k, Σ_k)`` with optional integer class per component.

    Args:
      weights: ``(K,)`` finite, non-negative, not all zero; they need not sum to one (they are
        normalised in float64 on the host, relative to the largest, so any finite scale works).
      means: ``(K, d)`` finite in the mixture's dtype (float32 unless x64 is on).
      covs: ``(K, d, d)`` symmetric positive semi-definite, finite in the mixture's dtype.
      labels: ``(K,)`` integer class of each component (default: all class 0).  Class
        labels must be ``>= 0`` and fit int32; ``NULL_LABEL = -1`` is reserved for "whole mixture".
      chunk_elements: rows are evaluated in chunks of about this many
        ``(row, component, direction)`` entries (bounds memory for large batches).

    Methods take ``x`` of shape ``(..., d)`` and ``t`` a float or an array broadcastable to
    ``x.shape[:-1]``, and a ``label``: ``None`` (whole mixture), an integer class (its
    components, weights renormalised), or an integer array broadcastable to
    ``x.shape[:-1]`` with one label per point, where ``NULL_LABEL`` selects the whole
    mixture.  Concrete labels are checked (a class with no component, or with zero total
    weight, is a ``ValueError``); traced labels cannot be checked and must be valid.
    An empty batch (a zero in ``x.shape[:-1]``) gives empty results of the matching shape,
    as NumPy does, and ``sample(key, 0)`` an empty ``(0, d)`` array.

    The object is a pytree (means and weights are differentiable leaves; the
    eigendecomposition is fixed at construction), so it can be passed through ``jit``,
    ``vmap`` and ``grad``.  Arrays are float64 when ``jax_enable_x64`` is on at
    construction, float32 otherwise.
    """

    def __init__(self, weights, means, covs, labels=None, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        chunk_elements = check_int("chunk_elements", chunk_elements, minimum=1)
        dtype = jnp.result_type(float)
        weights, means, covs, labels = _validated(weights, means, covs, labels, dtype)
        eigvals, eigvecs = np.linalg.eigh(0.5 * (covs + np.swapaxes(covs, -1, -2)))
        scale = np.maximum(np.abs(eigvals).max(axis=-1, keepdims=True), np.finfo(np.float64).tiny)
        if np.any(eigvals < -_PSD_RTOL * scale):
            bad = np.flatnonzero(np.any(eigvals < -_PSD_RTOL * scale, axis=-1))
            raise ValueError(
                f"covs must be positive semi-definite; components {bad.tolist()[:10]} have "
                f"negative eigenvalues (smallest {eigvals.min():.3g})"
            )
        eigvals = np.clip(eigvals, 0.0, None)
        eigvals[eigvals < _PSD_RTOL * scale] = 0.0
        with np.errstate(over="ignore"):
            too_large = not np.all(np.isfinite(eigvals.astype(dtype)))
        if too_large:
            raise ValueError(f"covs have eigenvalues too large for {np.dtype(dtype).name} (largest {eigvals.max():.3g})")

        # normalised on the host in float64, relative to the largest weight: the sum is at most
        # K, so weights near the float64 maximum cannot overflow it
        with np.errstate(divide="ignore", under="ignore"):
            relative = weights / weights.max()
            log_weights = np.log(relative) - np.log(relative.sum())
        self.log_weights = jnp.asarray(log_weights, dtype)
        self.means = jnp.asarray(means, dtype)
        self.eigvals = jnp.asarray(eigvals, dtype)
        self.eigvecs = jnp.asarray(eigvecs, dtype)
        self.labels = jnp.asarray(labels, jnp.int32)
        classes = tuple(int(c) for c in np.unique(labels[weights > 0]))
        self._static = (classes, bool(np.any(eigvals == 0.0)), int(chunk_elements))

    # ----------------------------------------------------------------- pytree protocol
    def tree_flatten(self):
        children = (self.log_weights, self.means, self.eigvals, self.eigvecs, self.labels)
        return children, self._static

    @classmethod
    def tree_unflatten(cls, static, children):
        obj = object.__new__(cls)
        obj.log_weights, obj.means, obj.eigvals, obj.eigvecs, obj.labels = children
        obj._static = static
        return obj

    # ----------------------------------------------------------------- basic properties
    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def classes(self) -> tuple[int, ...]:
        """Sorted class labels that have at least one component of positive weight."""
        return self._static[0]

    @property
    def is_singular(self) -> bool:
        """Whether some component covariance is singular (rank-deficient)."""
        return self._static[1]

    @property
    def dtype(self):
        return self.means.dtype

    @property
    def weights(self) -> Array:
        """Normalised component weights ``π``."""
        return jnp.exp(self.log_weights)

    @property
    def covs(self) -> Array:
        """Component covariances ``Q diag(λ) Qᵀ`` (reassembled from the eigendecomposition)."""
        return jnp.einsum("kij,kj,klj->kil", self.eigvecs, self.eigvals, self.eigvecs)

    def __repr__(self) -> str:
        return (
            f"GaussianMixture(num_components={self.num_components}, dim={self.dim}, "
            f"classes={self.classes}, dtype={self.dtype})"
        )

    def class_weight(self, label: int | None = None) -> Array:
        """Component weights of a class (or of the whole mixture), renormalised to sum to one."""
        return jnp.exp(self._class_log_weights(self.check_label(label)))

    def mean(self, label: int | None = None) -> Array:
        """Mean ``Σ_k π_k μ_k`` of the data distribution (of one class if ``label`` is given)."""
        return self.class_weight(label) @ self.means

    # ----------------------------------------------------------------- public quantities
    def log_prob_t(self, x, t, label=None) -> Array:
        """Log-density of ``x_t`` at ``x``: ``logsumexp_k ℓ_k``.  Shape ``x.shape[:-1]``."""
        return self._evaluate(x, t, label, _log_prob_from_terms)

    def log_prob(self, x, label=None) -> Array:
        """Log-density of the data ``x1`` (``log_prob_t`` at ``t = 1``); needs nonsingular covariances."""
        if self.is_singular:
            raise ValueError(
                "log_prob: the mixture has a singular covariance, so its data distribution has no "
                "density; use log_prob_t with t < 1"
            )
        return self.log_prob_t(x, 1.0, label)

    def velocity(self, x, t, label=None) -> Array:
        """Exact flow-matching velocity ``u_t(x) = E[x1 − x0 | x_t = x]``, shape ``x.shape``."""
        return self._evaluate(x, t, label, _VELOCITY)

    def posterior_mean_x1(self, x, t, label=None) -> Array:
        """Posterior mean of the data, ``E[x1 | x_t = x]`` (the "denoised" prediction)."""
        return self._evaluate(x, t, label, _POSTERIOR_X1)

    def posterior_mean_x0(self, x, t, label=None) -> Array:
        """Posterior mean of the noise, ``E[x0 | x_t = x]``."""
        return self._evaluate(x, t, label, _POSTERIOR_X0)

    def score(self, x, t, label=None) -> Array:
        """Score ``∇_x log p_t(x) = −Σ_k w_k S_k⁻¹ (x − t·μ_k)``; ``u = (x + (1 − t)·score)/t``."""
        return self._evaluate(x, t, label, _SCORE)

    def log_responsibilities(self, x, t, label=None) -> Array:
        """``log P(k | x_t = x)`` for every component, shape ``x.shape[:-1] + (K,)``.

        Components outside the class ``label`` get ``-inf``.  At ``t = 1`` its ``argmax`` is
        the Bayes assignment of a data point to a component.
        """
        return self._evaluate(x, t, label, _log_responsibilities_from_terms)

    def velocity_variance(self, x, t, label=None) -> Array:
        """``E[‖x1 − x0 − u_t(x)‖² | x_t = x]``: the trace of the conditional covariance.

        ``Σ_k w_k (tr(Σ_k S_k⁻¹) + ‖u_k‖²) − ‖u‖²``.  Its expectation over ``t`` and ``x_t`` is
        the irreducible flow-matching loss (the floor of a training curve).
        """
        return self._evaluate(x, t, label, _velocity_variance_from_terms)

    def sample(self, key: Array, n: int, label=None) -> Array:
        """``n`` draws from the data distribution (of class ``label``, or per-sample labels ``(n,)``).

        ``n = 0`` gives an empty ``(0, d)`` array, as NumPy's samplers do.
        """
        n = check_int("n", n, minimum=0)
        return _sample_rows(self, key, self.check_label(label, (n,)), n)

    def sample_labelled(self, key: Array, n: int) -> tuple[Array, Array]:
        """``n`` draws ``(x, y)`` of the joint: class ``y ~ Σ_{k∈y} π_k``, then ``x ~ p1(x | y)`` (``n = 0``: empty)."""
        n = check_int("n", n, minimum=0)
        key_class, key_x = jax.random.split(key)
        labels = self.labels[jax.random.categorical(key_class, self.log_weights, shape=(n,))]
        return self.sample(key_x, n, labels), labels

    # ----------------------------------------------------------------- machinery
    def check_label(self, label, batch_shape=()):
        """Validate a label and return ``None``, a Python int, or an int array of ``batch_shape``.

        A Python / NumPy integer (or a concrete 0-d integer array) is a single class; ``bool``
        is not a label.  Arrays must hold integers; concrete ones are checked against the
        classes before they are converted to JAX's integer type (so a value outside int32
        cannot wrap onto a class).
        """
        if label is None:
            return None
        number = concrete_number(label) if np.ndim(label) == 0 else None
        if isinstance(number, int):
            self._check_label_values([number])
            return None if number == NULL_LABEL else number
        on_host = not isinstance(label, jax.Array)  # NumPy arrays, lists: checked before the cast
        if on_host:
            host = np.asarray(label)
            if host.dtype.kind not in "iu":
                raise ValueError(f"label must be None, an int or an integer array, got dtype {host.dtype}")
            self._check_label_values(host)
        concrete_device = not on_host and _is_concrete(label)
        label = jnp.asarray(label)
        if not jnp.issubdtype(label.dtype, jnp.integer):
            raise ValueError(f"label must be None, an int or an integer array, got dtype {label.dtype}")
        try:
            label = jnp.broadcast_to(label, batch_shape)
        except ValueError:
            raise ValueError(f"label of shape {label.shape} does not broadcast to the batch shape {batch_shape}") from None
        if concrete_device:
            self._check_label_values(np.asarray(label))
        return label

    def _check_label_values(self, values) -> None:
        """``ValueError`` unless every value is ``NULL_LABEL`` or a class with positive weight."""
        missing = sorted(set(np.unique(np.asarray(values)).tolist()) - set(self.classes) - {NULL_LABEL})
        if missing:
            raise ValueError(
                f"label values {missing[:10]} have no component of positive weight; classes are {self.classes}"
            )

    def _class_log_weights(self, label) -> Array:
        """Renormalised log-weights: ``(K,)`` for ``None`` or one class, ``(n, K)`` for labels ``(n,)``."""
        if label is None:
            return self.log_weights
        label = jnp.asarray(label)[..., None]
        keep = (label == self.labels) | (label == NULL_LABEL)
        masked = jnp.where(keep, self.log_weights, -jnp.inf)
        return masked - jax.nn.logsumexp(masked, axis=-1, keepdims=True)

    def _basis_matrix(self) -> Array:
        """``[Q_1 … Q_K]`` of shape ``(d, K·d)``: ``x @ basis`` gives every ``Q_kᵀ x`` at once."""
        return jnp.transpose(self.eigvecs, (1, 0, 2)).reshape(self.dim, -1)

    def _chunk_rows(self) -> int:
        per_row = self.num_components * self.dim
        return max(MIN_CHUNK_ROWS, self._static[2] // per_row)

    def _evaluate(self, x, t, label, quantity: Callable) -> Array:
        """Validate and flatten the inputs, then evaluate ``quantity`` row-chunk by row-chunk."""
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., {self.dim}), got {x.shape}")
        dtype = jnp.result_type(x.dtype, self.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else self.dtype
        batch_shape = x.shape[:-1]
        n = math.prod(batch_shape)
        t = jnp.asarray(t, dtype)
        if _is_concrete(t) and np.any((np.asarray(t) < 0) | (np.asarray(t) > 1) | ~np.isfinite(np.asarray(t))):
            raise ValueError("t must lie in [0, 1]")
        try:
            t = t if t.ndim == 0 else jnp.broadcast_to(t, batch_shape).reshape(n)
        except ValueError:
            raise ValueError(f"t of shape {t.shape} does not broadcast to the batch shape {batch_shape}") from None
        labels = self.check_label(label, batch_shape)
        labels = labels.reshape(n) if isinstance(labels, jax.Array) else labels
        out = _evaluate_rows(self, x.reshape(n, self.dim).astype(dtype), t, labels, quantity)
        return out.reshape(*batch_shape, *out.shape[1:])


@functools.partial(jax.jit, static_argnames=("quantity",))
def _evaluate_rows(mix: GaussianMixture, rows: Array, t: Array, labels, quantity: Callable) -> Array:
    """``quantity(terms)`` for rows ``(n, d)``; ``t`` is a scalar or ``(n,)``, ``labels`` None, a class or ``(n,)``.

    One compiled program per quantity and shape: eager calls are as fast as jitted ones.
    With a scalar ``t`` the whitening ``s^{-½}`` and the shift ``t·m_k`` are folded into the
    first matrix (``[x, 1] @ [[Q_k diag(s^{-½})], [−t·m_k s^{-½}]]``), so the first product
    yields the whitened residuals directly; with one ``t`` per row they are applied per entry.
    """
    mix = jax.tree_util.tree_map(lambda a: a.astype(rows.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, mix)
    k, d = mix.num_components, mix.dim
    basis = mix._basis_matrix()
    projected_means = jnp.einsum("kij,ki->kj", mix.eigvecs, mix.means)  # m_k = Q_kᵀ μ_k
    per_row_t = t.ndim == 1
    per_row_labels = labels is not None and jnp.ndim(labels) == 1
    shared_log_w = None if per_row_labels else mix._class_log_weights(labels)
    if not per_row_t:
        s = t**2 * mix.eigvals + (1 - t) ** 2  # (K, d)
        inv_sqrt_s = jax.lax.rsqrt(s)
        whitening = jnp.concatenate([basis * inv_sqrt_s.reshape(1, -1), -(t * projected_means * inv_sqrt_s).reshape(1, -1)])

    def chunk(args):
        x_c, t_c, lab_c = args
        m = x_c.shape[0]
        log_w = mix._class_log_weights(lab_c) if per_row_labels else shared_log_w
        if per_row_t:
            tt = t_c[:, None, None]
            s_c = tt**2 * mix.eigvals + (1 - tt) ** 2  # (m, K, d)
            z = (x_c @ basis).reshape(m, k, d) - tt * projected_means
            z_white = z * jax.lax.rsqrt(s_c)
        else:
            tt, s_c = t, s
            z_white = (jnp.concatenate([x_c, jnp.ones((m, 1), x_c.dtype)], axis=1) @ whitening).reshape(m, k, d)
        log_joint = (
            log_w
            - 0.5 * jnp.sum(jnp.log(s_c), axis=-1)
            - 0.5 * jnp.sum(z_white * z_white, axis=-1)
            - 0.5 * d * math.log(2 * math.pi)
        )
        return quantity(_Terms(mix, basis, projected_means, tt, s_c, z_white, log_joint))

    arrays = (rows, t if per_row_t else None, labels if per_row_labels else None)
    return _map_row_chunks(chunk, arrays, mix._chunk_rows())


class _Terms:
    """Per-chunk intermediate terms shared by every quantity (see the module docstring).

    ``z_white = s^{-½} ⊙ z`` are the whitened eigenbasis residuals, ``(m, K, d)``; ``s`` is
    ``(K, d)`` for a shared ``t`` or ``(m, K, d)`` for one ``t`` per row.
    """

    def __init__(self, mix, basis, projected_means, t, s, z_white, log_joint):
        self.mix, self.basis, self.projected_means = mix, basis, projected_means
        self.t, self.s, self.z_white, self.log_joint = t, s, z_white, log_joint

    @property
    def resp(self) -> Array:
        return jax.nn.softmax(self.log_joint, axis=-1)

    def field(self, mean_coef: float, coef: Array, resp: Array | None = None) -> Array:
        """``Σ_k w_k (mean_coef·μ_k + Q_k (coef_k ⊙ z_k))`` for every row, with ``z = √s ⊙ z_white``.

        For a shared ``t`` the per-direction factor ``coef·√s`` is folded into the second
        matrix, so the only per-entry work is the responsibility weighting.
        """
        resp = self.resp if resp is None else resp
        gain = coef * jnp.sqrt(self.s)
        y = resp[..., None] * self.z_white
        rows, width = y.shape[0], y.shape[1] * y.shape[2]  # explicit: a -1 cannot be inferred for 0 rows
        if gain.ndim == 2:
            out = y.reshape(rows, width) @ (self.basis.T * gain.reshape(width, 1))
        else:
            out = (y * gain).reshape(rows, width) @ self.basis.T
        if mean_coef != 0.0:
            out = out + mean_coef * (resp @ self.mix.means)
        return out


@functools.partial(jax.jit, static_argnames=("n",))
def _sample_rows(mix: GaussianMixture, key: Array, labels, n: int) -> Array:
    """Draw a component per row, then ``x = μ_k + Q_k (√λ_k ⊙ ε)`` with the same two-matmul layout."""
    key_comp, key_noise = jax.random.split(key)
    log_w = jnp.broadcast_to(mix._class_log_weights(labels), (n, mix.num_components))
    comp = jax.random.categorical(key_comp, log_w, axis=-1)
    eps = jax.random.normal(key_noise, (n, mix.dim), mix.dtype) * jnp.sqrt(mix.eigvals[comp])
    one_hot = jax.nn.one_hot(comp, mix.num_components, dtype=mix.dtype)
    basis = mix._basis_matrix()

    def rotate(rows):
        eps_rows, hot_rows = rows
        blocks = hot_rows[:, :, None] * eps_rows[:, None, :]
        return blocks.reshape(blocks.shape[0], mix.num_components * mix.dim) @ basis.T

    return mix.means[comp] + _map_row_chunks(rotate, (eps, one_hot), mix._chunk_rows())


def _log_prob_from_terms(terms: _Terms) -> Array:
    return jax.nn.logsumexp(terms.log_joint, axis=-1)


def _log_responsibilities_from_terms(terms: _Terms) -> Array:
    return jax.nn.log_softmax(terms.log_joint, axis=-1)


def _field(mean_coef: float, coef_fn: Callable) -> Callable[[_Terms], Array]:
    def quantity(terms: _Terms) -> Array:
        return terms.field(mean_coef, coef_fn(terms.mix.eigvals, terms.s, terms.t))

    return quantity


_VELOCITY = _field(1.0, lambda lam, s, t: (t * lam - (1 - t)) / s)
_POSTERIOR_X1 = _field(1.0, lambda lam, s, t: t * lam / s)
_POSTERIOR_X0 = _field(0.0, lambda lam, s, t: (1 - t) / s)
_SCORE = _field(0.0, lambda lam, s, t: -1.0 / s)


def _velocity_variance_from_terms(terms: _Terms) -> Array:
    lam, s, t = terms.mix.eigvals, terms.s, terms.t
    resp = terms.resp
    c = (t * lam - (1 - t)) / s
    # u_k = μ_k + Q_k (c ⊙ z_k) = Q_k (m_k + c ⊙ z_k) with Q_k orthogonal, so ‖u_k‖ is a norm in the eigenbasis
    u_k_eig = terms.projected_means + c * jnp.sqrt(s) * terms.z_white
    norm_u_k = jnp.sum(u_k_eig * u_k_eig, axis=-1)
    trace_cov_k = jnp.sum(lam / s, axis=-1)  # tr(Σ_k S_k⁻¹)
    u = terms.field(1.0, c, resp)
    return jnp.sum(resp * (trace_cov_k + norm_u_k), axis=-1) - jnp.sum(u * u, axis=-1)


def _map_row_chunks(fn: Callable, arrays: tuple, rows: int) -> Array:
    """Apply ``fn`` to row-chunks of the arrays (``None`` entries pass through) and concatenate."""
    n = next(a.shape[0] for a in arrays if a is not None)
    if n <= rows:
        return fn(arrays)
    num_chunks = -(-n // rows)
    pad = num_chunks * rows - n

    def split(a):
        if a is None:
            return None
        padded = jnp.concatenate([a, jnp.broadcast_to(a[:1], (pad, *a.shape[1:]))]) if pad else a
        return padded.reshape(num_chunks, rows, *a.shape[1:])

    out = jax.lax.map(fn, tuple(split(a) for a in arrays))
    return out.reshape(num_chunks * rows, *out.shape[2:])[:n]


def _validated(weights, means, covs, labels, dtype):
    """Check the constructor arguments (concrete arrays) and return them as float64/int NumPy arrays.

    Means and covariances must stay finite once rounded to ``dtype`` (the mixture's float
    type: ``1e39`` is finite in float64 and ``inf`` in float32); labels must be integers in
    ``[0, 2**31 − 1]`` (they are stored as int32).
    """
    arrays = {}
    for name, value in (("weights", weights), ("means", means), ("covs", covs)):
        if isinstance(value, jax.core.Tracer):
            raise ValueError(f"{name} must be concrete (build the GaussianMixture outside jit and pass it in)")
        try:
            arrays[name] = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError, OverflowError) as err:
            raise ValueError(f"{name} must be an array of real numbers: {err}") from None
    weights, means, covs = arrays["weights"], arrays["means"], arrays["covs"]
    if weights.ndim != 1 or weights.shape[0] == 0:
        raise ValueError(f"weights must have shape (K,) with K >= 1, got {weights.shape}")
    k = weights.shape[0]
    if means.ndim != 2 or means.shape[0] != k or means.shape[1] == 0:
        raise ValueError(f"means must have shape (K, d) = ({k}, d) to match weights, got {means.shape}")
    d = means.shape[1]
    if covs.shape != (k, d, d):
        raise ValueError(f"covs must have shape (K, d, d) = ({k}, {d}, {d}) to match means, got {covs.shape}")
    if np.any(np.isnan(weights)) or np.any(np.isinf(weights)):
        raise ValueError("weights contain NaN or inf")
    if np.any(weights < 0):
        raise ValueError(f"weights must be non-negative; got negative entries at {np.flatnonzero(weights < 0).tolist()[:10]}")
    if not np.any(weights > 0):
        raise ValueError("weights are all zero")
    name = np.dtype(dtype).name
    for label, array in (("means", means), ("covs", covs)):
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{label} contain NaN or inf")
        with np.errstate(over="ignore"):
            if not np.all(np.isfinite(array.astype(dtype))):
                raise ValueError(f"{label} contain values too large for {name} (largest |value| {np.abs(array).max():.3g})")
    asym = np.abs(covs - np.swapaxes(covs, -1, -2)).max(axis=(-1, -2))
    scale = np.maximum(np.abs(covs).max(axis=(-1, -2)), np.finfo(np.float64).tiny)
    if np.any(asym > _SYMMETRY_RTOL * scale):
        bad = np.flatnonzero(asym > _SYMMETRY_RTOL * scale)
        raise ValueError(f"covs must be symmetric; components {bad.tolist()[:10]} are not")
    if labels is None:
        labels = np.zeros(k, dtype=np.int64)
    else:
        if isinstance(labels, jax.core.Tracer):
            raise ValueError("labels must be concrete")
        raw = np.asarray(labels)
        if raw.shape != (k,):
            raise ValueError(f"labels must have shape (K,) = ({k},) to match weights, got {raw.shape}")
        if raw.dtype.kind == "f":
            if not np.all(np.isfinite(raw) & (raw == np.round(raw))):
                raise ValueError(f"labels must be integers, got {raw.tolist()[:10]}")
        elif raw.dtype.kind not in "iu":
            raise ValueError(f"labels must be integers, got dtype {raw.dtype}")
        if np.any(raw < 0):
            raise ValueError(f"labels must be >= 0 ({NULL_LABEL} is reserved for the whole mixture)")
        too_large = raw > _MAX_LABEL
        if np.any(too_large):
            raise ValueError(f"labels must be <= {_MAX_LABEL} (stored as int32), got {raw[too_large].tolist()[:10]}")
        labels = raw.astype(np.int64)
    return weights, means, covs, labels
