"""The SD3 / SD3.5 MMDiT denoiser in Flax NNX, faithful to ``diffusers.SD3Transformer2DModel``.

Architecture (``D = num_attention_heads · attention_head_dim``, ``p = patch_size``):

1. **Patch embedding.**  Non-overlapping ``p × p`` patches of the latents ``(B, C, H, W)``
   are flattened in ``(c, i, j)`` order and projected by one matmul (the stride-``p``
   convolution written as a linear map), giving ``h·w`` tokens in row-major order.  A fixed
   2-D sin-cos table for a ``M × M`` grid (``M = pos_embed_max_size``) is *centre-cropped*
   to ``h × w``: rows ``(M − h)//2 …``, columns ``(M − w)//2 …``.  Grid coordinates are
   ``k / (M / base) / 1`` with ``base = sample_size // p``; the first ``D/2`` channels encode
   the column, the last ``D/2`` the row, each ``[sin(pos·ω), cos(pos·ω)]`` with
   ``ω_k = 10000^(−k/(D/4))`` (computed in float64, stored as float32).  A loaded checkpoint
   supplies this table (diffusers saves it as a persistent buffer); a freshly built module
   computes it.
2. **Conditioning** ``c = MLP_t(sincos_256(τ)) + MLP_p(pooled)``: the timestep ``τ``
   (diffusers' scheduler timestep ``σ·1000``) embedded with 128 frequencies
   ``exp(−ln(10000)·k/128)`` as ``[cos, sin]``, both MLPs ``Linear → SiLU → Linear``.
3. **Context embedder**: ``Linear(joint_attention_dim → caption_projection_dim)``.
4. **Joint blocks** (AdaLN-Zero on both streams).  Each stream is modulated from
   ``SiLU(c)`` by a linear map into 6 chunks ``(shift, scale, gate)_attn, (shift, scale,
   gate)_mlp``; ``LN(x)·(1 + scale) + shift`` with a parameter-free LayerNorm (eps ``1e-6``).
   Image and text tokens are projected to q/k/v separately, optionally normalised per head
   (``qk_norm``: RMSNorm or LayerNorm over ``attention_head_dim``, eps ``1e-6``, learned
   scale; LayerNorm also a bias), concatenated ``[image; text]`` along the sequence and
   attended jointly (softmax scale ``attention_head_dim^-1/2``), split again, projected
   out, gated and added.  The MLP is ``Linear(D → 4D) → GELU(tanh) → Linear(4D → D)``.

   * *Dual attention* (SD3.5-medium, blocks listed in ``dual_attention_layers``): the image
     modulation has 9 chunks; the last three ``(shift, scale, gate)`` modulate the *same*
     LayerNorm output for an extra image-only self-attention (its own q/k/v/out and qk-norms),
     added after the joint attention and before the MLP.
   * *Context pre-only* (the last block): the text stream is modulated by AdaLayerNorm-
     Continuous (2 chunks, ordered ``(scale, shift)``), keys and values only — its attention
     output, text MLP and residual are dropped.  Here only image queries are computed (rows
     of a softmax are independent, so this equals diffusers' full joint attention); the
     block's text query projection still exists so the checkpoint loads.
5. **Output**: AdaLayerNormContinuous (``(scale, shift)`` order, eps ``1e-6``) on the image
   tokens, ``Linear(D → p²·C_out)``, unpatchify ``(B, h, w, p, p, C) → (B, C, h·p, w·p)``.

Skip-layer guidance: ``skip_layers`` (static tuple of block indices) skips whole blocks, as
diffusers' ``skip_layers`` does.

Numerics: norms compute their statistics in float32; matmuls and attention use the
parameters' and inputs' promoted dtype; the attention program depends on the backend
(:func:`cfgzero_theory.ports.attention.attention_implementation`: cuDNN's fused kernel for bf16/fp16 on a GPU).  On accelerators whose default float32 matmul
precision is reduced (TF32/bf16 passes), wrap calls in ``jax.default_matmul_precision("highest")``
for fp32 parity.  ``pos_embed_max_size=None`` (uncropped, interpolated embeddings) is not
supported; every released SD3/SD3.5 checkpoint sets it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cfgzero_theory.ports.attention import attention
from cfgzero_theory.ports.layers import MLP, Norm, layer_norm, modulation, timestep_embedding
from cfgzero_theory.ports.loading import config_kwargs
from cfgzero_theory.ports.moved import moved_attributes
from cfgzero_theory.validation import check_choice, check_int

Array = jax.Array

__all__ = ["DIFFUSERS_CLASS_NAME", "PosEmbed", "SD3Config", "SD3Transformer", "sincos_pos_embed"]

__getattr__ = moved_attributes(__name__, {
    "QKNorm": "cfgzero_theory.ports.layers:Norm",
    "attention_implementation": "cfgzero_theory.ports.attention:attention_implementation",
})

DIFFUSERS_CLASS_NAME = "SD3Transformer2DModel"
QK_NORMS = (None, "rms_norm", "layer_norm")
NORM_EPS = 1e-6
TIME_CHANNELS = 256
MLP_RATIO = 4


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class SD3Config:
    """The keys of a diffusers ``SD3Transformer2DModel`` ``config.json`` (same defaults).

    ``out_channels=None`` means ``in_channels``; ``dual_attention_layers`` is normalised to
    a sorted tuple.  Construction raises ``ValueError`` naming a bad key.
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int | None = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def __post_init__(self):
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if self.pos_embed_max_size is None:
            raise ValueError(
                "pos_embed_max_size=None (an uncropped, interpolated positional embedding) is not supported; "
                "SD3/SD3.5 checkpoints set it (e.g. 96 or 192)"
            )
        for name in (
            "sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
            "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
            "pos_embed_max_size",
        ):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        if self.sample_size // self.patch_size < 1:
            raise ValueError(f"sample_size ({self.sample_size}) must be at least patch_size ({self.patch_size})")
        if self.inner_dim % 4:
            raise ValueError(
                f"num_attention_heads * attention_head_dim must be divisible by 4 for the 2-D sin-cos embedding, "
                f"got {self.inner_dim}"
            )
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(
                f"caption_projection_dim must equal num_attention_heads * attention_head_dim = {self.inner_dim} "
                f"(the blocks take the embedded context at that width), got {self.caption_projection_dim}"
            )
        check_choice("qk_norm", self.qk_norm, QK_NORMS)
        layers = self.dual_attention_layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
            raise ValueError(f"dual_attention_layers must be a sequence of block indices, got {layers!r}")
        layers = {check_int("dual_attention_layers entry", index, minimum=0, maximum=self.num_layers - 1)
                  for index in layers}
        object.__setattr__(self, "dual_attention_layers", tuple(sorted(layers)))

    @property
    def inner_dim(self) -> int:
        """Token width ``D = num_attention_heads · attention_head_dim``."""
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers_config(cls, config: Mapping) -> SD3Config:
        """Build from a diffusers ``config.json`` dict.

        Keys starting with ``_`` (``_class_name``, ``_diffusers_version``, …) are metadata;
        ``_class_name``, when present, must be ``"SD3Transformer2DModel"``.  Any other key
        this port does not know raises ``ValueError`` naming it; missing keys take
        diffusers' defaults.
        """
        kwargs = config_kwargs(cls, config, DIFFUSERS_CLASS_NAME)
        if isinstance(kwargs.get("dual_attention_layers"), list):
            kwargs["dual_attention_layers"] = tuple(kwargs["dual_attention_layers"])
        return cls(**kwargs)


