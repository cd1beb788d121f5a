"""Noise schedules and solver steps in diffusers' σ convention (docs/design.md §2).

``σ`` runs from ≈1 (noise) down to 0 (data); ``x_σ = (1 − σ)·x_data + σ·ε`` and the network
predicts ``v = ε − x_data``.  A :class:`FlowSchedule` holds what a diffusers scheduler holds
after ``set_timesteps``: the ``N + 1`` sigmas (the last one terminal) and the ``N``
timesteps the network is conditioned on.  A solver (:class:`FlowSolver`) turns a guided
prediction at step ``i`` into the next latent; its multistep history, if any, lives in an
explicit state so that a whole sampling loop is one ``lax.scan``.

:func:`flow_match_euler_schedule` reproduces diffusers' ``FlowMatchEulerDiscreteScheduler``
(``T = num_train_timesteps``, ``N = num_inference_steps``):

1. Training grid: ``σ_k = k/T`` for ``k = T, …, 1`` in float32, shifted with the static
   ``shift`` unless dynamic shifting is on; ``σ_max``, ``σ_min`` are its first and last values.
2. ``N`` sigmas ``linspace(σ_max·T, σ_min·T, N) / T`` (or a custom list, e.g. Flux's).
3. Shift them: static ``σ' = shift·σ / (1 + (shift − 1)·σ)``, or, with dynamic shifting,
   the exponential time shift ``σ' = e^μ / (e^μ + (1/σ − 1))`` or the linear one
   ``σ' = μ / (μ + (1/σ − 1))``.  With static shifting the smallest sigma is shifted twice,
   because ``σ_min`` comes from the already shifted training grid of step 1.
4. Optionally stretch to end at ``shift_terminal``: ``σ' = 1 − (1 − σ)/c`` with
   ``c = (1 − σ_{N−1}) / (1 − shift_terminal)``.
5. Optionally replace them by a Karras, exponential or beta schedule between their ends.
6. Cast to the output dtype, ``timesteps = σ·T``, append the terminal ``σ_N = 0``.

Diffusers computes steps 2–5 in float64 NumPy (float32 NumPy for a custom list) and casts
to float32 torch tensors; here they run in JAX's default float (a custom list in float32).
Under ``jax_enable_x64`` the result matches diffusers' to ~1e-12 before the cast (a custom
list to a float32 ulp: XLA's float32 division is not always correctly rounded); in float32
mode to a few float32 ulps.
``shift`` and ``μ`` may be traced (``jit``/``vmap``); integer and boolean options are static.

:class:`FlowMatchEuler` is the matching solver: ``x_{i+1} = x_i + (σ_{i+1} − σ_i)·v_i``;
:class:`Heun` is the second-order one, which evaluates the guided field a second time
through the ``field`` callback every solver step receives.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from cfgzero_theory.validation import check_choice, check_float_dtype, check_int, check_int_leaf, check_leaf, check_real

Array = jax.Array

TIME_SHIFT_TYPES = ("exponential", "linear")
KARRAS_RHO = 7.0
BETA_ALPHA = BETA_BETA = 0.6


class FlowSchedule(NamedTuple):
    """A σ schedule: ``sigmas`` ``(N + 1,)`` decreasing, ``timesteps`` ``(N,)`` for the network.

    Equal to diffusers' ``scheduler.sigmas`` and ``scheduler.timesteps`` after
    ``set_timesteps`` for the same configuration.  A NamedTuple, hence a pytree: a jitted
    loop takes it as a traced argument and recompiles only when ``N`` changes.
    """

    sigmas: Array
    timesteps: Array

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


class FlowSolver(Protocol):
    """One solver of the σ-convention ODE ``dx/dσ = v``.

    ``init(x, schedule)`` gives the initial solver state for latents ``x``;
    ``step(state, schedule, i, x, v, field=None)`` takes the guided prediction ``v`` at step
    ``i`` (``σ_i``, ``timesteps[i]``, ``i`` possibly traced) and returns ``(x_next, state')``.
    ``field(y, sigma, timestep)`` is the guided prediction at another point of the same step
    (same step index and guidance state): solvers with several stages per step (Heun) call
    it, single-stage ones ignore it.  Solvers are pytrees whose configuration is static
    (aux data), so they can be passed to ``jit`` as ordinary arguments.
    """

    def init(self, x: Array, schedule: FlowSchedule): ...

    def step(self, state, schedule: FlowSchedule, i, x: Array, v: Array, field=None): ...


# ----------------------------------------------------------------------------- schedules
def _default_float():
    """JAX's default float: float64 under ``jax_enable_x64``, float32 otherwise."""
    return jnp.result_type(float)


def _scalar(value, dtype) -> Array:
    """A host-precision scalar rounded to ``dtype``.

    NumPy and torch round a Python float once into an array's dtype; ``value`` is taken
    at the default float's precision first, so under x64 the rounding is the same.
    """
    return jnp.asarray(value, _default_float()).astype(dtype)


def _check_sigmas(sigmas, num_inference_steps: int) -> Array:
    """Custom sigmas as float32 ``(N,)``: concrete ones finite, in ``[0, 1]`` and strictly decreasing
    after the rounding to float32 (the values the schedule uses)."""
    given, sigmas = sigmas, jnp.asarray(sigmas, jnp.float32)
    if sigmas.shape != (num_inference_steps,):
        raise ValueError(f"sigmas must have shape ({num_inference_steps},) = (num_inference_steps,), got {sigmas.shape}")
    if not isinstance(sigmas, jax.core.Tracer):
        host = np.asarray(sigmas)
        if not np.all(np.isfinite(host)) or np.any(host < 0) or np.any(host > 1):
            raise ValueError(f"sigmas must be finite and lie in [0, 1], got {given!r}")
        if np.any(np.diff(host) >= 0):
            raise ValueError(f"sigmas must be strictly decreasing (noise to data), got {given!r}")
    return sigmas


def _linspace(start, stop, num: int) -> Array:
    """NumPy's ``linspace`` arithmetic: ``start + k·(stop − start)/(num − 1)``, last value ``stop``."""
    start, stop = jnp.asarray(start), jnp.asarray(stop)
    if num == 1:
        return start[None]
    values = start + jnp.arange(num - 1, dtype=start.dtype) * ((stop - start) / (num - 1))
    return jnp.append(values, stop)


def _static_shift(sigma: Array, shift, shift_minus_one) -> Array:
    """``shift·σ / (1 + (shift − 1)·σ)`` in ``sigma``'s dtype.

    ``shift − 1`` comes in already formed: diffusers forms it in Python floats and rounds
    it to ``sigma``'s dtype only then, which matters for float32 sigmas.
    """
    dtype = sigma.dtype
    return _scalar(shift, dtype) * sigma / (1 + _scalar(shift_minus_one, dtype) * sigma)


def _time_shift(sigma: Array, mu, kind: str) -> Array:
    """Dynamic shift: ``e^μ / (e^μ + (1/σ − 1))`` (exponential) or ``μ / (μ + (1/σ − 1))`` (linear).

    The exponential shift is evaluated as diffusers does wherever that is finite; where
    ``e^μ`` overflows (μ ≳ 88 in float32, 709 in float64) or underflows to 0 at ``σ = 1``
    (``0/0``), the same quantity is taken in the form that cannot overflow,
    ``sigmoid(μ − log(1/σ − 1))`` (1 at ``σ = 1``, 0 at ``σ = 0``).
    """
    dtype = sigma.dtype
    if kind != "exponential":
        scale = _scalar(mu, dtype)
        return scale / (scale + (1 / sigma - 1))
    mu = jnp.asarray(mu, _default_float())
    scale = _scalar(jnp.exp(mu), dtype)
    usable = jnp.isfinite(scale) & (scale > 0)
    safe = jnp.where(usable, scale, jnp.ones_like(scale))  # no inf/inf in the branch not taken
    direct = safe / (safe + (1 / sigma - 1))
    stable = jax.nn.sigmoid(mu - jnp.log(1 / sigma.astype(mu.dtype) - 1)).astype(dtype)
    return jnp.where(usable & jnp.isfinite(direct), direct, stable)


def _stretch_to_terminal(sigma: Array, shift_terminal: float) -> Array:
    """``1 − (1 − σ)/c`` with ``c = (1 − σ_last)/(1 − shift_terminal)``: the last σ becomes ``shift_terminal``."""
    one_minus = 1 - sigma
    scale = one_minus[-1] / _scalar(1 - shift_terminal, sigma.dtype)
    return 1 - one_minus / scale


def _karras(sigma_min: Array, sigma_max: Array, num: int) -> Array:
    """Karras et al.: ``(σ_max^{1/ρ} + r·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ``, ``r`` uniform on [0, 1], ``ρ = 7``."""
    ramp = _linspace(0.0, 1.0, num).astype(sigma_min.dtype)
    min_inv_rho = sigma_min ** (1 / KARRAS_RHO)
    max_inv_rho = sigma_max ** (1 / KARRAS_RHO)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** KARRAS_RHO


def _exponential(sigma_min: Array, sigma_max: Array, num: int) -> Array:
    """Log-uniform sigmas from ``σ_max`` down to ``σ_min``."""
    return jnp.exp(_linspace(jnp.log(sigma_max), jnp.log(sigma_min), num))


def _beta(sigma_min: Array, sigma_max: Array, num: int) -> Array:
    """``σ_min + F⁻¹(1 − r)·(σ_max − σ_min)``, ``F`` the Beta(0.6, 0.6) CDF, ``r`` uniform on [0, 1].

    The quantiles depend on ``num`` only, so SciPy evaluates them on the host; the
    affine map stays in JAX.
    """
    import scipy.stats

    quantiles = scipy.stats.beta.ppf(1 - np.linspace(0, 1, num), BETA_ALPHA, BETA_BETA)
    return sigma_min + jnp.asarray(quantiles, sigma_min.dtype) * (sigma_max - sigma_min)


def flow_match_euler_schedule(
    num_inference_steps: int,
    *,
    num_train_timesteps: int = 1000,
    shift=1.0,
    use_dynamic_shifting: bool = False,
    mu=None,
    time_shift_type: str = "exponential",
    shift_terminal: float | None = None,
    use_karras_sigmas: bool = False,
    use_exponential_sigmas: bool = False,
    use_beta_sigmas: bool = False,
    sigmas=None,
    invert_sigmas: bool = False,
    dtype=jnp.float32,
) -> FlowSchedule:
    """The schedule of ``FlowMatchEulerDiscreteScheduler(**config).set_timesteps(N, sigmas=, mu=)``.

    The keyword arguments are the scheduler's config (and ``set_timesteps``' ``sigmas`` and
    ``mu``); the steps are listed in the module docstring.  Behaviour kept from diffusers:

    * static ``shift``: the smallest sigma is shifted twice (``σ_min`` is read from the
      already shifted training grid), so for ``shift ≠ 1`` it is not ``shift·(1/T)/…``;
    * ``use_dynamic_shifting`` ignores ``shift`` and needs ``mu``; without dynamic shifting a
      given ``mu`` is ignored (pipelines such as Flux always pass one);
    * custom ``sigmas`` (length ``N``) are rounded to float32 first and shifted in float32;
      concrete ones must be finite, in ``[0, 1]`` and strictly decreasing after that rounding
      (diffusers accepts anything and returns NaN for a NaN);
    * ``shift_terminal`` of ``None`` or ``0`` means no stretch (and needs ``N ≥ 2`` here: with a
      single σ = 1 the stretch is 0/0, which diffusers returns as NaN);
    * Karras / exponential / beta schedules span the ends of the shifted sigmas;
    * ``invert_sigmas`` (Mochi) returns ``1 − σ`` increasing to a terminal ``1``, with
      ``timesteps = (1 − σ)·T``; it leaves this module's decreasing-σ convention.

    ``shift`` and ``mu`` may be traced scalars; everything else is static.  ``dtype`` is the
    output dtype (diffusers: float32); ``timesteps`` are ``σ·T`` computed in that dtype.
    """
    num_inference_steps = check_int("num_inference_steps", num_inference_steps, minimum=1)
    num_train_timesteps = check_int("num_train_timesteps", num_train_timesteps, minimum=1)
    check_choice("time_shift_type", time_shift_type, TIME_SHIFT_TYPES)
    if sum(map(bool, (use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas))) > 1:
        raise ValueError("at most one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be set")
    shift = check_leaf("shift", shift, lambda x: x > 0, "a finite positive number", scalar=True)
    if use_dynamic_shifting:
        if mu is None:
            raise ValueError("mu must be given when use_dynamic_shifting is True")
        mu = (check_leaf("mu", mu, lambda x: x > 0, "a finite positive number (linear time shift)", scalar=True)
              if time_shift_type == "linear" else check_leaf("mu", mu, lambda x: True, "a finite number", scalar=True))
    if shift_terminal is not None:
        shift_terminal = check_real("shift_terminal", shift_terminal, minimum=0.0)
        if not shift_terminal < 1:
            raise ValueError(f"shift_terminal must lie in [0, 1), got {shift_terminal!r}")
        if shift_terminal and num_inference_steps == 1:
            # The stretch divides by 1 − σ_last, which is 0 for a single σ = 1 (diffusers returns NaN).
            raise ValueError("shift_terminal needs num_inference_steps >= 2")
    dtype = check_float_dtype("dtype", dtype)

    if sigmas is not None:
        sigmas = _check_sigmas(sigmas, num_inference_steps)
    convert = _karras if use_karras_sigmas else _exponential if use_exponential_sigmas else _beta if use_beta_sigmas else None
    return _schedule(
        shift,
        shift - 1,  # in Python floats when shift is one, as diffusers forms it
        mu if use_dynamic_shifting else None,
        sigmas,
        num_inference_steps=num_inference_steps,
        num_train_timesteps=num_train_timesteps,
        time_shift_type=time_shift_type if use_dynamic_shifting else None,
        shift_terminal=shift_terminal or None,
        convert=convert,
        invert_sigmas=bool(invert_sigmas),
        dtype=dtype,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "num_inference_steps",
        "num_train_timesteps",
        "time_shift_type",
        "shift_terminal",
        "convert",
        "invert_sigmas",
        "dtype",
    ),
)
def _schedule(
    shift,
    shift_minus_one,
    mu,
    sigmas,
    *,
    num_inference_steps,
    num_train_timesteps,
    time_shift_type,
    shift_terminal,
    convert,
    invert_sigmas,
    dtype,
) -> FlowSchedule:
    """Steps 1–6 of the module docstring for validated arguments; ``time_shift_type`` is ``None`` for a static shift."""
    work = _default_float()
    if sigmas is None:
        # Ends of the float32 training grid k/T, k = T … 1, shifted there when shifting is static.
        ends = jnp.asarray([num_train_timesteps, 1], jnp.float32) / jnp.float32(num_train_timesteps)
        if time_shift_type is None:
            ends = _static_shift(ends, shift, shift_minus_one)
        ends = ends.astype(work) * num_train_timesteps
        sigma = _linspace(ends[0], ends[1], num_inference_steps) / num_train_timesteps
    else:
        sigma = sigmas

    if time_shift_type is None:
        sigma = _static_shift(sigma, shift, shift_minus_one)
    else:
        sigma = _time_shift(sigma, mu, time_shift_type)
    if shift_terminal is not None:
        sigma = _stretch_to_terminal(sigma, shift_terminal)
    if convert is not None:
        sigma = convert(sigma[-1].astype(work), sigma[0].astype(work), num_inference_steps)

    sigma = sigma.astype(dtype)
    terminal = 0
    if invert_sigmas:
        sigma, terminal = 1 - sigma, 1
    timesteps = sigma * jnp.asarray(num_train_timesteps, dtype)
    return FlowSchedule(jnp.append(sigma, jnp.asarray(terminal, dtype)), timesteps)


