"""The rest of the guidance family: original-formulation CFG, step intervals, guidance
rescale, APG, TCFG and Lumina's channel subset / renormalisation / truncation.

Every rule follows :mod:`cfgzero_theory.guidance`: axis 0 is the batch, every other axis
belongs to one sample; rule numbers (scales, momenta, ...) are pytree leaves, structural
options (step bounds, channel counts, axes, formulation flags) are static aux data; ``step``
may be a traced integer.  Wrappers (:class:`GuidanceInterval`, :class:`GuidanceRescale`,
:class:`ChannelSubset`, :class:`Renormalize`, :class:`CFGTruncation`) take any rule,
stateful or not, and forward its state.  :class:`APG` is stateful (its momentum buffer):
drive it with :func:`~cfgzero_theory.guidance.init_rule_state` and
:func:`~cfgzero_theory.guidance.apply_rule`, e.g. inside ``jax.lax.scan``.

Spaces.  CFG in either formulation is an affine combination of the two predictions
(coefficients summing to 1), so it commutes with the affine maps between the velocity,
x̂0 and ε parametrisations at fixed ``x_t``: it is parametrisation-invariant.  The other
rules are not: each acts on the prediction it is given, which in diffusers (and in our
samplers) is the raw model output, the velocity for a flow model.  Every rule here is odd
in its inputs (negating both predictions, and for APG starting from a zero momentum
buffer, negates the output), so the theory convention ``u_t`` and diffusers' σ convention
``v_σ = −u_t`` give the same guided field up to that sign.

Equivalences with diffusers (fp32 to 1e-5 relative; see tests/test_guidance_family.py):

* ``ClassifierFreeGuidance(w, use_original_formulation=True)`` = :class:`CFGOriginal` ``(w)``
* ``ClassifierFreeGuidance(w, start=a, stop=b)`` = ``GuidanceInterval(CFG(w), a, b, N)``
* ``ClassifierFreeGuidance(w, guidance_rescale=r)`` = ``GuidanceRescale(CFG(w), r)``
* ``AdaptiveProjectedGuidance(w, m, thr, eta=η, start=a, stop=b)`` =
  ``GuidanceInterval(APG(w, m, thr, η), a, b, N)`` (momentum frozen outside the interval)
* ``TangentialClassifierFreeGuidance(w)`` = :class:`TangentialCFG` ``(w)``
* Lumina-Next pipeline = :func:`lumina_next_cfg`; Lumina2 pipeline = :func:`lumina2_cfg`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .guidance import (CFG, GuidanceRule, apply_rule, describe, guidance_rule, init_rule_state, rule_family,
                       rule_kind, static_field, without_zero_init, zero_init_steps)
from .validation import check_fraction, check_int, check_leaf, check_real

Array = jax.Array

__all__ = [
    "CFGOriginal",
    "GuidanceInterval",
    "GuidanceRescale",
    "APG",
    "TangentialCFG",
    "ChannelSubset",
    "Renormalize",
    "CFGTruncation",
    "cfg_original",
    "guidance_rescale",
    "tangential_cfg",
    "lumina_next_cfg",
    "lumina2_cfg",
]


def _sample_axes(v) -> tuple:
    return tuple(range(1, jnp.ndim(v)))


def _isclose(x, target: float):
    """``math.isclose(x, target)`` (rel_tol 1e-9, abs_tol 0) for a possibly traced ``x``."""
    x = jnp.asarray(x)
    return jnp.abs(x - target) <= 1e-9 * jnp.maximum(jnp.abs(x), abs(target))


def _gate(enabled, v_guided, v_cond, new_state, old_state):
    """``v_guided`` and ``new_state`` where ``enabled``, else ``v_cond`` and the old state."""
    out = jnp.where(enabled, v_guided, v_cond)
    state = jax.tree_util.tree_map(lambda new, old: jnp.where(enabled, new, old), new_state, old_state)
    return out, state


class _Stateful:
    """Calling a stateful rule directly runs one step from its initial state.

    Rules outside the CFG-Zero* kinds describe themselves as family ``other`` without
    zero-init; :class:`_Wrapper` passes its inner rule's description through instead.
    """

    def __call__(self, v_cond, v_uncond, step=0):
        return self.apply(self.init_state(jnp.asarray(v_cond)), v_cond, v_uncond, step)[0]


class _Wrapper(_Stateful):
    """A rule around ``self.rule``: its state, kind, family and zero-init are the inner rule's."""

    def init_state(self, v_like):
        return init_rule_state(self.rule, v_like)

    @property
    def kind(self) -> str:
        return rule_kind(self.rule)

    @property
    def family(self) -> str:
        return rule_family(self.rule)

    @property
    def zero_init_steps(self):
        return zero_init_steps(self.rule)

    def without_zero_init(self):
        """The same wrapper around the inner rule without its zero-init."""
        return dataclasses.replace(self, rule=without_zero_init(self.rule))


