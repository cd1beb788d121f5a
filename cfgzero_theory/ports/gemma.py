"""The Gemma (v1) text encoder in Flax NNX, faithful to ``transformers.GemmaModel``.

Lumina-Next's ``text_encoder/`` is Gemma-2B (a ``GemmaModel``, what ``AutoModel`` makes of
``google/gemma-2b``: 18 layers, width 2048, 8 query heads sharing **one** key/value head,
``head_dim`` 256, vocabulary 256 000).  diffusers' ``LuminaPipeline._get_gemma_prompt_embeds``
calls it with the tokenizer's attention mask and ``output_hidden_states=True`` and keeps
``hidden_states[-2]``: the raw output of the penultimate decoder layer, without the final norm.

Public API
----------
* :class:`GemmaConfig` (``from_transformers_config(dict)``);
* :class:`GemmaEncoder`: ``encoder(input_ids, attention_mask=None, *, hidden_layer=-2) -> (B, T,
  hidden_size)``, transformers' ``hidden_states[hidden_layer]``; :func:`rotate_half_rope`
  ``(x, cos, sin)``;
* :data:`GEMMA_WEIGHT_MAP` and :func:`load_gemma_encoder` ``(folder, *, dtype=None, variant=None,
  sharding=None)`` for a transformers ``GemmaModel`` or ``GemmaForCausalLM`` folder.

Architecture (``D = hidden_size``, ``H`` query heads, ``H_kv = num_key_value_heads`` key/value
heads, ``d = head_dim`` — Gemma's ``d`` need not be ``D / H``)
-------------------------------------------------------------------------------------------
* token embedding times ``√D``; the factor is ``D ** 0.5`` rounded to float32 and then to the
  weights' dtype, as transformers does (``√2048`` is 45.2548… in float32, 45.25 in bfloat16);
* ``num_hidden_layers`` pre-norm decoder layers: ``x + o(attn(N₁(x)))``, then
  ``x + down(gelu_tanh(gate(N₂(x))) · up(N₂(x)))`` (GeGLU; ``hidden_act`` — the tanh GELU
  ``gelu_pytorch_tanh``, which transformers ≥ 5 also substitutes for a legacy ``"gelu"``);
* attention: ``q`` / ``k`` / ``v`` / ``o`` linear maps (bias only with ``attention_bias``), RoPE on
  ``q`` and ``k`` in the rotate-half form (the two halves of a head, not interleaved pairs:
  ``x·cos + [−x₂, x₁]·sin``) at positions ``0 … T−1`` with frequencies ``rope_theta^(−2j/d)``,
  scale ``d^−1/2``, causal, grouped-query when ``H_kv < H`` (key/value head ``j`` serves query
  heads ``j·H/H_kv …``), via :func:`cfgzero_theory.ports.attention.attention`;
* Gemma's RMS norm, everywhere: ``x / √(mean(x²) + eps) · (1 + w)`` with the stored ``w`` (zero
  at initialisation), computed in float32 **and then** cast to the input's dtype (Llama's norm
  casts before multiplying; Gemma's after);
* a final norm, applied only to the last hidden state.

Hidden states
-------------
As transformers' ``output_hidden_states`` tuple (``num_hidden_layers + 1`` entries): index 0 is
the scaled embedding, index ``k`` (``1 ≤ k < num_hidden_layers``) the raw output of layer
``k − 1``, the last index (``-1``) the final norm of the last layer's output — the raw output
of the last layer is in no entry.  ``hidden_layer`` takes any index of that tuple, negative ones
counted from its end, and only the layers it needs are computed: Lumina's ``-2`` skips the last
layer and the final norm.

Attention mask and padded positions
-----------------------------------
``attention_mask`` ``(B, T)`` (nonzero: a real token, 0: padding, on either side) masks keys on
top of the causal mask: a query at ``t`` attends to the real keys at positions ``≤ t``.  RoPE
positions stay ``0 … T−1`` whatever the padding (transformers passes no ``position_ids`` either).
Masked keys get the bias ``finfo(dtype).min`` and hence the weight 0 exactly.  A query that sees
**no** real key at all — every query of a row without real tokens, or the leading padding of a
left-padded row — gets an attention output of **zero**, exactly what transformers' default
``sdpa`` attention gives (PyTorch's SDPA returns 0 for a fully masked row; checked with
transformers 5.25 and torch 2.13; older versions handled such rows otherwise), so
its hidden state is the residual plus the feed-forward branch: finite, meaningless, and equal to
transformers'.  transformers' ``eager`` attention differs at those queries only (its
``finfo.min`` mask makes every score equal there: the plain average of all values, future
positions included); every query with at least one real key matches both.  Gemma's tokenizer
always writes ``<bos>`` first, so with right padding (:func:`cfgzero_theory.ports.tiny.gemma_tokenizer`'s;
transformers' ``GemmaTokenizer`` class defaults to left, a ``tokenizer_config.json`` may say
either) no query of a tokenizer's batch is without a real key; with left padding the leading
pads are, and take the zero above.

Lumina use: ``encoder(input_ids, attention_mask)`` (``hidden_layer=-2``) on the tokenizer's ids
and mask (``padding=True, pad_to_multiple_of=8, max_length=256, truncation=True``).

Precision: everything runs in the weights' dtype (bf16 weights give a bf16 residual stream, as
in transformers: Gemma keeps no module in float32); the norms and the attention softmax compute
in float32.  The RoPE tables are :func:`cfgzero_theory.ports.layers.rope_tables` (float64 angles)
rounded to the activations' dtype, as transformers rounds its tables to them.  transformers forms
its angles in float32 (``position · inv_freq``, ``inv_freq`` from torch's float32 ``pow``, whose
last-bit rounding NumPy does not reproduce), so its tables differ from the exact ones by up to
1.5e-5 at 256 tokens (5e-4 at 8192); a float32 NumPy copy of its recipe is no closer (3e-5).
Measured effect with ``head_dim`` 64 at 256 tokens: 2.4e-4 absolute on hidden states of scale 36
(7e-6 relative; 4e-5 with transformers' own tables) — well inside the 1e-4 relative tolerance.

Not supported: ``rope_type`` other than ``"default"`` (``rope_parameters`` / ``rope_scaling``),
``partial_rotary_factor``, ``use_bidirectional_attention=True``, ``position_ids``, a KV cache,
the language-model head (a ``GemmaForCausalLM`` folder's untied ``lm_head.weight``, if stored, is
an unexpected key), Gemma 2 / 3 (``Gemma2Model`` …: soft-capping, sliding windows,
``query_pre_attn_scalar``), and a legacy ``hidden_activation`` that disagrees with
``hidden_act`` (transformers 4.4x used the former, transformers ≥ 5 uses the latter).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cfgzero_theory.ports.attention import attention
from cfgzero_theory.ports.layers import ACTIVATIONS, rope_tables
from cfgzero_theory.ports.loading import (
    IDENTITY, LINEAR, TRANSFORMERS, TRANSFORMERS_METADATA_KEYS, WeightMap, config_kwargs, linear_rows, load_module,
)
from cfgzero_theory.ports.sharding import ParamSharding
from cfgzero_theory.validation import check_choice, check_int, check_real

Array = jax.Array

__all__ = ["GEMMA_ARCHITECTURE", "GEMMA_ARCHITECTURES", "GEMMA_WEIGHT_MAP", "GemmaConfig", "GemmaEncoder",
           "load_gemma_encoder", "rotate_half_rope"]

GEMMA_ARCHITECTURE = "GemmaModel"
GEMMA_ARCHITECTURES = (GEMMA_ARCHITECTURE, "GemmaForCausalLM")
"""The transformers classes we load: the bare model (Lumina-Next's ``text_encoder/``) and the
language model around it (its ``model.`` weights; the head is not used)."""
LEGACY_GELU = "gelu"
"""A ``hidden_act`` that Gemma's configs carry and transformers ≥ 5 reads as the tanh GELU."""

IGNORED_CONFIG_KEYS = TRANSFORMERS_METADATA_KEYS | {
    # training, generation and special-token settings; RoPE and activation keys are read apart
    "initializer_range", "use_cache", "pad_token_id", "eos_token_id", "bos_token_id", "tie_word_embeddings",
    "attention_dropout", "max_position_embeddings", "output_hidden_states", "output_attentions", "return_dict",
    "rope_parameters", "rope_scaling", "hidden_activation", "use_bidirectional_attention",
}
"""Keys of a ``GemmaConfig`` that do not change the encoder's inference (or are read apart:
``rope_parameters`` / ``rope_scaling`` give ``rope_theta``, ``hidden_activation`` is checked
against ``hidden_act``, ``use_bidirectional_attention`` must be unset)."""


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """The inference keys of a transformers ``GemmaConfig`` (same defaults, Gemma-7B's).

    ``hidden_act="gelu"`` is read as ``"gelu_pytorch_tanh"``, as transformers ≥ 5 does.
    Construction raises ``ValueError`` naming a bad value.
    """

    vocab_size: int = 256000
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 256
    hidden_act: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.hidden_act == LEGACY_GELU:
            object.__setattr__(self, "hidden_act", "gelu_pytorch_tanh")
        check_choice("hidden_act", self.hidden_act, sorted(ACTIVATIONS))
        object.__setattr__(self, "rms_norm_eps", check_real("rms_norm_eps", self.rms_norm_eps, positive=True))
        object.__setattr__(self, "rope_theta", check_real("rope_theta", self.rope_theta, positive=True))
        if not isinstance(self.attention_bias, bool):
            raise ValueError(f"attention_bias must be a bool, got {self.attention_bias!r}")

    @classmethod
    def from_transformers_config(cls, config: Mapping) -> GemmaConfig:
        """Build from a transformers ``config.json`` dict of a ``GemmaModel`` (or, when
        ``architectures`` names ``"GemmaForCausalLM"``, of that class).

        Metadata and training-only keys (:data:`IGNORED_CONFIG_KEYS`, keys starting with ``_``)
        are dropped; ``architectures``, when present, must contain one of
        :data:`GEMMA_ARCHITECTURES`.  ``rope_theta`` is read as transformers 5 does: from
        ``rope_scaling`` (legacy) or ``rope_parameters`` when they hold it, else the top-level
        ``rope_theta``, else 10000; their ``rope_type`` must be ``"default"``.  Raises
        ``ValueError`` naming any other unknown key, an unsupported RoPE variant,
        ``use_bidirectional_attention=True`` or a ``hidden_activation`` that disagrees with
        ``hidden_act``.  Missing keys take transformers' defaults.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"config must be a mapping (a parsed config.json), got {type(config).__name__}")
        architectures = config.get("architectures")
        causal_lm = isinstance(architectures, list) and GEMMA_ARCHITECTURES[1] in architectures
        kwargs = config_kwargs(cls, config, GEMMA_ARCHITECTURES[causal_lm], ignore=IGNORED_CONFIG_KEYS)
        if config.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=True (Gemma without its causal mask) is not supported")
        kwargs["rope_theta"] = _rope_theta(config)
        made = cls(**kwargs)
        legacy = config.get("hidden_activation")
        if legacy is not None and legacy != made.hidden_act:
            raise ValueError(
                f"hidden_activation {legacy!r} disagrees with hidden_act {config.get('hidden_act')!r} (read as "
                f"{made.hidden_act!r}): transformers 4.4x used the former, transformers >= 5 the latter")
        return made


def _rope_theta(config: Mapping) -> float:
    """``rope_theta`` from a Gemma ``config.json`` dict (see :meth:`GemmaConfig.from_transformers_config`)."""
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"rope_parameters must be a mapping, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported (only 'default' RoPE)")
    unknown = sorted(set(params) - {"rope_type", "type", "rope_theta"})
    if unknown:
        raise ValueError(f"unsupported rope_parameters key(s) {unknown}")
    return params.get("rope_theta", config.get("rope_theta", GemmaConfig.rope_theta))


# ----------------------------------------------------------------------------- layers


class RMSNorm(nnx.Module):
    """Gemma's RMS norm ``x / √(mean(x²) + eps) · (1 + weight)`` in float32, cast to ``x``'s dtype."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
        return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)


