"""Guided ODE sampling, the whole loop one compiled program: one loop, two conventions.

:func:`sample_flow` is *the* sampling loop, in diffusers' σ convention: a
:class:`~cfgzero_theory.schedules.FlowSchedule`, a solver object, any guidance rule (stateful
ones included) and a model ``model_fn(params, x, sigma, timestep, context)`` whose
conditional and unconditional contexts are batched into one call.  :func:`sample` is a thin
adapter onto it for the theory convention (docs/design.md §2): the ODE ``dx/dt = ṽ_t(x)``
integrated from ``t = 0`` (noise) to ``t = 1`` (data) on a time grid
``0 ≤ t_0 < t_1 < … < t_N ≤ 1``, with ``σ = 1 − t`` and ``v_σ = −u_t``.  At solver step ``i``
the guided velocity is ``ṽ = rule(v(x, t_i, label), v(x, t_i, NULL_LABEL), step=i)``, the
two branches evaluated in one batched call.  Solvers (:data:`SOLVERS` by name in
:func:`sample`):

* Euler (:class:`~cfgzero_theory.schedules.FlowMatchEuler`): ``x_{i+1} = x_i + h_i·ṽ(x_i, t_i)``,
  ``h_i = t_{i+1} − t_i``;
* Heun (:class:`~cfgzero_theory.schedules.Heun`): ``x̂ = x_i + h_i·ṽ(x_i, t_i)``,
  ``x_{i+1} = x_i + h_i/2·(ṽ(x_i, t_i) + ṽ(x̂, t_{i+1}))``, both stages guided with the same
  step index ``i`` (so zero-init zeroes whole steps).  Heun's last stage evaluates the field
  at ``t_N``; for a mixture with a singular covariance the exact field is undefined at
  ``t = 1``, so use Euler or end the grid below 1.
* UniPC (:class:`~cfgzero_theory.unipc.UniPC`, σ convention only): Wan's multistep solver.

A velocity function has the signature ``velocity_fn(params, x, t, label)`` with ``params`` a
pytree (a :class:`~cfgzero_theory.GaussianMixture`, network weights, …), ``x`` of shape
``(B, ...)``, ``t`` a scalar and ``label`` an integer array ``(B,)`` in which ``NULL_LABEL``
asks for the unconditional branch; ``GaussianMixture.velocity`` is one.

:func:`sigma_velocity_fn` and :func:`theory_velocity_fn` convert a velocity function between
the two conventions, :func:`sigmas_to_times` converts a σ schedule into a time grid, and
:func:`mixture_flow_model` makes the exact Gaussian-mixture field a σ-convention model.

The guidance rule is traced data: for the rules of :func:`cfgzero_theory.guidance.make_rule`
the kind, the scale and ``K`` are numbers in the compiled program, so switching CFG ↔
CFG-Zero*, or changing ``w`` or ``K``, reuses it; changing the step count, the shapes, the
solver or the model function compiles anew.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

import numpy as np

from cfgzero_theory.guidance import GuidanceRule, apply_rule, init_rule_state, optimized_scale
from cfgzero_theory.mixture import NULL_LABEL
from cfgzero_theory.schedules import FlowMatchEuler, FlowSchedule, FlowSolver, Heun
from cfgzero_theory.validation import check_choice, check_float_dtype, check_int, check_leaf, check_real, concrete_number

Array = jax.Array
VelocityFn = Callable[..., Array]

#: The solvers :func:`sample` takes by name.
SOLVERS = {"euler": FlowMatchEuler(), "heun": Heun()}


def shift_sigmas(sigma: Array, shift) -> Array:
    """SD3's time shift on ``σ = 1 − t``: ``σ' = shift·σ / (1 + (shift − 1)·σ)``."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def time_grid(num_steps: int, shift: float = 1.0, dtype=None) -> Array:
    """``num_steps + 1`` times from 0 to 1, uniform in ``σ = 1 − t`` before the shift.

    ``shift > 1`` spends more steps near the noise end (as SD3 does with ``shift = 3``).
    """
    num_steps = check_int("num_steps", num_steps, minimum=1)
    shift = check_real("shift", shift, positive=True)
    dtype = jnp.result_type(float) if dtype is None else check_float_dtype("dtype", dtype)
    sigma = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=dtype)
    return 1 - shift_sigmas(sigma, shift)


