"""The small layers every model port shares: norms, MLPs, activations, timestep embeddings, RoPE.

* :func:`layer_norm` ``(x, eps)`` — LayerNorm without parameters, statistics in float32;
* :class:`Norm` ``(dim, kind, eps)`` — RMSNorm (learned scale) or LayerNorm (learned scale and
  bias) over the last axis: the q/k norms of the DiTs and the text encoders' norms;
* :data:`ACTIVATIONS` — the activation functions by their transformers / diffusers names;
* :class:`MLP` ``(d_in, d_hidden, d_out, act)`` — ``Linear → act → Linear``;
* :func:`timestep_embedding` ``(t, channels=256)`` — diffusers' ``Timesteps(channels,
  flip_sin_to_cos=True, downscale_freq_shift=0)``: ``[cos(t·f), sin(t·f)]`` with
  ``f_k = exp(−ln(10000)·k/(channels/2))``, the frequencies rounded to float32 as torch does;
* :func:`round_to` ``(x, dtype)`` — ``x`` rounded to ``dtype``'s precision, kept in float32, a
  rounding XLA may not skip (it can elide a ``float32 → bfloat16 → float32`` round trip);
* :func:`modulation` ``(mod, n)`` — AdaLN's ``(B, n·D)`` split into ``n`` pieces ``(B, 1, D)``;
* :func:`rope_tables` ``(positions, axes_dims, theta)`` and :func:`apply_rope` ``(x, cos, sin)``
  — rotary position embeddings over several position axes with interleaved pairs.

Numerics: norms compute their statistics in float32 and return the input's dtype (or the
weight's, for a half-precision RMSNorm weight, as diffusers casts); matmuls run in the
promoted dtype of inputs and parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["ACTIVATIONS", "MLP", "NORM_KINDS", "Norm", "apply_rope", "layer_norm", "modulation", "rope_tables",
           "round_to", "timestep_embedding"]

Array = jax.Array

NORM_KINDS = ("rms_norm", "layer_norm")

#: Activation functions by the names configs use.
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def layer_norm(x: Array, eps: float = 1e-6) -> Array:
    """``(x − mean) / √(var + eps)`` over the last axis (biased variance), statistics in float32."""
    x32 = x.astype(jnp.float32)
    centred = x32 - x32.mean(-1, keepdims=True)
    var = jnp.mean(centred * centred, -1, keepdims=True)
    return (centred * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class Norm(nnx.Module):
    """RMSNorm ``x / √(mean(x²) + eps) · γ`` or LayerNorm ``layer_norm(x)·γ + β`` over the last axis."""

    def __init__(self, dim: int, kind: str, *, eps: float = 1e-6, param_dtype=jnp.float32):
        if kind not in NORM_KINDS:
            raise ValueError(f"kind must be one of {NORM_KINDS}, got {kind!r}")
        self.kind = kind
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype)) if kind == "layer_norm" else None

    def __call__(self, x: Array) -> Array:
        if self.kind == "rms_norm":
            x32 = x.astype(jnp.float32)
            normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
            scale = self.scale[...]
            if scale.dtype in (jnp.float16, jnp.bfloat16):  # diffusers casts to a half-precision weight
                return normed.astype(scale.dtype) * scale
            return (normed * scale).astype(jnp.promote_types(x.dtype, scale.dtype))
        return layer_norm(x, self.eps) * self.scale[...] + self.bias[...]


class MLP(nnx.Module):
    """``fc2(act(fc1(x)))`` with ``act`` a key of :data:`ACTIVATIONS`."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, act: str, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 use_bias: bool = True):
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        self.act = act
        self.fc1 = nnx.Linear(d_in, d_hidden, use_bias=use_bias, rngs=rngs, param_dtype=param_dtype)
        self.fc2 = nnx.Linear(d_hidden, d_out, use_bias=use_bias, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


def _time_frequencies(channels: int) -> np.ndarray:
    half = channels // 2
    exponent = np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def timestep_embedding(timestep: Array, channels: int = 256) -> Array:
    """``(B,) -> (B, channels)`` float32: ``[cos(τ·f), sin(τ·f)]``, ``f_k = exp(−ln(10000)·k/(channels/2))``."""
    angles = jnp.asarray(timestep, jnp.float32)[:, None] * jnp.asarray(_time_frequencies(channels))[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def round_to(x: Array, dtype) -> Array:
    """``x`` in float32, rounded to the nearest value of the floating ``dtype`` (identity for
    float32 and wider).  Where PyTorch computes ``x.to(bfloat16) * 1000`` the rounding changes
    the result (bf16(3.5)·1000 = 3504); XLA, allowed excess precision, may drop a plain
    ``astype`` round trip inside a compiled program, but never ``lax.reduce_precision``."""
    x = jnp.asarray(x, jnp.float32)
    info = jnp.finfo(dtype)
    if info.bits >= 32:
        return x
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def modulation(mod: Array, n: int) -> list[Array]:
    """Split an AdaLN modulation ``(B, n·D)`` into ``n`` pieces ``(B, 1, D)`` (broadcast over tokens)."""
    return [piece[:, None, :] for piece in jnp.split(mod, n, axis=-1)]


def rope_tables(positions: np.ndarray, axes_dims: Sequence[int], theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotary tables for ``positions (N, A)`` over ``A`` position axes: ``(cos, sin)``, each ``(N, Σ d_a / 2)``.

    Axis ``a`` owns ``d_a / 2`` frequencies ``ω_j = θ^(−2j/d_a)``; the angle of token ``n`` is
    ``positions[n, a]·ω_j``.  Built in float64 on the host (as diffusers builds Flux's and Wan's
    tables) and returned as float64; cast them where they are used.
    """
    positions = np.asarray(positions, np.float64)
    if positions.ndim != 2 or positions.shape[1] != len(axes_dims):
        raise ValueError(f"positions must be (N, {len(axes_dims)}), got {positions.shape}")
    angles = []
    for axis, dim in enumerate(axes_dims):
        if dim % 2:
            raise ValueError(f"every RoPE axis dimension must be even, got {tuple(axes_dims)}")
        omega = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles.append(np.outer(positions[:, axis], omega))
    angles = np.concatenate(angles, axis=1)
    return np.cos(angles), np.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])`` of ``x (B, N, H, D)`` by the angles of
    ``cos``/``sin`` ``(N, D/2)``: ``(a, b) ↦ (a·cos − b·sin, a·sin + b·cos)``, in float32,
    returned in ``x``'s dtype."""
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    a, b = x32[..., 0], x32[..., 1]
    cos, sin = cos[:, None, :].astype(jnp.float32), sin[:, None, :].astype(jnp.float32)
    rotated = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