# ----------------------------------------------------------------------------- CFG, original form
def cfg_original(v_cond: Array, v_uncond: Array, scale) -> Array:
    """CFG in the original (Ho & Salimans) form ``v_c + w·(v_c − v_u)``."""
    return v_cond + scale * (v_cond - v_uncond)


@guidance_rule
class CFGOriginal:
    """Classifier-free guidance in its original formulation: ``ṽ = v_c + w·(v_c − v_u)``.

    Scale semantics differ from :class:`~cfgzero_theory.guidance.CFG`: here ``w = 0`` is
    conditional only and ``CFGOriginal(w) == CFG(1 + w)``.  Equals diffusers'
    ``ClassifierFreeGuidance(guidance_scale=w, use_original_formulation=True)`` (which
    returns ``v_c`` exactly at ``w = 0``; the formula gives it exactly too).

    Space: any (an affine combination, parametrisation-invariant).  Odd: yes.
    """

    scale: float

    def __post_init__(self):
        object.__setattr__(self, "scale", check_leaf("scale", self.scale, lambda x: True, "a finite number"))

    def __call__(self, v_cond, v_uncond, step=0):
        return cfg_original(v_cond, v_uncond, self.scale)

    def describe(self):
        return f"CFG original (w={float(self.scale):g})"


# ----------------------------------------------------------------------------- step interval
@guidance_rule
class GuidanceInterval(_Wrapper):
    """``rule`` on solver steps ``int(start·N) <= i < int(stop·N)``, ``v_c`` elsewhere.

    ``ṽ_i = rule(v_c, v_u, i)`` inside the interval, ``ṽ_i = v_c`` outside: diffusers'
    ``start``/``stop`` of its guiders (``_is_cfg_enabled``), with ``N = num_steps``.  The
    bounds are computed once in Python floats, so ``int(0.29·100) = 28`` exactly as diffusers
    gets it; ``start``, ``stop`` and ``num_steps`` are therefore static (changing them
    retraces).  A stateful inner rule's state is frozen outside the interval, as diffusers'
    APG leaves its momentum buffer untouched on disabled steps.

    Diffusers also returns ``v_c`` when the scale "is close to" the identity (1, or 0 in
    the original formulation); for CFG/TCFG the formula gives ``v_c`` there up to rounding,
    and :class:`APG` does the check itself, so nothing is added here.

    Space: that of ``rule``.  Odd: if ``rule`` is.
    """

    rule: GuidanceRule
    start: float = static_field()
    stop: float = static_field()
    num_steps: int = static_field()

    def __post_init__(self):
        n = check_int("num_steps", self.num_steps, minimum=1)
        start = check_fraction("start", self.start)
        stop = check_fraction("stop", self.stop)
        if start > stop:
            raise ValueError(f"start must not exceed stop; got start={start!r} > stop={stop!r}")
        object.__setattr__(self, "num_steps", n)
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "stop", stop)

    @property
    def bounds(self) -> tuple[int, int]:
        """``(first, end)``: the guided steps are ``first <= i < end``."""
        return int(self.start * self.num_steps), int(self.stop * self.num_steps)

    def apply(self, state, v_cond, v_uncond, step=0):
        first, end = self.bounds
        step = jnp.asarray(step)
        v, new_state = apply_rule(self.rule, state, v_cond, v_uncond, step)
        return _gate((first <= step) & (step < end), v, jnp.asarray(v_cond), new_state, state)

    def describe(self):
        return f"{describe(self.rule)} on [{self.start:g}, {self.stop:g})×{self.num_steps}"


