"""Guided ODE sampling in the theory convention, each whole loop one compiled program.

The ODE ``dx/dt = ṽ_t(x)`` is integrated from ``t = 0`` (noise) to ``t = 1`` (data) on a
time grid ``0 = t_0 < t_1 < … < t_N = 1``.  At solver step ``i`` the guided velocity is
``ṽ = rule(v(x, t_i, label), v(x, t_i, NULL_LABEL), step=i)``, the two branches evaluated
in one batched call.  Solvers:

* Euler: ``x_{i+1} = x_i + h_i·ṽ(x_i, t_i)``, ``h_i = t_{i+1} − t_i``;
* Heun:  ``x̂ = x_i + h_i·ṽ(x_i, t_i)``, ``x_{i+1} = x_i + h_i/2·(ṽ(x_i, t_i) + ṽ(x̂, t_{i+1}))``,
  both stages guided with the same step index ``i`` (so zero-init zeroes whole steps).
  Heun's last stage evaluates the field at ``t_N = 1``; for a mixture with a singular
  covariance the exact field is undefined there, so use Euler or end the grid below 1.

A velocity function has the signature ``velocity_fn(params, x, t, label)`` with ``params`` a
pytree (a :class:`~cfgzero_theory.GaussianMixture`, network weights, …), ``x`` of shape
``(B, ...)``, ``t`` a scalar and ``label`` an integer array ``(B,)`` in which ``NULL_LABEL``
asks for the unconditional branch; ``GaussianMixture.velocity`` is one.

Diffusers' σ convention (DESIGN.md §2) is linked by ``σ = 1 − t`` and ``v_σ = −u_t``:
:func:`sigma_velocity_fn` and :func:`theory_velocity_fn` convert a velocity function between
the two, and :func:`sigmas_to_times` converts a σ schedule into a time grid.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cfgzero_theory.guidance import GuidanceRule
from cfgzero_theory.mixture import NULL_LABEL

Array = jax.Array
VelocityFn = Callable[..., Array]

SOLVERS = ("euler", "heun")


def shift_sigmas(sigma: Array, shift) -> Array:
    """SD3's time shift on ``σ = 1 − t``: ``σ' = shift·σ / (1 + (shift − 1)·σ)``."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def time_grid(num_steps: int, shift: float = 1.0, dtype=None) -> Array:
    """``num_steps + 1`` times from 0 to 1, uniform in ``σ = 1 − t`` before the shift.

    ``shift > 1`` spends more steps near the noise end (as SD3 does with ``shift = 3``).
    """
    if not (isinstance(num_steps, int) and num_steps >= 1):
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift!r}")
    sigma = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=dtype or jnp.result_type(float))
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

    Args:
      velocity_fn: ``(params, x, t, label) -> velocity`` (see the module docstring); static
        under ``jit``, so pass the same function object to reuse the compilation.
      params: pytree handed to ``velocity_fn`` (traced).
      x0: initial noise ``(B, ...)``.
      times: increasing time grid ``(N + 1,)``, e.g. :func:`time_grid`.
      label: an integer class, ``(B,)`` integers, or ``None``; ``None`` and ``NULL_LABEL``
        make the "conditional" branch unconditional too.
      rule: a guidance rule (e.g. ``CFGZeroStar(4.0)``), traced, so scales can be vmapped.
      solver: ``"euler"`` or ``"heun"``.
      return_trajectory: also return the states and per-step velocities.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    x0 = jnp.asarray(x0)
    if x0.ndim < 2:
        raise ValueError(f"x0 must have shape (B, ...) with at least 2 axes, got {x0.shape}")
    times = jnp.asarray(times)
    if times.ndim != 1 or times.shape[0] < 2:
        raise ValueError(f"times must be a 1-D grid with at least 2 entries, got shape {times.shape}")
    check = getattr(params, "check_label", None)
    if check is not None:
        check(label, (x0.shape[0],))
    labels = jnp.broadcast_to(jnp.asarray(NULL_LABEL if label is None else label, jnp.int32), (x0.shape[0],))
    return _sample_jit(velocity_fn, params, x0, times, labels, rule, solver, return_trajectory)


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _sample_jit(velocity_fn, params, x0, times, labels, rule, solver, return_trajectory):
    both_labels = jnp.concatenate([labels, jnp.full_like(labels, NULL_LABEL)])

    def branches(x, t):
        v = velocity_fn(params, jnp.concatenate([x, x]), t, both_labels)
        return v[: x.shape[0]], v[x.shape[0] :]

    def step(x, inputs):
        i, t, t_next = inputs
        h = (t_next - t).astype(x.dtype)
        v_c, v_u = branches(x, t)
        v = rule(v_c, v_u, i)
        if solver == "euler":
            x_next = x + h * v
        else:
            v_next = rule(*branches(x + h * v, t_next), i)
            x_next = x + 0.5 * h * (v + v_next)
        return x_next, ((x_next, v, v_c, v_u) if return_trajectory else None)

    steps = jnp.arange(times.shape[0] - 1)
    x_final, record = jax.lax.scan(step, x0, (steps, times[:-1], times[1:]))
    if not return_trajectory:
        return SampleResult(x_final)
    states, guided, v_c, v_u = record
    trajectory = jnp.concatenate([x0[None], states])
    return SampleResult(x_final, trajectory, guided, v_c, v_u)
