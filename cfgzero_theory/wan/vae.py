"""The Wan2.1 causal video autoencoder in Flax NNX, faithful to ``diffusers.AutoencoderKLWan``.

Public API
----------
* :class:`WanVAEConfig` (``WanVAEConfig.from_diffusers_config(dict)``; ``temporal_factor``,
  ``spatial_factor``);
* :class:`WanVAE`: ``encode(video) -> (mean, logvar)``, ``decode(z) -> video``,
  ``latents_to_vae`` / ``vae_to_latents`` (the Wan pipelines' latent normalisation), all
  arrays in diffusers' ``(B, C, F, H, W)`` layout;
* :data:`WAN_VAE_WEIGHT_MAP` and :func:`load_wan_vae` ``(folder, *, dtype=None, variant=None,
  sharding=None)`` for a diffusers ``vae/`` folder (``_class_name`` ``"AutoencoderKLWan"``).

Architecture (``d = base_dim``, ``d_k = d · dim_mult[k]``, ``L = num_res_blocks``; videos
``(B, C, F, H, W)``, run channels-last ``(B, F, H, W, C)`` inside)
-----------------------------------------------------------------------------------------------
* **Norm** (``WanRMS_norm``, every norm of the model): over the channels at each position,
  ``x / max(‖x‖₂, 1e-12) · √C · γ`` — torch's ``F.normalize`` (which clamps the norm, no
  ``eps`` inside a square root) times ``√C``: an RMSNorm without ``eps``; no bias (Wan2.1 has
  none); computed in float32 whatever the dtype.
* **Causal 3-D convolution** (``WanCausalConv3d``, kernels ``3×3×3`` unless said): zero padding
  ``k//2`` on both sides in space, and in time ``2·(k_t//2)`` frames on the **front only**, so
  output frame ``t`` sees input frames ``t−2 … t``.
* **Residual block**: ``norm → SiLU → conv → norm → SiLU → conv`` (dropout: inference, none),
  plus the input (through a ``1×1×1`` conv when the width changes).
* **Frame attention** (``WanAttentionBlock``, in the mid blocks): within each frame, single-head
  self-attention over the ``H·W`` positions: norm, ``to_qkv`` (a ``1×1`` conv ``C → 3C``, split
  into ``q, k, v`` in that order), softmax (float32) with scale ``C^-1/2``, ``proj`` (``1×1``
  conv), plus the input.  **Mid block**: residual, attention, residual at constant width.
* **Resampling** (``WanResample``), per frame unless said:

  - ``downsample2d``: zero-pad one pixel right and bottom, stride-2 conv3×3 (no padding);
  - ``downsample3d``: the same, then ``time_conv`` — a ``3×1×1`` conv of time stride 2 and no
    padding over ``[last frame of the previous chunk; this chunk]``; the first chunk is not
    downsampled in time (one frame stays one frame);
  - ``upsample2d``: nearest ×2 in space (``nearest-exact`` = pixel repetition at ×2), conv3×3
    ``C → C/2``;
  - ``upsample3d``: first ``time_conv``, a causal ``3×1×1`` conv ``C → 2C`` whose output channels
    ``[0, C)`` and ``[C, 2C)`` become frames ``2t`` and ``2t + 1`` — except on the first chunk,
    which is not upsampled in time and leaves the conv's past at zero (diffusers' ``"Rep"``) —
    then as ``upsample2d``.
* **Encoder**: causal conv ``in_channels → d``; for each level ``k`` ``L`` residual blocks ``→ d_k``
  and, except at the last level, ``downsample3d`` if ``temperal_downsample[k]`` else
  ``downsample2d`` (all one flat list, ``encoder.down_blocks``, as in diffusers); mid block;
  norm → SiLU → causal conv ``→ 2·z_dim``; then ``quant_conv`` (``1×1×1``).  The moments split
  along channels into ``(mean, logvar)``, ``logvar`` clipped to ``[−30, 20]`` (diffusers'
  ``DiagonalGaussianDistribution``).
* **Decoder** (``e = decoder_base_dim or base_dim``, widths ``e_k = e · dim_mult[k]``):
  ``post_quant_conv`` (``1×1×1``); causal conv ``z_dim → e_last``; mid block; for each level
  ``k`` from the last, ``L + 1`` residual blocks (from half the previous level's width after the
  first level, since Wan2.1's upsampling convs halve the width) and, except at the last,
  ``upsample3d`` if ``temperal_downsample`` reversed says so else ``upsample2d``;
  norm → SiLU → causal conv ``→ out_channels``; clipped to ``[−1, 1]``.

Chunks and the feature cache
----------------------------
Diffusers encodes the first frame alone and then chunks of 4 frames, and decodes one latent
frame at a time, each call continuing the causal convolutions from a cache of the last
``CACHE_T = 2`` frames each one saw.  Here every causal conv keeps exactly two past frames,
zero at the start: it convolves ``[past; chunk]`` without time padding and keeps the last two
frames of ``[past; chunk]``.  That is diffusers' logic, quirk included — a one-frame chunk
caches ``[last cached frame; its frame]`` — because diffusers' first chunk zero-pads where its
cache is empty, and a one-frame first chunk caches one frame that the next chunk completes with
one zero frame.  ``downsample3d`` keeps the last frame out of its spatial conv, ``upsample3d``
its time conv's two past frames (zero after the first chunk, which skips that conv).

``encode`` runs the first frame, then a :func:`jax.lax.scan` over the 4-frame chunks; ``decode``
the first latent frame, then a scan over the others, the cache a pytree carried by the scan
(the first chunk is outside because its shapes differ: no time resampling).  So the compiled
program and its memory do not grow with the number of frames.  A video of ``1 + 4k`` frames
encodes to ``1 + k·4/T`` latent frames, ``T = temporal_factor`` (4 for Wan2.1: ``1 + k``), and
``f`` latent frames decode to ``1 + T·(f − 1)`` frames.

Wan latent normalisation (``pipeline_wan.py`` / ``pipeline_wan_i2v.py``, per channel): the
denoiser's latents are ``(mean − latents_mean) · (1 / latents_std)`` (``vae_to_latents``, I2V's
image condition) and the decoder receives ``latents / (1 / latents_std) + latents_mean``
(``latents_to_vae``), with ``1 / latents_std`` rounded to float32 first, as the pipelines do.

Precision: norms and the attention softmax compute in float32 whatever the weights' dtype, and
the 3-D convolutions add their bias in float32 before rounding (with bfloat16 weights and input,
a tiny model's decoder then errs against float32 diffusers about as much as diffusers in
bfloat16 does).  On
accelerators whose default float32 matmul/conv precision is reduced, wrap calls in
``jax.default_matmul_precision("highest")`` for fp32 parity.

Not supported: Wan2.2's VAE (``is_residual=True``: the average / duplicate shortcuts; a
``patch_size``) — refused, only Wan2.1's VAE is ported; non-empty ``attn_scales`` (no released
Wan2.1 VAE has them, and diffusers' decoder ignores them); tiling and slicing (we always run
the whole frame; results would differ only at tile seams); dropout (inference only: recorded,
not acted on); ``temperal_downsample`` halving time more than twice (a 4-frame chunk would
vanish); videos of other than ``1 + 4k`` frames, or whose height or width is not a multiple of
``spatial_factor`` (diffusers silently drops the frames after the last whole chunk and
decodes such sizes back to other sizes; we refuse them).  ``scale_factor_temporal`` / ``scale_factor_spatial`` are recorded; the factors
this module uses are computed from the architecture (``temporal_factor``, ``spatial_factor``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cfgzero_theory.ports.attention import attention
from cfgzero_theory.ports.autoencoder import Conv2d
from cfgzero_theory.ports.loading import IDENTITY, Transform, WeightMap, config_kwargs, conv_rows, load_module
from cfgzero_theory.ports.sharding import ParamSharding
from cfgzero_theory.validation import check_int, check_real

Array = jax.Array

__all__ = ["WAN_VAE_DIFFUSERS_CLASS_NAME", "WAN_VAE_WEIGHT_MAP", "WanVAE", "WanVAEConfig", "load_wan_vae"]

WAN_VAE_DIFFUSERS_CLASS_NAME = "AutoencoderKLWan"
CACHE_T = 2  # past frames every causal 3×3×3 / 3×1×1 conv keeps between chunks
ENCODE_CHUNK = 4  # video frames per encoder call after the first frame, as diffusers' _encode
NORM_EPS = 1e-12  # F.normalize's clamp on the norm
LOGVAR_RANGE = (-30.0, 20.0)
WAN21_ONLY = "only Wan2.1's VAE is ported"

# diffusers' defaults: Wan2.1's latent statistics
_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                 0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """The keys of a diffusers ``AutoencoderKLWan`` ``config.json`` (same defaults: Wan2.1's VAE).

    Sequences are normalised to tuples.  Construction raises ``ValueError`` naming a bad key;
    Wan2.2's keys (``is_residual=True``, a ``patch_size``) are refused.
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = _LATENTS_MEAN
    latents_std: tuple[float, ...] = _LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8

    def __post_init__(self):
        def as_tuple(name):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError(f"{name} must be a sequence, got {value!r}")
            object.__setattr__(self, name, tuple(value))
            return tuple(value)

        if not isinstance(self.is_residual, bool):
            raise ValueError(f"is_residual must be a bool, got {self.is_residual!r}")
        if self.is_residual:
            raise ValueError(f"is_residual=True is Wan2.2's VAE; {WAN21_ONLY} (is_residual=False)")
        if self.patch_size is not None:
            raise ValueError(f"patch_size={self.patch_size!r} is Wan2.2's VAE; {WAN21_ONLY} (patch_size=None)")
        for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        for name in ("decoder_base_dim", "scale_factor_temporal", "scale_factor_spatial"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        mult = as_tuple("dim_mult")
        if not mult:
            raise ValueError("dim_mult must be a non-empty sequence of positive integers, got ()")
        object.__setattr__(self, "dim_mult", tuple(check_int("dim_mult entry", m, minimum=1) for m in mult))
        if as_tuple("attn_scales"):
            raise ValueError(f"attn_scales must be empty (every released Wan2.1 VAE; diffusers' decoder ignores "
                             f"them), got {self.attn_scales!r}")
        temporal = as_tuple("temperal_downsample")
        if not all(isinstance(t, (bool, np.bool_)) for t in temporal) or len(temporal) != len(mult) - 1:
            raise ValueError(f"temperal_downsample must hold one bool per downsampling level ({len(mult) - 1}), "
                             f"got {temporal!r}")
        object.__setattr__(self, "temperal_downsample", tuple(bool(t) for t in temporal))
        if sum(self.temperal_downsample) > 2:
            raise ValueError(f"temperal_downsample may halve time at most twice (the encoder's {ENCODE_CHUNK}-frame "
                             f"chunks), got {temporal!r}")
        object.__setattr__(self, "dropout", check_real("dropout", self.dropout, minimum=0.0, maximum=1.0))
        for name in ("latents_mean", "latents_std"):
            values = as_tuple(name)
            if len(values) != self.z_dim:
                raise ValueError(f"{name} must have z_dim = {self.z_dim} entries, got {len(values)}")
            object.__setattr__(self, name, tuple(
                check_real(f"{name} entry", v, positive=name == "latents_std") for v in values))

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame (after the first), ``2^(number of temporal downsamplings)``."""
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel along each spatial axis, ``2^(len(dim_mult) − 1)``."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def decoder_dim(self) -> int:
        """The decoder's base width: ``decoder_base_dim``, or ``base_dim`` when it is ``None``."""
        return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim

    @classmethod
    def from_diffusers_config(cls, config: Mapping) -> WanVAEConfig:
        """Build from a diffusers ``config.json`` dict.

        Keys starting with ``_`` are metadata; ``_class_name``, when present, must be
        ``"AutoencoderKLWan"``.  Any other unknown key raises ``ValueError`` naming it; missing
        keys take diffusers' defaults.
        """
        return cls(**config_kwargs(cls, config, WAN_VAE_DIFFUSERS_CLASS_NAME))


# ----------------------------------------------------------------------------- layers


class Conv3d(nnx.Module):
    """A 3-D convolution on ``(B, F, H, W, C)`` arrays, kernel ``(k_t, k_h, k_w, in, out)``, zero
    padding ``k//2`` on both sides in space and none in time: the causal past is the caller's
    (:func:`_causal`).  The bias is added to the float32 sums before one rounding to the
    inputs' dtype, as torch's half-precision convolutions do."""

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int, int], *, time_stride: int = 1,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        fan_in = c_in * math.prod(kernel)
        self.kernel = nnx.Param(
            jax.random.normal(rngs.params(), (*kernel, c_in, c_out), param_dtype) / np.sqrt(fan_in)
        )
        self.bias = nnx.Param(jnp.zeros((c_out,), param_dtype))
        self.time_stride = time_stride

    def __call__(self, x: Array) -> Array:
        """``y[t] = b + Σ_τ conv2d(x[s·t + τ], kernel[τ])`` over the ``k_t`` time taps (stride ``s``):
        one 2-D convolution per tap on the frames it reads, summed in float32 — the same sums as
        one 3-D convolution, and 2.5–3.5× faster with XLA on a CPU, whose 3-D convolution is
        slow at these widths."""
        kernel = self.kernel[...]
        kt, kh, kw = kernel.shape[:3]
        dtype = jnp.promote_types(x.dtype, kernel.dtype)
        accumulate = jnp.promote_types(dtype, jnp.float32)
        batch, frames = x.shape[:2]
        out_frames = (frames - kt) // self.time_stride + 1
        x = x.astype(dtype)
        y = 0
        for tap in range(kt):
            taken = x[:, tap:tap + self.time_stride * (out_frames - 1) + 1:self.time_stride]
            y = y + jax.lax.conv_general_dilated(
                taken.reshape(batch * out_frames, *x.shape[2:]), kernel[tap].astype(dtype), (1, 1),
                ((kh // 2, kh // 2), (kw // 2, kw // 2)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                preferred_element_type=accumulate,
            )
        y = (y + self.bias[...].astype(accumulate)).astype(dtype)
        return y.reshape(batch, out_frames, *y.shape[1:])


def _causal(conv: Conv3d, x: Array, past: Array | None) -> tuple[Array, Array]:
    """``conv`` over ``[past; x]`` in time and the new past, the last ``CACHE_T`` frames of
    ``[past; x]``; ``past=None`` (the first chunk) is ``CACHE_T`` zero frames, the causal padding."""
    if past is None:
        past = jnp.zeros((x.shape[0], CACHE_T, *x.shape[2:]), x.dtype)
    frames = jnp.concatenate([past, x], axis=1)
    return conv(frames), frames[:, -CACHE_T:]


def _parts(cache, n: int) -> tuple:
    """A composite cache's parts; ``None`` (the first chunk) for each of ``n`` parts."""
    return (None,) * n if cache is None else cache


class RMSNorm(nnx.Module):
    """``WanRMS_norm`` over the last axis: ``x / max(‖x‖₂, 1e-12) · √C · γ``, in float32."""

    def __init__(self, channels: int, *, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((channels,), param_dtype))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
        normed = x32 / jnp.maximum(norm, NORM_EPS) * np.float32(math.sqrt(x.shape[-1]))
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class ResidualBlock(nnx.Module):
    """``norm → SiLU → causal conv → norm → SiLU → causal conv`` plus the (1×1×1-projected) input;
    cache ``(past of conv1, past of conv2)``."""

    def __init__(self, c_in: int, c_out: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.norm1 = RMSNorm(c_in, param_dtype=param_dtype)
        self.conv1 = Conv3d(c_in, c_out, (3, 3, 3), rngs=rngs, param_dtype=param_dtype)
        self.norm2 = RMSNorm(c_out, param_dtype=param_dtype)
        self.conv2 = Conv3d(c_out, c_out, (3, 3, 3), rngs=rngs, param_dtype=param_dtype)
        self.conv_shortcut = (
            Conv3d(c_in, c_out, (1, 1, 1), rngs=rngs, param_dtype=param_dtype) if c_in != c_out else None
        )

    def __call__(self, x: Array, cache=None) -> tuple[Array, tuple]:
        past1, past2 = _parts(cache, 2)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        h, past1 = _causal(self.conv1, jax.nn.silu(self.norm1(x)), past1)
        h, past2 = _causal(self.conv2, jax.nn.silu(self.norm2(h)), past2)
        return h + skip, (past1, past2)


class FrameAttention(nnx.Module):
    """``WanAttentionBlock``: single-head self-attention over the ``H·W`` positions of each frame,
    the norm in front and the residual added; softmax in float32, scale ``C^-1/2``."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.norm = RMSNorm(channels, param_dtype=param_dtype)
        self.qkv = Conv2d(channels, 3 * channels, 1, rngs=rngs, param_dtype=param_dtype)
        self.proj = Conv2d(channels, channels, 1, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        b, t, h, w, c = x.shape
        qkv = self.qkv(self.norm(x.reshape(b * t, h, w, c))).reshape(b * t, h * w, 1, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # one head of width C each
        out = self.proj(attention(q, k, v).reshape(b * t, h, w, c))
        return x + out.reshape(b, t, h, w, c)


class MidBlock(nnx.Module):
    """Residual block → frame attention → residual block at constant width; cache: the two blocks'."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.resnets = nnx.List([ResidualBlock(channels, channels, rngs=rngs, param_dtype=param_dtype)
                                 for _ in range(2)])
        self.attention = FrameAttention(channels, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: Array, cache=None) -> tuple[Array, tuple]:
        first, second = _parts(cache, 2)
        x, first = self.resnets[0](x, first)
        x, second = self.resnets[1](self.attention(x), second)
        return x, (first, second)


RESAMPLE_MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")


class Resample(nnx.Module):
    """``WanResample`` (module docstring): ``resample`` the per-frame conv3×3, ``time_conv`` the
    ``3×1×1`` time conv of the 3-D modes.  Cache: ``downsample3d`` its input's last frame after
    the spatial conv, ``upsample3d`` the past of its time conv, the 2-D modes ``None``."""

    def __init__(self, channels: int, mode: str, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.mode = mode
        if mode.startswith("up"):
            self.resample = Conv2d(channels, channels // 2, 3, rngs=rngs, param_dtype=param_dtype)
            self.time_conv = (Conv3d(channels, 2 * channels, (3, 1, 1), rngs=rngs, param_dtype=param_dtype)
                              if mode == "upsample3d" else None)
        else:
            self.resample = Conv2d(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs,
                                   param_dtype=param_dtype)
            self.time_conv = (Conv3d(channels, channels, (3, 1, 1), time_stride=2, rngs=rngs, param_dtype=param_dtype)
                              if mode == "downsample3d" else None)

    def __call__(self, x: Array, cache=None) -> tuple[Array, Array | None]:
        b, t, h, w, c = x.shape
        if self.mode == "upsample3d":
            if cache is None:  # the first chunk: no time upsampling, the conv's past stays zero
                cache = jnp.zeros((b, CACHE_T, h, w, c), x.dtype)
            else:  # channels [0, C) and [C, 2C) of frame i become frames 2i and 2i + 1
                y, cache = _causal(self.time_conv, x, cache)
                x = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
                t *= 2
        if self.mode.startswith("up"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        y = self.resample(x.reshape(b * t, *x.shape[2:]))
        y = y.reshape(b, t, *y.shape[1:])
        if self.mode == "downsample3d":
            last = y[:, -1:]
            if cache is not None:  # the first chunk is not downsampled in time
                y = self.time_conv(jnp.concatenate([cache, y], axis=1))
            cache = last
        return y, cache


class UpBlock(nnx.Module):
    """One decoder level: ``L + 1`` residual blocks, then an optional :class:`Resample`."""

    def __init__(self, c_in: int, c_out: int, layers: int, mode: str | None, *, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        self.resnets = nnx.List([
            ResidualBlock(c_in if j == 0 else c_out, c_out, rngs=rngs, param_dtype=param_dtype) for j in range(layers)
        ])
        self.upsample = None if mode is None else Resample(c_out, mode, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: Array, cache=None) -> tuple[Array, tuple]:
        resnet_caches, upsample_cache = _parts(cache, 2)
        new = []
        for resnet, past in zip(self.resnets, _parts(resnet_caches, len(self.resnets))):
            x, past = resnet(x, past)
            new.append(past)
        if self.upsample is not None:
            x, upsample_cache = self.upsample(x, upsample_cache)
        return x, (tuple(new), upsample_cache)


class Encoder(nnx.Module):
    """One chunk of video ``(B, F, H, W, in_channels)`` → moments ``(B, F', h, w, 2·z_dim)``
    (before ``quant_conv``), and the cache for the next chunk."""

    def __init__(self, config: WanVAEConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        last_level = len(config.dim_mult) - 1
        self.conv_in = Conv3d(config.in_channels, dims[0], (3, 3, 3), rngs=rngs, param_dtype=param_dtype)
        blocks = []
        for k, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            for j in range(config.num_res_blocks):
                blocks.append(ResidualBlock(c_in if j == 0 else c_out, c_out, rngs=rngs, param_dtype=param_dtype))
            if k < last_level:
                mode = "downsample3d" if config.temperal_downsample[k] else "downsample2d"
                blocks.append(Resample(c_out, mode, rngs=rngs, param_dtype=param_dtype))
        self.down_blocks = nnx.List(blocks)
        self.mid = MidBlock(dims[-1], rngs=rngs, param_dtype=param_dtype)
        self.norm_out = RMSNorm(dims[-1], param_dtype=param_dtype)
        self.conv_out = Conv3d(dims[-1], 2 * config.z_dim, (3, 3, 3), rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: Array, cache=None) -> tuple[Array, tuple]:
        conv_in, blocks, mid, conv_out = _parts(cache, 4)
        x, conv_in = _causal(self.conv_in, x, conv_in)
        new = []
        for block, past in zip(self.down_blocks, _parts(blocks, len(self.down_blocks))):
            x, past = block(x, past)
            new.append(past)
        x, mid = self.mid(x, mid)
        x, conv_out = _causal(self.conv_out, jax.nn.silu(self.norm_out(x)), conv_out)
        return x, (conv_in, tuple(new), mid, conv_out)


class Decoder(nnx.Module):
    """One latent frame ``(B, 1, h, w, z_dim)`` (after ``post_quant_conv``) → its video frames
    ``(B, F', H, W, out_channels)`` (``F' = 1`` on the first chunk), and the cache."""

    def __init__(self, config: WanVAEConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        mult = config.dim_mult
        dims = [config.decoder_dim * m for m in (mult[-1], *reversed(mult))]
        temporal = tuple(reversed(config.temperal_downsample))
        last_level = len(mult) - 1
        self.conv_in = Conv3d(config.z_dim, dims[0], (3, 3, 3), rngs=rngs, param_dtype=param_dtype)
        self.mid = MidBlock(dims[0], rngs=rngs, param_dtype=param_dtype)
        levels = []
        for k, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            mode = None if k == last_level else ("upsample3d" if temporal[k] else "upsample2d")
            levels.append(UpBlock(c_in if k == 0 else c_in // 2, c_out, config.num_res_blocks + 1, mode, rngs=rngs,
                                  param_dtype=param_dtype))
        self.up_blocks = nnx.List(levels)
        self.norm_out = RMSNorm(dims[-1], param_dtype=param_dtype)
        self.conv_out = Conv3d(dims[-1], config.out_channels, (3, 3, 3), rngs=rngs, param_dtype=param_dtype)

    def __call__(self, z: Array, cache=None) -> tuple[Array, tuple]:
        conv_in, mid, levels, conv_out = _parts(cache, 4)
        x, conv_in = _causal(self.conv_in, z, conv_in)
        x, mid = self.mid(x, mid)
        new = []
        for level, past in zip(self.up_blocks, _parts(levels, len(self.up_blocks))):
            x, past = level(x, past)
            new.append(past)
        x, conv_out = _causal(self.conv_out, jax.nn.silu(self.norm_out(x)), conv_out)
        return x, (conv_in, mid, tuple(new), conv_out)


def _channels_last(x: Array) -> Array:
    return jnp.moveaxis(x, 1, -1)


def _channels_first(x: Array) -> Array:
    return jnp.moveaxis(x, -1, 1)


def _stream(module, first: Array, chunks: Array) -> Array:
    """``module`` (``(x, cache) -> (y, cache)``) on ``first`` (cache ``None``), then on each of
    ``chunks`` ``(B, n, k, …)`` along axis 1 by a :func:`jax.lax.scan` carrying the cache; the
    outputs concatenated along time."""
    out, cache = module(first)

    def step(cache, chunk):
        y, cache = module(chunk, cache)
        return cache, y

    _, outs = jax.lax.scan(step, cache, jnp.swapaxes(chunks, 0, 1))  # (n, B, k', …)
    outs = jnp.swapaxes(outs, 0, 1)
    return jnp.concatenate([out, outs.reshape(outs.shape[0], -1, *outs.shape[3:])], axis=1)


class WanVAE(nnx.Module):
    """``diffusers.AutoencoderKLWan`` (Wan2.1) in NNX; ``(B, C, F, H, W)`` in and out.

    Build with random weights from a :class:`WanVAEConfig`, or load a diffusers checkpoint with
    :func:`load_wan_vae`.
    """

    def __init__(self, config: WanVAEConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if not isinstance(config, WanVAEConfig):
            raise ValueError(f"config must be a WanVAEConfig, got {type(config).__name__}")
        self.config = config
        z = config.z_dim
        self.encoder = Encoder(config, rngs=rngs, param_dtype=param_dtype)
        self.quant_conv = Conv3d(2 * z, 2 * z, (1, 1, 1), rngs=rngs, param_dtype=param_dtype)
        self.post_quant_conv = Conv3d(z, z, (1, 1, 1), rngs=rngs, param_dtype=param_dtype)
        self.decoder = Decoder(config, rngs=rngs, param_dtype=param_dtype)

    def encode(self, video: Array) -> tuple[Array, Array]:
        """Video ``(B, in_channels, F, H, W)``, ``F = 1 + 4k`` and ``H``, ``W`` multiples of
        ``spatial_factor`` → ``(mean, logvar)``, each ``(B, z_dim, 1 + 4k/T, H/s, W/s)``
        (``T = temporal_factor``, ``s = spatial_factor``: Wan2.1 gives ``1 + k`` frames of
        ``H/8 × W/8``); ``logvar`` clipped to ``[−30, 20]``.  The first frame is encoded alone,
        then the 4-frame chunks in a scan (module docstring)."""
        cfg = self.config
        video = jnp.asarray(video)
        if video.ndim != 5 or video.shape[1] != cfg.in_channels:
            raise ValueError(f"video must have shape (B, {cfg.in_channels}, F, H, W), got {video.shape}")
        frames, height, width = video.shape[2:]
        if frames % ENCODE_CHUNK != 1:
            raise ValueError(f"video must have 1 + {ENCODE_CHUNK}k frames (1, 5, 9, ...), got {frames}")
        if height % cfg.spatial_factor or width % cfg.spatial_factor:
            raise ValueError(f"video height and width must be multiples of {cfg.spatial_factor}, "
                             f"got {height}×{width}")
        x = _channels_last(video)
        chunks = x[:, 1:].reshape(x.shape[0], -1, ENCODE_CHUNK, *x.shape[2:])
        moments = _channels_first(self.quant_conv(_stream(self.encoder, x[:, :1], chunks)))
        mean, logvar = jnp.split(moments, 2, axis=1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: Array) -> Array:
        """VAE latent ``(B, z_dim, f, h, w)`` → video ``(B, out_channels, 1 + T·(f − 1), h·s, w·s)``
        (Wan2.1: ``1 + 4(f − 1)`` frames of ``8h × 8w``) clipped to ``[−1, 1]``.  The first latent
        frame is decoded alone, then the others one at a time in a scan (module docstring)."""
        z = jnp.asarray(z)
        if z.ndim != 5 or z.shape[1] != self.config.z_dim or z.shape[2] < 1:
            raise ValueError(f"z must have shape (B, {self.config.z_dim}, f, h, w) with f >= 1, got {z.shape}")
        x = self.post_quant_conv(_channels_last(z))
        video = _stream(self.decoder, x[:, :1], x[:, 1:, None])
        return jnp.clip(_channels_first(video), -1.0, 1.0)

    def _statistics(self, latents: Array, name: str) -> tuple[Array, Array]:
        """``(latents_mean, 1 / latents_std)`` as ``(1, z_dim, 1, 1, 1)`` arrays of ``latents``' dtype."""
        z = self.config.z_dim
        if latents.ndim != 5 or latents.shape[1] != z:
            raise ValueError(f"{name} must have shape (B, {z}, f, h, w), got {latents.shape}")
        mean = np.asarray(self.config.latents_mean, np.float32).reshape(1, z, 1, 1, 1)
        inv_std = (1.0 / np.asarray(self.config.latents_std, np.float32)).reshape(1, z, 1, 1, 1)
        return jnp.asarray(mean, latents.dtype), jnp.asarray(inv_std, latents.dtype)

    def latents_to_vae(self, latents: Array) -> Array:
        """Denoiser latents → decoder input: ``latents / (1 / latents_std) + latents_mean`` per
        channel (axis 1), as the Wan pipelines do before ``vae.decode``."""
        latents = jnp.asarray(latents)
        mean, inv_std = self._statistics(latents, "latents")
        return latents / inv_std + mean

    def vae_to_latents(self, mean: Array) -> Array:
        """Encoder mean → denoiser latents: ``(mean − latents_mean) · (1 / latents_std)`` per
        channel (axis 1), as the I2V pipeline normalises its encoded condition."""
        mean = jnp.asarray(mean)
        shift, inv_std = self._statistics(mean, "mean")
        return (mean - shift) * inv_std


# ----------------------------------------------------------------------------- weights


def _gamma_rows(diffusers: str, ours: str, kind: str) -> tuple[tuple[str, str, str], ...]:
    return ((f"{diffusers}.gamma", f"{ours}.scale", kind),)


def _residual(diffusers: str, ours: str) -> tuple[tuple[str, str, str], ...]:
    return (
        *_gamma_rows(f"{diffusers}.norm{{n}}", f"{ours}.norm{{n}}", "video_gamma"),
        *conv_rows(f"{diffusers}.conv{{n}}", f"{ours}.conv{{n}}"),
        *conv_rows(f"{diffusers}.conv_shortcut", f"{ours}.conv_shortcut"),
    )


def _resample(diffusers: str, ours: str) -> tuple[tuple[str, str, str], ...]:
    return (*conv_rows(f"{diffusers}.resample.1", f"{ours}.resample"),
            *conv_rows(f"{diffusers}.time_conv", f"{ours}.time_conv"))


def _side(side: str) -> tuple[tuple[str, str, str], ...]:
    mid, attn = f"{side}.mid_block", f"{side}.mid_block.attentions.0"
    return (
        *conv_rows(f"{side}.conv_in", f"{side}.conv_in"),
        *_residual(f"{mid}.resnets.{{j}}", f"{side}.mid.resnets.{{j}}"),
        *_gamma_rows(f"{attn}.norm", f"{side}.mid.attention.norm", "image_gamma"),
        *conv_rows(f"{attn}.to_qkv", f"{side}.mid.attention.qkv"),
        *conv_rows(f"{attn}.proj", f"{side}.mid.attention.proj"),
        *_gamma_rows(f"{side}.norm_out", f"{side}.norm_out", "video_gamma"),
        *conv_rows(f"{side}.conv_out", f"{side}.conv_out"),
    )


WAN_VAE_WEIGHT_MAP: tuple[tuple[str, str, str], ...] = (
    # (diffusers key, our state path, transform)
    *_side("encoder"),
    *_residual("encoder.down_blocks.{k}", "encoder.down_blocks.{k}"),
    *_resample("encoder.down_blocks.{k}", "encoder.down_blocks.{k}"),
    *_side("decoder"),
    *_residual("decoder.up_blocks.{i}.resnets.{j}", "decoder.up_blocks.{i}.resnets.{j}"),
    *_resample("decoder.up_blocks.{i}.upsamplers.0", "decoder.up_blocks.{i}.upsample"),
    *conv_rows("quant_conv", "quant_conv"),
    *conv_rows("post_quant_conv", "post_quant_conv"),
)
"""The Wan VAE weight mapping: ``{k}`` an entry of the encoder's flat block list, ``{i}`` a
decoder level, ``{j}`` a residual block, ``{n}`` ``1``/``2``; transforms ``identity``, ``conv``
(torch ``Conv2d``/``Conv3d`` ``(out, in, *kernel)`` → ``(*kernel, in, out)``) and the norm gammas
``video_gamma`` (stored ``(C, 1, 1, 1)``) and ``image_gamma`` (the attention norm's, ``(C, 1, 1)``)
→ ``(C,)``."""


def _gamma(trailing: int) -> Transform:
    return Transform(lambda a: a.reshape(-1), lambda shape, cfg: (shape[0],) + (1,) * trailing)


_TRANSFORMS = {
    "identity": IDENTITY,
    "conv": Transform(lambda a: a.transpose(*range(2, a.ndim), 1, 0),
                      lambda shape, cfg: (shape[-1], shape[-2], *shape[:-2])),
    "video_gamma": _gamma(3),
    "image_gamma": _gamma(2),
}

_WAN_VAE_WEIGHT_MAP = WeightMap(
    WAN_VAE_WEIGHT_MAP, {"k": r"\d+", "i": r"\d+", "j": r"\d+", "n": "[12]"}, _TRANSFORMS,
)


def _encoder_blocks(config: WanVAEConfig) -> int:
    levels = len(config.dim_mult)
    return levels * config.num_res_blocks + levels - 1


def load_wan_vae(
    folder: str | os.PathLike, *, dtype=None, variant: str | None = None, sharding: ParamSharding | None = None,
) -> WanVAE:
    """Load a diffusers ``AutoencoderKLWan`` folder (``.../vae``) into an NNX :class:`WanVAE`.

    Same folder rules and checks as :func:`~cfgzero_theory.ports.autoencoder.load_vae` (both are
    :func:`cfgzero_theory.ports.loading.load_module`): ``config.json`` with ``_class_name``
    ``"AutoencoderKLWan"`` (a Wan2.2 config is refused), safetensors only, every missing,
    unexpected or wrongly shaped key reported in one ``ValueError`` before any tensor data is
    read; ``dtype`` casts every tensor (``None`` keeps the stored dtype), ``variant`` reads
    ``diffusion_pytorch_model.<variant>.safetensors`` and ``sharding`` lays the weights out over
    a device mesh as they are read.
    """
    return load_module(
        folder, WanVAE, WanVAEConfig, _WAN_VAE_WEIGHT_MAP,
        class_name=WAN_VAE_DIFFUSERS_CLASS_NAME, what="Wan vae/", dtype=dtype, variant=variant, sharding=sharding,
        repeats={  # the encoder's flat block list, decoder levels, residual blocks per decoder level (mid: 2)
            "k": ("len(dim_mult)·(num_res_blocks + 1) − 1", _encoder_blocks),
            "i": ("len(dim_mult)", lambda config: len(config.dim_mult)),
            "j": ("num_res_blocks + 1", lambda config: config.num_res_blocks + 1),
        },
    )
