"""The T5 and UMT5 text encoders in Flax NNX, faithful to ``transformers.T5EncoderModel`` and
``transformers.UMT5EncoderModel``.

Stable Diffusion 3 / 3.5's ``text_encoder_3/`` and Flux's ``text_encoder_2/`` are the encoder of
T5 v1.1 XXL (``feed_forward_proj="gated-gelu"``); Wan2.1's ``text_encoder/`` is the encoder of
UMT5 XXL.  The prompt embeddings are the last hidden state.

Public API
----------
* :class:`T5Config` and its subclass :class:`UMT5Config` (``from_transformers_config(dict)``);
* :class:`T5Encoder` (built from either config): ``encoder(input_ids, attention_mask=None) ->
  (B, T, d_model)`` (transformers' ``last_hidden_state``); :func:`relative_position_buckets`
  ``(length, num_buckets, max_distance)``; :func:`masked_bias` ``(position_bias, keep)``;
* :data:`T5_WEIGHT_MAP` and :func:`load_t5_encoder` ``(folder, *, dtype=None, variant=None,
  sharding=None)`` for a transformers ``T5EncoderModel`` or ``UMT5EncoderModel`` folder (the
  class is read from its ``config.json``).

Architecture (``H = num_heads``, ``d_kv`` per head; every norm is T5's RMS norm — no mean, no
bias, learned scale, ``layer_norm_epsilon``, statistics in float32)
-----------------------------------------------------------------------------------------
* token embedding (no position embedding, no scaling);
* ``num_layers`` pre-norm blocks: ``x + o(attn(RMS(x)))`` with bias-free q/k/v/o maps and
  **unscaled** scores ``q·k`` plus a relative position bias (and the padding mask, below); then
  ``x + ff(RMS(x))`` with ``ff = wo(act(wi_0 x) · wi_1 x)`` for ``gated-*`` (``gated-gelu`` uses
  the tanh GELU, transformers' ``gelu_new``) or ``wo(act(wi x))`` otherwise (``relu`` for T5 v1.0);
* the relative position bias of a layer is a table ``(relative_attention_num_buckets, H)`` looked
  up, for query ``i`` and key ``j``, at the bucket of ``j − i`` (bidirectional: half the buckets
  per sign; within a half, distances below a quarter of the buckets are exact, larger ones share
  logarithmically wider buckets up to ``relative_attention_max_distance``, beyond which the last
  bucket is used).  **T5**: one table, held by the first block and shared by all.  **UMT5**: every
  block holds its own table (the one difference between the two encoders);
* a final RMS norm.

T5 or UMT5
----------
UMT5 is a distinct architecture, as in transformers (``UMT5Config`` / ``UMT5EncoderModel``), not a
flag: :class:`UMT5Config` subclasses :class:`T5Config` with UMT5's defaults for missing keys
(``vocab_size=250112``, ``d_ff=1024``, ``num_layers=8``, ``num_heads=6``, ``gated-gelu`` —
transformers' ``UMT5Config``), and the loader picks it when ``config.json``'s ``architectures``
names ``"UMT5EncoderModel"``.  A flag would be a key that no ``config.json`` carries, and would
leave T5's defaults for a UMT5 config's missing keys.  The module is one :class:`T5Encoder`
whose blocks own a bias table where transformers' do (block 0 for T5, every block for UMT5);
a block without one uses the last table above it.

Attention mask
--------------
``attention_mask`` ``(B, T)`` (nonzero: a real token, 0: padding) masks keys as transformers'
default ``sdpa`` attention does: the bias of a padded key is replaced by the dtype's most
negative finite number, ``finfo(dtype).min`` (:func:`masked_bias`), not ``-inf``.  (``eager``
attention adds ``finfo.min`` to the scores plus position bias instead; that sum rounds to
``finfo.min`` itself for any score of magnitude below half its spacing there, ~1e31 in
float32.)  A padded key then gets the weight ``exp(min − max) = 0`` exactly in every row with
a real key, so the outputs at the real positions equal those of the sequence without its
padding (up to float rounding).  The padded query positions still attend to the real keys
(only keys are masked): their outputs are finite numbers, equal to transformers', and
meaningless — Wan's pipeline trims them away.  A row with no real token at all gets equal
scores everywhere, hence the average of all values (finite, as in transformers; ``-inf`` would
give ``nan``).

SD3 / Flux use: ``encoder(input_ids)`` with no attention mask (padding tokens are attended to,
as in those pipelines).  Wan use: ``encoder(input_ids, attention_mask)`` at 512 tokens (the
pipeline then trims each prompt to its real length and zero-pads back).

Precision: a ``dtype`` cast applies to every weight.  transformers keeps ``wo`` in float32
(``_keep_in_fp32_modules``) only for float16 weights; in bfloat16, the pipelines' dtype, it
casts ``wo`` too, as here.

Not supported: the decoder, ``T5ForConditionalGeneration`` / ``UMT5Model`` folders and the
float16 overflow clamping transformers applies to float16 activations (run in bfloat16 or
float32).  A checkpoint may store the embedding as ``shared.weight``,
``encoder.embed_tokens.weight`` or both (tied copies; the last one read is kept).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cfgzero_theory.ports.loading import (
    IDENTITY, LINEAR, TRANSFORMERS, TRANSFORMERS_METADATA_KEYS, WeightMap, config_kwargs, load_module,
)
from cfgzero_theory.ports.sharding import ParamSharding
from cfgzero_theory.ports.attention import attention
from cfgzero_theory.ports.layers import ACTIVATIONS, Norm
from cfgzero_theory.validation import check_choice, check_int, check_real

Array = jax.Array

__all__ = ["T5Config", "T5Encoder", "T5_ARCHITECTURE", "T5_WEIGHT_MAP", "UMT5Config", "UMT5_ARCHITECTURE",
           "load_t5_encoder", "masked_bias", "relative_position_buckets"]

T5_ARCHITECTURE = "T5EncoderModel"
UMT5_ARCHITECTURE = "UMT5EncoderModel"
FEED_FORWARD = ("relu", "gated-relu", "gelu", "gated-gelu")

IGNORED_CONFIG_KEYS = TRANSFORMERS_METADATA_KEYS | {
    # training, generation and decoder settings, special ids; dense_act_fn / is_gated_act are
    # derived from feed_forward_proj (transformers recomputes them from it, so do we)
    "dropout_rate", "classifier_dropout", "initializer_factor", "is_encoder_decoder", "is_decoder", "use_cache",
    "output_past", "pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id", "num_decoder_layers",
    "tie_word_embeddings", "scale_decoder_outputs", "dense_act_fn", "is_gated_act", "n_positions", "task_specific_params",
    # google/umt5-* and Wan's text_encoder/ carry these; transformers never reads scalable_attention
    "tokenizer_class", "scalable_attention",
}
"""Keys of a ``T5Config`` / ``UMT5Config`` that do not change the encoder's inference."""


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The encoder keys of a transformers ``T5Config`` (same defaults).

    ``architecture`` and ``position_bias_per_layer`` are fixed by the class (:class:`UMT5Config`
    for UMT5).  Construction raises ``ValueError`` naming a bad value.
    """

    architecture: ClassVar[str] = T5_ARCHITECTURE
    position_bias_per_layer: ClassVar[bool] = False

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_max_distance"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        object.__setattr__(self, "relative_attention_num_buckets", check_int(
            "relative_attention_num_buckets", self.relative_attention_num_buckets, minimum=4))
        check_choice("feed_forward_proj", self.feed_forward_proj, FEED_FORWARD)
        object.__setattr__(self, "layer_norm_epsilon",
                           check_real("layer_norm_epsilon", self.layer_norm_epsilon, positive=True))

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """transformers' ``dense_act_fn``: ``gated-gelu`` means the tanh GELU (``gelu_new``)."""
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_transformers_config(cls, config: Mapping) -> T5Config:
        """Build from a transformers ``config.json`` dict of a ``T5EncoderModel`` (of a
        ``UMT5EncoderModel`` for :class:`UMT5Config`).

        Metadata, training-only and decoder keys (:data:`IGNORED_CONFIG_KEYS`, keys starting
        with ``_``) are dropped; ``architectures``, when present, must contain
        ``cls.architecture``.  Any other unknown key raises ``ValueError`` naming it; missing
        keys take transformers' defaults for the class.
        """
        return cls(**config_kwargs(cls, config, cls.architecture, ignore=IGNORED_CONFIG_KEYS))