# ----------------------------------------------------------------------------- guidance rescale
def guidance_rescale(v_guided: Array, v_cond: Array, rescale) -> Array:
    """Lin et al.'s rescale: ``φ·ṽ·σ(v_c)/σ(ṽ) + (1 − φ)·ṽ``, σ the per-sample std.

    σ is the unbiased (ddof=1) standard deviation over every non-batch axis, as torch's
    ``Tensor.std``.  Where ``σ(ṽ) = 0`` (diffusers divides by zero) the factor is 1.
    """
    v_guided, v_cond = jnp.asarray(v_guided), jnp.asarray(v_cond)
    axes = _sample_axes(v_guided)
    std_cond = jnp.std(v_cond, axis=axes, ddof=1, keepdims=True)
    std_guided = jnp.std(v_guided, axis=axes, ddof=1, keepdims=True)
    positive = std_guided > 0
    factor = jnp.where(positive, std_cond / jnp.where(positive, std_guided, 1), 1)
    return rescale * (v_guided * factor) + (1 - rescale) * v_guided


@guidance_rule
class GuidanceRescale(_Wrapper):
    """``rule`` followed by guidance rescale (Lin et al. 2023, §3.4) with factor ``φ = rescale``.

    ``ṽ' = φ·ṽ·σ(v_c)/σ(ṽ) + (1 − φ)·ṽ`` with ``ṽ = rule(v_c, v_u)`` and σ the per-sample
    standard deviation over all non-batch axes (ddof=1).  ``GuidanceRescale(CFG(w), φ)``
    equals diffusers' ``ClassifierFreeGuidance(w, guidance_rescale=φ)``; diffusers rescales
    after its start/stop gate, i.e. ``GuidanceRescale(GuidanceInterval(...), φ)`` (outside
    the interval it rescales ``v_c`` by ``σ(v_c)/σ(v_c) = 1``).

    Space: the prediction it is given (designed for ε; diffusers applies it to the model
    output, the velocity for flow models); not parametrisation-invariant.  Odd: if ``rule``
    is (σ is even).

    Meant for images, where σ is taken over thousands of numbers.  In very low dimension
    (2-D points: σ of two numbers) σ(ṽ) can come arbitrarily close to 0 and the factor
    explode: on the 2-D toys it sends samples far off (notebook 04).
    """

    rule: GuidanceRule
    rescale: float = 0.7

    def __post_init__(self):
        object.__setattr__(self, "rescale", check_leaf("rescale", self.rescale, lambda x: 0.0 <= x <= 1.0,
                                                       "a number in [0, 1]"))

    def apply(self, state, v_cond, v_uncond, step=0):
        v, state = apply_rule(self.rule, state, v_cond, v_uncond, step)
        return guidance_rescale(v, v_cond, self.rescale), state

    def describe(self):
        return f"{describe(self.rule)} + rescale {float(self.rescale):g}"