def flux_mu(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    """Flux/SD3's resolution-dependent ``μ``, linear in the latent sequence length.

    ``μ = base_shift + (image_seq_len − base_seq_len)·(max_shift − base_shift)/(max_seq_len − base_seq_len)``,
    evaluated as diffusers' ``calculate_shift`` does (``m·len + b``); works on Python numbers
    (returning a float) and on JAX arrays alike.  ``image_seq_len`` is a token count: a
    concrete value must be an integer ``>= 1`` (traced ones pass unchecked).  ``μ`` grows
    without bound with it; :func:`flow_match_euler_schedule` keeps the exponential time shift
    finite for any finite ``μ``.
    """
    image_seq_len = check_int_leaf("image_seq_len", image_seq_len, minimum=1)
    if max_seq_len == base_seq_len:
        raise ValueError("max_seq_len must differ from base_seq_len")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    intercept = base_shift - slope * base_seq_len
    return image_seq_len * slope + intercept


def flux_sigmas(num_inference_steps: int) -> np.ndarray:
    """The custom sigmas the Flux pipeline passes: ``linspace(1, 1/N, N)`` (float64 NumPy).

    They depend only on the static ``N``, so they are built on the host exactly as the
    pipeline builds them; :func:`flow_match_euler_schedule` rounds them to float32.
    """
    num_inference_steps = check_int("num_inference_steps", num_inference_steps, minimum=1)
    return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)


