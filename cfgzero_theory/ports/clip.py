"""CLIP text encoders in Flax NNX, faithful to ``transformers.CLIPTextModelWithProjection`` and
``CLIPTextModel``.

Stable Diffusion 3 / 3.5 conditions on two CLIP text towers, ``text_encoder/`` (CLIP ViT-L:
``quick_gelu``, width 768) and ``text_encoder_2/`` (OpenCLIP bigG: ``gelu``, width 1280); both
are ``CLIPTextModelWithProjection`` folders that differ only in their configs.  Flux's
``text_encoder/`` is a ``CLIPTextModel`` (CLIP ViT-L without the projection); its pooled
embedding is the ``pooler_output``.

Public API
----------
* :class:`CLIPTextConfig` (``CLIPTextConfig.from_transformers_config(dict)``);
* :class:`CLIPTextEncoder`: ``encoder(input_ids, *, clip_skip=None, output_hidden_states=False)
  -> (hidden, text_embeds)`` — the per-token embeddings SD3 uses (the penultimate layer, or
  every hidden state) and the pooled, projected ``text_embeds`` (without a projection — a
  ``CLIPTextModel`` — the pooled ``pooler_output``);
* :data:`CLIP_WEIGHT_MAP` and :func:`load_clip_text_encoder` ``(folder, *, dtype=None,
  variant=None, sharding=None)`` for a transformers ``text_encoder/`` or ``text_encoder_2/`` folder.

Architecture (``D = hidden_size``, ``H = num_attention_heads``, LayerNorm eps ``layer_norm_eps``
with float32 statistics and the biased variance)
---------------------------------------------------------------------------------------------
* token embedding plus a learned position embedding at positions ``0 … T−1`` (``T ≤
  max_position_embeddings``);
* ``num_hidden_layers`` pre-LN layers: ``x + attn(LN1(x))`` with causal ``H``-head
  self-attention (q/k/v/out linear maps with bias, scale ``(D/H)^-1/2``), then
  ``x + fc2(act(fc1(LN2(x))))`` with ``act = hidden_act`` (``quick_gelu``: ``x·σ(1.702x)``;
  ``gelu``: the exact erf GELU; ``gelu_new``: the tanh approximation; ``relu``);
* ``hidden_states`` = the embeddings followed by every layer's output (``num_hidden_layers +
  1`` entries, none with the final LayerNorm);
* pooling: the final LayerNorm of the last layer's output, taken at one token per sequence —
  when ``eos_token_id == 2`` (the legacy value of older CLIP configs) at the first largest
  input id (``argmax(input_ids)``: the end-of-text id is the largest in CLIP's vocabulary),
  otherwise at the first position equal to ``eos_token_id`` (position 0 if there is none) —
  then ``text_projection`` (no bias) gives ``text_embeds``.

SD3 use (``StableDiffusion3Pipeline._get_clip_prompt_embeds``): the prompt embeddings are
``hidden_states[-(clip_skip + 2)]`` (``clip_skip=None`` → ``hidden_states[-2]``, the output
of the penultimate layer) and the pooled embeddings are ``text_embeds``.  No attention mask is
applied beyond the causal one (the pipeline passes none; padding tokens are encoded like any
other).

Not supported: padding masks, ``position_ids`` other than ``0 … T−1``, a list-valued
``eos_token_id``, checkpoints that store the legacy persistent buffer
``text_model.embeddings.position_ids`` (an unexpected key), and ``CLIPTextModel`` folders
without the projection.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from cfgzero_theory.ports.loading import (
    IDENTITY, LINEAR, TRANSFORMERS, TRANSFORMERS_METADATA_KEYS, WeightMap, config_kwargs, linear_rows, load_module,
    norm_rows,
)
from cfgzero_theory.ports.sharding import ParamSharding
from cfgzero_theory.ports.attention import attention
from cfgzero_theory.ports.layers import ACTIVATIONS, MLP, Norm
from cfgzero_theory.validation import check_choice, check_int, check_real

Array = jax.Array

__all__ = ["CLIPTextConfig", "CLIPTextEncoder", "CLIP_ARCHITECTURE", "CLIP_ARCHITECTURES", "CLIP_WEIGHT_MAP",
           "load_clip_text_encoder"]

CLIP_ARCHITECTURE = "CLIPTextModelWithProjection"
CLIP_ARCHITECTURES = (CLIP_ARCHITECTURE, "CLIPTextModel")
"""The transformers classes we load: with the text projection (SD3) and without it (Flux)."""
LEGACY_EOS_TOKEN_ID = 2
"""An ``eos_token_id`` of 2 means: pool at ``argmax(input_ids)`` (transformers' legacy rule)."""

IGNORED_CONFIG_KEYS = TRANSFORMERS_METADATA_KEYS | {
    "attention_dropout", "dropout", "initializer_range", "initializer_factor", "bos_token_id", "pad_token_id",
}
"""Keys of a ``CLIPTextConfig`` that do not change inference (metadata, dropout, init, special ids)."""


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The inference keys of a transformers ``CLIPTextConfig`` (same defaults).

    Construction raises ``ValueError`` naming a bad value.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    with_projection: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size ({self.hidden_size})"
            )
        check_choice("hidden_act", self.hidden_act, sorted(ACTIVATIONS))
        object.__setattr__(self, "layer_norm_eps", check_real("layer_norm_eps", self.layer_norm_eps, positive=True))
        object.__setattr__(self, "eos_token_id", check_int("eos_token_id", self.eos_token_id))
        if not isinstance(self.with_projection, bool):
            raise ValueError(f"with_projection must be a bool, got {self.with_projection!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_transformers_config(cls, config: Mapping) -> CLIPTextConfig:
        """Build from a transformers ``config.json`` dict of a ``CLIPTextModelWithProjection``
        (or, when ``architectures`` names ``"CLIPTextModel"``, of a ``CLIPTextModel``:
        ``with_projection=False``).

        Metadata and training-only keys (:data:`IGNORED_CONFIG_KEYS`, keys starting with
        ``_``) are dropped; ``architectures``, when present, must contain one of
        :data:`CLIP_ARCHITECTURES`.  Any other unknown key raises ``ValueError`` naming it;
        missing keys take transformers' defaults.
        """
        architectures = config.get("architectures") if isinstance(config, Mapping) else None
        plain = isinstance(architectures, list) and CLIP_ARCHITECTURES[1] in architectures
        kwargs = config_kwargs(cls, config, CLIP_ARCHITECTURES[plain], ignore=IGNORED_CONFIG_KEYS)
        return cls(**{**kwargs, "with_projection": not plain})


# ----------------------------------------------------------------------------- layers


def LayerNorm(dim: int, eps: float, *, param_dtype=jnp.float32) -> Norm:
    """torch ``LayerNorm`` over the last axis (affine; statistics in float32)."""
    return Norm(dim, "layer_norm", param_dtype=param_dtype, eps=eps)


class CausalSelfAttention(nnx.Module):
    """``H``-head causal self-attention, scale ``head_dim^-1/2``."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.heads = heads
        lin = lambda: nnx.Linear(dim, dim, rngs=rngs, param_dtype=param_dtype)  # noqa: E731
        self.q, self.k, self.v, self.out = lin(), lin(), lin(), lin()

    def __call__(self, x: Array) -> Array:
        split = lambda y: y.reshape(*y.shape[:2], self.heads, -1)  # noqa: E731
        out = attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), causal=True)
        return self.out(out.reshape(*out.shape[:2], -1))


class EncoderLayer(nnx.Module):
    """Pre-LN transformer layer: ``x + attn(LN1(x))``, then ``x + mlp(LN2(x))``."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        d, eps = config.hidden_size, config.layer_norm_eps
        self.norm1 = LayerNorm(d, eps, param_dtype=param_dtype)
        self.attn = CausalSelfAttention(d, config.num_attention_heads, rngs=rngs, param_dtype=param_dtype)
        self.norm2 = LayerNorm(d, eps, param_dtype=param_dtype)
        self.mlp = MLP(d, config.intermediate_size, d, config.hidden_act, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLIPTextEncoder(nnx.Module):
    """``transformers.CLIPTextModelWithProjection`` as SD3 uses it (see the module docstring)."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.config = config
        d = config.hidden_size
        self.token_embedding = nnx.Embed(config.vocab_size, d, rngs=rngs, param_dtype=param_dtype)
        self.position_embedding = nnx.Embed(config.max_position_embeddings, d, rngs=rngs, param_dtype=param_dtype)
        self.layers = nnx.List([
            EncoderLayer(config, rngs=rngs, param_dtype=param_dtype) for _ in range(config.num_hidden_layers)
        ])
        self.final_norm = LayerNorm(d, config.layer_norm_eps, param_dtype=param_dtype)
        self.text_projection = (nnx.Linear(d, config.projection_dim, use_bias=False, rngs=rngs, param_dtype=param_dtype)
                                if config.with_projection else None)

    def pool_index(self, input_ids: Array) -> Array:
        """The token each sequence is pooled at, ``(B,)`` (see the module docstring)."""
        if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            return jnp.argmax(input_ids, axis=-1)
        return jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)

    def __call__(
        self, input_ids: Array, *, clip_skip: int | None = None, output_hidden_states: bool = False,
    ) -> tuple[Array | tuple[Array, ...], Array]:
        """Encode token ids ``(B, T)``.

        Returns ``(hidden, text_embeds)``: ``hidden`` is ``hidden_states[-(clip_skip + 2)]``
        ``(B, T, hidden_size)`` (``clip_skip=None``: the penultimate layer's output, SD3's
        prompt embeddings), or, with ``output_hidden_states=True``, the tuple of all
        ``num_hidden_layers + 1`` hidden states; ``text_embeds`` ``(B, projection_dim)`` (without
        a projection: the pooled ``pooler_output`` ``(B, hidden_size)``).
        Raises ``ValueError`` for a bad shape, a sequence longer than
        ``max_position_embeddings`` or a ``clip_skip`` outside ``0 … num_hidden_layers − 1``.
        """
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be an integer array (batch, tokens), got {input_ids.dtype} {input_ids.shape}")
        t = input_ids.shape[1]
        if t > self.config.max_position_embeddings:
            raise ValueError(f"{t} tokens exceed max_position_embeddings ({self.config.max_position_embeddings})")
        skip = 0 if clip_skip is None else check_int("clip_skip", clip_skip, minimum=0,
                                                     maximum=self.config.num_hidden_layers - 1)
        x = self.token_embedding(input_ids) + self.position_embedding(jnp.arange(t))[None]
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x)
            hidden_states.append(x)
        final = self.final_norm(x)
        pooled = final[jnp.arange(final.shape[0]), self.pool_index(input_ids)]
        text_embeds = pooled if self.text_projection is None else self.text_projection(pooled)
        if output_hidden_states:
            return tuple(hidden_states), text_embeds
        return hidden_states[-(skip + 2)], text_embeds


# ----------------------------------------------------------------------------- weights


_L = "text_model.encoder.layers.{i}"
CLIP_WEIGHT_MAP: tuple[tuple[str, str, str], ...] = (
    # (transformers key, our state path, transform)
    ("text_model.embeddings.token_embedding.weight", "token_embedding.embedding", "identity"),
    ("text_model.embeddings.position_embedding.weight", "position_embedding.embedding", "identity"),
    *linear_rows(f"{_L}.self_attn.{{x}}_proj", "layers.{i}.attn.{x}"),
    *norm_rows(f"{_L}.layer_norm{{n}}", "layers.{i}.norm{n}"),
    *linear_rows(f"{_L}.mlp.fc{{n}}", "layers.{i}.mlp.fc{n}"),
    *norm_rows("text_model.final_layer_norm", "final_norm"),
    ("text_projection.weight", "text_projection.kernel", "linear"),
)
"""The CLIP text weight mapping: ``{i}`` a layer, ``{x}`` ``q``/``k``/``v``/``out``, ``{n}``
``1``/``2``; transforms ``identity`` and ``linear`` (transpose).  transformers 5 saves a
``CLIPTextModel`` without the ``text_model.`` prefix, so each such key is also accepted bare."""

_BARE_ROWS = tuple((key.removeprefix("text_model."), ours, transform)
                   for key, ours, transform in CLIP_WEIGHT_MAP if key.startswith("text_model."))
_CLIP_WEIGHT_MAP = WeightMap(
    CLIP_WEIGHT_MAP + _BARE_ROWS, {"i": r"\d+", "x": "q|k|v|out", "n": "[12]"}, {"identity": IDENTITY, "linear": LINEAR},
)


def load_clip_text_encoder(
    folder: str | os.PathLike, *, dtype=None, variant: str | None = None, sharding: ParamSharding | None = None,
    architecture: str = CLIP_ARCHITECTURE,
) -> CLIPTextEncoder:
    """Load a transformers ``CLIPTextModelWithProjection`` folder (SD3's ``text_encoder/`` or
    ``text_encoder_2/``) — or, with ``architecture="CLIPTextModel"``, a ``CLIPTextModel``
    folder (Flux's ``text_encoder/``) — into an NNX :class:`CLIPTextEncoder`.

    The folder holds ``config.json`` (``architectures`` containing ``architecture``) and ``model.safetensors`` or a sharded
    ``model.safetensors.index.json`` (``variant="fp16"`` reads ``model.fp16.safetensors``).
    Same checks as the other loaders (all are :func:`cfgzero_theory.ports.loading.load_module`):
    every problem in the headers — missing, unexpected or wrongly shaped keys — reported in one
    ``ValueError`` before any tensor data is read; tensors are then read, transformed, cast
    (``dtype``; ``None`` keeps the stored dtype) and placed one at a time — on the default
    device, or split over a device mesh as ``sharding`` (a
    :class:`~cfgzero_theory.ports.sharding.ParamSharding`) says.
    """
    return load_module(
        folder, CLIPTextEncoder, CLIPTextConfig, _CLIP_WEIGHT_MAP,
        class_name=check_choice("architecture", architecture, CLIP_ARCHITECTURES), what="CLIP text_encoder/", dtype=dtype, variant=variant,
        folder_kind=TRANSFORMERS, sharding=sharding,
        repeats={"i": ("num_hidden_layers", lambda config: config.num_hidden_layers)},
    )
