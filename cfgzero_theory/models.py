"""Class-conditional flow-matching velocity networks ``v_θ(x, t, y)`` in Flax NNX.

Theory convention (docs/design.md §2): ``t = 0`` noise, ``t = 1`` data; the network regresses
``x1 − x0``.  The unconditional branch of CFG is a learned *null class*: label
``NULL_LABEL = -1`` selects an extra embedding row (index ``num_classes``), trained by label
dropout.  The conditioning is ``c = [sin(π·2^j·t), cos(π·2^j·t) (j < F), embed(y)]``; the
architecture (``NetworkConfig.architecture``) is :class:`VelocityMLP` (``[s·x, c]`` through
``depth`` hidden layers of ``width`` units) or :class:`VelocityResMLP` (residual blocks that
each see ``c``), with ``s = input_scale``.

A :class:`Network` bundles the module structure (static) with its parameters (leaves), so
``network_velocity(network, x, t, label)`` is a velocity function in the sampler's protocol
and a stack of networks (a leading seed axis on every parameter) can be ``vmap``-ped.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cfgzero_theory.mixture import NULL_LABEL
from cfgzero_theory.validation import check_choice, check_int, check_real

Array = jax.Array

ACTIVATIONS = {"silu": jax.nn.silu, "relu": jax.nn.relu, "gelu": jax.nn.gelu, "tanh": jnp.tanh}


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """Architecture of the velocity network.

    ``time_frequencies`` is ``F``, the number of sine/cosine pairs ``π·2^j·t`` (``j < F``);
    ``class_embedding`` the size of the learned class (and null-class) embedding;
    ``architecture`` ``"mlp"`` (:class:`VelocityMLP`) or ``"resmlp"`` (:class:`VelocityResMLP`);
    ``input_scale`` multiplies ``x`` before the first layer (bring the data to order one).
    """

    dim: int
    num_classes: int
    width: int = 128
    depth: int = 3
    activation: str = "silu"
    time_frequencies: int = 6
    class_embedding: int = 16
    architecture: str = "mlp"
    input_scale: float = 1.0

    def __post_init__(self):
        for name in ("dim", "num_classes", "width", "depth", "time_frequencies", "class_embedding"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        check_choice("activation", self.activation, sorted(ACTIVATIONS))
        check_choice("architecture", self.architecture, sorted(ARCHITECTURES))
        object.__setattr__(self, "input_scale", check_real("input_scale", self.input_scale, positive=True))


def _conditioning(config: NetworkConfig, class_embed: nnx.Embed, x: Array, t, label: Array) -> Array:
    """``[sin(π·2^j·t), cos(π·2^j·t) (j < F), embed(y)]`` per point; ``NULL_LABEL`` → row ``num_classes``."""
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])[:, None]
    phases = t * (jnp.pi * 2.0 ** jnp.arange(config.time_frequencies, dtype=x.dtype))
    classes = jnp.where(label == NULL_LABEL, config.num_classes, label)
    return jnp.concatenate([jnp.sin(phases), jnp.cos(phases), class_embed(classes).astype(x.dtype)], axis=-1)


class VelocityMLP(nnx.Module):
    """``v_θ(x, t, y)``: an MLP on ``[s·x, Fourier(t), embed(y)]`` with a learned null class.

    ``depth`` hidden layers of ``width`` units, then a linear output; ``s`` is
    ``config.input_scale``.
    """

    def __init__(self, config: NetworkConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.class_embed = nnx.Embed(config.num_classes + 1, config.class_embedding, rngs=rngs)
        widths = [config.dim + 2 * config.time_frequencies + config.class_embedding] + [config.width] * config.depth
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.out = nnx.Linear(config.width, config.dim, rngs=rngs)

    def __call__(self, x: Array, t, label: Array) -> Array:
        cfg = self.config
        h = jnp.concatenate([cfg.input_scale * x, _conditioning(cfg, self.class_embed, x, t, label)], axis=-1)
        act = ACTIVATIONS[cfg.activation]
        for layer in self.hidden:
            h = act(layer(h))
        return self.out(h)


class VelocityResMLP(nnx.Module):
    """``v_θ(x, t, y)``: a residual MLP whose every block sees the conditioning.

    With ``c = [Fourier(t), embed(y)]`` and ``h₀ = W_in [s·x, c]``, each of the ``depth``
    blocks computes ``h ← h + W₂ act(LayerNorm(h)·W₁ + W_c c)`` (pre-norm, the time and class
    injected into every block, not only at the input), and the output is
    ``W_out act(LayerNorm(h))``.  The residual path keeps the gradient of the deep part well
    scaled, and per-block conditioning lets the field change sharply with ``t`` near the
    data — where a plain MLP on the concatenated input spends most of its loss.
    """

    def __init__(self, config: NetworkConfig, *, rngs: nnx.Rngs):
        self.config = config
        width, cond = config.width, 2 * config.time_frequencies + config.class_embedding
        self.class_embed = nnx.Embed(config.num_classes + 1, config.class_embedding, rngs=rngs)
        self.inp = nnx.Linear(config.dim + cond, width, rngs=rngs)
        self.norms = nnx.List([nnx.LayerNorm(width, rngs=rngs) for _ in range(config.depth)])
        self.up = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(config.depth)])
        self.cond = nnx.List([nnx.Linear(cond, width, use_bias=False, rngs=rngs) for _ in range(config.depth)])
        self.down = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(config.depth)])
        self.out_norm = nnx.LayerNorm(width, rngs=rngs)
        self.out = nnx.Linear(width, config.dim, rngs=rngs)

    def __call__(self, x: Array, t, label: Array) -> Array:
        cfg = self.config
        c = _conditioning(cfg, self.class_embed, x, t, label)
        act = ACTIVATIONS[cfg.activation]
        h = self.inp(jnp.concatenate([cfg.input_scale * x, c], axis=-1))
        for norm, up, cond, down in zip(self.norms, self.up, self.cond, self.down):
            h = h + down(act(up(norm(h)) + cond(c)))
        return self.out(act(self.out_norm(h)))


#: ``NetworkConfig.architecture`` → module class.
ARCHITECTURES = {"mlp": VelocityMLP, "resmlp": VelocityResMLP}


@jax.tree_util.register_pytree_node_class
class Network:
    """A network's structure (``graphdef``, static) and parameters (``state``, the leaves)."""

    def __init__(self, graphdef, state):
        self.graphdef, self.state = graphdef, state

    def tree_flatten(self):
        return (self.state,), self.graphdef

    @classmethod
    def tree_unflatten(cls, graphdef, children):
        return cls(graphdef, children[0])


def network_velocity(network: Network, x: Array, t, label: Array) -> Array:
    """The sampler's velocity-function protocol for a (single, unstacked) :class:`Network`."""
    return nnx.merge(network.graphdef, network.state)(x, t, label)


def init_networks(config: NetworkConfig, keys: Array) -> Network:
    """One network per key, stacked: every parameter gets a leading axis of ``len(keys)``."""
    module = ARCHITECTURES[config.architecture]
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: module(config, rngs=nnx.Rngs(0))))
    states = jax.vmap(lambda key: nnx.split(module(config, rngs=nnx.Rngs(key)))[1])(keys)
    return Network(graphdef, states)


def select(network: Network, index: int) -> Network:
    """The ``index``-th network of a stack."""
    return Network(network.graphdef, jax.tree_util.tree_map(lambda a: a[index], network.state))
