"""How model parameters are laid out on a device mesh (FSDP-style weight sharding).

Public API
----------
* :func:`shard_axis` ``(shape, n, min_size=2**14) -> int | None`` — the rule, a pure function
  of the shape and the number of devices;
* :class:`ParamSharding` ``(mesh, axis=None, min_size=2**14)`` and its
  ``sharding_for(path, shape) -> NamedSharding``;
* :func:`mesh_sharding` ``(devices=None, axis="model", *, min_size=2**14) -> ParamSharding`` —
  a one-dimensional mesh over ``jax.devices()`` (or the given devices);
* :func:`shard_state` ``(state, param_sharding)`` — re-lay an ``nnx.State`` (or any pytree
  of arrays) built in memory;
* :func:`describe_sharding` ``(state) -> dict`` — how many arrays are split or replicated and
  the bytes each device holds.

The loaders (:func:`~cfgzero_theory.sd3.weights.load_sd3_transformer`,
:func:`~cfgzero_theory.ports.autoencoder.load_vae`, :func:`~cfgzero_theory.ports.clip.load_clip_text_encoder`,
:func:`~cfgzero_theory.ports.t5.load_t5_encoder`) take ``sharding=ParamSharding(...)`` and put
each tensor straight from the host onto its shards (:func:`cfgzero_theory.ports.loading.load_module`).

The rule
--------
A parameter of shape ``shape`` is split along **one** axis over the ``n`` devices of the
mesh axis: the largest axis whose size is a multiple of ``n`` (on a tie, the last such axis —
for an NNX kernel ``(in, out)`` the output features).  Parameters with fewer than ``min_size``
elements, and those with no such axis, are replicated on every device.  Splitting the largest
axis gives each device ``1/n`` of every large tensor, so the weights of a model ``n`` times
larger than one device's memory fit the mesh; small tensors (biases, norm scales) are not
worth the collectives.

Why it is correct
-----------------
Only the layout changes, never the computation.  Under ``jax.jit`` the shardings of the
inputs are part of the program's inputs; GSPMD (XLA's sharding propagation) inserts the
all-gathers, or computes sharded matmuls and all-reduces the partial sums, wherever an
operation needs data held by another device.  The result is the same function of the same
values — equal to the unsharded run up to the floating-point order of summations that a split
contraction axis changes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cfgzero_theory.validation import check_int

__all__ = ["MIN_SIZE", "ParamSharding", "describe_sharding", "mesh_sharding", "shard_axis", "shard_state"]

MIN_SIZE = 2**14
"""Default element count below which a parameter is replicated rather than split."""


def shard_axis(shape: Sequence[int], n: int, min_size: int = MIN_SIZE) -> int | None:
    """The axis of ``shape`` to split over ``n`` devices, or ``None`` to replicate.

    The largest axis whose size is a positive multiple of ``n`` (ties: the last such axis);
    ``None`` when ``n == 1``, when the tensor has fewer than ``min_size`` elements, or when no
    axis is divisible by ``n``.
    """
    n = check_int("n", n, minimum=1)
    min_size = check_int("min_size", min_size, minimum=0)
    shape = tuple(check_int("shape entry", d, minimum=0) for d in shape)
    if n == 1 or math.prod(shape) < min_size:
        return None
    divisible = [(size, axis) for axis, size in enumerate(shape) if size > 0 and size % n == 0]
    return max(divisible)[1] if divisible else None


@dataclasses.dataclass(frozen=True)
class ParamSharding:
    """Where each parameter goes: split over the mesh axis ``axis`` by :func:`shard_axis`.

    Args:
      mesh: a ``jax.sharding.Mesh``; parameters are replicated over its other axes.
      axis: the mesh axis to split over (default: the mesh's first axis).
      min_size: parameters with fewer elements are replicated.
    """

    mesh: Mesh
    axis: str | None = None
    min_size: int = MIN_SIZE

    def __post_init__(self):
        if not isinstance(self.mesh, Mesh):
            raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(self.mesh).__name__}")
        if self.axis is None:
            object.__setattr__(self, "axis", self.mesh.axis_names[0])
        if self.axis not in self.mesh.axis_names:
            raise ValueError(f"axis must be one of the mesh axes {self.mesh.axis_names}, got {self.axis!r}")
        object.__setattr__(self, "min_size", check_int("min_size", self.min_size, minimum=0))

    @property
    def axis_size(self) -> int:
        """The number of devices a split parameter is divided over."""
        return self.mesh.shape[self.axis]

    def sharding_for(self, path: str, shape: tuple[int, ...]) -> NamedSharding:
        """The ``NamedSharding`` of the parameter at ``path`` (dotted, for messages) with ``shape``."""
        try:
            shape = tuple(check_int("shape entry", d, minimum=0) for d in shape)
        except ValueError:
            raise ValueError(f"parameter {path!r}: shape must be non-negative integers, got {shape!r}") from None
        spec = [None] * len(shape)
        dim = shard_axis(shape, self.axis_size, self.min_size)
        if dim is not None:
            spec[dim] = self.axis
        return NamedSharding(self.mesh, PartitionSpec(*spec))


def mesh_sharding(devices: Sequence[jax.Device] | None = None, axis: str = "model", *,
                  min_size: int = MIN_SIZE) -> ParamSharding:
    """A :class:`ParamSharding` over a one-dimensional mesh named ``axis`` of ``devices``
    (default ``jax.devices()``)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("devices must not be empty")
    return ParamSharding(Mesh(np.array(devices), (axis,)), axis, min_size)


def _path_name(path) -> str:
    """Dotted name of a pytree key path (``blocks.0.attn.img_q.kernel``), as the loaders name parameters."""
    return ".".join(str(next(getattr(entry, a) for a in ("key", "idx", "name") if hasattr(entry, a))) for entry in path)


def shard_state(state, param_sharding: ParamSharding):
    """``state`` (an ``nnx.State`` or any pytree of arrays) with every array put on the
    devices ``param_sharding`` gives it; ``nnx.Variable`` leaves keep their type.  For modules
    built in memory: ``nnx.update(module, shard_state(nnx.state(module), sharding))``."""
    if not isinstance(param_sharding, ParamSharding):
        raise ValueError(f"param_sharding must be a ParamSharding, got {param_sharding!r}")

    def place(path, leaf):
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        placed = jax.device_put(value, param_sharding.sharding_for(_path_name(path), np.shape(value)))
        return leaf.replace(placed) if isinstance(leaf, nnx.Variable) else placed

    return jax.tree_util.tree_map_with_path(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def describe_sharding(state) -> dict:
    """How the arrays of ``state`` are laid out.

    Returns ``{"arrays", "sharded", "replicated", "total_bytes", "device_bytes",
    "max_device_bytes"}``: the number of arrays, of those split over several devices and of
    those every device holds whole; the bytes of one copy of everything; ``{device id: bytes
    it holds}``; and the largest of those — what must fit on one device.
    """
    counts = {"arrays": 0, "sharded": 0, "replicated": 0, "total_bytes": 0}
    device_bytes: dict[int, int] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if not isinstance(leaf, jax.Array):
            raise ValueError(f"{_path_name(path)!r} is a {type(leaf).__name__}, not a jax.Array on devices")
        counts["arrays"] += 1
        counts["replicated" if leaf.sharding.is_fully_replicated else "sharded"] += 1
        counts["total_bytes"] += leaf.nbytes
        for device, index in leaf.sharding.devices_indices_map(leaf.shape).items():
            elements = math.prod(len(range(*s.indices(d))) for s, d in zip(index, leaf.shape))
            device_bytes[device.id] = device_bytes.get(device.id, 0) + elements * leaf.dtype.itemsize
    return {**counts, "device_bytes": device_bytes, "max_device_bytes": max(device_bytes.values(), default=0)}
