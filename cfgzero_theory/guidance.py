"""Guidance rules: CFG, the optimized scale (CFG*), zero-init and CFG-Zero*, as one rule.

Semantics (docs/design.md §3): scale ``w``; ``w = 1`` is conditional only, ``w = 0``
unconditional only.  Axis 0 is the batch; every other axis belongs to one sample (a point,
an image, a video), so the optimized scale is one scalar per batch element.  Every rule is
odd in its inputs, so it applies unchanged in the theory convention (``u_t``) and in
diffusers' σ convention (``v_σ = −u_t``).

* CFG:        ``ṽ = v_u + w·(v_c − v_u)``
* s*:         ``s* = ⟨v_c, v_u⟩ / (‖v_u‖² + 1e-8)``
* CFG*:       ``ṽ = s*·v_u + w·(v_c − s*·v_u)  =  P_u v_c + w·(I − P_u) v_c``  (up to eps)
* zero-init:  steps ``i < K`` return ``ṽ = 0``  (diffusers' ``zero_init_steps = K``; the
  official repository's ``zero_steps = K − 1`` with the test ``i <= zero_steps``)
* CFG-Zero*:  CFG* with zero-init; equals diffusers' ``ClassifierFreeZeroStarGuidance``.

**One rule, one vocabulary.**  All five kinds of :data:`KINDS` are one pytree class,
:class:`Guidance`, whose three numbers are leaves: the scale ``w``, whether the optimized
scale is used, and ``K``::

    ṽ_i = 0                                 if i < K
    ṽ_i = s·v_u + w·(v_c − s·v_u)           otherwise,  s = s* (optimized) or 1

so a sampling loop compiled once serves every kind, scale and ``K`` (they are traced data),
and ``vmap`` can run over scales.  :func:`make_rule` builds a rule from a kind name; the
short constructors :func:`CFG`, :func:`CFGStar`, :func:`CFGZeroStar` give the same objects.
Every rule describes itself (``kind``, ``family``, ``zero_init_steps``, ``describe()``,
``without_zero_init()``); the wrappers of :mod:`cfgzero_theory.guidance_family` pass these
through, and :func:`describe`, :func:`rule_family`, :func:`zero_init_steps` and
:func:`without_zero_init` work on any rule.

Stateful rules (APG's momentum, in :mod:`cfgzero_theory.guidance_family`) add two methods,
``init_state(v_like) -> state`` and ``apply(state, v_cond, v_uncond, step) -> (ṽ, state)``;
samplers call every rule through :func:`init_rule_state` and :func:`apply_rule`, which give
stateless rules an empty state, so one loop serves both kinds.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from cfgzero_theory.validation import check_choice, check_int, check_int_leaf, check_leaf, check_real

Array = jax.Array

OPTIMIZED_SCALE_EPS = 1e-8

#: The guidance kinds, the one vocabulary of presets, pipelines, command lines, widgets and
#: JSON keys: plain CFG, the optimized scale, CFG with zero-init, CFG-Zero*, and the
#: conditional prediction alone (``w = 1``; with ``K > 0`` Flux-dev's zero-init-only variant).
KINDS = ("cfg", "cfg-star", "zero-init", "cfg-zero-star", "conditional")

#: How each kind is written in legends and buttons.
KIND_LABELS = {"cfg": "CFG", "cfg-star": "CFG*", "zero-init": "CFG + zero-init", "cfg-zero-star": "CFG-Zero*",
               "conditional": "conditional"}

#: The kinds that zero their first ``K`` steps (``zero_init_steps`` defaults to 1 for them).
ZERO_INIT_KINDS = ("zero-init", "cfg-zero-star")


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


def static_field(default=dataclasses.MISSING):
    """A field of a :func:`guidance_rule` class stored as pytree aux data (hashable, never traced)."""
    return dataclasses.field(default=default, metadata={"static": True})


def guidance_rule(cls):
    """Freeze a dataclass and register it as a pytree whose fields are children.

    ``register_pytree_node`` (not ``register_dataclass``) is used on purpose: its tree
    structures compare unequal across classes, so ``jit`` never confuses two rule classes
    with the same field names.  A field declared with :func:`static_field` is aux data
    instead (part of the tree structure, never traced): for structural options only.
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


