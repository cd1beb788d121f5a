"""CLIP encoders in Flax NNX: the text towers, faithful to ``transformers.CLIPTextModelWithProjection``
and ``CLIPTextModel``, and the vision tower, faithful to ``transformers.CLIPVisionModel`` and
``CLIPVisionModelWithProjection``.

Stable Diffusion 3 / 3.5 conditions on two CLIP text towers, ``text_encoder/`` (CLIP ViT-L:
``quick_gelu``, width 768) and ``text_encoder_2/`` (OpenCLIP bigG: ``gelu``, width 1280); both
are ``CLIPTextModelWithProjection`` folders that differ only in their configs.  Flux's
``text_encoder/`` is a ``CLIPTextModel`` (CLIP ViT-L without the projection); its pooled
embedding is the ``pooler_output``.  Wan2.1's image-to-video pipeline encodes the conditioning
image with the vision tower of CLIP ViT-H/14 (``image_encoder/``, a ``CLIPVisionModel``: ``gelu``,
width 1280, 32 layers, 224² images in 14² patches) and uses its penultimate hidden state.

Public API
----------
* :class:`CLIPTextConfig` (``CLIPTextConfig.from_transformers_config(dict)``);
* :class:`CLIPTextEncoder`: ``encoder(input_ids, *, clip_skip=None, output_hidden_states=False)
  -> (hidden, text_embeds)`` — the per-token embeddings SD3 uses (the penultimate layer, or
  every hidden state) and the pooled, projected ``text_embeds`` (without a projection — a
  ``CLIPTextModel`` — the pooled ``pooler_output``);
* :data:`CLIP_WEIGHT_MAP` and :func:`load_clip_text_encoder` ``(folder, *, dtype=None,
  variant=None, sharding=None, architecture=CLIP_ARCHITECTURE)`` for a transformers
  ``text_encoder/`` or ``text_encoder_2/`` folder;
* :class:`CLIPVisionConfig` (``CLIPVisionConfig.from_transformers_config(dict)``);
* :class:`CLIPVisionEncoder`: ``encoder(pixel_values, *, output_hidden_states=False) ->
  CLIPVisionOutput(hidden, pooled, image_embeds)`` — ``hidden`` the penultimate hidden state
  (Wan's image embeddings) or every hidden state, ``pooled`` the ``pooler_output`` and
  ``image_embeds`` the projected one (``None`` without a projection);
* :data:`CLIP_VISION_WEIGHT_MAP` and :func:`load_clip_vision_encoder` ``(folder, *, dtype=None,
  variant=None, sharding=None)`` for a transformers ``image_encoder/`` folder.

The encoder layers (both towers; ``D = hidden_size``, ``H = num_attention_heads``, LayerNorm
eps ``layer_norm_eps`` with float32 statistics and the biased variance)
---------------------------------------------------------------------------------------------
``num_hidden_layers`` pre-LN layers: ``x + attn(LN1(x))`` with ``H``-head self-attention (q/k/v/out
linear maps with bias, scale ``(D/H)^-1/2``; causal in the text tower, not in the vision tower),
then ``x + fc2(act(fc1(LN2(x))))`` with ``act = hidden_act`` (``quick_gelu``: ``x·σ(1.702x)``;
``gelu``: the exact erf GELU; ``gelu_new``: the tanh approximation; ``relu``).

The text tower
--------------
* token embedding plus a learned position embedding at positions ``0 … T−1`` (``T ≤
  max_position_embeddings``), then the causal layers;
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

The vision tower (``p = patch_size``, ``S = image_size``, ``g = S/p``)
------------------------------------------------------------------------
* pixel values ``(B, C, S, S)`` (already resized, cropped and normalised by the pipeline) are
  cast to the weights' dtype and cut into ``g²`` non-overlapping ``p × p`` patches in row-major
  order, each flattened in ``(c, i, j)`` order and mapped to ``D`` by one matrix (the
  stride-``p`` convolution without bias written as a linear map);
* a learned class embedding is put in front (token 0), a learned position embedding ``(1 + g², D)``
  is added, and ``pre_layrnorm`` (transformers' spelling) normalises the sum;
* ``hidden_states`` = that normalised embedding followed by every (non-causal) layer's output
  (``num_hidden_layers + 1`` entries of ``(B, 1 + g², D)``);
* pooling: ``pooled = post_layernorm(last_hidden_state[:, 0])`` (the class token), and with the
  projection ``image_embeds = visual_projection(pooled)`` (no bias).

Wan2.1 use (``WanImageToVideoPipeline.encode_image``): ``hidden_states[-2]``, the output of the
penultimate layer, ``(B, 257, 1280)`` for ViT-H/14.

Not supported: padding masks, ``position_ids`` other than ``0 … T−1``, a list-valued
``eos_token_id``, images of another size than ``image_size`` (transformers'
``interpolate_pos_encoding``), an ``image_size`` that ``patch_size`` does not divide, non-square
(list-valued) ``image_size`` / ``patch_size``, and checkpoints that store the legacy persistent
buffers ``text_model.embeddings.position_ids`` / ``vision_model.embeddings.position_ids`` (an
unexpected key).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cfgzero_theory.ports.loading import (
    IDENTITY, LINEAR, TRANSFORMERS, TRANSFORMERS_METADATA_KEYS, Transform, WeightMap, config_kwargs, linear_rows,
    load_module, norm_rows,
)
from cfgzero_theory.ports.sharding import ParamSharding
from cfgzero_theory.ports.attention import attention
from cfgzero_theory.ports.layers import ACTIVATIONS, MLP, Norm
from cfgzero_theory.validation import check_choice, check_int, check_real

Array = jax.Array

__all__ = ["CLIPTextConfig", "CLIPTextEncoder", "CLIPVisionConfig", "CLIPVisionEncoder", "CLIPVisionOutput",
           "CLIP_ARCHITECTURE", "CLIP_ARCHITECTURES", "CLIP_VISION_ARCHITECTURES", "CLIP_VISION_WEIGHT_MAP",
           "CLIP_WEIGHT_MAP", "load_clip_text_encoder", "load_clip_vision_encoder"]

CLIP_ARCHITECTURE = "CLIPTextModelWithProjection"
CLIP_ARCHITECTURES = (CLIP_ARCHITECTURE, "CLIPTextModel")
"""The transformers text classes we load: with the text projection (SD3) and without it (Flux)."""
CLIP_VISION_ARCHITECTURES = ("CLIPVisionModel", "CLIPVisionModelWithProjection")
"""The transformers vision classes we load: without the visual projection (Wan2.1) and with it."""
LEGACY_EOS_TOKEN_ID = 2
"""An ``eos_token_id`` of 2 means: pool at ``argmax(input_ids)`` (transformers' legacy rule)."""

_TRAINING_KEYS = frozenset({"attention_dropout", "dropout", "initializer_range", "initializer_factor"})
IGNORED_CONFIG_KEYS = TRANSFORMERS_METADATA_KEYS | _TRAINING_KEYS | {"bos_token_id", "pad_token_id"}
"""Keys of a ``CLIPTextConfig`` that do not change inference (metadata, dropout, init, special ids)."""
IGNORED_VISION_CONFIG_KEYS = TRANSFORMERS_METADATA_KEYS | _TRAINING_KEYS
"""Keys of a ``CLIPVisionConfig`` that do not change inference (metadata, dropout, init)."""


# ----------------------------------------------------------------------------- configs


def _check_tower(config, counts: tuple[str, ...]) -> None:
    """The checks both towers' configs share: ``counts`` positive ints (stored as Python ints),
    heads dividing the width, a known ``hidden_act``, a positive ``layer_norm_eps``, a bool
    ``with_projection``."""
    for name in counts:
        object.__setattr__(config, name, check_int(name, getattr(config, name), minimum=1))
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"num_attention_heads ({config.num_attention_heads}) must divide hidden_size ({config.hidden_size})"
        )
    check_choice("hidden_act", config.hidden_act, sorted(ACTIVATIONS))
    object.__setattr__(config, "layer_norm_eps", check_real("layer_norm_eps", config.layer_norm_eps, positive=True))
    if not isinstance(config.with_projection, bool):
        raise ValueError(f"with_projection must be a bool, got {config.with_projection!r}")


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
        _check_tower(self, ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                            "num_attention_heads", "max_position_embeddings"))
        object.__setattr__(self, "eos_token_id", check_int("eos_token_id", self.eos_token_id))

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


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The inference keys of a transformers ``CLIPVisionConfig`` (same defaults), plus
    ``with_projection`` (``CLIPVisionModelWithProjection``; default ``False``, a ``CLIPVisionModel``).

    ``image_size`` and ``patch_size`` are single ints (square images and patches) and
    ``patch_size`` must divide ``image_size``.  Construction raises ``ValueError`` naming a bad value.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    with_projection: bool = False

    def __post_init__(self):
        _check_tower(self, ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                            "num_attention_heads", "num_channels", "image_size", "patch_size"))
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size ({self.patch_size}) must divide image_size ({self.image_size})")

    @property
    def num_positions(self) -> int:
        """Tokens per image: the class token and ``(image_size / patch_size)²`` patches."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_transformers_config(cls, config: Mapping) -> CLIPVisionConfig:
        """Build from a transformers ``config.json`` dict of a ``CLIPVisionModel`` (or, when
        ``architectures`` names ``"CLIPVisionModelWithProjection"``, of that class:
        ``with_projection=True``).

        Metadata and training-only keys (:data:`IGNORED_VISION_CONFIG_KEYS`, keys starting
        with ``_``) are dropped; ``architectures``, when present, must contain one of
        :data:`CLIP_VISION_ARCHITECTURES`.  Any other unknown key raises ``ValueError`` naming
        it; missing keys take transformers' defaults.
        """
        architectures = config.get("architectures") if isinstance(config, Mapping) else None
        projected = isinstance(architectures, list) and CLIP_VISION_ARCHITECTURES[1] in architectures
        kwargs = config_kwargs(cls, config, CLIP_VISION_ARCHITECTURES[projected], ignore=IGNORED_VISION_CONFIG_KEYS)
        return cls(**{**kwargs, "with_projection": projected})


# ----------------------------------------------------------------------------- layers


def LayerNorm(dim: int, eps: float, *, param_dtype=jnp.float32) -> Norm:
    """torch ``LayerNorm`` over the last axis (affine; statistics in float32)."""
    return Norm(dim, "layer_norm", param_dtype=param_dtype, eps=eps)


class SelfAttention(nnx.Module):
    """``H``-head self-attention, scale ``head_dim^-1/2``; ``causal``: token ``t`` sees tokens ``≤ t``."""

    def __init__(self, dim: int, heads: int, *, causal: bool, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.heads = heads
        self.causal = causal
        lin = lambda: nnx.Linear(dim, dim, rngs=rngs, param_dtype=param_dtype)  # noqa: E731
        self.q, self.k, self.v, self.out = lin(), lin(), lin(), lin()

    def __call__(self, x: Array) -> Array:
        split = lambda y: y.reshape(*y.shape[:2], self.heads, -1)  # noqa: E731
        out = attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), causal=self.causal)
        return self.out(out.reshape(*out.shape[:2], -1))


class EncoderLayer(nnx.Module):
    """Pre-LN transformer layer of either tower: ``x + attn(LN1(x))``, then ``x + mlp(LN2(x))``
    (``config`` a :class:`CLIPTextConfig` or :class:`CLIPVisionConfig`)."""

    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig, *, causal: bool, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        d, eps = config.hidden_size, config.layer_norm_eps
        self.norm1 = LayerNorm(d, eps, param_dtype=param_dtype)
        self.attn = SelfAttention(d, config.num_attention_heads, causal=causal, rngs=rngs, param_dtype=param_dtype)
        self.norm2 = LayerNorm(d, eps, param_dtype=param_dtype)
        self.mlp = MLP(d, config.intermediate_size, d, config.hidden_act, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _layers(config: CLIPTextConfig | CLIPVisionConfig, *, causal: bool, rngs: nnx.Rngs, param_dtype) -> nnx.List:
    return nnx.List([EncoderLayer(config, causal=causal, rngs=rngs, param_dtype=param_dtype)
                     for _ in range(config.num_hidden_layers)])


# ----------------------------------------------------------------------------- text tower


class CLIPTextEncoder(nnx.Module):
    """``transformers.CLIPTextModelWithProjection`` as SD3 uses it (see the module docstring)."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.config = config
        d = config.hidden_size
        self.token_embedding = nnx.Embed(config.vocab_size, d, rngs=rngs, param_dtype=param_dtype)
        self.position_embedding = nnx.Embed(config.max_position_embeddings, d, rngs=rngs, param_dtype=param_dtype)
        self.layers = _layers(config, causal=True, rngs=rngs, param_dtype=param_dtype)
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