# ----------------------------------------------------------------------------- solver
def euler_step(x: Array, v: Array, sigma, sigma_next) -> Array:
    """``x + (σ_next − σ)·v`` with diffusers' precision: the sample is upcast to at least
    float32, the product ``(σ_next − σ)·v`` is formed in ``v``'s dtype, and the result is cast
    to ``v``'s dtype.
    """
    v, x = jnp.asarray(v), jnp.asarray(x)
    step = (jnp.asarray(sigma_next) - jnp.asarray(sigma)).astype(v.dtype)
    return (x.astype(jnp.promote_types(x.dtype, jnp.float32)) + step * v).astype(v.dtype)


@dataclasses.dataclass(frozen=True)
class FlowMatchEuler:
    """Euler on ``dx/dσ = v``: ``x_{i+1} = x_i + (σ_{i+1} − σ_i)·v_i`` (diffusers' flow-match Euler step).

    Stateless (``init`` returns ``()``) and without configuration: a pytree with no leaves.
    """

    def init(self, x: Array, schedule: FlowSchedule):
        return ()

    def step(self, state, schedule: FlowSchedule, i, x: Array, v: Array, field=None):
        return euler_step(x, v, schedule.sigmas[i], schedule.sigmas[i + 1]), state


jax.tree_util.register_pytree_node(FlowMatchEuler, lambda solver: ((), None), lambda _, children: FlowMatchEuler())