@dataclasses.dataclass(frozen=True)
class UMT5Config(T5Config):
    """The encoder keys of a transformers ``UMT5Config`` (same defaults): a T5 v1.1 encoder
    whose every block has its own relative position bias table."""

    architecture: ClassVar[str] = UMT5_ARCHITECTURE
    position_bias_per_layer: ClassVar[bool] = True

    vocab_size: int = 250112
    d_ff: int = 1024
    num_layers: int = 8
    num_heads: int = 6
    feed_forward_proj: str = "gated-gelu"


_CONFIGS: dict[str, type[T5Config]] = {T5_ARCHITECTURE: T5Config, UMT5_ARCHITECTURE: UMT5Config}  # by architecture


# ----------------------------------------------------------------------------- layers


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """The ``(length, length)`` bucket of ``key − query`` for T5's bidirectional encoder.

    Float32 arithmetic in transformers' order, so that the truncation to an integer lands on
    the same side at the logarithmic buckets' boundaries.
    """
    relative = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    buckets = np.where(relative > 0, half, 0)
    distance = np.abs(relative)
    max_exact = half // 2
    scaled = np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact)  # distance 0 is exact anyway
    ratio = np.log(scaled) / np.float32(math.log(max_distance / max_exact))
    large = max_exact + (ratio * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return buckets + np.where(distance < max_exact, distance, large)


def masked_bias(position_bias: Array, keep: Array | None) -> Array:
    """The attention bias: ``position_bias`` ``(1, H, T, S)`` where ``keep`` ``(B, S)`` is true,
    ``finfo(dtype).min`` at the other keys — ``(B, H, T, S)`` (``position_bias`` itself when
    ``keep`` is ``None``).  transformers' ``sdpa`` rule (module docstring)."""
    if keep is None:
        return position_bias
    return jnp.where(keep[:, None, None, :], position_bias, jnp.finfo(position_bias.dtype).min)


class Attention(nnx.Module):
    """Bias-free multi-head self-attention with unscaled scores and an additive bias; the owner
    of a relative position bias table when ``has_position_bias``."""

    def __init__(self, config: T5Config, *, has_position_bias: bool, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.heads = config.num_heads
        inner = config.num_heads * config.d_kv
        lin = lambda a, b: nnx.Linear(a, b, use_bias=False, rngs=rngs, param_dtype=param_dtype)  # noqa: E731
        self.q, self.k, self.v = lin(config.d_model, inner), lin(config.d_model, inner), lin(config.d_model, inner)
        self.o = lin(inner, config.d_model)
        self.relative_attention_bias = nnx.Embed(
            config.relative_attention_num_buckets, config.num_heads, rngs=rngs, param_dtype=param_dtype,
        ) if has_position_bias else None

    def position_bias(self, buckets: Array) -> Array:
        """This layer's table at the ``(T, S)`` buckets, as ``(1, H, T, S)``."""
        return jnp.transpose(self.relative_attention_bias(buckets), (2, 0, 1))[None]

    def __call__(self, x: Array, bias: Array) -> Array:
        split = lambda y: y.reshape(*y.shape[:2], self.heads, -1)  # noqa: E731
        out = attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), bias=bias, scale=1.0)
        return self.o(out.reshape(*out.shape[:2], -1))