def rotate_half_rope(x: Array, cos: Array, sin: Array) -> Array:
    """RoPE in the rotate-half form on ``x`` ``(B, T, H, d)`` with ``cos`` / ``sin`` ``(T, d)``
    (each angle written twice, ``[θ, θ]``): ``x·cos + [−x₂, x₁]·sin`` with ``x₁, x₂`` the two
    halves of a head, in ``x``'s dtype (transformers' ``apply_rotary_pos_emb``)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def _rope(length: int, config: GemmaConfig, dtype) -> tuple[Array, Array]:
    """The ``(T, head_dim)`` cos and sin tables at positions ``0 … T−1``, in ``dtype``."""
    cos, sin = rope_tables(np.arange(length)[:, None], (config.head_dim,), config.rope_theta)
    return (jnp.asarray(np.concatenate([cos, cos], axis=-1), dtype),
            jnp.asarray(np.concatenate([sin, sin], axis=-1), dtype))


class Attention(nnx.Module):
    """Causal grouped-query self-attention with RoPE on ``q`` and ``k``, scale ``head_dim^-1/2``."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.head_dim = config.head_dim
        d, heads, kv = config.hidden_size, config.num_attention_heads * config.head_dim, \
            config.num_key_value_heads * config.head_dim
        lin = lambda a, b: nnx.Linear(a, b, use_bias=config.attention_bias, rngs=rngs,  # noqa: E731
                                      param_dtype=param_dtype)
        self.q, self.k, self.v, self.o = lin(d, heads), lin(d, kv), lin(d, kv), lin(heads, d)

    def __call__(self, x: Array, cos: Array, sin: Array, bias: Array | None, seen: Array | None) -> Array:
        split = lambda y: y.reshape(*y.shape[:2], -1, self.head_dim)  # noqa: E731
        q, k = rotate_half_rope(split(self.q(x)), cos, sin), rotate_half_rope(split(self.k(x)), cos, sin)
        out = attention(q, k, split(self.v(x)), bias=bias, causal=True)
        if seen is not None:  # a query without any real key: 0, as transformers' sdpa (module docstring)
            out = jnp.where(seen[:, :, None, None], out, jnp.zeros((), out.dtype))
        return self.o(out.reshape(*out.shape[:2], -1))