def sigmas_to_times(sigmas: Array) -> Array:
    """A diffusers σ schedule (decreasing, ending at 0) as a theory time grid ``t = 1 − σ``."""
    return 1 - jnp.asarray(sigmas)


def sigma_velocity_fn(velocity_fn: VelocityFn) -> VelocityFn:
    """Theory-convention velocity ``u_t`` → diffusers' ``v_σ(x) = −u_{1−σ}(x)``."""

    @functools.wraps(velocity_fn)
    def v_sigma(params, x, sigma, label):
        return -velocity_fn(params, x, 1 - sigma, label)

    return v_sigma


def theory_velocity_fn(sigma_fn: VelocityFn) -> VelocityFn:
    """Diffusers' σ-convention prediction ``v_σ`` → theory velocity ``u_t(x) = −v_{1−t}(x)``."""

    @functools.wraps(sigma_fn)
    def u_t(params, x, t, label):
        return -sigma_fn(params, x, 1 - t, label)

    return u_t


class SampleResult(NamedTuple):
    """Output of :func:`sample`.

    ``samples`` has the shape of ``x0``.  With ``return_trajectory=True``: ``trajectory``
    ``(N + 1, B, ...)`` holds ``x_0 … x_N``; ``guided``, ``v_cond`` and ``v_uncond``
    ``(N, B, ...)`` hold the first-stage velocities of each step, at ``(x_i, t_i)``.
    """

    samples: Array
    trajectory: Array | None = None
    guided: Array | None = None
    v_cond: Array | None = None
    v_uncond: Array | None = None


def sample(
    velocity_fn: VelocityFn,
    params,
    x0: Array,
    times: Array,
    label,
    rule: GuidanceRule,
    *,
    solver: str = "euler",
    return_trajectory: bool = False,
) -> SampleResult:
    """Integrate the guided ODE from ``x0`` (at ``times[0]``) to ``times[-1]``; one compiled loop.

    The theory-convention face of :func:`sample_flow`: ``σ = 1 − t``, the model
    ``v_σ = −velocity_fn(params, x, 1 − σ, label)``, the labels as the conditional context
    and ``NULL_LABEL`` as the unconditional one, the velocities of the result negated back.

    Args:
      velocity_fn: ``(params, x, t, label) -> velocity`` (see the module docstring); static
        under ``jit``, so pass the same function object to reuse the compilation.
      params: pytree handed to ``velocity_fn`` (traced).
      x0: initial noise ``(B, ...)``.
      times: strictly increasing time grid in ``[0, 1]``, ``(N + 1,)``, e.g. :func:`time_grid`.
      label: an integer class, ``(B,)`` integers, or ``None``; ``None`` and ``NULL_LABEL``
        make the "conditional" branch unconditional too.
      rule: a guidance rule (e.g. ``make_rule("cfg-zero-star", 4.0)``), traced, so kinds and
        scales share one compiled loop and scales can be vmapped.
      solver: ``"euler"`` or ``"heun"``.
      return_trajectory: also return the states and per-step velocities.
    """
    check_choice("solver", solver, tuple(SOLVERS))
    x0 = jnp.asarray(x0)
    if x0.ndim < 2:
        raise ValueError(f"x0 must have shape (B, ...) with at least 2 axes, got {x0.shape}")
    times = jnp.asarray(times)
    if times.ndim != 1 or times.shape[0] < 2:
        raise ValueError(f"times must be a 1-D grid with at least 2 entries, got shape {times.shape}")
    if not isinstance(times, jax.core.Tracer):
        grid = np.asarray(times, np.float64)
        if not (np.all(np.isfinite(grid)) and np.all(np.diff(grid) > 0) and grid[0] >= 0 and grid[-1] <= 1):
            raise ValueError(f"times must be finite and strictly increasing within [0, 1], got {grid}")
    check = getattr(params, "check_label", None)
    if check is not None:
        check(label, (x0.shape[0],))
    labels = jnp.broadcast_to(jnp.asarray(NULL_LABEL if label is None else label, jnp.int32), (x0.shape[0],))
    sigmas = 1 - times
    flow = sample_flow(TheoryModel(velocity_fn), params, x0, FlowSchedule(sigmas, sigmas[:-1]), labels,
                       jnp.full_like(labels, NULL_LABEL), rule, solver=SOLVERS[solver],
                       return_trajectory=return_trajectory)
    if not return_trajectory:
        return SampleResult(flow.samples)
    return SampleResult(flow.samples, flow.trajectory, -flow.guided, -flow.v_cond, -flow.v_uncond)