class FeedForward(nnx.Module):
    """``wo(act(wi_0 x) · wi_1 x)`` (gated) or ``wo(act(wi x))``, bias-free."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.act = config.activation
        lin = lambda a, b: nnx.Linear(a, b, use_bias=False, rngs=rngs, param_dtype=param_dtype)  # noqa: E731
        if config.gated:
            self.wi_0, self.wi_1, self.wi = lin(config.d_model, config.d_ff), lin(config.d_model, config.d_ff), None
        else:
            self.wi_0, self.wi_1, self.wi = None, None, lin(config.d_model, config.d_ff)
        self.wo = lin(config.d_ff, config.d_model)

    def __call__(self, x: Array) -> Array:
        act = ACTIVATIONS[self.act]
        h = act(self.wi(x)) if self.wi is not None else act(self.wi_0(x)) * self.wi_1(x)
        return self.wo(h)


class Block(nnx.Module):
    """``x + attn(RMS(x))``, then ``x + ff(RMS(x))``."""

    def __init__(self, config: T5Config, *, has_position_bias: bool, rngs: nnx.Rngs, param_dtype=jnp.float32):
        eps = config.layer_norm_epsilon
        self.attn_norm = Norm(config.d_model, "rms_norm", param_dtype=param_dtype, eps=eps)
        self.attn = Attention(config, has_position_bias=has_position_bias, rngs=rngs, param_dtype=param_dtype)
        self.ff_norm = Norm(config.d_model, "rms_norm", param_dtype=param_dtype, eps=eps)
        self.ff = FeedForward(config, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: Array, bias: Array) -> Array:
        x = x + self.attn(self.attn_norm(x), bias)
        return x + self.ff(self.ff_norm(x))


class T5Encoder(nnx.Module):
    """``transformers.T5EncoderModel`` (from a :class:`T5Config`) or ``UMT5EncoderModel`` (from a
    :class:`UMT5Config`); see the module docstring."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.config = config
        self.embed_tokens = nnx.Embed(config.vocab_size, config.d_model, rngs=rngs, param_dtype=param_dtype)
        self.layers = nnx.List([  # a bias table in every block for UMT5, in the first for T5
            Block(config, has_position_bias=config.position_bias_per_layer or i == 0, rngs=rngs,
                  param_dtype=param_dtype)
            for i in range(config.num_layers)
        ])
        self.final_norm = Norm(config.d_model, "rms_norm", param_dtype=param_dtype, eps=config.layer_norm_epsilon)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """Encode token ids ``(B, T)`` into the last hidden state ``(B, T, d_model)``.

        ``attention_mask`` ``(B, T)``: nonzero at real tokens, 0 at padding (whose keys are
        masked as the module docstring says); ``None`` attends to every token.  Raises
        ``ValueError`` for a bad shape or dtype.
        """
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be an integer array (batch, tokens), got {input_ids.dtype} {input_ids.shape}")
        keep = None
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must have the shape of input_ids {input_ids.shape}, "
                                 f"got {attention_mask.shape}")
            keep = attention_mask != 0
        cfg = self.config
        buckets = jnp.asarray(relative_position_buckets(
            input_ids.shape[1], cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance))
        x = self.embed_tokens(input_ids)
        bias = None
        for layer in self.layers:
            if layer.attn.relative_attention_bias is not None:  # else: the table of a block above
                bias = masked_bias(layer.attn.position_bias(buckets).astype(x.dtype), keep)
            x = layer(x, bias)
        return self.final_norm(x)


