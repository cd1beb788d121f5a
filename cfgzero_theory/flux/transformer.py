"""The Flux.1 denoiser in Flax NNX, faithful to ``diffusers.FluxTransformer2DModel``.

Architecture (``D = num_attention_heads · attention_head_dim``; tokens are the pipeline's
packed latents, 2×2 latent patches of ``C`` channels flattened in ``(C, 2, 2)`` order, so
``in_channels = 4C``):

1. **Embeddings.**  Image tokens ``x_embedder: Linear(in_channels → D)``; text tokens
   ``context_embedder: Linear(joint_attention_dim → D)``.
2. **Conditioning** ``c = MLP_t(sincos_256(1000·t)) [+ MLP_g(sincos_256(1000·g))] + MLP_p(pooled)``
   (each MLP ``Linear → SiLU → Linear``; ``sincos_256`` is :func:`~cfgzero_theory.ports.layers.timestep_embedding`).
   The timestep ``t ∈ [0, 1]`` and the distilled guidance ``g`` (dev only,
   ``guidance_embeds=True``) are cast to the weights' dtype *before* the multiplication by
   1000, as diffusers does: in bfloat16 a guidance of 3.5 is embedded as 3504.
3. **RoPE.**  Every token has a position ``(t, h, w)``: text tokens ``(0, 0, 0)``, image token
   ``(i, j)`` of the packed grid ``(0, i, j)``.  The angles of axis ``a`` use ``axes_dims_rope[a]/2``
   frequencies ``θ^(−2k/d_a)`` (θ = 10000); pairs ``(x[2k], x[2k+1])`` are rotated
   (:func:`~cfgzero_theory.ports.layers.apply_rope`), the tables built in float64 on the host.
4. **Double-stream blocks** (``num_layers``).  Each stream has an AdaLN-Zero modulation
   ``Linear(SiLU(c)) → (shift, scale, gate)_attn, (shift, scale, gate)_mlp`` applied to a
   parameter-free LayerNorm (eps ``1e-6``): ``LN(x)·(1 + scale) + shift``.  Both streams are
   projected to q/k/v (with bias), q and k RMS-normalised **per head** (eps ``1e-6``),
   concatenated ``[text; image]``, rotated by RoPE and attended jointly; each stream's part
   is projected out, gated and added; then each stream's ``GELU(tanh)`` MLP ``D → 4D → D``,
   modulated, gated and added.
5. **Single-stream blocks** (``num_single_layers``) on ``x = [text; image]``: one modulation
   ``(shift, scale, gate)``, ``h = LN(x)·(1 + scale) + shift``; q/k/v from ``h`` (per-head
   RMSNorm, RoPE), attention **without** an output projection; ``m = GELU(tanh)(proj_mlp h)``
   ``(4D)``; ``x ← x + gate · proj_out([attn, m])``.
6. **Output** on the image tokens: ``AdaLayerNormContinuous`` — modulation chunks in the
   order **(scale, shift)**, LayerNorm eps ``1e-6`` — then ``Linear(D → out_channels)``.

Numerics: norms compute their statistics in float32; attention scores and softmax run in
float32 (:func:`cfgzero_theory.ports.attention.attention`); matmuls in the weights' dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cfgzero_theory.ports.attention import attention
from cfgzero_theory.ports.layers import (
    MLP, Norm, apply_rope, layer_norm, modulation, rope_tables, round_to, timestep_embedding,
)
from cfgzero_theory.ports.loading import config_kwargs
from cfgzero_theory.validation import check_int

Array = jax.Array

__all__ = ["DIFFUSERS_CLASS_NAME", "FluxConfig", "FluxTransformer", "image_ids", "rope_for"]

DIFFUSERS_CLASS_NAME = "FluxTransformer2DModel"
NORM_EPS = 1e-6
ROPE_THETA = 10000.0
TIME_CHANNELS = 256
MLP_RATIO = 4


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """The keys of a diffusers ``FluxTransformer2DModel`` ``config.json`` (same defaults: FLUX.1-schnell's)."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        if self.patch_size != 1:
            raise ValueError(f"patch_size must be 1 (the Flux pipelines pack 2×2 patches themselves), "
                             f"got {self.patch_size!r}")
        for name in ("in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
                     "joint_attention_dim", "pooled_projection_dim"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        check_int("num_single_layers", self.num_single_layers, minimum=0)
        if self.out_channels is not None:
            object.__setattr__(self, "out_channels", check_int("out_channels", self.out_channels, minimum=1))
        if not isinstance(self.guidance_embeds, bool):
            raise ValueError(f"guidance_embeds must be a bool, got {self.guidance_embeds!r}")
        axes = tuple(self.axes_dims_rope)
        if not axes or any(check_int("axes_dims_rope entry", d, minimum=2) % 2 for d in axes):
            raise ValueError(f"axes_dims_rope must hold even sizes, got {self.axes_dims_rope!r}")
        if sum(axes) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {axes} must sum to attention_head_dim ({self.attention_head_dim})")
        object.__setattr__(self, "axes_dims_rope", axes)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_diffusers_config(cls, config: Mapping) -> FluxConfig:
        """Build from a diffusers ``config.json`` dict; an unknown key raises ``ValueError`` naming it."""
        return cls(**config_kwargs(cls, config, DIFFUSERS_CLASS_NAME))


# ----------------------------------------------------------------------------- positions


def image_ids(height: int, width: int) -> np.ndarray:
    """The packed image grid's positions ``(h·w, 3)``: token ``i·w + j`` at ``(0, i, j)``."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([np.zeros(height * width), rows.ravel(), cols.ravel()], axis=1)


def rope_for(config: FluxConfig, text_length: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The RoPE tables ``(cos, sin)``, ``(L + h·w, head_dim / 2)`` float32, of ``text_length`` text
    tokens at the origin followed by the ``height × width`` packed image grid (float64 on the host)."""
    ids = np.concatenate([np.zeros((text_length, len(config.axes_dims_rope))), image_ids(height, width)])
    cos, sin = rope_tables(ids, config.axes_dims_rope, ROPE_THETA)
    return cos.astype(np.float32), sin.astype(np.float32)


# ----------------------------------------------------------------------------- layers


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs, param_dtype) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, rngs=rngs, param_dtype=param_dtype)