class GatedMLP(nnx.Module):
    """GeGLU ``down(act(gate(x)) · up(x))``, bias-free."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.act = config.hidden_act
        lin = lambda a, b: nnx.Linear(a, b, use_bias=False, rngs=rngs, param_dtype=param_dtype)  # noqa: E731
        d, f = config.hidden_size, config.intermediate_size
        self.gate, self.up, self.down = lin(d, f), lin(d, f), lin(f, d)

    def __call__(self, x: Array) -> Array:
        return self.down(ACTIVATIONS[self.act](self.gate(x)) * self.up(x))


class DecoderLayer(nnx.Module):
    """``x + attn(N₁(x))``, then ``x + mlp(N₂(x))``."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        eps = config.rms_norm_eps
        self.input_norm = RMSNorm(config.hidden_size, eps, param_dtype=param_dtype)
        self.attn = Attention(config, rngs=rngs, param_dtype=param_dtype)
        self.post_attention_norm = RMSNorm(config.hidden_size, eps, param_dtype=param_dtype)
        self.mlp = GatedMLP(config, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: Array, cos: Array, sin: Array, bias: Array | None, seen: Array | None) -> Array:
        x = x + self.attn(self.input_norm(x), cos, sin, bias, seen)
        return x + self.mlp(self.post_attention_norm(x))