# ----------------------------------------------------------------------------- weights


_B = "encoder.block.{i}.layer"
T5_WEIGHT_MAP: tuple[tuple[str, str, str], ...] = (
    # (transformers key, our state path, transform)
    ("shared.weight", "embed_tokens.embedding", "identity"),
    ("encoder.embed_tokens.weight", "embed_tokens.embedding", "identity"),  # a tied copy, when stored
    (f"{_B}.0.SelfAttention.relative_attention_bias.weight", "layers.{i}.attn.relative_attention_bias.embedding",
     "identity"),
    (f"{_B}.0.SelfAttention.{{x}}.weight", "layers.{i}.attn.{x}.kernel", "linear"),
    (f"{_B}.0.layer_norm.weight", "layers.{i}.attn_norm.scale", "identity"),
    (f"{_B}.1.DenseReluDense.{{w}}.weight", "layers.{i}.ff.{w}.kernel", "linear"),
    (f"{_B}.1.layer_norm.weight", "layers.{i}.ff_norm.scale", "identity"),
    ("encoder.final_layer_norm.weight", "final_norm.scale", "identity"),
)
"""The T5 and UMT5 encoder weight mapping: ``{i}`` a block, ``{x}`` ``q``/``k``/``v``/``o``,
``{w}`` ``wi_0``/``wi_1``/``wi``/``wo``; transforms ``identity`` and ``linear`` (transpose).  A
block's ``relative_attention_bias`` maps to its layer's table: only block 0 has one in a T5
model (another block's is an unexpected key), every block in a UMT5 model."""

