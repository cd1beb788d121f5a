"""The Lumina-Next denoiser (Next-DiT) in Flax NNX, faithful to ``diffusers.LuminaNextDiT2DModel``.

Architecture (``D = hidden_size``, ``H = num_attention_heads`` query heads of ``d = D / H``,
``H_kv = num_kv_heads`` key/value heads, ``D_c = min(D, 1024)`` the conditioning width; latents
``(B, C, H_lat, W_lat)``, patch ``p``):

1. **Patch embedding**: ``Linear(C·p² → D)`` over each ``p × p`` patch flattened in ``(c, i, j)``
   order (channel first); tokens in ``(h, w)`` row-major order, ``N = (H_lat/p)·(W_lat/p)``.
2. **Conditioning** ``c = MLP_t(sincos_256(t)) + Linear(LN(pool(y)))``: ``t ∈ [0, 1]`` the network
   time (``t = 1`` the image, see :mod:`cfgzero_theory.lumina.convention`) embedded **without**
   a factor 1000 (:func:`~cfgzero_theory.ports.layers.timestep_embedding`, ``MLP_t = Linear → SiLU
   → Linear``, ``256 → D_c → D_c``); ``pool(y) = Σ_l m_l·y_l / Σ_l m_l`` the caption's mean over
   its unmasked tokens (``m`` the caption mask), ``LN`` affine (eps ``1e-5``), ``Linear(D_txt → D_c)``.
3. **2-D RoPE** (complex-pair form): the head dimension holds ``d/2`` pairs ``(x[2k], x[2k+1])``,
   pair ``2j`` rotated by the token's row ``r`` and pair ``2j+1`` by its column ``q`` (rows and
   columns **interleaved**, as diffusers' ``get_2d_rotary_pos_embed_lumina`` flattens them), with
   angles ``r·ω_j / λ`` and ``q·ω_j / λ``, ``ω_j = (θ·κ)^(−4j/d)``, ``j < d/4``, ``θ = 10000``;
   ``λ`` is the linear (position-interpolation) factor and ``κ`` the NTK factor of the time-aware
   scaling (:func:`rope_for`; tables in float64 on the host, cast to float32).
4. **Blocks** (``num_layers``), ``RMS`` an RMSNorm with a learned scale (eps ``norm_eps``):

   a. ``(s₁, g₁, s₂, g₂) = Linear(SiLU(c))`` (``D_c → 4D``; scale and gate, no shift),
      ``h = RMS(x)·(1 + s₁)``;
   b. self-attention on ``h``: ``q = LN_q(W_q h)``, ``k = LN_k(W_k h)``, ``v = W_v h`` (no
      biases; ``LN_q``/``LN_k`` affine LayerNorms **across all heads**, over ``H·d`` and
      ``H_kv·d``, eps ``1e-5``), RoPE on ``q`` and ``k``, grouped-query attention (each
      key/value head serves ``H / H_kv`` consecutive query heads) with the **proportional**
      scale ``√(log N / log N_base) / √d`` when ``base_sequence_length = N_base`` is given
      (``1/√d`` otherwise); every image token is attended (no padding);
   c. cross-attention of the same ``h`` to ``RMS_y(y)`` (the raw caption, normalised in every
      block): its own ``W_q``, ``LN_q``, ``W_k``, ``LN_k``, ``W_v`` (``D_txt → H_kv·d``), RoPE on
      the **queries only**, scale ``1/√d``, caption tokens with ``m = 0`` masked out; its output
      scaled by ``tanh(gate)`` per head;
   d. ``x ← x + tanh(g₁)·RMS(W_o [self + cross])`` — one output projection (the cross-attention's
      ``to_out``, no bias) applied to the sum of the two heads-concatenated outputs;
   e. ``x ← x + tanh(g₂)·RMS(FFN(RMS(x)·(1 + s₂)))``, ``FFN(u) = W₂(SiLU(W₁u) ⊙ W₃u)`` (no biases,
      SiLU in float32) with inner width ``F = ⌈⌊μ·⌊8D/3⌋⌋ / multiple_of⌉·multiple_of`` (``μ =
      ffn_dim_multiplier``, the inner floor only when it is set).
5. **Head**: ``x ← LN(x)·(1 + Linear(SiLU(c)))`` (LayerNorm without affine, eps ``1e-6``), then
   ``Linear(D → p²·C_out)`` and unpatchify with features in ``(i, j, c)`` order (channel
   **last**, unlike the patch embedding), to ``(B, C_out, H_lat, W_lat)``: ``C_out = 2C`` with
   ``learn_sigma`` — the prediction (the theory velocity ``x_data − ε``, convention module) then
   a learned variance the samplers drop.

Conventions: ``t`` is the network time ``1 − τ/1000`` the pipeline computes, not the scheduler
timestep; the caption mask is ``(B, L)``, nonzero for real tokens; the RoPE tables (``rope=``)
are those of the step (:func:`rope_for` with the step's linear/NTK factors — diffusers'
``image_rotary_emb``), the proportional-attention base (``base_sequence_length=``) diffusers'
``cross_attention_kwargs["base_sequence_length"]`` (the pipeline passes ``(sample_size·8 /
16)²``, the token count at the training resolution).  The sampler adapter
:func:`cfgzero_theory.lumina.weights.lumina_model_fn` derives both from the image size and the
traced time.

Precision: diffusers declares no float32 modules for this model; as there, norms take their
statistics in float32 (the RMSNorm result is cast to a half-precision weight's dtype), RoPE
and the FFN's SiLU run in float32, attention scores and softmax in float32
(:func:`cfgzero_theory.ports.attention.attention`), matmuls in the promoted dtype.

Not supported: lists of differently sized images in one batch (the original code's padded
``pad_token`` path, absent from diffusers' forward — ``pad_token`` is loaded and unused),
non-square patches, and grids of more than ``384`` tokens per side (the table size the
pipeline and the original code build).  A caption whose mask has no nonzero entry gives
``nan``, as in diffusers.
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
from cfgzero_theory.validation import check_int, check_real

Array = jax.Array

__all__ = ["DIFFUSERS_CLASS_NAME", "LuminaConfig", "LuminaTransformer", "attention_scale", "rope_for"]

DIFFUSERS_CLASS_NAME = "LuminaNextDiT2DModel"
ROPE_THETA = 10000.0
ROPE_GRID = 384  # the table side diffusers' pipeline (and the original code) builds and slices
TIME_CHANNELS = 256
ATTN_NORM_EPS = 1e-5  # the q/k LayerNorms (diffusers' Attention(eps=1e-5))
CAPTION_NORM_EPS = 1e-5  # nn.LayerNorm's default, the caption embedder's
OUT_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class LuminaConfig:
    """The keys of a diffusers ``LuminaNextDiT2DModel`` ``config.json`` (same defaults; the released
    Lumina-Next-SFT 2B sets ``hidden_size=2304, num_layers=24, num_kv_heads=8``).

    ``sample_size`` (the training latent size) and ``scaling_factor`` do not enter the forward
    pass: the pipeline derives the resolution scaling from ``sample_size``.
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 2304
    num_layers: int = 32
    num_attention_heads: int = 32
    num_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    learn_sigma: bool = True
    qk_norm: bool = True
    cross_attention_dim: int = 2048
    scaling_factor: float = 1.0

    def __post_init__(self):
        for name in ("sample_size", "patch_size", "in_channels", "hidden_size", "num_layers", "num_attention_heads",
                     "multiple_of", "cross_attention_dim"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        if self.num_kv_heads is not None:
            object.__setattr__(self, "num_kv_heads", check_int("num_kv_heads", self.num_kv_heads, minimum=1))
        if self.ffn_dim_multiplier is not None:
            object.__setattr__(self, "ffn_dim_multiplier",
                               check_real("ffn_dim_multiplier", self.ffn_dim_multiplier, positive=True))
        object.__setattr__(self, "norm_eps", check_real("norm_eps", self.norm_eps, positive=True))
        object.__setattr__(self, "scaling_factor", check_real("scaling_factor", self.scaling_factor, positive=True))
        for name in ("learn_sigma", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.head_dim % 4:
            raise ValueError(f"hidden_size / num_attention_heads = {self.head_dim} must be a multiple of 4 "
                             "(the 2-D RoPE splits the head into row and column pairs)")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"num_kv_heads ({self.kv_heads}) must divide num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.ffn_dim < 1:
            raise ValueError(f"ffn_dim_multiplier={self.ffn_dim_multiplier} leaves no feed-forward width")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_attention_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def cond_dim(self) -> int:
        """The conditioning width ``min(hidden_size, 1024)``."""
        return min(self.hidden_size, 1024)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def ffn_dim(self) -> int:
        """The SwiGLU inner width: ``⌊8D/3⌋``, times ``ffn_dim_multiplier`` (floored), rounded up to
        a multiple of ``multiple_of``."""
        inner = int(4 * 2 * self.hidden_size / 3)
        if self.ffn_dim_multiplier is not None:
            inner = int(self.ffn_dim_multiplier * inner)
        return self.multiple_of * ((inner + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_diffusers_config(cls, config: Mapping) -> LuminaConfig:
        """Build from a diffusers ``config.json`` dict; an unknown key raises ``ValueError`` naming it."""
        return cls(**config_kwargs(cls, config, DIFFUSERS_CLASS_NAME))


def rope_for(config: LuminaConfig, height: int, width: int, *, linear_factor: float = 1.0,
             ntk_factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """RoPE ``(cos, sin)``, each ``(height·width, head_dim / 2)`` float32, for a patch grid of
    ``height × width`` tokens (module docstring, item 3), computed in float64 on the host:
    diffusers' ``get_2d_rotary_pos_embed_lumina(head_dim, 384, 384, linear_factor, ntk_factor)``
    sliced to the grid (diffusers rounds its angles in float32)."""
    height = check_int("height", height, minimum=1)
    width = check_int("width", width, minimum=1)
    linear_factor = check_real("linear_factor", linear_factor, positive=True)
    ntk_factor = check_real("ntk_factor", ntk_factor, positive=True)
    if max(height, width) > ROPE_GRID:
        raise ValueError(f"a patch grid of {height}×{width} exceeds the {ROPE_GRID}×{ROPE_GRID} RoPE table of "
                         "Lumina-Next")
    grid = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij"), -1).reshape(-1, 2)
    half = config.head_dim // 2
    cos, sin = rope_tables(grid / linear_factor, (half, half), ROPE_THETA * ntk_factor)
    quarter = half // 2  # interleave the row and column frequencies: (r0, q0, r1, q1, ...)
    order = np.stack([np.arange(quarter), quarter + np.arange(quarter)], -1).reshape(-1)
    return cos[:, order].astype(np.float32), sin[:, order].astype(np.float32)


def attention_scale(head_dim: int, sequence_length: int, base_sequence_length: int | None = None) -> float:
    """The self-attention softmax scale: ``1/√head_dim``, times ``√(log N / log N_base)``
    (proportional attention) for ``N = sequence_length`` tokens when ``base_sequence_length =
    N_base`` is given (as diffusers computes it, ``math.log(N, N_base)``)."""
    scale = head_dim ** -0.5
    if base_sequence_length is None:
        return scale
    base = check_int("base_sequence_length", base_sequence_length, minimum=2)
    return math.sqrt(math.log(sequence_length, base)) * scale


# ----------------------------------------------------------------------------- layers


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs, param_dtype, *, bias: bool = True) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=bias, rngs=rngs, param_dtype=param_dtype)


class Attention(nnx.Module):
    """Lumina's attention projections: bias-free q/k/v, optional LayerNorms across heads; the
    optional ``out`` (the cross-attention's) is applied by the block to the mixed output."""

    def __init__(self, config: LuminaConfig, source_dim: int, *, out: bool, rngs: nnx.Rngs, param_dtype):
        dim, kv_dim = config.hidden_size, config.kv_heads * config.head_dim
        self.heads, self.kv_heads = config.num_attention_heads, config.kv_heads
        self.q = _linear(dim, dim, rngs, param_dtype, bias=False)
        self.k = _linear(source_dim, kv_dim, rngs, param_dtype, bias=False)
        self.v = _linear(source_dim, kv_dim, rngs, param_dtype, bias=False)
        if config.qk_norm:
            self.q_norm = Norm(dim, "layer_norm", eps=ATTN_NORM_EPS, param_dtype=param_dtype)
            self.k_norm = Norm(kv_dim, "layer_norm", eps=ATTN_NORM_EPS, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None
        self.out = _linear(dim, dim, rngs, param_dtype, bias=False) if out else None

    def __call__(self, x: Array, source: Array, rope, *, rope_keys: bool, bias: Array | None, scale: float) -> Array:
        """``(B, N, H, d)``: queries from ``x`` (rotated by ``rope``), keys/values from ``source``
        (rotated too when ``rope_keys``)."""
        q, k, v = self.q(x), self.k(source), self.v(source)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(*q.shape[:2], self.heads, -1)
        k = k.reshape(*k.shape[:2], self.kv_heads, -1)
        v = v.reshape(*v.shape[:2], self.kv_heads, -1)
        q = apply_rope(q, *rope)
        if rope_keys:
            k = apply_rope(k, *rope)
        return attention(q, k, v, bias=bias, scale=scale).astype(q.dtype)


class FeedForward(nnx.Module):
    """SwiGLU ``fc2(SiLU₃₂(fc1 x) ⊙ fc3 x)`` without biases (diffusers' ``LuminaFeedForward``)."""

    def __init__(self, dim: int, inner: int, *, rngs: nnx.Rngs, param_dtype):
        self.fc1 = _linear(dim, inner, rngs, param_dtype, bias=False)
        self.fc2 = _linear(inner, dim, rngs, param_dtype, bias=False)
        self.fc3 = _linear(dim, inner, rngs, param_dtype, bias=False)

    def __call__(self, x: Array) -> Array:
        gate = self.fc1(x)
        return self.fc2(jax.nn.silu(gate.astype(jnp.float32)).astype(gate.dtype) * self.fc3(x))


class Block(nnx.Module):
    """One Next-DiT block (module docstring, item 4)."""

    def __init__(self, config: LuminaConfig, *, rngs: nnx.Rngs, param_dtype):
        dim, eps = config.hidden_size, config.norm_eps
        self.head_dim = config.head_dim
        self.modulation = _linear(config.cond_dim, 4 * dim, rngs, param_dtype)
        self.norm = Norm(dim, "rms_norm", eps=eps, param_dtype=param_dtype)
        self.self_attn = Attention(config, dim, out=False, rngs=rngs, param_dtype=param_dtype)
        self.context_norm = Norm(config.cross_attention_dim, "rms_norm", eps=eps, param_dtype=param_dtype)
        self.cross_attn = Attention(config, config.cross_attention_dim, out=True, rngs=rngs, param_dtype=param_dtype)
        self.gate = nnx.Param(jnp.zeros((config.num_attention_heads,), param_dtype))
        self.attn_norm = Norm(dim, "rms_norm", eps=eps, param_dtype=param_dtype)
        self.ffn_norm1 = Norm(dim, "rms_norm", eps=eps, param_dtype=param_dtype)
        self.ffn = FeedForward(dim, config.ffn_dim, rngs=rngs, param_dtype=param_dtype)
        self.ffn_norm2 = Norm(dim, "rms_norm", eps=eps, param_dtype=param_dtype)

    def __call__(self, x: Array, caption: Array, caption_bias: Array, cond: Array, rope, self_scale: float) -> Array:
        scale, gate, ffn_scale, ffn_gate = (m[:, None] for m in jnp.split(self.modulation(jax.nn.silu(cond)), 4, -1))
        h = self.norm(x) * (1 + scale)
        mixed = self.self_attn(h, h, rope, rope_keys=True, bias=None, scale=self_scale)
        cross = self.cross_attn(h, self.context_norm(caption), rope, rope_keys=False, bias=caption_bias,
                                scale=self.head_dim ** -0.5)
        mixed = mixed + cross * jnp.tanh(self.gate[...])[:, None]
        out = self.cross_attn.out(mixed.reshape(*mixed.shape[:2], -1))
        x = x + jnp.tanh(gate) * self.attn_norm(out)
        return x + jnp.tanh(ffn_gate) * self.ffn_norm2(self.ffn(self.ffn_norm1(x) * (1 + ffn_scale)))


# ----------------------------------------------------------------------------- model


class LuminaTransformer(nnx.Module):
    """``LuminaNextDiT2DModel`` in NNX: ``(latents, t, caption, caption mask[, rope]) -> prediction``.

    Build with random weights from a :class:`LuminaConfig`, or load a diffusers checkpoint with
    :func:`cfgzero_theory.lumina.weights.load_lumina_transformer`.
    """

    def __init__(self, config: LuminaConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if not isinstance(config, LuminaConfig):
            raise ValueError(f"config must be a LuminaConfig, got {type(config).__name__}")
        self.config = config
        dim, cond = config.hidden_size, config.cond_dim
        self.patch_proj = _linear(config.in_channels * config.patch_size ** 2, dim, rngs, param_dtype)
        self.pad_token = nnx.Param(jnp.zeros((dim,), param_dtype))  # loaded, unused (module docstring)
        self.time_mlp = MLP(TIME_CHANNELS, cond, cond, "silu", rngs=rngs, param_dtype=param_dtype)
        self.caption_norm = Norm(config.cross_attention_dim, "layer_norm", eps=CAPTION_NORM_EPS,
                                 param_dtype=param_dtype)
        self.caption_proj = _linear(config.cross_attention_dim, cond, rngs, param_dtype)
        self.blocks = nnx.List([Block(config, rngs=rngs, param_dtype=param_dtype) for _ in range(config.num_layers)])
        self.out_modulation = _linear(cond, dim, rngs, param_dtype)
        self.out_proj = _linear(dim, config.patch_size ** 2 * config.out_channels, rngs, param_dtype)

    def _check(self, latents: Array, caption: Array, mask: Array, rope) -> tuple[int, int]:
        cfg = self.config
        if latents.ndim != 4 or latents.shape[1] != cfg.in_channels:
            raise ValueError(f"hidden_states must have shape (B, {cfg.in_channels}, H, W), got {latents.shape}")
        if latents.shape[2] % cfg.patch_size or latents.shape[3] % cfg.patch_size:
            raise ValueError(f"height and width {latents.shape[2:]} must be multiples of patch_size {cfg.patch_size}")
        batch = latents.shape[0]
        if caption.ndim != 3 or caption.shape[0] != batch or caption.shape[2] != cfg.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states must have shape ({batch}, L, {cfg.cross_attention_dim}), "
                             f"got {caption.shape}")
        if mask.shape != caption.shape[:2]:
            raise ValueError(f"encoder_mask must have shape {caption.shape[:2]} (one entry per caption token), "
                             f"got {mask.shape}")
        grid = (latents.shape[2] // cfg.patch_size, latents.shape[3] // cfg.patch_size)
        want = (grid[0] * grid[1], cfg.head_dim // 2)
        if rope is not None and (len(rope) != 2 or any(tuple(jnp.shape(r)) != want for r in rope)):
            raise ValueError(f"rope must be (cos, sin) tables of shape {want} (rope_for with the patch grid "
                             f"{grid[0]}×{grid[1]}), got {[jnp.shape(r) for r in rope]}")
        return grid

    def patchify(self, x: Array) -> Array:
        """``(B, C, H, W) -> (B, h·w, C·p·p)`` in ``(c, i, j)`` order."""
        b, c, height, width = x.shape
        p = self.config.patch_size
        x = x.reshape(b, c, height // p, p, width // p, p).transpose(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (height // p) * (width // p), c * p * p)

    def unpatchify(self, tokens: Array, grid: tuple[int, int]) -> Array:
        """``(B, h·w, p·p·C) -> (B, C, H, W)``, features in ``(i, j, c)`` order."""
        p, (h, w) = self.config.patch_size, grid
        x = tokens.reshape(tokens.shape[0], h, w, p, p, -1).transpose(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], x.shape[1], h * p, w * p)

    def __call__(self, hidden_states: Array, timestep: Array, encoder_hidden_states: Array, encoder_mask: Array,
                 rope: tuple[Array, Array] | None = None, *, base_sequence_length: int | None = None) -> Array:
        """Predict ``(B, out_channels, H, W)`` (prediction, then with ``learn_sigma`` the variance).

        Args:
          hidden_states: latents ``(B, in_channels, H, W)``, ``H`` and ``W`` multiples of ``patch_size``.
          timestep: the **network time** ``t = 1 − τ/1000`` (``t = 0`` noise, ``t = 1`` the image),
            ``(B,)`` or a scalar — what ``LuminaPipeline`` passes, not the scheduler timestep ``τ``.
          encoder_hidden_states: caption features ``(B, L, cross_attention_dim)`` (Gemma's
            penultimate hidden states in the pipeline).
          encoder_mask: ``(B, L)``, nonzero for real caption tokens (pooling weights and the
            cross-attention mask); every row needs one.
          rope: the ``(cos, sin)`` tables of the patch grid, :func:`rope_for` with the step's
            ``linear_factor`` / ``ntk_factor`` (may be traced, e.g. selected by the traced time);
            ``None``: both factors 1.
          base_sequence_length: the proportional-attention base ``N_base`` (diffusers'
            ``cross_attention_kwargs["base_sequence_length"]``); ``None``: plain ``1/√d``.
        """
        latents = jnp.asarray(hidden_states)
        caption = jnp.asarray(encoder_hidden_states)
        mask = jnp.asarray(encoder_mask)
        grid = self._check(latents, caption, mask, rope)
        cfg = self.config
        if rope is None:
            rope = rope_for(cfg, *grid)
        rope = tuple(jnp.asarray(table) for table in rope)
        self_scale = attention_scale(cfg.head_dim, grid[0] * grid[1], base_sequence_length)
        x = self.patch_proj(self.patchify(latents))

        batch = latents.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (batch,))
        temb = self.time_mlp(timestep_embedding(t, TIME_CHANNELS).astype(caption.dtype))
        weights = mask.astype(jnp.float32)[..., None]
        pooled = ((caption * weights).sum(1) / weights.sum(1)).astype(caption.dtype)
        cond = temb + self.caption_proj(self.caption_norm(pooled))
        caption_bias = jnp.where(mask != 0, 0.0, -jnp.inf).astype(jnp.float32)[:, None, None, :]

        for block in self.blocks:
            x = block(x, caption, caption_bias, cond, rope, self_scale)

        out_scale = self.out_modulation(jax.nn.silu(cond).astype(x.dtype))  # a scale, no shift
        x = layer_norm(x, OUT_NORM_EPS) * (1 + out_scale[:, None])
        return self.unpatchify(self.out_proj(x), grid)