@guidance_rule
class Guidance:
    """CFG, CFG*, CFG + zero-init, CFG-Zero* and conditional-only as one rule (module docstring).

    ``scale`` is ``w``; ``optimized`` selects the optimized scale ``s*`` for the unconditional
    branch (``s = 1`` otherwise); the first ``zero_init_steps`` solver steps return zero.  All
    three are leaves (traced under ``jit``), so changing any of them never recompiles.  Build
    it with :func:`make_rule` or the constructors :func:`CFG`, :func:`CFGStar`,
    :func:`CFGZeroStar`.  ``kind``, ``family`` and :meth:`describe` read the numbers, so they
    need a concrete rule (not one inside ``jit``).
    """

    scale: float
    optimized: bool = False
    zero_init_steps: int = 0

    def __post_init__(self):
        object.__setattr__(self, "scale", check_leaf("scale", self.scale, lambda x: True, "a finite number"))
        if isinstance(self.optimized, (bool, np.bool_)):
            object.__setattr__(self, "optimized", bool(self.optimized))
        elif isinstance(self.optimized, (numbers.Number, str, bytes)):
            raise ValueError(f"optimized must be a bool, got {self.optimized!r}")
        object.__setattr__(self, "zero_init_steps", check_int_leaf("zero_init_steps", self.zero_init_steps))

    def __call__(self, v_cond, v_uncond, step=0):
        v_cond, v_uncond = jnp.asarray(v_cond), jnp.asarray(v_uncond)
        if v_cond.shape != v_uncond.shape:
            raise ValueError(f"v_cond and v_uncond must share a shape, got {v_cond.shape} and {v_uncond.shape}")
        s = jnp.where(self.optimized, optimized_scale(v_cond, v_uncond), jnp.ones((), v_uncond.dtype))
        rescaled_uncond = s * v_uncond
        return zero_init(rescaled_uncond + self.scale * (v_cond - rescaled_uncond), step, self.zero_init_steps)

    @property
    def kind(self) -> str:
        """The kind name in :data:`KINDS` (``w = 1`` without the optimized scale is ``conditional``)."""
        zeroed = int(self.zero_init_steps) > 0
        if bool(self.optimized):
            return "cfg-zero-star" if zeroed else "cfg-star"
        if float(self.scale) == 1.0:
            return "conditional"
        return "zero-init" if zeroed else "cfg"

    @property
    def family(self) -> str:
        """The plotting family: the kind, or ``unconditional`` for plain CFG at ``w = 0``."""
        if self.kind == "cfg" and float(self.scale) == 0.0:
            return "unconditional"
        return self.kind

    def without_zero_init(self) -> Guidance:
        """The same rule with ``K = 0``."""
        return dataclasses.replace(self, zero_init_steps=0)

    def describe(self) -> str:
        """E.g. ``"CFG-Zero* (w=4, K=1)"``, ``"CFG (w=4)"``, ``"conditional + zero-init (K=1)"``."""
        w, k, kind = float(self.scale), int(self.zero_init_steps), self.kind
        if kind == "conditional":
            return KIND_LABELS[kind] + (f" + zero-init (K={k})" if k else "")
        numbers = f"w={w:g}, K={k}" if kind in ZERO_INIT_KINDS else f"w={w:g}"
        return f"{KIND_LABELS[kind]} ({numbers})"


def make_rule(kind: str, scale: float | None = None, zero_init_steps: int | None = None, *,
              channels: int | None = None) -> GuidanceRule:
    """The guidance rule of ``kind`` (one of :data:`KINDS`) with scale ``w`` and ``K`` zeroed steps.

    * ``scale``: required, except for ``conditional`` (``w = 1``; another value is an error);
    * ``zero_init_steps``: ``K`` for ``zero-init`` and ``cfg-zero-star`` (default 1) and for
      ``conditional`` (default 0); ``cfg`` and ``cfg-star`` have none (a positive ``K`` is an
      error: that rule is ``zero-init`` or ``cfg-zero-star``);
    * ``channels``: guide only the first ``channels`` channels of axis 1 and take the rest
      from the conditional prediction (Lumina-Next: 3), via
      :class:`~cfgzero_theory.guidance_family.ChannelSubset`.

    Every kind gives a :class:`Guidance` (wrapped for ``channels``), so rules of different
    kinds share one compiled sampling loop.
    """
    check_choice("kind", kind, KINDS)
    if kind == "conditional":
        if scale is not None and check_real("scale", scale) != 1.0:
            raise ValueError(f"scale of the conditional kind is 1 (conditional only), got {scale!r}")
        scale = 1.0
    elif scale is None:
        raise ValueError(f"scale is required for guidance kind {kind!r}")
    else:
        scale = check_real("scale", scale)
    if zero_init_steps is None:
        k = 1 if kind in ZERO_INIT_KINDS else 0
    else:
        k = check_int("zero_init_steps", zero_init_steps, minimum=0)
        if k and kind in ("cfg", "cfg-star"):
            better = "zero-init" if kind == "cfg" else "cfg-zero-star"
            raise ValueError(f"zero_init_steps must be 0 for guidance kind {kind!r} (that rule is {better!r}), got {k}")
    rule = Guidance(scale, kind in ("cfg-star", "cfg-zero-star"), k)
    if channels is None:
        return rule
    from cfgzero_theory.guidance_family import ChannelSubset

    return ChannelSubset(rule, channels)


def CFG(scale) -> Guidance:  # noqa: N802 - named after the method, like the other constructors
    """Classifier-free guidance with scale ``w``: ``v_u + w·(v_c − v_u)``."""
    return Guidance(scale, False, 0)


def CFGStar(scale) -> Guidance:  # noqa: N802
    """CFG with the optimized scale ``s*`` of CFG-Zero* (no zero-init)."""
    return Guidance(scale, True, 0)