class QKV(nnx.Module):
    """q/k/v projections (with bias) split into heads, q and k RMS-normalised per head."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, rngs: nnx.Rngs, param_dtype):
        self.heads = heads
        self.q, self.k, self.v = (_linear(dim, heads * head_dim, rngs, param_dtype) for _ in range(3))
        self.q_norm = Norm(head_dim, "rms_norm", eps=NORM_EPS, param_dtype=param_dtype)
        self.k_norm = Norm(head_dim, "rms_norm", eps=NORM_EPS, param_dtype=param_dtype)

    def __call__(self, x: Array) -> tuple[Array, Array, Array]:
        split = lambda y: y.reshape(*y.shape[:2], self.heads, -1)  # noqa: E731
        return self.q_norm(split(self.q(x))), self.k_norm(split(self.k(x))), split(self.v(x))


def _rotary_attention(q: Array, k: Array, v: Array, rope: tuple[Array, Array]) -> Array:
    """RoPE on q and k, softmax attention, heads merged: ``(B, N, H·Dh)``."""
    cos, sin = rope
    out = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
    return out.reshape(*out.shape[:2], -1).astype(q.dtype)


class DoubleBlock(nnx.Module):
    """A double-stream block (module docstring, item 4)."""

    def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs, param_dtype):
        dim, heads, head_dim = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        self.img_mod = _linear(dim, 6 * dim, rngs, param_dtype)
        self.txt_mod = _linear(dim, 6 * dim, rngs, param_dtype)
        self.img_qkv = QKV(dim, heads, head_dim, rngs=rngs, param_dtype=param_dtype)
        self.txt_qkv = QKV(dim, heads, head_dim, rngs=rngs, param_dtype=param_dtype)
        self.img_out = _linear(dim, dim, rngs, param_dtype)
        self.txt_out = _linear(dim, dim, rngs, param_dtype)
        self.img_mlp = MLP(dim, MLP_RATIO * dim, dim, "gelu_tanh", rngs=rngs, param_dtype=param_dtype)
        self.txt_mlp = MLP(dim, MLP_RATIO * dim, dim, "gelu_tanh", rngs=rngs, param_dtype=param_dtype)

    def __call__(self, txt: Array, img: Array, act: Array, rope) -> tuple[Array, Array]:
        shift, scale, gate, mlp_shift, mlp_scale, mlp_gate = modulation(self.img_mod(act), 6)
        t_shift, t_scale, t_gate, t_mlp_shift, t_mlp_scale, t_mlp_gate = modulation(self.txt_mod(act), 6)
        img_q, img_k, img_v = self.img_qkv(layer_norm(img, NORM_EPS) * (1 + scale) + shift)
        txt_q, txt_k, txt_v = self.txt_qkv(layer_norm(txt, NORM_EPS) * (1 + t_scale) + t_shift)
        joint = lambda a, b: jnp.concatenate([a, b], axis=1)  # noqa: E731
        out = _rotary_attention(joint(txt_q, img_q), joint(txt_k, img_k), joint(txt_v, img_v), rope)
        n_txt = txt.shape[1]
        img = img + gate * self.img_out(out[:, n_txt:])
        img = img + mlp_gate * self.img_mlp(layer_norm(img, NORM_EPS) * (1 + mlp_scale) + mlp_shift)
        txt = txt + t_gate * self.txt_out(out[:, :n_txt])
        txt = txt + t_mlp_gate * self.txt_mlp(layer_norm(txt, NORM_EPS) * (1 + t_mlp_scale) + t_mlp_shift)
        return txt, img


class SingleBlock(nnx.Module):
    """A single-stream block (module docstring, item 5)."""

    def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs, param_dtype):
        dim = config.inner_dim
        self.mod = _linear(dim, 3 * dim, rngs, param_dtype)
        self.qkv = QKV(dim, config.num_attention_heads, config.attention_head_dim, rngs=rngs, param_dtype=param_dtype)
        self.proj_mlp = _linear(dim, MLP_RATIO * dim, rngs, param_dtype)
        self.proj_out = _linear(dim + MLP_RATIO * dim, dim, rngs, param_dtype)

    def __call__(self, x: Array, act: Array, rope) -> Array:
        shift, scale, gate = modulation(self.mod(act), 3)
        h = layer_norm(x, NORM_EPS) * (1 + scale) + shift
        out = _rotary_attention(*self.qkv(h), rope)
        mlp = jax.nn.gelu(self.proj_mlp(h), approximate=True)
        return x + gate * self.proj_out(jnp.concatenate([out, mlp], axis=-1))


# ----------------------------------------------------------------------------- model


class FluxTransformer(nnx.Module):
    """``FluxTransformer2DModel`` in NNX: ``(packed latents, prompt_embeds, pooled, t, guidance) -> v``.

    Build with random weights from a :class:`FluxConfig`, or load a diffusers checkpoint with
    :func:`cfgzero_theory.flux.weights.load_flux_transformer`.
    """

    def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if not isinstance(config, FluxConfig):
            raise ValueError(f"config must be a FluxConfig, got {type(config).__name__}")
        self.config = config
        dim = config.inner_dim
        self.x_embedder = _linear(config.in_channels, dim, rngs, param_dtype)
        self.context_embedder = _linear(config.joint_attention_dim, dim, rngs, param_dtype)
        self.time_mlp = MLP(TIME_CHANNELS, dim, dim, "silu", rngs=rngs, param_dtype=param_dtype)
        self.guidance_mlp = (MLP(TIME_CHANNELS, dim, dim, "silu", rngs=rngs, param_dtype=param_dtype)
                             if config.guidance_embeds else None)
        self.pooled_mlp = MLP(config.pooled_projection_dim, dim, dim, "silu", rngs=rngs, param_dtype=param_dtype)
        self.double_blocks = nnx.List([DoubleBlock(config, rngs=rngs, param_dtype=param_dtype)
                                       for _ in range(config.num_layers)])
        self.single_blocks = nnx.List([SingleBlock(config, rngs=rngs, param_dtype=param_dtype)
                                       for _ in range(config.num_single_layers)])
        self.out_mod = _linear(dim, 2 * dim, rngs, param_dtype)
        self.out_proj = _linear(dim, config.output_channels, rngs, param_dtype)

    def _check(self, hidden_states, encoder_hidden_states, pooled_projections, guidance, grid):
        cfg = self.config
        if hidden_states.ndim != 3 or hidden_states.shape[2] != cfg.in_channels:
            raise ValueError(f"hidden_states must have shape (B, N, {cfg.in_channels}), got {hidden_states.shape}")
        batch, tokens = hidden_states.shape[:2]
        height, width = (check_int("grid entry", g, minimum=1) for g in grid)
        if height * width != tokens:
            raise ValueError(f"grid {height}×{width} does not hold the {tokens} image tokens of hidden_states")
        if (encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch
                or encoder_hidden_states.shape[2] != cfg.joint_attention_dim):
            raise ValueError(f"encoder_hidden_states must have shape ({batch}, L, {cfg.joint_attention_dim}), "
                             f"got {encoder_hidden_states.shape}")
        if pooled_projections.shape != (batch, cfg.pooled_projection_dim):
            raise ValueError(f"pooled_projections must have shape ({batch}, {cfg.pooled_projection_dim}), "
                             f"got {pooled_projections.shape}")
        if (guidance is None) == cfg.guidance_embeds:
            raise ValueError("guidance must be given exactly when the model embeds it (guidance_embeds="
                             f"{cfg.guidance_embeds}; FLUX.1-dev embeds it, schnell does not)")

    def __call__(self, hidden_states: Array, encoder_hidden_states: Array, pooled_projections: Array,
                 timestep: Array, guidance: Array | None = None, *, grid: Sequence[int]) -> Array:
        """Predict ``(B, N, out_channels)`` from packed latents ``(B, N, in_channels)`` laid out on the
        ``grid = (h, w)`` packed grid (``N = h·w``), prompt embeddings ``(B, L, joint_attention_dim)``,
        pooled embeddings ``(B, pooled_projection_dim)``, the timestep ``t ∈ [0, 1]`` ``(B,)`` (or a
        scalar) and, for a guidance-distilled model, the guidance ``(B,)`` (or a scalar).  Text
        ids are zeros and image ids the grid's, as the Flux pipelines build them."""
        hidden_states = jnp.asarray(hidden_states)
        encoder_hidden_states = jnp.asarray(encoder_hidden_states)
        pooled_projections = jnp.asarray(pooled_projections)
        self._check(hidden_states, encoder_hidden_states, pooled_projections, guidance, grid)
        batch = hidden_states.shape[0]
        img = self.x_embedder(hidden_states)
        dtype = img.dtype

        def embed(mlp, value):  # rounded to the weights' dtype, × 1000, rounded again (diffusers' order)
            value = round_to(round_to(jnp.broadcast_to(jnp.asarray(value), (batch,)), dtype) * 1000, dtype)
            return mlp(timestep_embedding(value, TIME_CHANNELS).astype(pooled_projections.dtype))

        cond = embed(self.time_mlp, timestep)
        if self.guidance_mlp is not None:
            cond = cond + embed(self.guidance_mlp, guidance)
        cond = cond + self.pooled_mlp(pooled_projections)
        act = jax.nn.silu(cond)
        txt = self.context_embedder(encoder_hidden_states)
        n_txt = txt.shape[1]
        rope = tuple(jnp.asarray(t) for t in rope_for(self.config, n_txt, *grid))

        for block in self.double_blocks:
            txt, img = block(txt, img, act, rope)
        x = jnp.concatenate([txt, img], axis=1)
        for block in self.single_blocks:
            x = block(x, act, rope)
        img = x[:, n_txt:]

        scale, shift = modulation(self.out_mod(act.astype(img.dtype)), 2)  # AdaLayerNormContinuous: (scale, shift)
        return self.out_proj(layer_norm(img, NORM_EPS) * (1 + scale) + shift)
