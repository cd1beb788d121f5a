"""The SD3 / SD3.5 image autoencoder in Flax NNX, faithful to ``diffusers.AutoencoderKL``.

Public API
----------
* :class:`VAEConfig` (``VAEConfig.from_diffusers_config(dict)``);
* :class:`AutoencoderKL`: ``encode(x) -> (mean, logvar)``, ``decode(z) -> image``,
  ``latents_to_vae`` / ``vae_to_latents`` (SD3's latent scaling), all arrays NCHW;
* :func:`sample_latent` ``(mean, logvar, key)`` — a draw from the diagonal Gaussian;
* :data:`VAE_WEIGHT_MAP` and :func:`load_vae` ``(folder, *, dtype=None, variant=None,
  sharding=None)`` for a diffusers ``vae/`` folder.

Architecture (``C_k = block_out_channels[k]``, ``L = layers_per_block``; all group norms
have ``norm_num_groups`` groups, eps ``1e-6``, statistics in float32 with the biased variance)
---------------------------------------------------------------------------------------------
* **ResNet block**: ``GN → SiLU → conv3×3 → GN → SiLU → conv3×3``, plus the input (through a
  1×1 conv when the channel count changes).
* **Mid block** (at ``C_last``): ResNet, then (``mid_block_add_attention``) a single-head
  spatial self-attention — GN, q/k/v linear maps over channels, softmax (in float32) with
  scale ``C_last^-1/2``, output linear map, plus the residual — then ResNet.
* **Encoder**: conv3×3 ``in → C_0``; for each level ``k`` ``L`` ResNets ``→ C_k`` and, except
  at the last level, a downsample — zero-pad one pixel on the right and bottom only, then a
  stride-2 conv3×3 without padding; mid block; GN → SiLU → conv3×3 ``→ 2·latent_channels``;
  optionally the 1×1 ``quant_conv``.  The moments split along channels into ``(mean,
  logvar)``; ``logvar`` is clipped to ``[−30, 20]``.
* **Decoder**: optional 1×1 ``post_quant_conv``; conv3×3 ``latent → C_last``; mid block; the
  levels in reverse (``L + 1`` ResNets each, then, except at the last, nearest-neighbour ×2
  upsampling followed by a conv3×3); GN → SiLU → conv3×3 ``→ out_channels``.

Convolutions run NHWC internally (kernels stored HWIO); the public methods take and return
NCHW like diffusers.  On accelerators whose default float32 matmul/conv precision is
reduced, wrap calls in ``jax.default_matmul_precision("highest")`` for fp32 parity.

SD3 latent scaling (the pipelines' formulas): the denoiser's latents are
``(vae_mean_or_sample − shift_factor) · scaling_factor`` (``vae_to_latents``, img2img's
encode side) and the decoder receives ``z / scaling_factor + shift_factor``
(``latents_to_vae``).  ``shift_factor=None`` counts as ``0``.

Not supported: activations other than SiLU, block types other than ``DownEncoderBlock2D`` /
``UpDecoderBlock2D``, the spatial-norm decoder (``MoVQ``), tiling / slicing (the results would
differ only at tile seams; we always run the whole image), legacy attention key names
(``query``/``key``/``value``/``proj_attn``), and ``force_upcast`` (recorded, not acted on:
choose the dtype with ``load_vae(..., dtype=...)``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cfgzero_theory.ports.loading import (
    CONV, IDENTITY, LINEAR, WeightMap, config_kwargs, conv_rows, linear_rows, load_module, norm_rows,
)
from cfgzero_theory.ports.attention import attention
from cfgzero_theory.ports.sharding import ParamSharding
from cfgzero_theory.validation import check_choice, check_int, check_real

Array = jax.Array

__all__ = [
    "AutoencoderKL", "VAEConfig", "VAE_DIFFUSERS_CLASS_NAME", "VAE_WEIGHT_MAP", "load_vae", "sample_latent",
]

VAE_DIFFUSERS_CLASS_NAME = "AutoencoderKL"
GN_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
ACTIVATIONS = ("silu", "swish")


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The keys of a diffusers ``AutoencoderKL`` ``config.json`` (same defaults).

    Sequences are normalised to tuples.  Construction raises ``ValueError`` naming a bad key.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (DOWN_BLOCK,)
    up_block_types: tuple[str, ...] = (UP_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        def as_tuple(name):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError(f"{name} must be a sequence, got {value!r}")
            object.__setattr__(self, name, tuple(value))

        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            as_tuple(name)
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        if not self.block_out_channels:
            raise ValueError("block_out_channels must be a non-empty sequence of positive integers, got ()")
        channels = tuple(check_int("block_out_channels entry", c, minimum=1) for c in self.block_out_channels)
        object.__setattr__(self, "block_out_channels", channels)
        bad = [c for c in channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups ({self.norm_num_groups}) must divide every block_out_channels entry, got {channels!r}")
        for name, allowed in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
            types = getattr(self, name)
            if len(types) != len(channels):
                raise ValueError(f"{name} must have one entry per block_out_channels entry ({len(channels)}), got {types!r}")
            if any(t != allowed for t in types):
                raise ValueError(f"{name}: only {allowed!r} is supported, got {types!r}")
        check_choice("act_fn", self.act_fn, ACTIVATIONS)
        object.__setattr__(self, "scaling_factor", check_real("scaling_factor", self.scaling_factor))
        if self.scaling_factor == 0:
            raise ValueError("scaling_factor must be non-zero")
        if self.shift_factor is not None:
            object.__setattr__(self, "shift_factor", check_real("shift_factor", self.shift_factor))
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is not None:
                as_tuple(name)
        if isinstance(self.sample_size, (list, tuple)):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        for name in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each axis, ``2^(levels − 1)``."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers_config(cls, config: Mapping) -> VAEConfig:
        """Build from a diffusers ``config.json`` dict.

        Keys starting with ``_`` are metadata; ``_class_name``, when present, must be
        ``"AutoencoderKL"``.  Any other unknown key raises ``ValueError`` naming it; missing
        keys take diffusers' defaults.
        """
        return cls(**config_kwargs(cls, config, VAE_DIFFUSERS_CLASS_NAME))


# ----------------------------------------------------------------------------- layers


class Conv2d(nnx.Module):
    """A 2-D convolution on NHWC arrays, kernel ``(k, k, in, out)``; ``padding`` as for
    ``lax.conv_general_dilated`` (``((top, bottom), (left, right))``)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, *, stride: int = 1, padding=None, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        fan_in = c_in * kernel * kernel
        self.kernel = nnx.Param(
            jax.random.normal(rngs.params(), (kernel, kernel, c_in, c_out), param_dtype) / np.sqrt(fan_in)
        )
        self.bias = nnx.Param(jnp.zeros((c_out,), param_dtype))
        self.stride = stride
        self.padding = ((kernel // 2, kernel // 2),) * 2 if padding is None else padding

    def __call__(self, x: Array) -> Array:
        kernel = self.kernel[...]
        dtype = jnp.promote_types(x.dtype, kernel.dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(dtype), kernel.astype(dtype), (self.stride, self.stride), self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.bias[...].astype(dtype)


class GroupNorm(nnx.Module):
    """torch ``GroupNorm`` on NHWC arrays: statistics in float32, biased variance, affine."""

    def __init__(self, channels: int, groups: int, *, param_dtype=jnp.float32):
        self.groups = groups
        self.scale = nnx.Param(jnp.ones((channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))

    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        x32 = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = x32.mean(axis=(1, 2, 4), keepdims=True)
        centred = x32 - mean
        var = jnp.mean(centred * centred, axis=(1, 2, 4), keepdims=True)
        normed = (centred * jax.lax.rsqrt(var + GN_EPS)).reshape(b, h, w, c).astype(x.dtype)
        return normed * self.scale[...] + self.bias[...]


class ResnetBlock(nnx.Module):
    """``GN → SiLU → conv → GN → SiLU → conv`` plus the (1×1-projected) input."""

    def __init__(self, c_in: int, c_out: int, groups: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.norm1 = GroupNorm(c_in, groups, param_dtype=param_dtype)
        self.conv1 = Conv2d(c_in, c_out, 3, rngs=rngs, param_dtype=param_dtype)
        self.norm2 = GroupNorm(c_out, groups, param_dtype=param_dtype)
        self.conv2 = Conv2d(c_out, c_out, 3, rngs=rngs, param_dtype=param_dtype)
        self.conv_shortcut = Conv2d(c_in, c_out, 1, rngs=rngs, param_dtype=param_dtype) if c_in != c_out else None

    def __call__(self, x: Array) -> Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class MidAttention(nnx.Module):
    """Single-head self-attention over the ``H·W`` positions, with a group norm in front and
    the residual added; softmax in float32, scale ``C^-1/2``."""

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.norm = GroupNorm(channels, groups, param_dtype=param_dtype)
        self.q = nnx.Linear(channels, channels, rngs=rngs, param_dtype=param_dtype)
        self.k = nnx.Linear(channels, channels, rngs=rngs, param_dtype=param_dtype)
        self.v = nnx.Linear(channels, channels, rngs=rngs, param_dtype=param_dtype)
        self.out = nnx.Linear(channels, channels, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        tokens = self.norm(x).reshape(b, h * w, c)
        q, k, v = (proj(tokens)[:, :, None, :] for proj in (self.q, self.k, self.v))  # one head of width C
        out = self.out(attention(q, k, v)[:, :, 0, :])
        return x + out.reshape(b, h, w, c)


class MidBlock(nnx.Module):
    """ResNet → (attention) → ResNet at constant width."""

    def __init__(self, channels: int, groups: int, attention: bool, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.resnets = nnx.List([
            ResnetBlock(channels, channels, groups, rngs=rngs, param_dtype=param_dtype) for _ in range(2)
        ])
        self.attention = MidAttention(channels, groups, rngs=rngs, param_dtype=param_dtype) if attention else None

    def __call__(self, x: Array) -> Array:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


def _resnet_stack(c_in: int, c_out: int, layers: int, groups: int, *, rngs: nnx.Rngs, param_dtype) -> nnx.List:
    """``layers`` ResNets ``c_in → c_out → … → c_out``."""
    return nnx.List([
        ResnetBlock(c_in if j == 0 else c_out, c_out, groups, rngs=rngs, param_dtype=param_dtype) for j in range(layers)
    ])


class DownBlock(nnx.Module):
    """``DownEncoderBlock2D``: ResNets, then (optionally) pad right/bottom by one and a stride-2 conv."""

    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, downsample: bool, *, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        self.resnets = _resnet_stack(c_in, c_out, layers, groups, rngs=rngs, param_dtype=param_dtype)
        self.downsample = (
            Conv2d(c_out, c_out, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs, param_dtype=param_dtype)
            if downsample else None
        )

    def __call__(self, x: Array) -> Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsample is None else self.downsample(x)


class UpBlock(nnx.Module):
    """``UpDecoderBlock2D``: ResNets, then (optionally) nearest ×2 and a conv3×3."""

    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, upsample: bool, *, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        self.resnets = _resnet_stack(c_in, c_out, layers, groups, rngs=rngs, param_dtype=param_dtype)
        self.upsample = Conv2d(c_out, c_out, 3, rngs=rngs, param_dtype=param_dtype) if upsample else None

    def __call__(self, x: Array) -> Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsample is not None:
            x = self.upsample(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
        return x


class Encoder(nnx.Module):
    """Image (NHWC) → moments ``(B, h, w, 2·latent_channels)`` (before ``quant_conv``)."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        ch, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, ch[0], 3, rngs=rngs, param_dtype=param_dtype)
        self.down_blocks = nnx.List([
            DownBlock(ch[max(k - 1, 0)], ch[k], config.layers_per_block, groups, k < len(ch) - 1, rngs=rngs,
                      param_dtype=param_dtype)
            for k in range(len(ch))
        ])
        self.mid = MidBlock(ch[-1], groups, config.mid_block_add_attention, rngs=rngs, param_dtype=param_dtype)
        self.norm_out = GroupNorm(ch[-1], groups, param_dtype=param_dtype)
        self.conv_out = Conv2d(ch[-1], 2 * config.latent_channels, 3, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class Decoder(nnx.Module):
    """Latent (NHWC, after ``post_quant_conv``) → image."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        ch, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = Conv2d(config.latent_channels, ch[0], 3, rngs=rngs, param_dtype=param_dtype)
        self.mid = MidBlock(ch[0], groups, config.mid_block_add_attention, rngs=rngs, param_dtype=param_dtype)
        self.up_blocks = nnx.List([
            UpBlock(ch[max(k - 1, 0)], ch[k], config.layers_per_block + 1, groups, k < len(ch) - 1, rngs=rngs,
                    param_dtype=param_dtype)
            for k in range(len(ch))
        ])
        self.norm_out = GroupNorm(ch[-1], groups, param_dtype=param_dtype)
        self.conv_out = Conv2d(ch[-1], config.out_channels, 3, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, z: Array) -> Array:
        x = self.mid(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


def _nhwc(x: Array) -> Array:
    return jnp.transpose(x, (0, 2, 3, 1))


def _nchw(x: Array) -> Array:
    return jnp.transpose(x, (0, 3, 1, 2))


def sample_latent(mean: Array, logvar: Array, key: Array) -> Array:
    """A draw ``mean + exp(logvar / 2) · ε``, ``ε ~ N(0, I)`` (``logvar`` already clipped by ``encode``)."""
    noise = jax.random.normal(key, mean.shape, jnp.float32).astype(mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * noise


class AutoencoderKL(nnx.Module):
    """``diffusers.AutoencoderKL`` (SD3 flavour: 16 latent channels, no quant convs); NCHW in and out."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.config = config
        self.encoder = Encoder(config, rngs=rngs, param_dtype=param_dtype)
        self.decoder = Decoder(config, rngs=rngs, param_dtype=param_dtype)
        lat = config.latent_channels
        self.quant_conv = (
            Conv2d(2 * lat, 2 * lat, 1, rngs=rngs, param_dtype=param_dtype) if config.use_quant_conv else None
        )
        self.post_quant_conv = (
            Conv2d(lat, lat, 1, rngs=rngs, param_dtype=param_dtype) if config.use_post_quant_conv else None
        )

    def encode(self, x: Array) -> tuple[Array, Array]:
        """Image ``(B, in_channels, H, W)`` → ``(mean, logvar)``, each ``(B, latent_channels, H/f, W/f)``,
        ``f = config.downsample_factor``; ``logvar`` clipped to ``[−30, 20]``."""
        moments = self.encoder(_nhwc(x))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(_nchw(moments), 2, axis=1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: Array) -> Array:
        """VAE latent ``(B, latent_channels, h, w)`` → image ``(B, out_channels, h·f, w·f)``."""
        z = _nhwc(z)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return _nchw(self.decoder(z))

    def latents_to_vae(self, latents: Array) -> Array:
        """Denoiser latents → decoder input: ``latents / scaling_factor + shift_factor``."""
        return latents / self.config.scaling_factor + (self.config.shift_factor or 0.0)

    def vae_to_latents(self, z: Array) -> Array:
        """Encoder latent → denoiser latents: ``(z − shift_factor) · scaling_factor``."""
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor


# ----------------------------------------------------------------------------- weights


def _resnet(diffusers: str, ours: str) -> tuple[tuple[str, str, str], ...]:
    return (
        *norm_rows(f"{diffusers}.norm{{n}}", f"{ours}.norm{{n}}"),
        *conv_rows(f"{diffusers}.conv{{n}}", f"{ours}.conv{{n}}"),
        *conv_rows(f"{diffusers}.conv_shortcut", f"{ours}.conv_shortcut"),
    )


def _side(side: str) -> tuple[tuple[str, str, str], ...]:
    mid, attn = f"{side}.mid_block", f"{side}.mid_block.attentions.0"
    return (
        *conv_rows(f"{side}.conv_in", f"{side}.conv_in"),
        *_resnet(f"{mid}.resnets.{{j}}", f"{side}.mid.resnets.{{j}}"),
        *norm_rows(f"{attn}.group_norm", f"{side}.mid.attention.norm"),
        *linear_rows(f"{attn}.to_{{x}}", f"{side}.mid.attention.{{x}}"),
        *linear_rows(f"{attn}.to_out.0", f"{side}.mid.attention.out"),
        *norm_rows(f"{side}.conv_norm_out", f"{side}.norm_out"),
        *conv_rows(f"{side}.conv_out", f"{side}.conv_out"),
    )


VAE_WEIGHT_MAP: tuple[tuple[str, str, str], ...] = (
    # (diffusers key, our state path, transform)
    *_side("encoder"),
    *_resnet("encoder.down_blocks.{i}.resnets.{j}", "encoder.down_blocks.{i}.resnets.{j}"),
    *conv_rows("encoder.down_blocks.{i}.downsamplers.0.conv", "encoder.down_blocks.{i}.downsample"),
    *_side("decoder"),
    *_resnet("decoder.up_blocks.{i}.resnets.{j}", "decoder.up_blocks.{i}.resnets.{j}"),
    *conv_rows("decoder.up_blocks.{i}.upsamplers.0.conv", "decoder.up_blocks.{i}.upsample"),
    *conv_rows("quant_conv", "quant_conv"),
    *conv_rows("post_quant_conv", "post_quant_conv"),
)
"""The VAE weight mapping: ``{i}`` a level, ``{j}`` a ResNet index, ``{n}`` ``1``/``2``,
``{x}`` ``q``/``k``/``v``; transforms ``identity``, ``linear`` (transpose), ``conv`` (OIHW → HWIO)."""

_VAE_WEIGHT_MAP = WeightMap(
    VAE_WEIGHT_MAP,
    {"i": r"\d+", "j": r"\d+", "n": "[12]", "x": "[qkv]"},
    {"identity": IDENTITY, "linear": LINEAR, "conv": CONV},
)


def load_vae(
    folder: str | os.PathLike, *, dtype=None, variant: str | None = None, sharding: ParamSharding | None = None,
) -> AutoencoderKL:
    """Load a diffusers ``AutoencoderKL`` folder (``.../vae``) into an NNX :class:`AutoencoderKL`.

    Same folder rules and checks as :func:`~cfgzero_theory.sd3.weights.load_sd3_transformer`
    (both are :func:`cfgzero_theory.ports.loading.load_module`): ``config.json`` with
    ``_class_name`` ``"AutoencoderKL"``, safetensors only (single or sharded), every problem in
    the headers (missing / unexpected / wrongly shaped keys) reported in one ``ValueError``
    before any tensor data is read; tensors are then read, transformed, cast (``dtype``;
    ``None`` keeps the stored dtype) and placed one at a time — on the default device, or split
    over a device mesh as ``sharding`` (a :class:`~cfgzero_theory.ports.sharding.ParamSharding`) says.
    """
    return load_module(
        folder, AutoencoderKL, VAEConfig, _VAE_WEIGHT_MAP,
        class_name=VAE_DIFFUSERS_CLASS_NAME, what="vae/", dtype=dtype, variant=variant, sharding=sharding,
        repeats={  # levels, and ResNets per level (the decoder's layers_per_block + 1; the mid block's 2)
            "i": ("len(block_out_channels)", lambda config: len(config.block_out_channels)),
            "j": ("layers_per_block + 1", lambda config: config.layers_per_block + 1),
        },
    )