class GemmaEncoder(nnx.Module):
    """``transformers.GemmaModel`` as Lumina-Next's pipeline uses it (see the module docstring)."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.config = config
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs, param_dtype=param_dtype)
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs, param_dtype=param_dtype)
                                for _ in range(config.num_hidden_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *, hidden_layer: int = -2) -> Array:
        """transformers' ``hidden_states[hidden_layer]`` ``(B, T, hidden_size)`` for token ids ``(B, T)``.

        ``hidden_layer`` (a static Python int) indexes the ``num_hidden_layers + 1`` hidden
        states as transformers' tuple does (0: the scaled embedding, ``-2``: the penultimate
        layer's raw output — Lumina's prompt embeddings —, ``-1``: the final norm of the last
        layer's output); only the layers it needs run.  ``attention_mask`` ``(B, T)``: nonzero at
        real tokens, 0 at padding (module docstring); ``None`` attends to every earlier token.
        Raises ``ValueError`` for a bad shape or dtype or a ``hidden_layer`` outside
        ``-(num_hidden_layers + 1) … num_hidden_layers``.
        """
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be an integer array (batch, tokens), got {input_ids.dtype} {input_ids.shape}")
        layers = self.config.num_hidden_layers
        index = check_int("hidden_layer", hidden_layer, minimum=-(layers + 1), maximum=layers) % (layers + 1)
        keep = None
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must have the shape of input_ids {input_ids.shape}, "
                                 f"got {attention_mask.shape}")
            keep = attention_mask != 0
        x = self.embed_tokens(input_ids)
        x = x * jnp.asarray(np.float32(self.config.hidden_size ** 0.5)).astype(x.dtype)
        if index == 0:
            return x
        cos, sin = _rope(input_ids.shape[1], self.config, x.dtype)
        bias = seen = None
        if keep is not None:
            batch, length = keep.shape  # the bias in full (B, 1, T, S): cuDNN takes no broadcast T
            bias = jnp.where(keep, jnp.zeros((), x.dtype), jnp.finfo(x.dtype).min)[:, None, None, :]
            bias = jnp.broadcast_to(bias, (batch, 1, length, length))
            seen = jnp.cumsum(keep, axis=1) > 0  # query t sees a real key at some position <= t
        for i in range(min(index, layers)):
            x = self.layers[i](x, cos, sin, bias, seen)
        return self.final_norm(x) if index == layers else x


# ----------------------------------------------------------------------------- weights


_L = "layers.{i}"
GEMMA_WEIGHT_MAP: tuple[tuple[str, str, str], ...] = (
    # (transformers key, our state path, transform)
    ("embed_tokens.weight", "embed_tokens.embedding", "identity"),
    *linear_rows(f"{_L}.self_attn.{{x}}_proj", "layers.{i}.attn.{x}"),
    (f"{_L}.mlp.{{m}}_proj.weight", "layers.{i}.mlp.{m}.kernel", "linear"),
    (f"{_L}.input_layernorm.weight", "layers.{i}.input_norm.weight", "identity"),
    (f"{_L}.post_attention_layernorm.weight", "layers.{i}.post_attention_norm.weight", "identity"),
    ("norm.weight", "final_norm.weight", "identity"),
)
"""The ``GemmaModel`` weight mapping: ``{i}`` a layer, ``{x}`` ``q``/``k``/``v``/``o`` (the
``.bias`` rows only exist with ``attention_bias``), ``{m}`` ``gate``/``up``/``down``;
transforms ``identity`` and ``linear`` (transpose).  Every key is also accepted under
``model.``, as a ``GemmaForCausalLM`` stores it (transformers loads either layout into either
class)."""

_PLACEHOLDERS = {"i": r"\d+", "x": "[qkvo]", "m": "gate|up|down"}
_TRANSFORMS = {"identity": IDENTITY, "linear": LINEAR}
_PREFIXED = tuple((f"model.{key}", ours, transform) for key, ours, transform in GEMMA_WEIGHT_MAP)
_WEIGHT_MAPS = {  # by architecture: its own layout first, so that missing keys are named in it
    GEMMA_ARCHITECTURES[0]: WeightMap(GEMMA_WEIGHT_MAP + _PREFIXED, _PLACEHOLDERS, _TRANSFORMS),
    GEMMA_ARCHITECTURES[1]: WeightMap(_PREFIXED + GEMMA_WEIGHT_MAP, _PLACEHOLDERS, _TRANSFORMS),
}
_REPEATS = {"i": ("num_hidden_layers", lambda config: config.num_hidden_layers)}


def _listed_architecture(folder: str) -> str:
    """The one of :data:`GEMMA_ARCHITECTURES` that ``folder/config.json``'s ``architectures``
    names.  Raises ``ValueError`` when it names neither (or both); a missing or unreadable
    ``config.json`` gives ``"GemmaModel"``, whose loading then reports it."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as file:
            architectures = json.load(file).get("architectures")
    except (OSError, ValueError, AttributeError):
        return GEMMA_ARCHITECTURE
    found = [name for name in GEMMA_ARCHITECTURES if isinstance(architectures, list) and name in architectures]
    if len(found) != 1:
        expected = " or ".join(f"[{name!r}]" for name in GEMMA_ARCHITECTURES)
        raise ValueError(f"{path}: architectures is {architectures!r}, expected {expected}")
    return found[0]


