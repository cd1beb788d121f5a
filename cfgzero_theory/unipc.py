"""UniPC in the flow (σ) convention: a JAX port of diffusers' ``UniPCMultistepScheduler``.

Wan2.1 samples with diffusers' ``UniPCMultistepScheduler(prediction_type="flow_prediction",
use_flow_sigmas=True, flow_shift=F, num_train_timesteps=1000)`` and otherwise default settings
(``solver_order=2``, ``solver_type="bh2"``, ``predict_x0=True``, ``lower_order_final=True``,
``final_sigmas_type="zero"``, no thresholding).  This module reproduces that scheduler:

* :func:`unipc_flow_schedule` gives its ``sigmas``/``timesteps`` after ``set_timesteps(N)``;
* :class:`UniPC` is a :class:`~cfgzero_theory.schedules.FlowSolver` whose ``step`` does what
  one ``scheduler.step`` call does, with the multistep history in an explicit
  :class:`UniPCState`, so that a whole sampling loop is a single ``lax.scan``.

Notation.  Flow sigmas mean ``x_σ = α·x_data + σ·ε`` with ``α = 1 − σ``; the network returns
``v = ε − x_data``.  UniPC works on the data prediction ``x̂0 = x − σ·v`` and the half
log-SNR ``λ = log(α/σ) = log(1 − σ) − log σ``, which increases along sampling.  For a step
from ``s = σ_i`` to ``t = σ_{i+1}`` put ``h = λ_t − λ_s``, ``m_0 = x̂0`` at ``s`` and, for
the ``k``-th older output ``m_k`` (at ``σ_{i−k}``), ``r_k = (λ_{i−k} − λ_s)/h`` and
``D_k = (m_k − m_0)/r_k``.  With ``B(h) = −h`` ("bh1") or ``e^{−h} − 1`` ("bh2"):

* UniP-p (predictor)::

      x_t = (σ_t/σ_s)·x_s − α_t·(e^{−h} − 1)·m_0 − α_t·B(h)·Σ_{k=1}^{p−1} ρ_k·D_k

  whose first two terms (UniP-1) are exactly the Euler step ``x_s + (σ_t − σ_s)·v``;
* UniC-p (corrector), applied to the predicted ``x_t`` once the model output ``m_t`` at
  ``x_t`` is known, redoes the same step from ``x_s`` with one more difference,
  ``D_t = m_t − m_0`` (``r = 1``)::

      x_t^c = (σ_t/σ_s)·x_s − α_t·(e^{−h} − 1)·m_0 − α_t·B(h)·(Σ_{k=1}^{p−1} ρ^c_k·D_k + ρ^c_p·D_t)

The weights solve ``Σ_k ρ_k·r_k^{j−1} = j!·φ_{j+1}(−h)·(−h)/B(h)`` for ``j = 1…p`` (with
``φ_{j+1}(z) = (e^z − Σ_{n≤j} z^n/n!)/z^{j+1}``); the predictor uses the leading
``(p−1)×(p−1)`` block and the corrector the full ``p×p`` system over ``(r_1, …, r_{p−1}, 1)``.
Like diffusers, UniP-2 and UniC-1 skip the solve and use ``ρ = 1/2``.

Sequence of one step ``i`` (diffusers' ``step``): convert ``v`` to ``x̂0``; unless this is
the first step or ``i − 1`` is in ``disable_corrector``, correct the incoming sample with
UniC of the previous predictor's order; push ``x̂0`` into the history; pick the order
``p = min(order, N − i, steps_taken + 1)`` (the ``N − i`` term only with
``lower_order_final``; the code applies it whatever ``N`` is, although diffusers' docstring
speaks of fewer than 15 steps); predict with UniP-p.  With ``order=2`` the orders of a run
are ``1, 2, …, 2, 1``.  The step index is explicit, as in Wan's pipeline, which calls
``set_begin_index(0)`` (without it diffusers locates the first step by timestep and starts at
index 1 when the first two integer timesteps coincide, e.g. ``N ≥ 200`` at ``F = 5``).

Precision.  diffusers does not upcast: its sigmas are float32, so every scalar coefficient
(``λ``, ``h``, ``B(h)``, ``ρ``) is float32, and each product ``coefficient·tensor`` takes the
tensor's dtype (torch rounds a 0-dim coefficient to it; a 0-dim tensor never promotes an
n-dim one); results are cast back to the sample's dtype.  :class:`UniPC` does the same:
coefficients in the schedule's dtype, each product rounded to the dtype of the tensor it
scales (also under ``jit``), the history and the result in ``x``'s dtype.  Wan's pipeline
keeps float32 latents and feeds bfloat16 ``v``, so ``x̂0 = x − bf16(σ·v)`` is float32 in
both and agrees to float32 rounding.  With low-precision latents themselves XLA may fuse
the remaining tensor arithmetic at higher precision than torch's op-by-op rounding.

One deliberate difference: with ``solver_type="bh1"`` the final step to ``σ = 0`` has
``B(h) = −∞`` and diffusers multiplies it by the empty correction ``0`` of UniP-1, returning
NaN; here UniP-1 has no correction term, so that step returns ``x̂0`` (the bh2 value, and
the limit of the formula).  Without ``lower_order_final`` the final step to ``σ = 0`` has
``r_k = 0`` and diverges in diffusers (order 2: non-finite; order ≥ 3: a singular solve);
this port returns non-finite values there.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cfgzero_theory.schedules import FlowSchedule
from cfgzero_theory.validation import check_choice, check_int, check_real

Array = jax.Array

#: diffusers lowers a first sigma within this distance of 1 by this amount (log α must be finite).
_FIRST_SIGMA_EPS = 1e-6


def unipc_flow_schedule(num_inference_steps, *, flow_shift=1.0, num_train_timesteps=1000,
                        dtype=jnp.float32) -> FlowSchedule:
    """The sigmas and timesteps of diffusers' flow-mode UniPC after ``set_timesteps(N)``.

    ``σ_k = F·u_k/(1 + (F − 1)·u_k)`` for ``u = linspace(1, 1/T, N + 1)[:N]`` (``F`` the
    flow shift, ``T = num_train_timesteps``); a first sigma within ``1e-6`` of 1 is lowered
    by ``1e-6``; ``timesteps = int(σ·T)`` (truncation); ``sigmas`` is ``σ`` followed by a
    terminal 0 (``final_sigmas_type="zero"``).

    diffusers computes this in float64 and rounds ``sigmas`` to float32; the truncation to
    integer timesteps is sensitive to that (``0.334·1000`` is ``333.99…`` in float64).  A
    concrete ``flow_shift`` is therefore evaluated in NumPy float64, which reproduces diffusers
    bit for bit.  A traced ``flow_shift`` (under ``jit``/``grad``) is evaluated by the same
    formula in ``jax.numpy`` at the widest enabled float: exact with ``jax_enable_x64``,
    otherwise float32, where sigmas can be a few ulp off and a timestep one off.

    Args:
        num_inference_steps: ``N ≥ 1``, a Python int (it sets the array shapes).
        flow_shift: ``F > 0``; a number or a (possibly traced) scalar array.
        num_train_timesteps: ``T ≥ 2``, a Python int.
        dtype: floating dtype of ``sigmas`` (diffusers: float32).  ``timesteps`` are int64
            as in diffusers, or int32 when x64 is disabled.

    Returns:
        ``FlowSchedule(sigmas (N + 1,), timesteps (N,))``.
    """
    num_inference_steps = check_int("num_inference_steps", num_inference_steps, minimum=1)
    num_train_timesteps = check_int("num_train_timesteps", num_train_timesteps, minimum=2)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype!r}")
    if isinstance(flow_shift, jax.core.Tracer):
        xp = jnp
        shift = flow_shift.astype(jax.dtypes.canonicalize_dtype(jnp.float64))
    else:
        xp = np
        if np.ndim(flow_shift) != 0:
            raise ValueError(f"flow_shift must be a scalar, got shape {np.shape(flow_shift)}")
        shift = check_real("flow_shift", flow_shift, positive=True)

    u = xp.asarray(np.linspace(1.0, 1.0 / num_train_timesteps, num_inference_steps + 1)[:-1])
    sigma = shift * u / (1 + (shift - 1) * u)
    first = xp.where(xp.abs(sigma[0] - 1) < _FIRST_SIGMA_EPS, sigma[0] - _FIRST_SIGMA_EPS, sigma[0])
    sigma = xp.concatenate([first[None], sigma[1:]])
    timesteps = (sigma * num_train_timesteps).astype(jax.dtypes.canonicalize_dtype(jnp.int64))
    sigmas = xp.concatenate([sigma, xp.zeros(1, sigma.dtype)]).astype(dtype)
    return FlowSchedule(sigmas=jnp.asarray(sigmas), timesteps=jnp.asarray(timesteps))


class UniPCState(NamedTuple):
    """The multistep history of :class:`UniPC` (diffusers' scheduler attributes in brackets).

    Attributes:
        model_outputs: ``(order, *x.shape)`` in ``x``'s dtype, the last ``order`` data
            predictions ``x̂0``, oldest first (``model_outputs``); zeros before they exist.
        last_sample: ``x.shape``, the sample the previous predictor started from, after
            its own correction (``last_sample``); the corrector redoes that step.
        last_order: int32 ``()``, the order of the previous predictor, 0 before the first
            step (``this_order``; 0 plays ``last_sample is None``).
        lower_order_nums: int32 ``()``, steps taken so far, capped at ``order``
            (``lower_order_nums``); the warm-up limits the order to ``lower_order_nums + 1``.
    """

    model_outputs: Array
    last_sample: Array
    last_order: Array
    lower_order_nums: Array


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class UniPC:
    """Multistep UniPC (data prediction) in diffusers' flow mode; a ``FlowSolver``.

    The formulas are in the module docstring.  The configuration is static pytree aux data,
    so ``jit`` specialises on it; the step index ``i`` may be traced.

    Args:
        order: ``solver_order``, an int ≥ 1 (Wan: 2).  Orders 1–3 are parity-tested.
        solver_type: ``"bh2"`` (``B(h) = e^{−h} − 1``, Wan) or ``"bh1"`` (``B(h) = −h``).
        lower_order_final: cap the order at ``N − i`` on the last steps.
        disable_corrector: step indices ``j`` such that the correction made at the start
            of step ``j + 1`` (of the sample produced by step ``j``) is skipped — diffusers'
            indexing.
    """

    order: int = 2
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "order", check_int("order", self.order, minimum=1))
        check_choice("solver_type", self.solver_type, ("bh1", "bh2"))
        if not isinstance(self.lower_order_final, bool):
            raise ValueError(f"lower_order_final must be a bool, got {self.lower_order_final!r}")
        try:
            disabled = tuple(check_int("disable_corrector", j, minimum=0) for j in self.disable_corrector)
        except TypeError:
            raise ValueError(
                f"disable_corrector must be a sequence of step indices, got {self.disable_corrector!r}"
            ) from None
        object.__setattr__(self, "disable_corrector", disabled)

    def tree_flatten(self):
        return (), (self.order, self.solver_type, self.lower_order_final, self.disable_corrector)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*aux)

    def init(self, x: Array, schedule: FlowSchedule) -> UniPCState:
        """The state before step 0: empty history, no corrector pending."""
        if schedule.sigmas.shape != (schedule.num_steps + 1,):
            raise ValueError(
                f"schedule must hold N + 1 sigmas for N timesteps, got sigmas {schedule.sigmas.shape} "
                f"and timesteps {schedule.timesteps.shape}"
            )
        x = jnp.asarray(x)
        return UniPCState(
            model_outputs=jnp.zeros((self.order, *x.shape), x.dtype),
            last_sample=jnp.zeros_like(x),
            last_order=jnp.zeros((), jnp.int32),
            lower_order_nums=jnp.zeros((), jnp.int32),
        )

    def step(self, state: UniPCState, schedule: FlowSchedule, i, x: Array, v: Array, field=None):
        """One ``scheduler.step``: correct ``x`` (UniC), then predict ``x`` at ``σ_{i+1}`` (UniP).

        The orders are traced values, so nothing branches on ``i``: the corrector is
        always evaluated and kept only when due (``jnp.where``), and the weights ``ρ`` of
        every order are formed and the current one picked by index.

        Args:
            state: from :meth:`init` or the previous ``step``.
            schedule: the sampling schedule (``schedule.sigmas[i]`` is ``x``'s sigma).
            i: the step index, an int or traced int scalar.
            x: the latents at ``σ_i`` as returned by the previous step (uncorrected).
            v: the (guided) flow prediction at ``(x, σ_i)``.
            field: unused (UniPC takes one prediction per step).

        Returns:
            ``(x_next, state')``, ``x_next`` at ``σ_{i+1}`` in ``x``'s dtype.
        """
        i = jnp.asarray(i, jnp.int32)
        sigmas = schedule.sigmas
        history = state.model_outputs
        x0 = (x - _scaled(sigmas[i], v)).astype(history.dtype)

        disabled = jnp.any(i - 1 == jnp.asarray(self.disable_corrector, jnp.int32))
        corrected = self._update(
            state.last_sample, history, sigmas, jnp.maximum(i - 1, 0),
            jnp.maximum(state.last_order, 1), x0,
        )
        x = jnp.where((state.last_order > 0) & ~disabled, corrected.astype(x.dtype), x)

        history = jnp.concatenate([history[1:], x0[None]])
        order = self.order
        if self.lower_order_final:
            order = jnp.minimum(order, schedule.num_steps - i)
        order = jnp.minimum(order, state.lower_order_nums + 1)
        x_next = self._update(x, history, sigmas, i, order).astype(x.dtype)

        state = UniPCState(
            model_outputs=history,
            last_sample=x,
            last_order=order.astype(jnp.int32),
            lower_order_nums=jnp.minimum(state.lower_order_nums + 1, self.order),
        )
        return x_next, state

    def _update(self, x, history, sigmas, s, p, x0_t=None):
        """UniP-``p`` from ``σ_s`` to ``σ_{s+1}``, or UniC-``p`` of that step if ``x0_t`` is given.

        ``x`` is the sample at ``σ_s``; ``history[-1]`` is ``m_0`` (at ``σ_s``) and
        ``history[-1-k]`` is ``m_k`` (at ``σ_{s−k}``); ``x0_t`` is ``m_t``, the model's
        ``x̂0`` at the predicted sample.  ``p`` (traced, ``1 ≤ p ≤ order``) selects the
        weights; the differences ``D_k`` with ``k ≥ p`` get weight 0.  Their ``r_k`` are
        replaced by ``k + 1``: real ``r_k`` are negative (``λ`` increases), so the systems
        of the unused orders stay regular and their ``D_k`` finite.
        """
        sigma_s, sigma_t = sigmas[s], sigmas[s + 1]
        lam_s = _lambda(sigma_s)
        h = _lambda(sigma_t) - lam_s
        m0 = history[-1]
        rks, diffs = [], []
        for k in range(1, self.order):
            lam_k = _lambda(sigmas[jnp.maximum(s - k, 0)])
            r = jnp.where(k < p, (lam_k - lam_s) / h, k + 1)
            rks.append(r)
            diffs.append((history[-1 - k] - m0) / r.astype(m0.dtype))

        hh = -h
        h_phi_1 = jnp.expm1(hh)
        b_h = hh if self.solver_type == "bh1" else jnp.expm1(hh)
        rhs, h_phi_j, factorial = [], h_phi_1 / hh - 1, 1  # h_phi_j = hh·φ_{j+1}(hh)
        for j in range(1, self.order + 1):
            rhs.append(h_phi_j * factorial / b_h)
            factorial *= j + 1
            h_phi_j = h_phi_j / hh - 1 / factorial
        alpha_t = 1 - sigma_t
        x_t = _scaled(sigma_t / sigma_s, x) - _scaled(alpha_t * h_phi_1, m0)
        corrector = x0_t is not None
        if not corrector and self.order == 1:
            return x_t
        rhos = jnp.stack([
            self._weights(q, rks, jnp.stack(rhs[:q]), corrector) for q in range(1, self.order + 1)
        ])[p - 1]
        if corrector:
            return x_t - _scaled(alpha_t * b_h, _combine(rhos, [*diffs, x0_t - m0]))
        return jnp.where(p > 1, x_t - _scaled(alpha_t * b_h, _combine(rhos, diffs)), x_t)

    def _weights(self, q, rks, rhs, corrector):
        """The order-``q`` weights, zero-padded: ``ρ_1…ρ_{order−1}`` (then ``ρ_t`` for UniC).

        They solve ``Σ_k ρ_k·r_k^{j−1} = rhs_j`` over the nodes ``(r_1, …, r_{q−1}, 1)``,
        ``j = 1…q`` (UniC), or its leading ``(q−1)×(q−1)`` block (UniP); diffusers fixes
        ``ρ = 1/2`` for UniP-2 and UniC-1 instead of solving.
        """
        dtype = rhs.dtype
        nodes = jnp.stack([*rks[: q - 1], jnp.ones((), dtype)])
        powers = jnp.stack([nodes ** (j - 1) for j in range(1, q + 1)])
        half = jnp.full((1,), 0.5, dtype)
        if corrector:
            solved = half if q == 1 else jnp.linalg.solve(powers, rhs)
            weights, last = solved[:-1], solved[-1:]
        else:
            if q == 1:
                weights = jnp.zeros((0,), dtype)
            else:
                weights = half if q == 2 else jnp.linalg.solve(powers[:-1, :-1], rhs[:-1])
            last = jnp.zeros((0,), dtype)
        return jnp.concatenate([weights, jnp.zeros((self.order - q,), dtype), last])


def _lambda(sigma):
    """``λ = log α − log σ`` for flow sigmas (``α = 1 − σ``); ``+∞`` at ``σ = 0``."""
    return jnp.log(1 - sigma) - jnp.log(sigma)


def _scaled(coefficient, tensor):
    """``coefficient·tensor`` in the tensor's dtype, as torch does with a 0-dim coefficient.

    The product is rounded to that dtype explicitly: under ``jit`` XLA may otherwise keep a
    bfloat16/float16 product at float32 precision (``xla_allow_excess_precision``).
    """
    info = jnp.finfo(tensor.dtype)
    product = jnp.asarray(coefficient).astype(tensor.dtype) * tensor
    return lax.reduce_precision(product, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def _combine(rhos, diffs):
    """``Σ_k ρ_k·D_k`` (the ``einsum`` of diffusers), in the dtype of the ``D_k``."""
    total = _scaled(rhos[0], diffs[0])
    for rho, diff in zip(rhos[1:], diffs[1:]):
        total = total + _scaled(rho, diff)
    return total