# ----------------------------------------------------------------------------- APG
def _apg_update(diff: Array, v_cond: Array, eta, norm_threshold) -> Array:
    """Clip ``diff`` to norm ``norm_threshold`` (if > 0), then ``d⊥ + η·d∥`` w.r.t. ``v_c``."""
    axes = _sample_axes(diff)
    dtype = diff.dtype
    norm = jnp.sqrt(jnp.sum(jnp.square(diff), axis=axes, keepdims=True))
    factor = jnp.where(norm_threshold > 0, jnp.minimum(1, norm_threshold / norm), 1)
    diff = diff * factor.astype(dtype)
    compute = jnp.promote_types(dtype, jnp.float32)
    d, c = diff.astype(compute), v_cond.astype(compute)
    c = c / jnp.maximum(jnp.sqrt(jnp.sum(c * c, axis=axes, keepdims=True)), 1e-12)
    parallel = jnp.sum(d * c, axis=axes, keepdims=True) * c
    orthogonal = d - parallel
    return orthogonal.astype(dtype) + eta * parallel.astype(dtype)


@guidance_rule
class APG(_Stateful):
    """Adaptive projected guidance (Sadat et al. 2024) as diffusers' ``AdaptiveProjectedGuidance``.

    With ``Δ_i = v_c − v_u`` and momentum buffer ``b`` (the guidance state, zero at start)::

        b ← Δ_i + m·b                                   (momentum; m = 0: b = Δ_i)
        d = b · min(1, r / ‖b‖)     if r > 0 else b     (norm threshold r)
        d∥ = ⟨d, ĉ⟩ ĉ,  d⊥ = d − d∥,  ĉ = v_c / ‖v_c‖     (projection on the conditional)
        ṽ = v_u + w·(d⊥ + η·d∥)    (use_original_formulation: ṽ = v_c + w·(d⊥ + η·d∥))

    norms and inner products over all non-batch axes.  As in diffusers, when ``w`` is close
    to 1 (to 0 with the original formulation; ``math.isclose``) the rule returns ``v_c`` and
    leaves ``b`` untouched; this is more than rounding (APG at ``w = 1`` is not ``v_c``).
    ``APG(w, 0, 0, 1)`` is plain CFG.  Defaults are diffusers' (no momentum, r = 15, η = 1).

    Space: the prediction it is given.  Diffusers applies it to the raw model output (the
    velocity for flow models, ε for ε-models); the APG paper applies it to the denoised
    estimate x̂0.  The norm threshold and the projection are not parametrisation-invariant,
    so for the paper's version convert both branches to x̂0 first.  Odd: yes (with a zero
    initial buffer, negating all inputs negates every output and buffer).

    Calling the rule directly (``rule(v_c, v_u, step)``) runs one step from an empty buffer:
    exact only when ``momentum = 0``; samplers use ``init_state``/``apply``.
    ``momentum``, ``norm_threshold``, ``eta`` and ``scale`` are leaves;
    ``use_original_formulation`` is static.
    """

    scale: float
    momentum: float = 0.0
    norm_threshold: float = 15.0
    eta: float = 1.0
    use_original_formulation: bool = static_field(False)

    def __post_init__(self):
        for name in ("scale", "momentum", "eta"):
            object.__setattr__(self, name, check_leaf(name, getattr(self, name), lambda x: True, "a finite number"))
        object.__setattr__(self, "norm_threshold", check_leaf("norm_threshold", self.norm_threshold,
                                                              lambda x: x >= 0, "a number >= 0"))
        if not isinstance(self.use_original_formulation, (bool, np.bool_)):
            raise ValueError(f"use_original_formulation must be a bool; got {self.use_original_formulation!r}")
        object.__setattr__(self, "use_original_formulation", bool(self.use_original_formulation))

    def init_state(self, v_like):
        """The momentum buffer, zeros shaped and typed like the predictions."""
        return jnp.zeros_like(jnp.asarray(v_like))

    def apply(self, state, v_cond, v_uncond, step=0):
        v_cond, v_uncond = jnp.asarray(v_cond), jnp.asarray(v_uncond)
        dtype = jnp.result_type(v_cond, v_uncond)
        v_cond, v_uncond = v_cond.astype(dtype), v_uncond.astype(dtype)
        buffer = ((v_cond - v_uncond) + self.momentum * state).astype(state.dtype)
        update = _apg_update(buffer.astype(dtype), v_cond, self.eta, self.norm_threshold)
        base = v_cond if self.use_original_formulation else v_uncond
        guided = base + self.scale * update
        enabled = ~_isclose(self.scale, 0.0 if self.use_original_formulation else 1.0)
        return _gate(enabled, guided, v_cond, buffer, state)

    def describe(self):
        form = ", original" if self.use_original_formulation else ""
        return (
            f"APG (w={float(self.scale):g}, m={float(self.momentum):g}, "
            f"r={float(self.norm_threshold):g}, η={float(self.eta):g}{form})"
        )


