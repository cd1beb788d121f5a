"""Class-conditional flow-matching velocity networks ``v_θ(x, t, y)`` in Flax NNX.

Theory convention (DESIGN.md §2): ``t = 0`` noise, ``t = 1`` data; the network regresses
``x1 − x0``.  The unconditional branch of CFG is a learned *null class*: label
``NULL_LABEL = -1`` selects an extra embedding row (index ``num_classes``), trained by label
dropout.  Inputs are ``[x, sin(π·2^j·t), cos(π·2^j·t) (j < F), embed(y)]``, followed by
``depth`` hidden layers of ``width`` units.

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

Array = jax.Array

ACTIVATIONS = {"silu": jax.nn.silu, "relu": jax.nn.relu, "gelu": jax.nn.gelu, "tanh": jnp.tanh}


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """Architecture of :class:`VelocityMLP`.

    ``time_frequencies`` is ``F``, the number of sine/cosine pairs ``π·2^j·t`` (``j < F``);
    ``class_embedding`` the size of the learned class (and null-class) embedding.
    """

    dim: int
    num_classes: int
    width: int = 128
    depth: int = 3
    activation: str = "silu"
    time_frequencies: int = 6
    class_embedding: int = 16

    def __post_init__(self):
        for name in ("dim", "num_classes", "width", "depth", "time_frequencies", "class_embedding"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")


class VelocityMLP(nnx.Module):
    """``v_θ(x, t, y)``: an MLP on ``[x, Fourier(t), embed(y)]`` with a learned null class."""

    def __init__(self, config: NetworkConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.class_embed = nnx.Embed(config.num_classes + 1, config.class_embedding, rngs=rngs)
        widths = [config.dim + 2 * config.time_frequencies + config.class_embedding] + [config.width] * config.depth
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.out = nnx.Linear(config.width, config.dim, rngs=rngs)

    def __call__(self, x: Array, t, label: Array) -> Array:
        cfg = self.config
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])[:, None]
        phases = t * (jnp.pi * 2.0 ** jnp.arange(cfg.time_frequencies, dtype=x.dtype))
        classes = jnp.where(label == NULL_LABEL, cfg.num_classes, label)
        h = jnp.concatenate([x, jnp.sin(phases), jnp.cos(phases), self.class_embed(classes).astype(x.dtype)], axis=-1)
        act = ACTIVATIONS[cfg.activation]
        for layer in self.hidden:
            h = act(layer(h))
        return self.out(h)


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
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: VelocityMLP(config, rngs=nnx.Rngs(0))))
    states = jax.vmap(lambda key: nnx.split(VelocityMLP(config, rngs=nnx.Rngs(key)))[1])(keys)
    return Network(graphdef, states)


def select(network: Network, index: int) -> Network:
    """The ``index``-th network of a stack."""
    return Network(network.graphdef, jax.tree_util.tree_map(lambda a: a[index], network.state))