# ----------------------------------------------------------------------------- fixed embeddings


def sincos_pos_embed(config: SD3Config) -> np.ndarray:
    """diffusers' (uncropped) fixed 2-D sin-cos table, ``(1, M·M, D)`` float32, ``M = pos_embed_max_size``."""
    size, dim = config.pos_embed_max_size, config.inner_dim
    base = config.sample_size // config.patch_size
    # grid coordinates in float32 (as torch computes them), frequencies and angles in float64
    coords = (np.arange(size, dtype=np.float32) / np.float32(size / base) / np.float32(1.0)).astype(np.float64)
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    axis = np.outer(coords, omega)
    axis = np.concatenate([np.sin(axis), np.cos(axis)], axis=1)  # (M, D/2)
    cols = np.broadcast_to(axis[None, :, :], (size, size, dim // 2))  # token (i, j) -> column j
    rows = np.broadcast_to(axis[:, None, :], (size, size, dim // 2))  # token (i, j) -> row i
    table = np.concatenate([cols, rows], axis=-1).reshape(1, size * size, dim)
    return table.astype(np.float32)


# ----------------------------------------------------------------------------- layers


class PosEmbed(nnx.Variable):
    """A fixed (non-trainable) buffer: the positional table."""


def _qk_norm(dim: int, kind: str | None, param_dtype):
    return None if kind is None else Norm(dim, kind, eps=NORM_EPS, param_dtype=param_dtype)


def _apply(norm, x: Array) -> Array:
    return x if norm is None else norm(x)


def _attention(q: Array, k: Array, v: Array) -> Array:
    """:func:`~cfgzero_theory.ports.attention.attention` with the heads merged: ``(B, T, H·Dh)``."""
    out = attention(q, k, v)
    return out.reshape(*out.shape[:2], -1)


class JointAttention(nnx.Module):
    """Joint image–text attention; ``text_out=False`` for the context-pre-only block."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm, text_out: bool, *, rngs, param_dtype):
        self.heads = heads
        lin = lambda: nnx.Linear(dim, heads * head_dim, rngs=rngs, param_dtype=param_dtype)  # noqa: E731
        self.img_q, self.img_k, self.img_v = lin(), lin(), lin()
        self.txt_q, self.txt_k, self.txt_v = lin(), lin(), lin()
        self.img_q_norm = _qk_norm(head_dim, qk_norm, param_dtype)
        self.img_k_norm = _qk_norm(head_dim, qk_norm, param_dtype)
        self.txt_q_norm = _qk_norm(head_dim, qk_norm, param_dtype)
        self.txt_k_norm = _qk_norm(head_dim, qk_norm, param_dtype)
        self.img_out = nnx.Linear(heads * head_dim, dim, rngs=rngs, param_dtype=param_dtype)
        self.txt_out = nnx.Linear(heads * head_dim, dim, rngs=rngs, param_dtype=param_dtype) if text_out else None

    def _heads(self, x: Array) -> Array:
        return x.reshape(*x.shape[:2], self.heads, -1)

    def __call__(self, img: Array, txt: Array) -> tuple[Array, Array | None]:
        q = _apply(self.img_q_norm, self._heads(self.img_q(img)))
        k = _apply(self.img_k_norm, self._heads(self.img_k(img)))
        v = self._heads(self.img_v(img))
        tk = _apply(self.txt_k_norm, self._heads(self.txt_k(txt)))
        tv = self._heads(self.txt_v(txt))
        k, v = jnp.concatenate([k, tk], axis=1), jnp.concatenate([v, tv], axis=1)
        n_img = img.shape[1]
        if self.txt_out is None:  # context pre-only: the text outputs are discarded
            return self.img_out(_attention(q, k, v)), None
        tq = _apply(self.txt_q_norm, self._heads(self.txt_q(txt)))
        out = _attention(jnp.concatenate([q, tq], axis=1), k, v)
        return self.img_out(out[:, :n_img]), self.txt_out(out[:, n_img:])


class SelfAttention(nnx.Module):
    """The image-only second attention of SD3.5-medium's dual-attention blocks."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm, *, rngs, param_dtype):
        self.heads = heads
        lin = lambda: nnx.Linear(dim, heads * head_dim, rngs=rngs, param_dtype=param_dtype)  # noqa: E731
        self.q, self.k, self.v = lin(), lin(), lin()
        self.q_norm = _qk_norm(head_dim, qk_norm, param_dtype)
        self.k_norm = _qk_norm(head_dim, qk_norm, param_dtype)
        self.out = nnx.Linear(heads * head_dim, dim, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        split = lambda y: y.reshape(*y.shape[:2], self.heads, -1)  # noqa: E731
        q = _apply(self.q_norm, split(self.q(x)))
        k = _apply(self.k_norm, split(self.k(x)))
        return self.out(_attention(q, k, split(self.v(x))))


class JointBlock(nnx.Module):
    """One MMDiT block (AdaLN-Zero on both streams; optional dual attention; optional pre-only context)."""

    def __init__(self, config: SD3Config, *, dual: bool, context_pre_only: bool, rngs: nnx.Rngs, param_dtype):
        dim, heads, head_dim = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        self.dual, self.context_pre_only = dual, context_pre_only
        self.img_mod = nnx.Linear(dim, (9 if dual else 6) * dim, rngs=rngs, param_dtype=param_dtype)
        self.txt_mod = nnx.Linear(dim, (2 if context_pre_only else 6) * dim, rngs=rngs, param_dtype=param_dtype)
        self.attn = JointAttention(dim, heads, head_dim, config.qk_norm, not context_pre_only,
                                   rngs=rngs, param_dtype=param_dtype)
        self.self_attn = (SelfAttention(dim, heads, head_dim, config.qk_norm, rngs=rngs, param_dtype=param_dtype)
                          if dual else None)
        self.img_mlp = MLP(dim, MLP_RATIO * dim, dim, "gelu_tanh", rngs=rngs, param_dtype=param_dtype)
        self.txt_mlp = (None if context_pre_only
                        else MLP(dim, MLP_RATIO * dim, dim, "gelu_tanh", rngs=rngs, param_dtype=param_dtype))

    def __call__(self, img: Array, txt: Array, cond: Array) -> tuple[Array, Array]:
        act = jax.nn.silu(cond)
        img_mod = modulation(self.img_mod(act), 9 if self.dual else 6)
        shift, scale, gate, mlp_shift, mlp_scale, mlp_gate = img_mod[:6]
        img_normed = layer_norm(img)
        img_in = img_normed * (1 + scale) + shift

        txt_mod = modulation(self.txt_mod(act), 2 if self.context_pre_only else 6)
        txt_normed = layer_norm(txt)
        if self.context_pre_only:
            txt_scale, txt_shift = txt_mod  # AdaLayerNormContinuous order
        else:
            txt_shift, txt_scale = txt_mod[0], txt_mod[1]
        txt_in = txt_normed * (1 + txt_scale) + txt_shift

        img_attn, txt_attn = self.attn(img_in, txt_in)
        img = img + gate * img_attn
        if self.self_attn is not None:
            shift2, scale2, gate2 = img_mod[6:]
            img = img + gate2 * self.self_attn(img_normed * (1 + scale2) + shift2)
        img = img + mlp_gate * self.img_mlp(layer_norm(img) * (1 + mlp_scale) + mlp_shift)

        if self.context_pre_only:
            return img, txt
        txt_gate, txt_mlp_shift, txt_mlp_scale, txt_mlp_gate = txt_mod[2:]
        txt = txt + txt_gate * txt_attn
        txt = txt + txt_mlp_gate * self.txt_mlp(layer_norm(txt) * (1 + txt_mlp_scale) + txt_mlp_shift)
        return img, txt


# ----------------------------------------------------------------------------- model


class SD3Transformer(nnx.Module):
    """``SD3Transformer2DModel`` in NNX: ``(latents, prompt_embeds, pooled, timestep) -> prediction``.

    Build with random weights from a :class:`SD3Config`, or load a diffusers checkpoint with
    :func:`cfgzero_theory.sd3.weights.load_sd3_transformer`.
    """

    def __init__(self, config: SD3Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if not isinstance(config, SD3Config):
            raise ValueError(f"config must be an SD3Config, got {type(config).__name__}")
        self.config = config
        dim, p = config.inner_dim, config.patch_size
        self.patch_proj = nnx.Linear(config.in_channels * p * p, dim, rngs=rngs, param_dtype=param_dtype)
        self.pos_embed = PosEmbed(jnp.asarray(sincos_pos_embed(config), param_dtype))
        self.time_mlp = MLP(TIME_CHANNELS, dim, dim, "silu", rngs=rngs, param_dtype=param_dtype)
        self.pooled_mlp = MLP(config.pooled_projection_dim, dim, dim, "silu", rngs=rngs, param_dtype=param_dtype)
        self.context_proj = nnx.Linear(config.joint_attention_dim, config.caption_projection_dim,
                                       rngs=rngs, param_dtype=param_dtype)
        last = config.num_layers - 1
        self.blocks = nnx.List([
            JointBlock(config, dual=i in config.dual_attention_layers, context_pre_only=i == last,
                       rngs=rngs, param_dtype=param_dtype)
            for i in range(config.num_layers)
        ])
        self.out_mod = nnx.Linear(dim, 2 * dim, rngs=rngs, param_dtype=param_dtype)
        self.out_proj = nnx.Linear(dim, p * p * config.out_channels, rngs=rngs, param_dtype=param_dtype)

    def _check(self, hidden_states, encoder_hidden_states, pooled_projections, skip_layers):
        cfg = self.config
        if hidden_states.ndim != 4 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(f"hidden_states must have shape (B, {cfg.in_channels}, H, W), got {hidden_states.shape}")
        batch, _, height, width = hidden_states.shape
        p, size = cfg.patch_size, cfg.pos_embed_max_size
        if height % p or width % p:
            raise ValueError(f"hidden_states height and width must be multiples of patch_size={p}, got {height}x{width}")
        if height // p > size or width // p > size:
            raise ValueError(
                f"hidden_states of {height}x{width} give a {height // p}x{width // p} patch grid, larger than "
                f"pos_embed_max_size={size}"
            )
        if (encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch
                or encoder_hidden_states.shape[2] != cfg.joint_attention_dim):
            raise ValueError(
                f"encoder_hidden_states must have shape ({batch}, L, {cfg.joint_attention_dim}), "
                f"got {encoder_hidden_states.shape}"
            )
        if pooled_projections.shape != (batch, cfg.pooled_projection_dim):
            raise ValueError(
                f"pooled_projections must have shape ({batch}, {cfg.pooled_projection_dim}), "
                f"got {pooled_projections.shape}"
            )
        return frozenset(check_int("skip_layers entry", index, minimum=0, maximum=cfg.num_layers - 1)
                         for index in skip_layers)

    def patchify(self, x: Array) -> Array:
        """``(B, C, H, W) -> (B, h·w, C·p·p)`` in the conv weight's ``(c, i, j)`` order."""
        batch, channels, height, width = x.shape
        p = self.config.patch_size
        x = x.reshape(batch, channels, height // p, p, width // p, p)
        return x.transpose(0, 2, 4, 1, 3, 5).reshape(batch, (height // p) * (width // p), channels * p * p)

    def unpatchify(self, tokens: Array, height: int, width: int) -> Array:
        """``(B, h·w, p·p·C) -> (B, C, H, W)``."""
        p, c = self.config.patch_size, self.config.out_channels
        h, w = height // p, width // p
        x = tokens.reshape(tokens.shape[0], h, w, p, p, c)
        return x.transpose(0, 5, 1, 3, 2, 4).reshape(tokens.shape[0], c, h * p, w * p)

    def cropped_pos_embed(self, h: int, w: int) -> Array:
        """The centre ``h × w`` crop of the ``M × M`` table, ``(1, h·w, D)``."""
        size = self.config.pos_embed_max_size
        top, left = (size - h) // 2, (size - w) // 2
        table = self.pos_embed[...].reshape(size, size, -1)
        return table[top:top + h, left:left + w].reshape(1, h * w, -1)

    def __call__(
        self,
        hidden_states: Array,
        encoder_hidden_states: Array,
        pooled_projections: Array,
        timestep: Array,
        *,
        skip_layers: tuple[int, ...] = (),
    ) -> Array:
        """Predict ``(B, C_out, H, W)`` from latents ``(B, C, H, W)``, prompt embeddings
        ``(B, L, joint_attention_dim)``, pooled embeddings ``(B, pooled_projection_dim)`` and
        timesteps ``(B,)`` (or a scalar, broadcast; diffusers' ``σ·1000``).
        ``skip_layers``: static block indices to skip (skip-layer guidance)."""
        hidden_states = jnp.asarray(hidden_states)
        encoder_hidden_states = jnp.asarray(encoder_hidden_states)
        pooled_projections = jnp.asarray(pooled_projections)
        skip_layers = self._check(hidden_states, encoder_hidden_states, pooled_projections, skip_layers)
        batch, _, height, width = hidden_states.shape
        p = self.config.patch_size

        img = self.patch_proj(self.patchify(hidden_states))
        img = (img + self.cropped_pos_embed(height // p, width // p)).astype(img.dtype)
        timestep = jnp.broadcast_to(jnp.asarray(timestep), (batch,))
        cond = (self.time_mlp(timestep_embedding(timestep).astype(pooled_projections.dtype))
                + self.pooled_mlp(pooled_projections))
        txt = self.context_proj(encoder_hidden_states)

        for index, block in enumerate(self.blocks):
            if index not in skip_layers:
                img, txt = block(img, txt, cond)

        scale, shift = modulation(self.out_mod(jax.nn.silu(cond)), 2)
        img = layer_norm(img) * (1 + scale) + shift
        return self.unpatchify(self.out_proj(img), height, width)