# ----------------------------------------------------------------------------- TCFG
def tangential_cfg(v_cond: Array, v_uncond: Array, scale, use_original_formulation: bool = False) -> Array:
    """TCFG: ``v_u`` projected on the top right-singular vector of ``[v_c; v_u]``, then CFG."""
    v_cond, v_uncond = jnp.asarray(v_cond), jnp.asarray(v_uncond)
    dtype = jnp.result_type(v_cond, v_uncond)
    compute = jnp.promote_types(dtype, jnp.float32)
    batch = v_cond.shape[0]
    u = v_uncond.reshape(batch, -1).astype(compute)
    stacked = jnp.stack([v_cond.reshape(batch, -1).astype(compute), u], axis=1)  # (B, 2, D)
    top = jnp.linalg.svd(stacked, full_matrices=False)[2][:, 0]  # (B, D), unit norm
    u_proj = (jnp.sum(u * top, axis=1, keepdims=True) * top).reshape(v_uncond.shape).astype(dtype)
    base = v_cond if use_original_formulation else u_proj
    return base + scale * (v_cond - u_proj)


@guidance_rule
class TangentialCFG:
    """Tangential CFG (arXiv:2503.18137) as diffusers' ``TangentialClassifierFreeGuidance``.

    Per sample, stack the flattened predictions as a 2×D matrix ``M = [v_c; v_u]``, take its
    top right-singular vector ``e₁`` and keep only the unconditional's component along it::

        ũ = ⟨v_u, e₁⟩ e₁,    ṽ = ũ + w·(v_c − ũ)    (original formulation: v_c + w·(v_c − ũ))

    (the SVD in at least float32, as diffusers).  ``w = 1`` (``w = 0`` original) gives ``v_c``
    up to rounding, which is what diffusers returns there.

    Space: the prediction it is given (diffusers: the raw model output, the velocity for
    flow models); the SVD is not equivariant under the affine maps between
    parametrisations, so not parametrisation-invariant.  Odd: yes (the projection does not
    depend on the sign of ``e₁``).  ``use_original_formulation`` is static.
    """

    scale: float
    use_original_formulation: bool = static_field(False)

    def __post_init__(self):
        object.__setattr__(self, "scale", check_leaf("scale", self.scale, lambda x: True, "a finite number"))
        if not isinstance(self.use_original_formulation, (bool, np.bool_)):
            raise ValueError(f"use_original_formulation must be a bool; got {self.use_original_formulation!r}")
        object.__setattr__(self, "use_original_formulation", bool(self.use_original_formulation))

    def __call__(self, v_cond, v_uncond, step=0):
        return tangential_cfg(v_cond, v_uncond, self.scale, self.use_original_formulation)

    def describe(self):
        form = ", original" if self.use_original_formulation else ""
        return f"TCFG (w={float(self.scale):g}{form})"