@dataclasses.dataclass(frozen=True)
class TheoryModel:
    """A theory-convention velocity function as a σ-convention model of :func:`sample_flow`:
    ``model(params, x, σ, timestep, labels) = −velocity_fn(params, x, 1 − σ, labels)``
    (the timestep is not used).  Equal for equal ``velocity_fn``, so ``jit`` reuses its
    compilation across calls."""

    velocity_fn: VelocityFn

    def __call__(self, params, x, sigma, timestep, labels):
        return -self.velocity_fn(params, x, 1 - sigma, labels)


# ----------------------------------------------------------------------------- σ convention
ModelFn = Callable[..., Array]


@dataclasses.dataclass(frozen=True)
class PerturbedGuidance:
    """A guidance term from a perturbed conditional prediction, added to the rule's output.

    At step ``i`` of ``N``, when ``N·start < i < N·stop`` (the comparison of diffusers'
    ``StableDiffusion3Pipeline``; ``start``/``stop`` are fractions of the steps)::

        ṽ ← ṽ + scale·(v_c − v_p),    v_p = model_fn(params, x, σ_i, τ_i, context)

    with ``ṽ`` the guidance rule's output (CFG, CFG-Zero*, …), ``v_c`` the conditional
    prediction and ``v_p`` a prediction of the same network made worse on purpose, evaluated on
    the conditional batch only and only inside the interval (a ``lax.cond``).  Skip-layer
    guidance (SD3.5-medium: ``model_fn = sd3_model_fn(transformer, skip_layers=(7, 8, 9))``,
    ``scale=2.8``, ``start=0.01``, ``stop=0.2``) is this term; perturbed-attention guidance has
    the same shape.  ``model_fn`` is static under ``jit`` (reuse one function object);
    ``scale``, ``start`` and ``stop`` are traced.  Note that diffusers' modular
    ``SkipLayerGuidance`` guider compares with ``int(N·start) < i < int(N·stop)`` instead, which
    can differ by a step.  A zero-init step inside the interval receives the term too.
    """

    model_fn: ModelFn
    scale: float = 2.8
    start: float = 0.01
    stop: float = 0.2

    def __post_init__(self):
        if not callable(self.model_fn):
            raise ValueError(f"model_fn must be callable, got {type(self.model_fn).__name__}")
        object.__setattr__(self, "scale", check_leaf("scale", self.scale, lambda x: True, "a finite number"))
        for name in ("start", "stop"):
            object.__setattr__(self, name, check_leaf(name, getattr(self, name), lambda x: 0 <= x <= 1,
                                                      "a number in [0, 1]"))
        start, stop = concrete_number(self.start), concrete_number(self.stop)
        if start is not None and stop is not None and start > stop:
            raise ValueError(f"start must not exceed stop, got start={start}, stop={stop}")

    def active(self, i, num_steps: int):
        """Whether the term is applied at step ``i`` (``N·start < i < N·stop``; traceable)."""
        return (i > num_steps * self.start) & (i < num_steps * self.stop)


jax.tree_util.register_dataclass(PerturbedGuidance, data_fields=["scale", "start", "stop"], meta_fields=["model_fn"])


class FlowSampleResult(NamedTuple):
    """Output of :func:`sample_flow` (σ convention).

    ``samples`` has the shape of the initial latents.  With ``return_trajectory=True``:
    ``trajectory`` ``(N + 1, B, ...)`` holds the latents before each step and the final
    ones; ``guided``, ``v_cond``, ``v_uncond`` ``(N, B, ...)`` the predictions of each step
    (``guided`` is what the solver received) and ``opt_scale`` ``(N, B)`` the optimized
    scale ``s* = ⟨v_c, v_u⟩ / (‖v_u‖² + ε)`` of each step, whatever the rule.
    """

    samples: Array
    trajectory: Array | None = None
    guided: Array | None = None
    v_cond: Array | None = None
    v_uncond: Array | None = None
    opt_scale: Array | None = None