# ----------------------------------------------------------------------------- vision tower


class CLIPVisionOutput(NamedTuple):
    """What :class:`CLIPVisionEncoder` returns."""

    hidden: Array | tuple[Array, ...]
    """``hidden_states[-2]`` ``(B, 1 + g², hidden_size)``, or the tuple of all hidden states."""
    pooled: Array
    """``post_layernorm`` of the last layer's class token, ``(B, hidden_size)`` (``pooler_output``)."""
    image_embeds: Array | None
    """``visual_projection(pooled)`` ``(B, projection_dim)``; ``None`` without the projection."""


def patchify(x: Array, p: int) -> Array:
    """``(B, C, H, W) -> (B, (H/p)·(W/p), C·p·p)``: patches in row-major order, each flattened
    in the conv weight's ``(c, i, j)`` order."""
    batch, channels, height, width = x.shape
    x = x.reshape(batch, channels, height // p, p, width // p, p)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(batch, (height // p) * (width // p), channels * p * p)


class CLIPVisionEncoder(nnx.Module):
    """``transformers.CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` (see the module docstring)."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.patch_embedding = nnx.Linear(config.num_channels * p * p, d, use_bias=False, rngs=rngs,
                                          param_dtype=param_dtype)
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,), param_dtype))
        self.position_embedding = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (config.num_positions, d), param_dtype))
        self.pre_norm = LayerNorm(d, config.layer_norm_eps, param_dtype=param_dtype)
        self.layers = _layers(config, causal=False, rngs=rngs, param_dtype=param_dtype)
        self.post_norm = LayerNorm(d, config.layer_norm_eps, param_dtype=param_dtype)
        self.visual_projection = (
            nnx.Linear(d, config.projection_dim, use_bias=False, rngs=rngs, param_dtype=param_dtype)
            if config.with_projection else None)

    def __call__(self, pixel_values: Array, *, output_hidden_states: bool = False) -> CLIPVisionOutput:
        """Encode preprocessed images ``(B, num_channels, image_size, image_size)``.

        Returns :class:`CLIPVisionOutput` ``(hidden, pooled, image_embeds)``: ``hidden`` is
        ``hidden_states[-2]`` (the penultimate layer's output, Wan2.1's image embeddings) or, with
        ``output_hidden_states=True``, the tuple of all ``num_hidden_layers + 1`` hidden states.
        The pixels are cast to the weights' dtype first, as transformers does.  Raises
        ``ValueError`` for a non-floating array or a shape other than that.
        """
        pixel_values = jnp.asarray(pixel_values)
        cfg = self.config
        if pixel_values.ndim != 4 or not jnp.issubdtype(pixel_values.dtype, jnp.floating):
            raise ValueError("pixel_values must be a floating array (batch, channels, height, width), "
                             f"got {pixel_values.dtype} {pixel_values.shape}")
        if pixel_values.shape[1:] != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"pixel_values of shape {pixel_values.shape} do not match the model's {cfg.num_channels} channels "
                f"of {cfg.image_size}x{cfg.image_size} (image_size); resize and crop images to it first"
            )
        kernel = self.patch_embedding.kernel[...]
        patches = self.patch_embedding(patchify(pixel_values.astype(kernel.dtype), cfg.patch_size))
        class_token = jnp.broadcast_to(self.class_embedding[...], (patches.shape[0], 1, patches.shape[-1]))
        x = self.pre_norm(jnp.concatenate([class_token, patches], axis=1) + self.position_embedding[...])
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x)
            hidden_states.append(x)
        pooled = self.post_norm(x[:, 0])
        image_embeds = None if self.visual_projection is None else self.visual_projection(pooled)
        hidden = tuple(hidden_states) if output_hidden_states else hidden_states[-2]
        return CLIPVisionOutput(hidden, pooled, image_embeds)


# ----------------------------------------------------------------------------- weights


def _layer_rows(prefix: str) -> tuple[tuple[str, str, str], ...]:
    """The rows of the encoder layers stored under ``prefix`` (``….encoder.layers.{i}``)."""
    return (
        *linear_rows(f"{prefix}.self_attn.{{x}}_proj", "layers.{i}.attn.{x}"),
        *norm_rows(f"{prefix}.layer_norm{{n}}", "layers.{i}.norm{n}"),
        *linear_rows(f"{prefix}.mlp.fc{{n}}", "layers.{i}.mlp.fc{n}"),
    )


def _weight_map(rows: tuple[tuple[str, str, str], ...], prefix: str, transforms: Mapping[str, Transform]) -> WeightMap:
    """``rows`` plus each row under ``prefix`` again without it (transformers 5 saves a
    ``CLIPTextModel`` / ``CLIPVisionModel`` bare, older versions under ``text_model.`` / ``vision_model.``)."""
    bare = tuple((key.removeprefix(prefix), ours, transform) for key, ours, transform in rows if key.startswith(prefix))
    return WeightMap(rows + bare, {"i": r"\d+", "x": "q|k|v|out", "n": "[12]"}, transforms)


CLIP_WEIGHT_MAP: tuple[tuple[str, str, str], ...] = (
    # (transformers key, our state path, transform)
    ("text_model.embeddings.token_embedding.weight", "token_embedding.embedding", "identity"),
    ("text_model.embeddings.position_embedding.weight", "position_embedding.embedding", "identity"),
    *_layer_rows("text_model.encoder.layers.{i}"),
    *norm_rows("text_model.final_layer_norm", "final_norm"),
    ("text_projection.weight", "text_projection.kernel", "linear"),
)
"""The CLIP text weight mapping: ``{i}`` a layer, ``{x}`` ``q``/``k``/``v``/``out``, ``{n}``
``1``/``2``; transforms ``identity`` and ``linear`` (transpose).  transformers 5 saves a
``CLIPTextModel`` without the ``text_model.`` prefix, so each such key is also accepted bare."""

CLIP_VISION_WEIGHT_MAP: tuple[tuple[str, str, str], ...] = (
    # (transformers key, our state path, transform)
    ("vision_model.embeddings.patch_embedding.weight", "patch_embedding.kernel", "patch"),
    ("vision_model.embeddings.class_embedding", "class_embedding", "identity"),
    ("vision_model.embeddings.position_embedding.weight", "position_embedding", "identity"),
    *norm_rows("vision_model.pre_layrnorm", "pre_norm"),
    *_layer_rows("vision_model.encoder.layers.{i}"),
    *norm_rows("vision_model.post_layernorm", "post_norm"),
    ("visual_projection.weight", "visual_projection.kernel", "linear"),
)
"""The CLIP vision weight mapping (placeholders as in :data:`CLIP_WEIGHT_MAP`); transform
``patch``: the conv weight ``(D, C, p, p)`` flattened to ``(D, C·p·p)`` and transposed.
transformers 5 saves a ``CLIPVisionModel`` without the ``vision_model.`` prefix (a
``CLIPVisionModelWithProjection`` with it), so each such key is also accepted bare."""

PATCH = Transform(
    lambda a: a.reshape(a.shape[0], -1).T,
    lambda shape, cfg: (shape[1], cfg.num_channels, cfg.patch_size, cfg.patch_size),
)
"""torch ``Conv2d.weight`` ``(D, C, p, p)`` of the patch embedding -> our ``kernel`` ``(C·p·p, D)``."""

_CLIP_WEIGHT_MAP = _weight_map(CLIP_WEIGHT_MAP, "text_model.", {"identity": IDENTITY, "linear": LINEAR})
_CLIP_VISION_WEIGHT_MAP = _weight_map(CLIP_VISION_WEIGHT_MAP, "vision_model.",
                                      {"identity": IDENTITY, "linear": LINEAR, "patch": PATCH})
_REPEATS = {"i": ("num_hidden_layers", lambda config: config.num_hidden_layers)}


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
        folder_kind=TRANSFORMERS, sharding=sharding, repeats=_REPEATS,
    )


def _listed_vision_architecture(folder: str | os.PathLike) -> str:
    """``"CLIPVisionModelWithProjection"`` when the folder's ``config.json`` lists it, else
    ``"CLIPVisionModel"`` (an unreadable or wrong ``config.json`` is then reported by the loader)."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as file:
            architectures = json.load(file).get("architectures")
    except (OSError, ValueError, AttributeError):
        architectures = None
    return CLIP_VISION_ARCHITECTURES[isinstance(architectures, list) and CLIP_VISION_ARCHITECTURES[1] in architectures]


def load_clip_vision_encoder(
    folder: str | os.PathLike, *, dtype=None, variant: str | None = None, sharding: ParamSharding | None = None,
) -> CLIPVisionEncoder:
    """Load a transformers ``CLIPVisionModel`` folder (Wan2.1's ``image_encoder/``) or a
    ``CLIPVisionModelWithProjection`` folder — whichever its ``config.json``'s ``architectures``
    names — into an NNX :class:`CLIPVisionEncoder` (with ``visual_projection`` for the latter).

    Keys are accepted with the ``vision_model.`` prefix or, as transformers 5 writes a
    ``CLIPVisionModel``, without it.  Files, checks, ``dtype``, ``variant`` and ``sharding`` as
    for :func:`load_clip_text_encoder`.
    """
    return load_module(
        folder, CLIPVisionEncoder, CLIPVisionConfig, _CLIP_VISION_WEIGHT_MAP,
        class_name=_listed_vision_architecture(folder), what="CLIP image_encoder/", dtype=dtype, variant=variant,
        folder_kind=TRANSFORMERS, sharding=sharding, repeats=_REPEATS,
    )
