"""Learned models against the exact truth: guidance errors, the crossover epoch, sample quality.

Everything here compares a *model* — any velocity function ``velocity_fn(params, x, t, label)``
in the sampler's protocol (:mod:`cfgzero_theory.sampling`), with ``params`` of ``S`` seeds
stacked along a leading axis on every leaf — against the exact fields of the
:class:`~cfgzero_theory.GaussianMixture` it was trained on.  Seeds are handled with
``jax.vmap`` over that leading axis and each function is one ``jit``-compiled program with
``velocity_fn`` static (pass the same function object to reuse the compilation).  A stacked
mixture is itself such a model (``velocity_fn = GaussianMixture.velocity``)::

    params = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *mixtures)

Conventions (docs/design.md §2 and §4): theory time, ``t = 0`` is noise; the two branches are
``v_c = v(x, t, label)`` and ``v_u = v(x, t, NULL_LABEL)``, evaluated in one batched call as
the sampler does; a guided velocity is ``ṽ = rule(v_c, v_u, step)``.  For a rule and scale:

* learning error   ``‖ṽ^θ − ṽ*‖`` — the model's guided velocity against the *exact guided
  field of the same rule and scale* ``ṽ* = rule(u_c, u_u, step)``;
* zero baseline    ``‖ṽ*‖`` — the learning error of a zero velocity, so "zero beats the
  model" means learning error > zero baseline, measured against the rule's own exact field
  (a secondary view; the paper's Fig. 3 measures against the true ``u_c`` with the grey
  line ``‖u_c‖``: ``total_error`` against ``zero_error_cond``);
* guidance bias    ``‖ṽ* − u_c‖`` — what guidance adds on top of the true class velocity
  ``u_c`` (no learning involved); at ``t = 0`` it is ``|w − 1|·‖μ_c − μ̄‖`` for CFG;
* total error      ``‖ṽ^θ − u_c‖`` — the model's guided velocity against ``u_c``.

Norms are per sample (over all non-batch axes); reported numbers are means over the noise
batch ``x0``.  ``x0`` is *shared* by all seeds (a paired comparison: seed-to-seed spread is
model spread, not noise spread).

**Zero-init rules.**  Rules with zero-init (kinds ``zero-init`` and ``cfg-zero-star``,
any rule wrapped in :class:`~cfgzero_theory.ZeroInit`) replace the first ``K`` steps by ``ṽ = 0`` for the
model *and* for the exact field, so "same rule, same step" compares ``0`` with ``0`` there —
a learning error of zero that says nothing.  The meaningful question on those steps is the
one the paper asks: would the guided velocity the model *would* have produced beat zero?
So the error pairs here always use the rule **without** its zero-init
(:func:`~cfgzero_theory.guidance.without_zero_init`: ``K = 0``, through any wrapper), while
the velocity the sampler actually *applied* (zero on zeroed steps) enters
``applied_error`` and ``total_error`` of :func:`per_step_errors`.

Functions:

* :func:`first_step_errors` — the paper's first-step comparison at ``t = 0``, per seed;
* :func:`per_step_errors` — the same along the model's own sampling trajectory, per seed and
  step, plus the final samples;
* :func:`crossover_epoch` — from error-vs-epoch curves, the epoch from which the model beats
  the zero velocity, with a bootstrap interval over seeds;
* :func:`sample_quality` — the exact sample metrics of :mod:`cfgzero_theory.metrics` in one
  dict, for one sample set or one per seed;
* :func:`make_sample_scorer` — the cheap ones (NLL, HDR precision, 2-D JSD) as one compiled
  program over seeds, its references computed once, for evaluating many epochs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cfgzero_theory import metrics
from cfgzero_theory.guidance import GuidanceRule, without_zero_init, zero_init_steps
from cfgzero_theory.validation import check_open_fraction
from cfgzero_theory.mixture import NULL_LABEL
from cfgzero_theory.sampling import SOLVERS, sample

Array = jax.Array
VelocityFn = Callable[..., Array]


# ----------------------------------------------------------------------------- helpers
def _norms(v: Array) -> Array:
    """Per-sample Euclidean norms over every non-batch axis, ``(B,)``."""
    return jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=1))


def num_seeds(params) -> int:
    """The common leading (seed) axis of every array leaf of ``params``; ``ValueError`` otherwise."""
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("params has no array leaves (expected a pytree stacked along a leading seed axis)")
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) >= 1 else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"params must be stacked along a leading seed axis on every leaf; got leading sizes {sorted(map(str, sizes))}"
        )
    return sizes.pop()


def _check_x0(mixture, x0) -> Array:
    x0 = jnp.asarray(x0)
    if x0.ndim != 2 or x0.shape[1] != mixture.dim or x0.shape[0] < 1:
        raise ValueError(f"x0 must have shape (B, {mixture.dim}) (shared by all seeds), got {x0.shape}")
    if not jnp.issubdtype(x0.dtype, jnp.floating):
        raise ValueError(f"x0 must be floating point, got dtype {x0.dtype}")
    return x0


def _labels(mixture, label, batch: int) -> Array:
    """``label`` (an int class, ``(B,)`` ints, ``None`` / ``NULL_LABEL``) as ``(B,)`` int32."""
    checked = mixture.check_label(label, (batch,))
    return jnp.broadcast_to(jnp.asarray(NULL_LABEL if checked is None else checked, jnp.int32), (batch,))


def _branches(velocity_fn, params, x, t, labels):
    """``(v_c, v_u)`` from one batched call, as the sampler evaluates them."""
    both = jnp.concatenate([labels, jnp.full_like(labels, NULL_LABEL)])
    v = velocity_fn(params, jnp.concatenate([x, x]), t, both)
    return v[: x.shape[0]], v[x.shape[0] :]


def _exact_branches(mixture, x, t, labels):
    return mixture.velocity(x, t, labels), mixture.velocity(x, t, None)


# ----------------------------------------------------------------------------- first step
class FirstStepErrors(NamedTuple):
    """First-step (``t = 0``) errors of one rule, means over the noise batch ``x0``.

    ``learning_error (S,)``: ``E‖ṽ_0^θ − ṽ_0^*‖`` per seed; ``total_error (S,)``:
    ``E‖ṽ_0^θ − u_c‖`` per seed; ``zero_error ()``: ``E‖ṽ_0^*‖``, the zero velocity's error
    against the guided target (seed-independent); ``guidance_bias ()``: ``E‖ṽ_0^* − u_c‖``
    (seed-independent); ``zero_error_cond ()``: ``E‖u_c‖``, the zero velocity's error against
    the true conditional velocity (the baseline of ``total_error``).
    """

    learning_error: Array
    total_error: Array
    zero_error: Array
    guidance_bias: Array
    zero_error_cond: Array


@functools.partial(jax.jit, static_argnums=(0,))
def _first_step_jit(velocity_fn, params, mixture, labels, rules, x0):
    t0 = jnp.zeros((), x0.dtype)
    u_c, u_u = _exact_branches(mixture, x0, t0, labels)
    exact = {name: rule(u_c, u_u, 0) for name, rule in rules.items()}

    def per_seed(p):
        v_c, v_u = _branches(velocity_fn, p, x0, t0, labels)
        out = {}
        for name, rule in rules.items():
            guided = rule(v_c, v_u, 0)
            out[name] = (jnp.mean(_norms(guided - exact[name])), jnp.mean(_norms(guided - u_c)))
        return out

    per = jax.vmap(per_seed)(params)
    return {
        name: FirstStepErrors(
            learning_error=per[name][0],
            total_error=per[name][1],
            zero_error=jnp.mean(_norms(exact[name])),
            guidance_bias=jnp.mean(_norms(exact[name] - u_c)),
            zero_error_cond=jnp.mean(_norms(u_c)),
        )
        for name in rules
    }


def first_step_errors(
    velocity_fn: VelocityFn,
    params,
    mixture,
    label,
    rules: Mapping[str, GuidanceRule],
    x0,
) -> dict[str, FirstStepErrors]:
    """The paper's first-step comparison (Fig. 3 right): model vs exact guided velocity at ``t = 0``.

    For every rule, at ``t = 0`` and every noise point ``x0``, with ``r`` the rule without
    its zero-init (:func:`without_zero_init`) evaluated at step ``0``:

    * ``ṽ_0^θ = r(v^θ(x0, 0, c), v^θ(x0, 0, ∅))`` — per seed ``θ``;
    * ``ṽ_0^* = r(u_c, u_u)`` with ``u_c = μ_c − x0``, ``u_u = μ̄ − x0`` (exact, docs/design.md §4);

    and returns, as :class:`FirstStepErrors`, ``E‖ṽ_0^θ − ṽ_0^*‖`` and ``E‖ṽ_0^θ − u_c‖`` per
    seed, and the seed-independent ``E‖ṽ_0^*‖`` (zero baseline), ``E‖ṽ_0^* − u_c‖``
    (guidance bias) and ``E‖u_c‖`` (zero baseline against ``u_c``), expectations being means
    over ``x0``.

    Zero-init rules (``ZeroInit``, ``CFGZeroStar``) would give ``0`` against ``0`` at step
    ``0``; they are evaluated through their inner rule (``CFGZeroStar(w)`` is reported as
    ``CFGStar(w)``), i.e. the guided velocity the model *would* produce at step 0, which is
    what zero-init is a bet against.

    Args:
      velocity_fn: ``(params, x (B, d), t, label (B,)) -> (B, d)``, static under ``jit``.
      params: pytree with a leading seed axis ``S`` on every leaf.
      mixture: the exact :class:`~cfgzero_theory.GaussianMixture` (not stacked).
      label: an int class or ``(B,)`` ints (``NULL_LABEL`` entries: unconditional).
      rules: ``{name: rule}``, e.g. ``{"cfg": CFG(4.0), "cfg*": CFGStar(4.0)}``.
      x0: noise ``(B, d)``, shared by all seeds.

    Returns:
      ``{name: FirstStepErrors}`` with ``(S,)`` per-seed fields and scalar baselines.
    """
    x0 = _check_x0(mixture, x0)
    num_seeds(params)
    if not isinstance(rules, Mapping) or not rules or not all(isinstance(k, str) for k in rules):
        raise ValueError("rules must be a non-empty mapping from names (str) to guidance rules")
    if not all(callable(r) for r in rules.values()):
        raise ValueError("every value of rules must be a guidance rule (callable)")
    labels = _labels(mixture, label, x0.shape[0])
    inner = {name: without_zero_init(rule) for name, rule in rules.items()}
    return _first_step_jit(velocity_fn, params, mixture, labels, inner, x0)


# ----------------------------------------------------------------------------- along the trajectory
class PerStepErrors(NamedTuple):
    """Errors along the model's own sampling trajectory; ``(S, N)`` arrays are seed × step means over the batch.

    With ``r`` the rule without zero-init (:func:`without_zero_init`), at the state
    ``x_i`` the seed's sampler visited at step ``i`` (time ``t_i``; first stage for Heun):

    * ``learning_error``: ``E‖r(v_c^θ, v_u^θ) − r(u_c, u_u)‖`` — the guided velocity the model
      produces (or, on zeroed steps, would produce) against the exact one;
    * ``zero_error``: ``E‖r(u_c, u_u)‖`` — the same for a zero velocity;
    * ``applied_error``: ``E‖ṽ_applied − r(u_c, u_u)‖`` — the velocity the sampler used (zero
      on zeroed steps) against the exact guided field; equals ``zero_error`` on zeroed steps
      and ``learning_error`` elsewhere (so zero-init helped at step ``i`` exactly when
      ``zero_error < learning_error`` there);
    * ``total_error``: ``E‖ṽ_applied − u_c‖`` — the used velocity against the true class field;
    * ``guidance_bias``: ``E‖r(u_c, u_u) − u_c‖``;
    * ``zeroed (N,)``: the steps the rule zeroes (``i < K``);
    * ``samples (S, B, d)``: the final states, identical to ``sampling.sample`` per seed.
    """

    learning_error: Array
    zero_error: Array
    applied_error: Array
    total_error: Array
    guidance_bias: Array
    zeroed: Array
    samples: Array


@functools.partial(jax.jit, static_argnums=(0, 7))
def _per_step_jit(velocity_fn, params, mixture, labels, rule, x0, times, solver):
    inner = without_zero_init(rule)
    steps = jnp.arange(times.shape[0] - 1)

    def per_seed(p):
        res = sample(velocity_fn, p, x0, times, labels, rule, solver=solver, return_trajectory=True)

        def one_step(args):
            x, t, i, applied, v_c, v_u = args
            u_c, u_u = _exact_branches(mixture, x, t, labels)
            exact = inner(u_c, u_u, i)
            model = inner(v_c, v_u, i)
            return tuple(
                jnp.mean(_norms(a))
                for a in (model - exact, exact, applied - exact, applied - u_c, exact - u_c)
            )

        # lax.map, not vmap, over steps: the exact fields' memory stays that of one step
        errs = jax.lax.map(one_step, (res.trajectory[:-1], times[:-1].astype(x0.dtype), steps, res.guided, res.v_cond, res.v_uncond))
        return errs, res.samples

    errs, samples = jax.vmap(per_seed)(params)
    zeroed = steps < zero_init_steps(rule)
    return PerStepErrors(*errs, zeroed, samples)


def per_step_errors(
    velocity_fn: VelocityFn,
    params,
    mixture,
    label,
    rule: GuidanceRule,
    x0,
    times,
    solver: str = "euler",
) -> PerStepErrors:
    """Run the guided sampler with every seed's model and measure its errors at every step.

    Each seed integrates ``dx/dt = rule(v_c^θ, v_u^θ, i)`` from the shared noise ``x0`` on
    the grid ``times`` with :func:`~cfgzero_theory.sampling.sample` (so zero-init rules do
    zero their first steps), and at each step ``i`` the recorded model branches at the
    visited state ``(x_i, t_i)`` are compared with the exact branches of ``mixture`` at the
    same state.  The learning-error / zero-baseline pair uses the rule without zero-init
    (see :class:`PerStepErrors` and the module docstring): on a zeroed step "same rule" would
    compare ``0`` with ``0``; the velocity actually applied there enters ``applied_error``
    and ``total_error``.  The "same rule, same step" learning error is
    ``learning_error · (1 − zeroed)``.  With ``solver="heun"`` the errors are those of the
    first stage of each step (at ``(x_i, t_i)``); the corrector stage is not measured.

    Memory: the sampler's records, ``4·S·(N + 1)·B·d`` numbers (states and the three
    per-step velocities), plus the exact fields of one step per seed; split a large batch
    ``x0`` into several calls if that is too much.

    Args: as :func:`first_step_errors`, plus ``times`` (increasing grid ``(N + 1,)``, e.g.
    :func:`~cfgzero_theory.sampling.time_grid`) and ``solver`` (``"euler"`` or ``"heun"``).

    Returns:
      :class:`PerStepErrors`: ``(S, N)`` error means, ``zeroed (N,)``, ``samples (S, B, d)``.
    """
    x0 = _check_x0(mixture, x0)
    num_seeds(params)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not callable(rule):
        raise ValueError("rule must be a guidance rule (callable)")
    times = jnp.asarray(times)
    if times.ndim != 1 or times.shape[0] < 2:
        raise ValueError(f"times must be a 1-D grid with at least 2 entries, got shape {times.shape}")
    labels = _labels(mixture, label, x0.shape[0])
    return _per_step_jit(velocity_fn, params, mixture, labels, rule, x0, times, solver)


# ----------------------------------------------------------------------------- crossover epoch
class Crossover(NamedTuple):
    """Result of :func:`crossover_epoch` (Python floats).

    ``epoch``: the crossover epoch of the seed-mean curves, NaN if there is none;
    ``low``, ``high``: the bootstrap percentile interval at the requested level, where a
    replicate without a crossover counts as ``+inf`` ("not before the last evaluated
    epoch"), so ``high = inf`` means the data cannot rule that out; ``fraction``: share of
    bootstrap replicates that have a crossover.
    """

    epoch: float
    low: float
    high: float
    fraction: float


def _crossover_index(mean_model: Array, mean_zero: Array) -> Array:
    """First index from which ``mean_model < mean_zero`` holds for the rest of the curve, or ``E``."""
    below = mean_model < mean_zero
    stays = jnp.flip(jnp.cumprod(jnp.flip(below).astype(jnp.int32)).astype(bool))
    return jnp.where(stays[-1], jnp.argmax(stays), below.shape[0])


@functools.partial(jax.jit, static_argnums=(4,))
def _crossover_jit(epochs, err_model, err_zero, key, num_bootstrap):
    num_seeds, num_epochs = err_model.shape
    padded = jnp.concatenate([epochs, jnp.array([jnp.inf], epochs.dtype)])
    point = _crossover_index(err_model.mean(0), err_zero.mean(0))
    rows = jax.random.randint(key, (num_bootstrap, num_seeds), 0, num_seeds)
    boot = jax.vmap(lambda r: _crossover_index(err_model[r].mean(0), err_zero[r].mean(0)))(rows)
    return padded[point], padded[boot], jnp.mean(boot < num_epochs)


def crossover_epoch(epochs, err_model, err_zero, num_bootstrap: int = 1000, key=None, level: float = 0.9) -> Crossover:
    """The epoch from which the model beats the zero velocity for good, with a seed bootstrap.

    With ``m_e`` and ``z_e`` the seed means of ``err_model`` and ``err_zero`` at evaluated
    epoch ``e``, the crossover is the first evaluated epoch ``e*`` such that ``m_e < z_e`` for
    *every* evaluated epoch ``e >= e*`` (a dip below that is later undone does not count);
    NaN if the last evaluated epoch is not below.  The interval resamples the ``S`` seeds
    with replacement (``num_bootstrap`` replicates; ``err_model`` and ``err_zero`` rows of a
    seed stay paired), recomputes the crossover of each replicate's seed means, and reports
    the ``(1 − level)/2`` and ``(1 + level)/2`` percentiles (order statistics rounded
    outward, so bounds are evaluated epochs or ``inf``).

    Args:
      epochs: ``(E,)`` increasing evaluated epochs.
      err_model: ``(S, E)`` per-seed error curves (e.g. ``FirstStepErrors.learning_error``
        stacked over epochs).
      err_zero: the zero baseline, ``(S, E)``, ``(E,)`` or a scalar (broadcast over seeds).
      num_bootstrap: number of bootstrap replicates.
      key: PRNG key of the bootstrap; ``None`` uses ``jax.random.key(0)`` (reproducible).
      level: coverage of the percentile interval, in ``(0, 1)``.
    """
    epochs = np.asarray(epochs, dtype=np.float64)
    if epochs.ndim != 1 or epochs.size == 0 or not np.all(np.isfinite(epochs)):
        raise ValueError(f"epochs must be a non-empty finite 1-D array, got shape {epochs.shape}")
    if np.any(np.diff(epochs) <= 0):
        raise ValueError("epochs must be strictly increasing")
    err_model = np.asarray(err_model, dtype=np.float64)
    if err_model.ndim != 2 or err_model.shape[1] != epochs.size or err_model.shape[0] < 1:
        raise ValueError(f"err_model must have shape (S, E) = (S, {epochs.size}), got {err_model.shape}")
    try:
        err_zero = np.broadcast_to(np.asarray(err_zero, dtype=np.float64), err_model.shape)
    except ValueError:
        raise ValueError(f"err_zero must broadcast to err_model's shape {err_model.shape}") from None
    if not (np.all(np.isfinite(err_model)) and np.all(np.isfinite(err_zero))):
        raise ValueError("err_model and err_zero must be finite")
    if not (isinstance(num_bootstrap, (int, np.integer)) and num_bootstrap >= 1):
        raise ValueError(f"num_bootstrap must be a positive integer, got {num_bootstrap!r}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level!r}")
    key = jax.random.key(0) if key is None else key
    dtype = jnp.result_type(float)
    point, boot, fraction = _crossover_jit(
        jnp.asarray(epochs, dtype), jnp.asarray(err_model, dtype), jnp.asarray(err_zero, dtype), key, int(num_bootstrap)
    )
    boot = np.sort(np.asarray(boot, dtype=np.float64))
    alpha = 0.5 * (1.0 - float(level))
    lo_idx = int(np.floor(alpha * (boot.size - 1)))
    hi_idx = int(np.ceil((1.0 - alpha) * (boot.size - 1)))
    point = float(point)
    return Crossover(
        epoch=point if math.isfinite(point) else math.nan,
        low=float(boot[lo_idx]),
        high=float(boot[hi_idx]),
        fraction=float(fraction),
    )


def bootstrap_mean_interval(values, num_bootstrap: int = 1000, key=None, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean over seeds, per column.

    ``values (S, E)`` (seeds × epochs): resample the ``S`` rows with replacement
    ``num_bootstrap`` times, take each replicate's column means, and return the
    ``(1 − level)/2`` and ``(1 + level)/2`` percentiles ``(low (E,), high (E,))``.  ``key``:
    PRNG key (``None``: ``jax.random.key(0)``).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 1 or not np.all(np.isfinite(values)):
        raise ValueError(f"values must be a finite (S, E) array, got shape {values.shape}")
    if not (isinstance(num_bootstrap, (int, np.integer)) and num_bootstrap >= 1):
        raise ValueError(f"num_bootstrap must be a positive integer, got {num_bootstrap!r}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level!r}")
    key = jax.random.key(0) if key is None else key
    rows = np.asarray(jax.random.randint(key, (int(num_bootstrap), values.shape[0]), 0, values.shape[0]))
    means = values[rows].mean(axis=1)  # (B, E)
    alpha = 0.5 * (1.0 - float(level))
    return np.quantile(means, alpha, axis=0), np.quantile(means, 1.0 - alpha, axis=0)


# ----------------------------------------------------------------------------- sample quality
#: Half-width of the JSD grid around each component, in component standard deviations.
JSD_GRID_STDS = 4.0


def default_bandwidth(mixture, label=None) -> float:
    """Gaussian-kernel bandwidth for :func:`sample_quality`'s MMD: ``h = √tr(Cov_c)``.

    This is the median heuristic computed on the truth instead of the samples:
    ``h² = E‖Y − Y'‖²/2 = tr Cov[Y]`` for ``Y, Y'`` independent draws of class ``label``, so
    typical pairs sit at ``k ≈ e^{−1}`` in any dimension.  It depends only on the mixture,
    so MMD values are comparable across models, epochs and seeds.
    """
    _, cov = metrics.class_moments(mixture, mixture.check_label(label))
    return float(jnp.sqrt(jnp.trace(cov)))


def jsd_grid(mixture, num_stds: float = JSD_GRID_STDS) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` of the 2-D grid spanning every component of the *whole* mixture ± ``num_stds`` std.

    ``lo = min_k (μ_k − num_stds·√diag Σ_k)``, ``hi = max_k (μ_k + num_stds·√diag Σ_k)`` per
    coordinate; the whole mixture (not only the class) so samples on another class's modes
    land on the grid and count against the class.
    """
    means = np.asarray(mixture.means, np.float64)
    stds = np.sqrt(np.clip(np.diagonal(np.asarray(mixture.covs, np.float64), axis1=1, axis2=2), 0.0, None))
    return (means - num_stds * stds).min(0), (means + num_stds * stds).max(0)


def sample_quality(
    mixture,
    samples,
    label,
    key=None,
    *,
    bandwidth: float | None = None,
    mass: float = 0.95,
    num_reference: int = metrics.HDR_NUM_REFERENCE,
    bins: int = 40,
    grid: tuple | None = None,
) -> dict[str, Array]:
    """Exact sample-quality metrics of final samples against the true class distribution.

    Keys of the returned dict (``samples`` ``(n, d)`` → scalars; ``(S, n, d)`` → ``(S,)``):

    * ``"nll"``: mean negative log-likelihood under the true class density
      (:func:`metrics.mean_nll`); ``"nll_floor"``: its floor, the class entropy, estimated as
      ``−mean log p`` over the ``num_reference`` exact samples of the HDR reference;
    * ``"frechet"``: squared Fréchet distance between the samples' mean/covariance and the
      exact class moments (:func:`metrics.frechet_to_mixture`);
    * ``"mmd"``: unbiased squared MMD to the exact class mixture
      (:func:`metrics.mmd_rbf_to_mixture`) with bandwidth ``bandwidth`` (default
      :func:`default_bandwidth`: ``√tr Cov_c``, fixed by the truth);
    * ``"mode_tv"``: total variation between the samples' component shares and the class
      weights (:func:`metrics.mode_coverage`);
    * ``"precision"``: share of samples in the class's ``mass`` highest-density region
      (:func:`metrics.hdr_precision`; one threshold, drawn with ``key``, for all seeds);
    * ``"jsd"`` (only for ``d = 2``): Jensen–Shannon divergence (nats) between the sample
      histogram and the exact class density on a ``bins × bins`` grid spanning the whole
      mixture (:func:`jsd_grid`, or ``grid=(lo, hi)``).

    Every metric has a positive finite-``n`` floor (except NLL, whose floor is the entropy,
    and precision, whose target is ``mass``): compare against the same metrics of ``n``
    exact class samples.  ``key`` draws the HDR reference samples; ``None`` uses
    ``jax.random.key(0)``, which keeps the threshold identical across calls.  Needs
    nonsingular covariances (a data density).
    """
    x = jnp.asarray(samples)
    if x.ndim not in (2, 3) or x.shape[-1] != mixture.dim:
        raise ValueError(f"samples must have shape (n, {mixture.dim}) or (S, n, {mixture.dim}), got {x.shape}")
    label = mixture.check_label(label)
    h = default_bandwidth(mixture, label) if bandwidth is None else bandwidth
    stacked = x if x.ndim == 3 else x[None]
    scorer = make_sample_scorer(mixture, label, key, mass=mass, num_reference=num_reference, bins=bins, grid=grid)
    out = dict(scorer(stacked))
    out["nll_floor"] = jnp.full(stacked.shape[0], out["nll_floor"])
    out["frechet"] = jnp.stack([metrics.frechet_to_mixture(s, mixture, label) for s in stacked])
    out["mmd"] = jnp.stack([metrics.mmd_rbf_to_mixture(s, mixture, label, h) for s in stacked])
    out["mode_tv"] = jnp.stack([metrics.mode_coverage(mixture, s, label).total_variation for s in stacked])
    return out if x.ndim == 3 else {name: value[0] for name, value in out.items()}


def make_sample_scorer(
    mixture,
    label,
    key=None,
    *,
    mass: float = 0.95,
    num_reference: int = metrics.HDR_NUM_REFERENCE,
    bins: int = 40,
    grid: tuple | None = None,
) -> Callable[[Array], dict[str, Array]]:
    """``score(samples (S, n, d)) -> {"nll", "precision"[, "jsd"]: (S,)}``, one compiled program.

    The same numbers as :func:`sample_quality`'s keys of those names (mean NLL under the true
    class density; share of samples in the class's ``mass`` highest-density region, its
    threshold drawn once with ``key``; for ``d = 2`` the JSD between the sample histogram and
    the exact class density on the ``bins × bins`` grid of :func:`jsd_grid`), but everything
    that does not depend on the samples — the HDR threshold, the grid's cell masses — is
    computed here once, and the returned function is jitted and ``vmap``-ped over the seed
    axis: a study that scores every epoch compiles it once per sample shape.  Also returns
    ``"nll_floor"`` (scalar), the class entropy estimated on the HDR reference samples.

    The Fréchet distance and MMD are not included: fused into this one program with the NLL
    they made XLA's CPU runtime (JAX 0.10.2, 2 cores) hang on the second call; their own
    functions in :mod:`cfgzero_theory.metrics` are compiled once and fast enough per seed.
    """
    if mixture.is_singular:
        raise ValueError("mixture has a singular covariance: its data distribution has no density")
    label = mixture.check_label(label)
    key = jax.random.key(0) if key is None else key
    reference = mixture.sample(key, int(num_reference), label)
    ref_log_p = mixture.log_prob(reference, label)
    threshold = jnp.quantile(ref_log_p, 1.0 - check_open_fraction("mass", mass))
    nll_floor = -jnp.mean(ref_log_p)
    if mixture.dim == 2:
        lo, hi = jsd_grid(mixture) if grid is None else grid
        masses = metrics.density_on_grid(lambda p: mixture.log_prob(p, label), lo, hi, bins)
        lo, hi = jnp.asarray(lo, masses.dtype), jnp.asarray(hi, masses.dtype)

    def one(x):
        finite = jnp.all(jnp.isfinite(x), axis=1)
        log_p = mixture.log_prob(jnp.where(finite[:, None], x, 0.0), label)
        out = {"nll": -jnp.mean(jnp.where(finite, log_p, jnp.nan)),
               "precision": jnp.mean(finite & (log_p >= threshold))}
        if mixture.dim == 2:
            out["jsd"] = metrics.jsd_to_cell_masses(x, masses, lo, hi)
        return out

    scores = jax.jit(jax.vmap(one))

    def score(samples) -> dict[str, Array]:
        x = jnp.asarray(samples)
        if x.ndim != 3 or x.shape[-1] != mixture.dim:
            raise ValueError(f"samples must have shape (S, n, {mixture.dim}), got {x.shape}")
        return {**scores(x), "nll_floor": nll_floor}

    return score