def sample_flow(
    model_fn: ModelFn,
    params,
    latents: Array,
    schedule: FlowSchedule,
    context,
    uncond_context,
    rule: GuidanceRule,
    *,
    solver: FlowSolver = FlowMatchEuler(),
    perturbed: PerturbedGuidance | None = None,
    return_trajectory: bool = False,
) -> FlowSampleResult:
    """Guided sampling in diffusers' σ convention, the whole loop one compiled ``lax.scan``.

    At step ``i`` (``σ_i = schedule.sigmas[i]``, ``τ_i = schedule.timesteps[i]``) the model is
    called once on the doubled batch, ``model_fn(params, [x; x], σ_i, τ_i, [context;
    uncond_context])``, giving ``(v_c, v_u)``; with ``uncond_context=None`` it is called on the
    conditional batch alone (one branch per step, e.g. guidance-distilled Flux) and ``v_u = v_c``,
    so every :class:`~cfgzero_theory.guidance.Guidance` kind returns ``v_c``, zeroed for its
    first ``K`` steps; the rule (with its state, e.g. APG's momentum,
    in the scan carry) gives ``ṽ``; the solver (with its multistep history in the carry)
    gives the next latents.  Zero-init, guidance intervals and truncation are traced
    conditions on ``i``.  The guided prediction is cast to the model's output dtype and the
    next latents to the initial latents' dtype (as diffusers keeps bf16 latents bf16).  Works
    for any latent shape ``(B, ...)``: points, images
    ``(B, C, H, W)``, packed tokens ``(B, N, C)``, videos ``(B, C, F, H, W)``; sharding the
    batch axis of ``latents`` and contexts over a device mesh shards the whole loop.

    Args:
      model_fn: ``(params, x (2B, ...), sigma (), timestep (), context) -> v_σ (2B, ...)``,
        the prediction ``ε − x_data`` (static under ``jit``: reuse the same function object).
      params: pytree handed to ``model_fn`` (traced): weights, or a mixture.
      latents: initial noise at ``σ_0`` ``(B, ...)``.
      schedule: sigmas and timesteps, e.g. ``flow_match_euler_schedule(28, shift=3.0)``.
      context / uncond_context: pytrees whose leaves have batch axis ``B`` (prompt
        embeddings, class labels, …); concatenated leaf by leaf into the doubled batch.
        ``uncond_context=None``: the conditional branch only (see above).
      rule: any guidance rule of :mod:`cfgzero_theory.guidance` or
        :mod:`cfgzero_theory.guidance_family` (traced: scales can be vmapped).
      solver: a :class:`~cfgzero_theory.schedules.FlowSolver` (default Euler).
      perturbed: an optional :class:`PerturbedGuidance` term (skip-layer guidance).
      return_trajectory: also return latents, predictions and ``s*`` of every step.
    """
    latents = jnp.asarray(latents)
    if latents.ndim < 2:
        raise ValueError(f"latents must have shape (B, ...) with at least 2 axes, got {latents.shape}")
    if not isinstance(schedule, FlowSchedule):
        raise ValueError(f"schedule must be a FlowSchedule, got {type(schedule).__name__}")
    sigmas, timesteps = jnp.asarray(schedule.sigmas), jnp.asarray(schedule.timesteps)
    if sigmas.ndim != 1 or timesteps.ndim != 1 or sigmas.shape[0] != timesteps.shape[0] + 1 or timesteps.shape[0] < 1:
        raise ValueError(
            f"schedule must hold N + 1 sigmas and N >= 1 timesteps, got {sigmas.shape} and {timesteps.shape}"
        )
    if not isinstance(sigmas, jax.core.Tracer):
        values = np.asarray(sigmas, np.float64)
        if not (np.all(np.isfinite(values)) and np.all(np.diff(values) < 0)):
            raise ValueError(f"schedule.sigmas must be finite and strictly decreasing, got {values}")
    batch = latents.shape[0]
    for name, tree in (("context", context), ("uncond_context", uncond_context)):
        for leaf in jax.tree_util.tree_leaves(tree):
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != batch:
                raise ValueError(f"every leaf of {name} needs a leading batch axis of {batch}, got shape {jnp.shape(leaf)}")
    if uncond_context is not None and jax.tree_util.tree_structure(context) != jax.tree_util.tree_structure(uncond_context):
        raise ValueError("context and uncond_context must have the same tree structure")
    if model_fn is mixture_flow_model and not isinstance(context, jax.core.Tracer):
        params.check_label(context, (batch,))  # the contexts are the mixture's labels
    if isinstance(rule, str) or not callable(rule):
        hint = f" (make_rule({rule!r}, scale) builds one)" if isinstance(rule, str) else ""
        raise ValueError(f"rule must be a guidance rule{hint}, got {type(rule).__name__}")
    if isinstance(solver, str) or not (hasattr(solver, "init") and hasattr(solver, "step")):
        raise ValueError(f"solver must be a FlowSolver such as FlowMatchEuler(), Heun() or UniPC(), got {solver!r}")
    if perturbed is not None and not isinstance(perturbed, PerturbedGuidance):
        raise ValueError(f"perturbed must be a PerturbedGuidance or None, got {type(perturbed).__name__}")
    return _sample_flow_jit(model_fn, params, latents, FlowSchedule(sigmas, timesteps), context, uncond_context,
                            rule, solver, perturbed, return_trajectory)