@dataclasses.dataclass(frozen=True)
class Heun:
    """Heun's method (the explicit trapezoid rule) on ``dx/dσ = v``, ``h = σ_{i+1} − σ_i``::

        x̂ = x_i + h·v_i,      x_{i+1} = x_i + h/2·(v_i + v(x̂, σ_{i+1}))

    The second prediction comes from the ``field`` callback of the sampling loop: guided with
    the same step index ``i`` (so zero-init zeroes whole steps) and the step's incoming
    guidance state.  The network is conditioned there on the timestep
    ``σ_{i+1}·num_train_timesteps``, as flow-matching schedulers define timesteps.  Every step
    has both stages, the last one too (its second stage evaluates the field at ``σ_N``).
    Stateless; ``num_train_timesteps`` is static.
    """

    num_train_timesteps: int = 1000

    def init(self, x: Array, schedule: FlowSchedule):
        return ()

    def step(self, state, schedule: FlowSchedule, i, x: Array, v: Array, field=None):
        if field is None:
            raise ValueError("Heun needs the field callback of the sampling loop (sample_flow passes it)")
        sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
        x_hat = euler_step(x, v, sigma, sigma_next)
        v_next = field(x_hat.astype(x.dtype), sigma_next, sigma_next * self.num_train_timesteps)
        return euler_step(x, 0.5 * (v + v_next.astype(v.dtype)), sigma, sigma_next), state


jax.tree_util.register_pytree_node(Heun, lambda solver: ((), solver.num_train_timesteps),
                                   lambda aux, children: Heun(aux))
