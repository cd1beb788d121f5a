"""Guidance rules: CFG, the optimized scale (CFG*), zero-init and CFG-Zero*.

Semantics (DESIGN.md §2): scale ``w``; ``w = 1`` is conditional only, ``w = 0`` unconditional
only.  Axis 0 is the batch; every other axis belongs to one sample (a point, an image, a
video), so the optimized scale is one scalar per batch element.  Every rule is odd in its
inputs, so it applies unchanged in the theory convention (``u_t``) and in diffusers' σ
convention (``v_σ = −u_t``).

* CFG:        ``ṽ = v_u + w·(v_c − v_u)``
* s*:         ``s* = ⟨v_c, v_u⟩ / (‖v_u‖² + 1e-8)``
* CFG*:       ``ṽ = s*·v_u + w·(v_c − s*·v_u)  =  P_u v_c + w·(I − P_u) v_c``  (up to eps)
* zero-init:  steps ``i < K`` return ``ṽ = 0``  (diffusers' ``zero_init_steps = K``; the
  official repository's ``zero_steps = K − 1`` with the test ``i <= zero_steps``)
* CFG-Zero*:  CFG* with zero-init; equals diffusers' ``ClassifierFreeZeroStarGuidance``.

The functions are pure and jit-able; ``step`` may be a traced integer.  The rule classes
(:class:`CFG`, :class:`CFGStar`, :class:`ZeroInit`, :class:`CFGZeroStar`) are pytrees whose
numbers are leaves, so a sampler can take them as traced arguments and ``vmap`` over scales.

Stateful rules (APG's momentum, in :mod:`cfgzero_theory.guidance_family`) add two methods,
``init_state(v_like) -> state`` and ``apply(state, v_cond, v_uncond, step) -> (ṽ, state)``;
samplers call every rule through :func:`init_rule_state` and :func:`apply_rule`, which give
stateless rules an empty state, so one loop serves both kinds.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

Array = jax.Array

OPTIMIZED_SCALE_EPS = 1e-8


def optimized_scale(v_cond: Array, v_uncond: Array, eps: float = OPTIMIZED_SCALE_EPS) -> Array:
    """``s* = ⟨v_c, v_u⟩ / (‖v_u‖² + eps)`` per batch element, shaped ``(B, 1, …, 1)``.

    The sums run over every non-batch axis and are computed in float32 (float64 if the
    inputs are float64); the result is cast back to the inputs' dtype, as diffusers does.
    """
    v_cond, v_uncond = jnp.asarray(v_cond), jnp.asarray(v_uncond)
    if v_cond.shape != v_uncond.shape or v_cond.ndim < 1:
        raise ValueError(f"v_cond and v_uncond must share a shape (B, ...); got {v_cond.shape} and {v_uncond.shape}")
    dtype = jnp.result_type(v_cond, v_uncond)
    compute = jnp.promote_types(dtype, jnp.float32)
    c = v_cond.reshape(v_cond.shape[0], -1).astype(compute)
    u = v_uncond.reshape(v_uncond.shape[0], -1).astype(compute)
    scale = jnp.sum(c * u, axis=1) / (jnp.sum(u * u, axis=1) + eps)
    return scale.astype(dtype).reshape((-1,) + (1,) * (v_cond.ndim - 1))


def cfg(v_cond: Array, v_uncond: Array, scale) -> Array:
    """Classifier-free guidance ``v_u + w·(v_c − v_u)``."""
    return v_uncond + scale * (v_cond - v_uncond)


def cfg_star(v_cond: Array, v_uncond: Array, scale) -> Array:
    """CFG with the optimized scale: ``s*·v_u + w·(v_c − s*·v_u)`` (the unconditional branch rescaled first)."""
    rescaled_uncond = optimized_scale(v_cond, v_uncond) * v_uncond
    return rescaled_uncond + scale * (v_cond - rescaled_uncond)


def zero_init(v: Array, step, zero_init_steps) -> Array:
    """``0`` for solver steps ``step < zero_init_steps``, ``v`` afterwards (``step`` may be traced)."""
    return jnp.where(jnp.asarray(step) < zero_init_steps, jnp.zeros_like(v), v)


def cfg_zero_star(v_cond: Array, v_uncond: Array, scale, step, zero_init_steps=1) -> Array:
    """CFG-Zero*: CFG* for steps ``>= zero_init_steps``, zero velocity before."""
    return zero_init(cfg_star(v_cond, v_uncond, scale), step, zero_init_steps)


# ----------------------------------------------------------------------------- rule objects
class GuidanceRule(Protocol):
    """A guidance rule maps the two branches at solver step ``step`` to one velocity."""

    def __call__(self, v_cond: Array, v_uncond: Array, step=0) -> Array: ...


def init_rule_state(rule: GuidanceRule, v_like: Array):
    """The initial guidance state of ``rule`` for velocities shaped like ``v_like`` (``()`` if stateless)."""
    init = getattr(rule, "init_state", None)
    return () if init is None else init(v_like)


def apply_rule(rule: GuidanceRule, state, v_cond: Array, v_uncond: Array, step):
    """One guided velocity and the next state: ``(ṽ, state')``; stateless rules pass ``state`` through."""
    apply = getattr(rule, "apply", None)
    if apply is None:
        return rule(v_cond, v_uncond, step), state
    return apply(state, v_cond, v_uncond, step)


def _rule(cls):
    """Freeze a dataclass and register it as a pytree whose fields are children.

    ``register_pytree_node`` (not ``register_dataclass``) is used on purpose: its tree
    structures compare unequal across classes, so ``jit`` never confuses ``CFG`` with
    ``CFGStar`` (in JAX 0.10, dataclass nodes with the same field names compare equal).
    A field declared ``dataclasses.field(metadata={"static": True})`` is aux data instead
    (hashable, part of the tree structure, never traced): for structural options only.
    """
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    names = tuple(f.name for f in fields if not f.metadata.get("static"))
    static = tuple(f.name for f in fields if f.metadata.get("static"))
    jax.tree_util.register_pytree_node(
        cls,
        lambda rule: (tuple(getattr(rule, n) for n in names), tuple(getattr(rule, n) for n in static)),
        lambda aux, children: cls(**dict(zip(names, children)), **dict(zip(static, aux))),
    )
    return cls


@_rule
class CFG:
    """Classifier-free guidance with scale ``w``: ``v_u + w·(v_c − v_u)``."""

    scale: float

    def __call__(self, v_cond, v_uncond, step=0):
        return cfg(v_cond, v_uncond, self.scale)


@_rule
class CFGStar:
    """CFG with the optimized scale ``s*`` of CFG-Zero* (no zero-init)."""

    scale: float

    def __call__(self, v_cond, v_uncond, step=0):
        return cfg_star(v_cond, v_uncond, self.scale)


@_rule
class ZeroInit:
    """Any rule with its first ``steps`` solver steps replaced by a zero velocity.

    A stateful inner rule still runs (and updates its state) during the zeroed steps.
    """

    rule: GuidanceRule
    steps: int = 1

    def __call__(self, v_cond, v_uncond, step=0):
        return zero_init(self.rule(v_cond, v_uncond, step), step, self.steps)

    def init_state(self, v_like):
        return init_rule_state(self.rule, v_like)

    def apply(self, state, v_cond, v_uncond, step=0):
        v, state = apply_rule(self.rule, state, v_cond, v_uncond, step)
        return zero_init(v, step, self.steps), state


@_rule
class CFGZeroStar:
    """CFG-Zero*: the optimized scale plus zero-init of the first ``zero_init_steps`` steps."""

    scale: float
    zero_init_steps: int = 1

    def __call__(self, v_cond, v_uncond, step=0):
        return cfg_zero_star(v_cond, v_uncond, self.scale, step, self.zero_init_steps)


def describe(rule: GuidanceRule) -> str:
    """A short human-readable name for legends, e.g. ``"CFG-Zero* (w=4, K=1)"``."""
    if isinstance(rule, CFG):
        return f"CFG (w={float(rule.scale):g})"
    if isinstance(rule, CFGStar):
        return f"CFG* (w={float(rule.scale):g})"
    if isinstance(rule, CFGZeroStar):
        return f"CFG-Zero* (w={float(rule.scale):g}, K={int(rule.zero_init_steps)})"
    if isinstance(rule, ZeroInit):
        return f"{describe(rule.rule)} + zero-init (K={int(rule.steps)})"
    own = getattr(rule, "describe", None)
    return own() if own is not None else type(rule).__name__


# ----------------------------------------------------------------------------- exact fields
def exact_guided_velocity(mixture, x: Array, t, label, rule: GuidanceRule, step=0) -> Array:
    """The exact guided field ``ṽ*`` of a mixture: ``rule(u_t(x | label), u_t(x), step)``.

    ``x`` has shape ``(..., d)``; each point is one batch element (its own ``s*``).
    """
    x = jnp.asarray(x)
    rows = x.reshape(-1, x.shape[-1])
    t_rows = jnp.broadcast_to(jnp.asarray(t), x.shape[:-1]).reshape(-1) if jnp.ndim(t) else t
    label_rows = label if label is None or jnp.ndim(label) == 0 else jnp.broadcast_to(label, x.shape[:-1]).reshape(-1)
    v_cond = mixture.velocity(rows, t_rows, label_rows)
    v_uncond = mixture.velocity(rows, t_rows, None)
    return rule(v_cond, v_uncond, step).reshape(x.shape)


class GuidanceErrors(NamedTuple):
    """Per-sample error norms of a guided velocity, split as in DESIGN.md §3.

    ``learning_error = ‖ṽ^θ − ṽ*‖`` (model against the exact field of the same rule),
    ``guidance_bias = ‖ṽ* − u_c‖`` (exact guided field against the true conditional
    velocity), ``total_error = ‖ṽ^θ − u_c‖``, and ``zero_error = ‖ṽ*‖``: the error a zero
    velocity makes against the guided target ("zero beats CFG" when ``learning_error``
    exceeds it).
    """

    learning_error: Array
    guidance_bias: Array
    total_error: Array
    zero_error: Array


def _norm_per_sample(v: Array) -> Array:
    return jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=1))


def decompose_guidance_error(v_model: Array, v_exact: Array, u_cond: Array) -> GuidanceErrors:
    """Split the error of a guided velocity ``v_model`` into learning error and guidance bias.

    ``v_exact`` is the exact guided field of the same rule and scale, ``u_cond`` the exact
    conditional velocity; all share the shape ``(B, ...)`` and norms are per batch element.
    """
    return GuidanceErrors(
        learning_error=_norm_per_sample(v_model - v_exact),
        guidance_bias=_norm_per_sample(v_exact - u_cond),
        total_error=_norm_per_sample(v_model - u_cond),
        zero_error=_norm_per_sample(v_exact),
    )