# ----------------------------------------------------------------------------- Lumina
@guidance_rule
class ChannelSubset(_Wrapper):
    """``rule`` on the first ``channels`` channels (axis 1); the rest is taken from ``v_c``.

    ``ṽ[:, :k] = rule(v_c[:, :k], v_u[:, :k])``, ``ṽ[:, k:] = v_c[:, k:]``: the Lumina-Next
    pipeline's guidance (``k = 3`` of its 4 latent channels).  The inner rule only sees the
    subset (an optimized scale, APG's norms, ... are computed over those channels);
    ``channels=None`` applies ``rule`` to all channels.  ``channels`` is static.

    Space: that of ``rule`` (Lumina-Next: velocity).  Odd: if ``rule`` is.
    """

    rule: GuidanceRule
    channels: int | None = static_field(3)

    def __post_init__(self):
        if self.channels is not None:
            object.__setattr__(self, "channels", check_int("channels", self.channels, minimum=1))

    def init_state(self, v_like):
        v_like = jnp.asarray(v_like)
        return init_rule_state(self.rule, v_like if self.channels is None else v_like[:, : self.channels])

    def apply(self, state, v_cond, v_uncond, step=0):
        v_cond, v_uncond = jnp.asarray(v_cond), jnp.asarray(v_uncond)
        if self.channels is None:
            return apply_rule(self.rule, state, v_cond, v_uncond, step)
        if v_cond.ndim < 2:
            raise ValueError(f"ChannelSubset needs predictions with a channel axis 1; got shape {v_cond.shape}")
        k = self.channels
        v, state = apply_rule(self.rule, state, v_cond[:, :k], v_uncond[:, :k], step)
        return jnp.concatenate([v.astype(v_cond.dtype), v_cond[:, k:]], axis=1), state

    def describe(self):
        where = "all channels" if self.channels is None else f"channels :{self.channels}"
        return f"{describe(self.rule)} on {where}"


@guidance_rule
class Renormalize(_Wrapper):
    """Lumina2's ``cfg_normalization``: rescale ``ṽ = rule(v_c, v_u)`` to the conditional's norm.

    ``ṽ' = ṽ · ‖v_c‖ / ‖ṽ‖`` with the norms over ``axis``, default ``-1`` as diffusers'
    Lumina2 pipeline (``torch.norm(…, dim=-1)``: the *last* axis, the image width for
    ``(B, C, H, W)`` latents, one factor per row, not the channel axis).  It is a plain
    rescale (the norm becomes equal to the conditional's, growing if it was smaller);
    ``clamp=True`` only shrinks (``min(1, ‖v_c‖/‖ṽ‖)``, "never exceed the conditional
    norm").  ``axis`` may be an int, a tuple, or ``None`` (all non-batch axes); ``axis`` and
    ``clamp`` are static.  Where ``‖ṽ‖ = 0`` (diffusers divides by zero) the factor is 1.

    Space: the prediction it is given (Lumina2: velocity); not parametrisation-invariant.
    Odd: if ``rule`` is (norms are even).
    """

    rule: GuidanceRule
    axis: int | tuple | None = static_field(-1)
    clamp: bool = static_field(False)

    def __post_init__(self):
        axis = self.axis
        if isinstance(axis, (tuple, list)):
            axis = tuple(check_int("axis", a) for a in axis)
        elif axis is not None:
            axis = check_int("axis", axis)
        if not isinstance(self.clamp, (bool, np.bool_)):
            raise ValueError(f"clamp must be a bool; got {self.clamp!r}")
        object.__setattr__(self, "axis", axis)
        object.__setattr__(self, "clamp", bool(self.clamp))

    def _axes(self, ndim):
        if self.axis is None:
            return tuple(range(1, ndim))
        axes = (self.axis,) if isinstance(self.axis, int) else self.axis
        axes = tuple(a % ndim if -ndim <= a < ndim else a for a in axes)
        if any(a == 0 or not 0 < a < ndim for a in axes):
            raise ValueError(f"axis {self.axis!r} must name non-batch axes of a {ndim}-d prediction")
        return axes

    def apply(self, state, v_cond, v_uncond, step=0):
        v, state = apply_rule(self.rule, state, v_cond, v_uncond, step)
        v_cond = jnp.asarray(v_cond)
        axes = self._axes(v.ndim)
        norm_cond = jnp.sqrt(jnp.sum(jnp.square(v_cond), axis=axes, keepdims=True))
        norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))
        positive = norm > 0
        factor = jnp.where(positive, norm_cond / jnp.where(positive, norm, 1), 1)
        if self.clamp:
            factor = jnp.minimum(factor, 1)
        return v * factor, state

    def describe(self):
        kind = "clamp" if self.clamp else "renorm"
        return f"{describe(self.rule)} + {kind} (axis={self.axis})"


