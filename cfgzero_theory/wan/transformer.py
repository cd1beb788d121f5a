"""The Wan2.1 video denoiser in Flax NNX, faithful to ``diffusers.WanTransformer3DModel`` (T2V and I2V).

Architecture (``D = num_attention_heads · attention_head_dim``; latents ``(B, C, F, H, W)``):

1. **Patch embedding**: the ``Conv3d`` with kernel = stride = ``patch_size`` (``(1, 2, 2)``),
   written as one linear map over patches flattened in the kernel's ``(c, t, h, w)`` order;
   tokens in ``(f, h, w)`` row-major order.
2. **Conditioning**: ``temb = MLP_t(sincos_256(τ))`` (``Linear → SiLU → Linear``, float32),
   ``e = Linear(SiLU(temb))`` chunked into 6 vectors; the text ``Linear → GELU(tanh) →
   Linear`` (``text_dim → D``); for I2V the image tokens ``LN₃₂ → Linear → GELU → Linear → LN₃₂``
   (affine LayerNorms, eps ``1e-5``, exact GELU) placed **before** the text: ``context =
   [image; text]``.
3. **3-D RoPE** (self-attention only): the head dimension splits into ``t, h, w`` parts —
   ``h = w = 2⌊head_dim/6⌋``, ``t = head_dim − 2h`` — each with frequencies ``θ^(−2j/d)``
   (θ = 10000) of the token's frame, row and column; tables in float64 on the host; pairs
   ``(x[2j], x[2j+1])`` rotated.
4. **Blocks** (``num_layers``), modulated by ``scale_shift_table (6, D) + e`` in float32,
   chunked ``(shift, scale, gate)`` for self-attention then for the FFN:

   a. ``x ← x + gate · SelfAttn(LN(x)·(1 + scale) + shift)`` (LayerNorm without affine, eps
      ``1e-6``, float32; the sum in float32);
   b. ``x ← x + CrossAttn(LN_affine(x), context)`` — **ungated**; with image tokens, the
      queries also attend to the image keys/values (``add_k_proj``, ``add_v_proj``, the keys
      RMS-normalised) and the two attention outputs are summed before ``to_out``;
   c. ``x ← x + gate · FFN(LN(x)·(1 + scale) + shift)``, ``FFN = Linear → GELU(tanh) → Linear``.

   Attention: q/k/v/out linear maps with bias; q and k RMS-normalised **across all heads**
   (over ``D``, eps ``1e-6``) before splitting into heads; softmax scale ``head_dim^-1/2``.
5. **Head**: ``scale_shift_table (2, D) + temb`` chunked ``(shift, scale)``, ``LN(x)·(1 + scale)
   + shift``, ``Linear(D → C_out·∏patch)``, unpatchified to ``(B, C_out, F, H, W)``.

Precision: the modules diffusers keeps in float32 under bf16 weights (the time MLP, the
scale-shift tables, the norms) compute in float32 here whatever their weights' dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cfgzero_theory.ports.attention import attention
from cfgzero_theory.ports.layers import MLP, Norm, apply_rope, layer_norm, rope_tables, timestep_embedding
from cfgzero_theory.ports.loading import config_kwargs
from cfgzero_theory.validation import check_choice, check_int, check_real

Array = jax.Array

__all__ = ["DIFFUSERS_CLASS_NAME", "WanConfig", "WanTransformer", "rope_for"]

DIFFUSERS_CLASS_NAME = "WanTransformer3DModel"
ROPE_THETA = 10000.0
TEXT_LENGTH = 512  # the padded UMT5 length the I2V attention splits the context at, as diffusers does


@dataclasses.dataclass(frozen=True)
class WanConfig:
    """The keys of a diffusers ``WanTransformer3DModel`` ``config.json`` (same defaults: 14B T2V's)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    def __post_init__(self):
        patch = tuple(self.patch_size)
        if len(patch) != 3:
            raise ValueError(f"patch_size must be (t, h, w), got {self.patch_size!r}")
        object.__setattr__(self, "patch_size", tuple(check_int("patch_size entry", p, minimum=1) for p in patch))
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
                     "freq_dim", "ffn_dim", "num_layers", "rope_max_seq_len"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        if self.attention_head_dim < 6 or self.freq_dim % 2:
            raise ValueError("attention_head_dim must be at least 6 and freq_dim even")
        check_choice("qk_norm", self.qk_norm, ("rms_norm_across_heads",))
        if self.cross_attn_norm is not True:
            raise ValueError("only cross_attn_norm=True (every released Wan2.1 model) is supported")
        object.__setattr__(self, "eps", check_real("eps", self.eps, positive=True))
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError("image_dim and added_kv_proj_dim must be given together (I2V) or not at all (T2V)")
        if self.image_dim is not None:
            object.__setattr__(self, "image_dim", check_int("image_dim", self.image_dim, minimum=1))
            if check_int("added_kv_proj_dim", self.added_kv_proj_dim, minimum=1) != self.inner_dim:
                raise ValueError(f"added_kv_proj_dim ({self.added_kv_proj_dim}) must equal the width {self.inner_dim}")
        if self.pos_embed_seq_len is not None:
            raise ValueError("pos_embed_seq_len (Wan2.1 FLF2V's image position embedding) is not supported")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """The head-dimension split of the 3-D RoPE over ``(t, h, w)``."""
        hw = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - 2 * hw, hw, hw

    @property
    def image_to_video(self) -> bool:
        return self.image_dim is not None

    @classmethod
    def from_diffusers_config(cls, config: Mapping) -> WanConfig:
        """Build from a diffusers ``config.json`` dict; an unknown key raises ``ValueError`` naming it."""
        return cls(**config_kwargs(cls, config, DIFFUSERS_CLASS_NAME))


def rope_for(config: WanConfig, frames: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """RoPE ``(cos, sin)``, ``(frames·height·width, head_dim / 2)`` float32, for the patch grid
    ``frames × height × width`` (float64 on the host)."""
    longest = max(frames, height, width)
    if longest > config.rope_max_seq_len:
        raise ValueError(f"a patch grid of {frames}×{height}×{width} exceeds rope_max_seq_len={config.rope_max_seq_len}")
    grid = np.stack(np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij"), -1)
    cos, sin = rope_tables(grid.reshape(-1, 3), config.rope_axes, ROPE_THETA)
    return cos.astype(np.float32), sin.astype(np.float32)


# ----------------------------------------------------------------------------- layers


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs, param_dtype) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, rngs=rngs, param_dtype=param_dtype)


class Table(nnx.Variable):
    """A learned modulation table (``scale_shift_table``)."""


def _affine_layer_norm(dim: int, eps: float, param_dtype) -> Norm:
    return Norm(dim, "layer_norm", eps=eps, param_dtype=param_dtype)


def _float32_norm(norm: Norm, x: Array) -> Array:
    """diffusers' ``FP32LayerNorm``: statistics, weight and bias in float32, result in ``x``'s dtype."""
    x32 = x.astype(jnp.float32)
    return (layer_norm(x32, norm.eps) * norm.scale[...].astype(jnp.float32)
            + norm.bias[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
    """Wan's attention: q/k RMS-normalised across heads; cross-attention optionally with image keys."""

    def __init__(self, config: WanConfig, *, image: bool, rngs: nnx.Rngs, param_dtype):
        dim, eps = config.inner_dim, config.eps
        self.heads = config.num_attention_heads
        self.q, self.k, self.v, self.out = (_linear(dim, dim, rngs, param_dtype) for _ in range(4))
        self.q_norm = Norm(dim, "rms_norm", eps=eps, param_dtype=param_dtype)
        self.k_norm = Norm(dim, "rms_norm", eps=eps, param_dtype=param_dtype)
        if image:
            self.add_k = _linear(dim, dim, rngs, param_dtype)
            self.add_v = _linear(dim, dim, rngs, param_dtype)
            self.add_k_norm = Norm(dim, "rms_norm", eps=eps, param_dtype=param_dtype)
        else:
            self.add_k = self.add_v = self.add_k_norm = None

    def _heads(self, y: Array) -> Array:
        return y.reshape(*y.shape[:2], self.heads, -1)

    def __call__(self, x: Array, context: Array | None = None, rope=None) -> Array:
        """Self-attention (``context=None``, with ``rope``) or cross-attention to ``context``."""
        source = x if context is None else context
        image = None
        if self.add_k is not None:  # [image tokens; TEXT_LENGTH text tokens]
            image, source = source[:, :-TEXT_LENGTH], source[:, -TEXT_LENGTH:]
        q = self._heads(self.q_norm(self.q(x)))
        k = self._heads(self.k_norm(self.k(source)))
        v = self._heads(self.v(source))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v).astype(q.dtype)
        if image is not None:
            k_img = self._heads(self.add_k_norm(self.add_k(image)))
            out = out + attention(q, k_img, self._heads(self.add_v(image))).astype(q.dtype)
        return self.out(out.reshape(*out.shape[:2], -1))


class Block(nnx.Module):
    """One Wan block (module docstring, item 4)."""

    def __init__(self, config: WanConfig, *, rngs: nnx.Rngs, param_dtype):
        dim = config.inner_dim
        self.eps = config.eps
        self.self_attn = Attention(config, image=False, rngs=rngs, param_dtype=param_dtype)
        self.cross_norm = _affine_layer_norm(dim, config.eps, param_dtype)
        self.cross_attn = Attention(config, image=config.image_to_video, rngs=rngs, param_dtype=param_dtype)
        self.ffn = MLP(dim, config.ffn_dim, dim, "gelu_tanh", rngs=rngs, param_dtype=param_dtype)
        self.table = Table(jax.random.normal(rngs.params(), (1, 6, dim), param_dtype) / math.sqrt(dim))

    def __call__(self, x: Array, context: Array, e: Array, rope) -> Array:
        mod = self.table[...].astype(jnp.float32) + e.astype(jnp.float32)  # (B, 6, D)
        shift, scale, gate, f_shift, f_scale, f_gate = (mod[:, k:k + 1] for k in range(6))
        x32 = x.astype(jnp.float32)
        h = (layer_norm(x32, self.eps) * (1 + scale) + shift).astype(x.dtype)
        x = (x32 + self.self_attn(h, rope=rope) * gate).astype(x.dtype)
        x = x + self.cross_attn(_float32_norm(self.cross_norm, x), context)
        x32 = x.astype(jnp.float32)
        h = (layer_norm(x32, self.eps) * (1 + f_scale) + f_shift).astype(x.dtype)
        return (x32 + self.ffn(h).astype(jnp.float32) * f_gate).astype(x.dtype)


class ImageEmbedder(nnx.Module):
    """I2V's image-token projection: ``LN₃₂ → Linear → GELU → Linear → LN₃₂`` (eps ``1e-5``)."""

    def __init__(self, image_dim: int, dim: int, *, rngs: nnx.Rngs, param_dtype):
        self.norm1 = _affine_layer_norm(image_dim, 1e-5, param_dtype)
        self.mlp = MLP(image_dim, image_dim, dim, "gelu", rngs=rngs, param_dtype=param_dtype)
        self.norm2 = _affine_layer_norm(dim, 1e-5, param_dtype)

    def __call__(self, image: Array) -> Array:
        return _float32_norm(self.norm2, self.mlp(_float32_norm(self.norm1, image)))


# ----------------------------------------------------------------------------- model


class WanTransformer(nnx.Module):
    """``WanTransformer3DModel`` in NNX: ``(latents, timestep, text[, image]) -> prediction``.

    Build with random weights from a :class:`WanConfig`, or load a diffusers checkpoint with
    :func:`cfgzero_theory.wan.weights.load_wan_transformer`.
    """

    def __init__(self, config: WanConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if not isinstance(config, WanConfig):
            raise ValueError(f"config must be a WanConfig, got {type(config).__name__}")
        self.config = config
        dim = config.inner_dim
        self.patch_proj = _linear(config.in_channels * math.prod(config.patch_size), dim, rngs, param_dtype)
        self.time_mlp = MLP(config.freq_dim, dim, dim, "silu", rngs=rngs, param_dtype=param_dtype)
        self.time_proj = _linear(dim, 6 * dim, rngs, param_dtype)
        self.text_mlp = MLP(config.text_dim, dim, dim, "gelu_tanh", rngs=rngs, param_dtype=param_dtype)
        self.image_embedder = (ImageEmbedder(config.image_dim, dim, rngs=rngs, param_dtype=param_dtype)
                               if config.image_to_video else None)
        self.blocks = nnx.List([Block(config, rngs=rngs, param_dtype=param_dtype) for _ in range(config.num_layers)])
        self.out_table = Table(jax.random.normal(rngs.params(), (1, 2, dim), param_dtype) / math.sqrt(dim))
        self.out_proj = _linear(dim, config.out_channels * math.prod(config.patch_size), rngs, param_dtype)

    def _check(self, latents, text, image):
        cfg = self.config
        if latents.ndim != 5 or latents.shape[1] != cfg.in_channels:
            raise ValueError(f"hidden_states must have shape (B, {cfg.in_channels}, F, H, W), got {latents.shape}")
        if any(size % p for size, p in zip(latents.shape[2:], cfg.patch_size)):
            raise ValueError(f"frames, height and width {latents.shape[2:]} must be multiples of patch_size "
                             f"{cfg.patch_size}")
        batch = latents.shape[0]
        if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != cfg.text_dim:
            raise ValueError(f"encoder_hidden_states must have shape ({batch}, L, {cfg.text_dim}), got {text.shape}")
        if cfg.image_to_video:
            if image is None or image.ndim != 3 or image.shape[0] != batch or image.shape[2] != cfg.image_dim:
                raise ValueError(f"an I2V model needs encoder_hidden_states_image ({batch}, N, {cfg.image_dim}), "
                                 f"got {None if image is None else image.shape}")
            if text.shape[1] != TEXT_LENGTH:
                raise ValueError(f"an I2V model needs the text padded to exactly {TEXT_LENGTH} tokens (its attention "
                                 f"splits the context there), got {text.shape[1]}")
        elif image is not None:
            raise ValueError("encoder_hidden_states_image is for I2V models (image_dim set); this one is T2V")

    def patchify(self, x: Array) -> Array:
        """``(B, C, F, H, W) -> (B, f·h·w, C·pt·ph·pw)`` in the conv kernel's ``(c, t, h, w)`` order."""
        b, c, f, h, w = x.shape
        pt, ph, pw = self.config.patch_size
        x = x.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
        return x.transpose(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (f // pt) * (h // ph) * (w // pw), c * pt * ph * pw)

    def unpatchify(self, tokens: Array, grid: tuple[int, int, int]) -> Array:
        """``(B, f·h·w, pt·ph·pw·C) -> (B, C, F, H, W)``."""
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        x = tokens.reshape(tokens.shape[0], f, h, w, pt, ph, pw, -1)
        x = x.transpose(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], x.shape[1], f * pt, h * ph, w * pw)

    def __call__(self, hidden_states: Array, timestep: Array, encoder_hidden_states: Array,
                 encoder_hidden_states_image: Array | None = None) -> Array:
        """Predict ``(B, C_out, F, H, W)`` from latents ``(B, C, F, H, W)``, timesteps ``(B,)`` (or a
        scalar; Wan's pipelines pass integer-valued ``σ·1000``), text ``(B, L, text_dim)`` and, for
        I2V, image tokens ``(B, N, image_dim)`` (the text then exactly 512 tokens)."""
        latents = jnp.asarray(hidden_states)
        text = jnp.asarray(encoder_hidden_states)
        image = None if encoder_hidden_states_image is None else jnp.asarray(encoder_hidden_states_image)
        self._check(latents, text, image)
        cfg = self.config
        batch = latents.shape[0]
        grid = tuple(size // p for size, p in zip(latents.shape[2:], cfg.patch_size))
        rope = tuple(jnp.asarray(table) for table in rope_for(cfg, *grid))
        x = self.patch_proj(self.patchify(latents))

        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (batch,))
        freq = timestep_embedding(timestep, cfg.freq_dim)
        temb = self.time_mlp(freq).astype(text.dtype)  # a float32 input keeps the whole MLP in float32
        e = self.time_proj(jax.nn.silu(temb)).reshape(batch, 6, -1)
        context = self.text_mlp(text)
        if image is not None:
            context = jnp.concatenate([self.image_embedder(image).astype(context.dtype), context], axis=1)

        for block in self.blocks:
            x = block(x, context, e, rope)

        shift, scale = jnp.split(self.out_table[...].astype(jnp.float32) + temb[:, None].astype(jnp.float32), 2, 1)
        x = (layer_norm(x.astype(jnp.float32), cfg.eps) * (1 + scale) + shift).astype(x.dtype)
        return self.unpatchify(self.out_proj(x), grid)