@functools.partial(jax.jit, static_argnums=(0, 9))
def _sample_flow_jit(model_fn, params, latents, schedule, context, uncond_context, rule, solver, perturbed,
                     return_trajectory):
    batch = latents.shape[0]
    num_steps = schedule.timesteps.shape[0]
    both = (None if uncond_context is None  # the doubled batch's context, built once outside the loop
            else jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, u]), context, uncond_context))

    def branches(x, sigma, timestep):
        """``(v_c, v_u)``: one call on the doubled batch, or on the conditional batch alone."""
        if both is None:
            v_c = model_fn(params, x, sigma, timestep, context)
            return v_c, v_c
        v = model_fn(params, jnp.concatenate([x, x]), sigma, timestep, both)
        return v[:batch], v[batch:]

    def guided_at(x, sigma, timestep, i, rule_state):
        """The guided prediction at ``(x, σ)`` for step ``i``: ``(ṽ, rule_state', v_c, v_u)``."""
        v_c, v_u = branches(x, sigma, timestep)
        guided, rule_state = apply_rule(rule, rule_state, v_c, v_u, i)
        if perturbed is not None:
            v_p = jax.lax.cond(perturbed.active(i, num_steps),
                               lambda: perturbed.model_fn(params, x, sigma, timestep, context), lambda: v_c)
            guided = guided + perturbed.scale * (v_c - v_p)
        return guided.astype(v_c.dtype), rule_state, v_c, v_u

    def step(carry, i):
        x, rule_state, solver_state = carry
        guided, next_rule_state, v_c, v_u = guided_at(x, schedule.sigmas[i], schedule.timesteps[i], i, rule_state)

        def field(y, sigma, timestep):  # a later stage of step i: same index, same incoming guidance state
            return guided_at(y, sigma, timestep, i, rule_state)[0]

        x_next, solver_state = solver.step(solver_state, schedule, i, x, guided, field=field)
        x_next = x_next.astype(x.dtype)
        record = None
        if return_trajectory:
            record = (x_next, guided, v_c, v_u, optimized_scale(v_c, v_u).reshape(batch))
        return (x_next, next_rule_state, solver_state), record

    carry = (latents, init_rule_state(rule, latents), solver.init(latents, schedule))
    (x_final, _, _), record = jax.lax.scan(step, carry, jnp.arange(num_steps))
    if not return_trajectory:
        return FlowSampleResult(x_final)
    states, guided, v_c, v_u, opt_scale = record
    return FlowSampleResult(x_final, jnp.concatenate([latents[None], states]), guided, v_c, v_u, opt_scale)


def mixture_contexts(label, batch: int) -> tuple[Array, Array]:
    """The ``(context, uncond_context)`` pair of :func:`mixture_flow_model`: ``label`` and
    ``NULL_LABEL`` broadcast to ``(batch,)`` integers."""
    labels = jnp.broadcast_to(jnp.asarray(label, jnp.int32), (batch,))
    return labels, jnp.full_like(labels, NULL_LABEL)


def mixture_flow_model(mixture, x: Array, sigma, timestep, labels: Array) -> Array:
    """The exact mixture field as a σ-convention model: ``v_σ(x) = −u_{1−σ}(x | label)``.

    A ``model_fn`` for :func:`sample_flow` with ``params`` a
    :class:`~cfgzero_theory.GaussianMixture` and ``context`` integer labels ``(B,)``
    (``NULL_LABEL`` for the unconditional branch); evaluated at the schedule's ``σ``, not
    at the network timestep (which some schedulers round to integers).
    """
    flat = x.reshape(x.shape[0], -1)
    return -mixture.velocity(flat, 1 - sigma, labels).reshape(x.shape)