_T5_WEIGHT_MAP = WeightMap(
    T5_WEIGHT_MAP, {"i": r"\d+", "x": "[qkvo]", "w": "wi_0|wi_1|wi|wo"}, {"identity": IDENTITY, "linear": LINEAR},
)


def _config_class(folder: str) -> type[T5Config]:
    """The config class for the architecture that ``folder/config.json``'s ``architectures``
    names.  Raises ``ValueError`` when it names neither; a missing or unreadable
    ``config.json`` gives :class:`T5Config`, whose loading then reports it."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as file:
            architectures = json.load(file).get("architectures")
    except (OSError, ValueError, AttributeError):
        return T5Config
    found = [_CONFIGS[name] for name in _CONFIGS if isinstance(architectures, list) and name in architectures]
    if len(found) != 1:
        expected = " or ".join(f"[{name!r}]" for name in _CONFIGS)
        raise ValueError(f"{path}: architectures is {architectures!r}, expected {expected}")
    return found[0]


def load_t5_encoder(
    folder: str | os.PathLike, *, dtype=None, variant: str | None = None, sharding: ParamSharding | None = None,
) -> T5Encoder:
    """Load a transformers ``T5EncoderModel`` folder (SD3's ``text_encoder_3/``, Flux's
    ``text_encoder_2/``) or ``UMT5EncoderModel`` folder (Wan's ``text_encoder/``) into an NNX
    :class:`T5Encoder`.

    The folder holds ``config.json`` (``architectures`` containing ``"T5EncoderModel"`` or
    ``"UMT5EncoderModel"``, which selects :class:`T5Config` or :class:`UMT5Config`; any other is
    a ``ValueError``) and ``model.safetensors`` or a sharded ``model.safetensors.index.json``
    (``variant="fp16"`` reads ``model.fp16.safetensors``).  Same checks as the other loaders
    (all are :func:`cfgzero_theory.ports.loading.load_module`): a ``num_layers`` that differs
    from the blocks in the file, missing, unexpected or wrongly shaped keys (e.g. a UMT5 file
    read as T5: the biases of blocks 1 … are unexpected) reported in one ``ValueError`` before
    any tensor data is read; tensors are then read, transformed, cast (``dtype``; ``None`` keeps
    the stored dtype) and placed one at a time — on the default device, or split over a device
    mesh as ``sharding`` (a :class:`~cfgzero_theory.ports.sharding.ParamSharding`) says.
    """
    config_class = _config_class(os.fspath(folder))
    return load_module(
        folder, T5Encoder, config_class, _T5_WEIGHT_MAP,
        class_name=config_class.architecture, what="T5 or UMT5 text encoder", dtype=dtype, variant=variant,
        folder_kind=TRANSFORMERS, sharding=sharding,
        repeats={"i": ("num_layers", lambda config: config.num_layers)},
    )