def CFGZeroStar(scale, zero_init_steps=1) -> Guidance:  # noqa: N802
    """CFG-Zero*: the optimized scale plus zero-init of the first ``zero_init_steps`` steps."""
    return Guidance(scale, True, zero_init_steps)


@guidance_rule
class ZeroInit:
    """Any other rule with its first ``steps`` solver steps replaced by a zero velocity.

    For the rules of :class:`Guidance` zero-init is one of their numbers: use
    :func:`with_zero_init` (or :func:`make_rule`), which folds it in; ``ZeroInit`` refuses
    them, so every rule has one encoding.  A stateful inner rule still runs (and updates its
    state) during the zeroed steps.
    """

    rule: GuidanceRule
    steps: int = 1

    def __post_init__(self):
        if isinstance(self.rule, Guidance):
            raise ValueError("rule is a Guidance rule, whose zero-init is its own zero_init_steps: "
                             "use with_zero_init(rule, steps) or make_rule(kind, scale, zero_init_steps)")
        if not callable(self.rule):
            raise ValueError(f"rule must be a guidance rule, got {type(self.rule).__name__}")
        object.__setattr__(self, "steps", check_int_leaf("steps", self.steps))

    def __call__(self, v_cond, v_uncond, step=0):
        return zero_init(self.rule(v_cond, v_uncond, step), step, self.steps)

    def init_state(self, v_like):
        return init_rule_state(self.rule, v_like)

    def apply(self, state, v_cond, v_uncond, step=0):
        v, state = apply_rule(self.rule, state, v_cond, v_uncond, step)
        return zero_init(v, step, self.steps), state

    @property
    def kind(self) -> str:
        """The inner kind with zero-init added (``cfg`` → ``zero-init``, ``cfg-star`` → ``cfg-zero-star``)."""
        return _WITH_ZERO_INIT.get(rule_kind(self.rule), rule_kind(self.rule))

    @property
    def family(self) -> str:
        """``zero-init`` unless the inner family already names its zero-init variant."""
        inner = rule_family(self.rule)
        return _WITH_ZERO_INIT.get(inner, inner if inner in ("cfg-zero-star", "zero-init", "conditional") else "zero-init")

    @property
    def zero_init_steps(self):
        """``max(steps, K of the inner rule)``."""
        inner = zero_init_steps(self.rule)
        if _traced(self.steps) or _traced(inner):
            return jnp.maximum(self.steps, inner)
        return max(int(self.steps), int(inner))

    def without_zero_init(self) -> GuidanceRule:
        return without_zero_init(self.rule)

    def describe(self) -> str:
        return f"{describe(self.rule)} + zero-init (K={int(self.steps)})"


def with_zero_init(rule: GuidanceRule, steps: int) -> GuidanceRule:
    """``rule`` with its first ``steps`` solver steps zeroed (at least ``steps``, if it had more).

    A :class:`Guidance` rule takes ``K = max(K, steps)`` as its own number; any other rule is
    wrapped in :class:`ZeroInit`.
    """
    steps = check_int("steps", steps, minimum=0)
    if isinstance(rule, Guidance):
        k = rule.zero_init_steps
        return dataclasses.replace(rule, zero_init_steps=jnp.maximum(k, steps) if _traced(k) else max(int(k), steps))
    return ZeroInit(rule, steps)


#: What zero-init turns a kind into.
_WITH_ZERO_INIT = {"cfg": "zero-init", "cfg-star": "cfg-zero-star"}


def _traced(value) -> bool:
    return isinstance(value, jax.core.Tracer)


# ----------------------------------------------------------------------------- self-description
def rule_kind(rule: GuidanceRule) -> str:
    """The kind of a rule: one of :data:`KINDS` for :class:`Guidance` (and wrappers of it),
    else the rule's own ``kind`` or its class name in lower case."""
    kind = getattr(rule, "kind", None)
    return kind if isinstance(kind, str) else type(rule).__name__.lower()


def rule_family(rule: GuidanceRule) -> str:
    """The plotting family of a rule: its kind, ``unconditional`` for ``w = 0``, ``other`` for
    rules outside :data:`KINDS` (APG, TCFG, …); wrappers take their inner rule's family."""
    family = getattr(rule, "family", None)
    return family if isinstance(family, str) else "other"


def zero_init_steps(rule: GuidanceRule):
    """Number ``K`` of leading solver steps the rule replaces by a zero velocity (``0`` if none).

    May be a traced integer (inside ``jit``).
    """
    return getattr(rule, "zero_init_steps", 0)


def without_zero_init(rule: GuidanceRule) -> GuidanceRule:
    """The rule with its zero-init removed (``K = 0``), through any wrappers; works under ``jit``."""
    strip = getattr(rule, "without_zero_init", None)
    return rule if strip is None else strip()


def describe(rule: GuidanceRule) -> str:
    """A short human-readable name for legends, e.g. ``"CFG-Zero* (w=4, K=1)"``."""
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
    """Per-sample error norms of a guided velocity, split as in docs/design.md §4.

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