def load_gemma_encoder(
    folder: str | os.PathLike, *, dtype=None, variant: str | None = None, sharding: ParamSharding | None = None,
) -> GemmaEncoder:
    """Load a transformers ``GemmaModel`` folder (Lumina-Next's ``text_encoder/``) or
    ``GemmaForCausalLM`` folder — whichever its ``config.json``'s ``architectures`` names — into
    an NNX :class:`GemmaEncoder`.

    The folder holds ``config.json`` and ``model.safetensors`` or a sharded
    ``model.safetensors.index.json`` (``variant="fp16"`` reads ``model.fp16.safetensors``); keys
    bare (``embed_tokens.weight``, ``layers.N.…``, ``norm.weight``) or under ``model.``.  Same
    checks as the other loaders (all are :func:`cfgzero_theory.ports.loading.load_module`): a
    ``num_hidden_layers`` that differs from the layers in the file, missing, unexpected or
    wrongly shaped keys reported in one ``ValueError`` before any tensor data is read; tensors
    are then read, transformed, cast (``dtype``; ``None`` keeps the stored dtype) and placed one
    at a time — on the default device, or split over a device mesh as ``sharding`` (a
    :class:`~cfgzero_theory.ports.sharding.ParamSharding`) says.
    """
    architecture = _listed_architecture(os.fspath(folder))
    return load_module(
        folder, GemmaEncoder, GemmaConfig, _WEIGHT_MAPS[architecture],
        class_name=architecture, what="Gemma text_encoder/", dtype=dtype, variant=variant,
        folder_kind=TRANSFORMERS, sharding=sharding, repeats=_REPEATS,
    )