@guidance_rule
class CFGTruncation(_Wrapper):
    """Lumina2's ``cfg_trunc_ratio``: ``rule`` on steps with ``(i + 1)/N <= ratio``, ``v_c`` after.

    Diffusers' Lumina2 pipeline skips guidance (and its renormalisation) when
    ``(i + 1) / num_inference_steps > cfg_trunc_ratio``; this "normalised time" is the step
    count, not the scheduler's timestep.  The guided steps are a prefix ``i < K``; ``K`` is
    counted in Python floats with exactly that comparison, so this equals
    ``GuidanceInterval(rule, 0, ratio, N)`` except where float rounding differs
    (``ratio = 0.29, N = 100``: ``K = 29`` here, ``int(0.29·100) = 28`` there).  ``ratio``
    and ``num_steps`` are static; a stateful inner rule is frozen after the cut.

    Space: that of ``rule``.  Odd: if ``rule`` is.
    """

    rule: GuidanceRule
    ratio: float = static_field()
    num_steps: int = static_field()

    def __post_init__(self):
        object.__setattr__(self, "num_steps", check_int("num_steps", self.num_steps, minimum=1))
        object.__setattr__(self, "ratio", check_real("ratio", self.ratio, minimum=0.0))

    @property
    def guided_steps(self) -> int:
        """``K``: steps ``i < K`` are guided."""
        return sum((i + 1) / self.num_steps <= self.ratio for i in range(self.num_steps))

    def apply(self, state, v_cond, v_uncond, step=0):
        step = jnp.asarray(step)
        v, new_state = apply_rule(self.rule, state, v_cond, v_uncond, step)
        return _gate(step < self.guided_steps, v, jnp.asarray(v_cond), new_state, state)

    def describe(self):
        return f"{describe(self.rule)}, truncated at {self.ratio:g}×{self.num_steps}"


def lumina_next_cfg(v_cond: Array, v_uncond: Array, scale, channels: int | None = 3) -> Array:
    """The Lumina-Next pipeline's guidance: CFG on the first ``channels`` channels if ``w > 1``.

    ``ChannelSubset(CFG(w), channels)`` when ``scale > 1``; for ``scale <= 1`` the pipeline
    runs the conditional branch only (``do_classifier_free_guidance = w > 1``) and this
    returns ``v_c``.  ``scale`` may be traced.
    """
    v_cond = jnp.asarray(v_cond)
    guided = ChannelSubset(CFG(scale), channels)(v_cond, v_uncond)
    return jnp.where(jnp.asarray(scale) > 1, guided, v_cond)


def lumina2_cfg(
    v_cond: Array,
    v_uncond: Array,
    scale,
    step,
    num_steps: int,
    cfg_trunc_ratio: float = 1.0,
    cfg_normalization: bool = True,
) -> Array:
    """The Lumina2 pipeline's guidance at solver step ``step`` of ``num_steps``.

    ``CFGTruncation(Renormalize(CFG(w)), cfg_trunc_ratio, num_steps)`` (no
    :class:`Renormalize` when ``cfg_normalization`` is false); ``v_c`` when ``scale <= 1``
    (the pipeline's ``do_classifier_free_guidance``).  ``scale`` and ``step`` may be traced.
    """
    v_cond = jnp.asarray(v_cond)
    rule = Renormalize(CFG(scale)) if cfg_normalization else CFG(scale)
    guided = CFGTruncation(rule, cfg_trunc_ratio, num_steps)(v_cond, v_uncond, step)
    return jnp.where(jnp.asarray(scale) > 1, guided, v_cond)
