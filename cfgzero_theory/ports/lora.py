"""LoRA files merged into a loaded model: pairs and full deltas in diffusers / PEFT, kohya and original-layout keys.

The formula
-----------
A LoRA pair for a linear layer ``y = W x + b`` (``W`` of shape ``(out, in)``, torch's layout)
is a down matrix ``A (r, in)`` and an up matrix ``B (out, r)``, optionally an up bias
``β (out,)`` and a number ``α``.  Merged with strength ``s``::

    W' = W + s · f · B A,        b' = b + s · f · β,        f = α / r

(``r`` the rows of ``A``; ``f = α / √r`` when the file's diffusers metadata sets
``use_rslora``).  A pair without ``α`` has ``f = 1``: diffusers loads such a file with PEFT's
``lora_alpha = r``.

A full delta (ComfyUI's ``.diff`` and ``.diff_b`` keys) is an array ``Δ`` of the named
parameter's own shape, in the layout its name belongs to — a linear layer's ``(out, in)``
weight or ``(out,)`` bias, a norm's ``(C,)`` weight or bias, a convolution's kernel, a
modulation table — merged as ComfyUI merges it::

    P' = P + s · Δ

whatever ``α`` the file gives (ComfyUI ignores ``α`` for it; diffusers' ``lora_B.bias``, which
a ``.diff_b`` becomes there, is scaled by PEFT's ``lora_alpha / r``, which is 1 for such files).

All the terms of one parameter — pairs, up biases and full deltas — are computed in float32
(float64 for float64 weights), summed, added to the parameter and rounded **once** to its
dtype; several files merged in one :func:`merge_lora` call add all their terms before that one
rounding.  Terms are in the diffusers layout: the model's
:class:`~cfgzero_theory.ports.loading.WeightMap` maps a diffusers key (``<module>.weight``) to
our state path and its row's transform (:data:`~cfgzero_theory.ports.loading.LINEAR`: a
transpose; a patch convolution's reshape) to our layout, as it does for the weight itself.

Targets: a LoRA pair targets one of the model's linear layers, i.e. a parameter whose
weight-map row has the ``LINEAR`` transform, named by its diffusers module (``<module>.weight``
being its diffusers key, e.g. ``transformer_blocks.0.attn.to_q``).  A full delta targets any
parameter of the weight map (:func:`param_targets`), named by its diffusers key.

Key formats
-----------
Every key ends in one of these suffixes:

* ``.lora_A.weight``, ``.lora_down.weight`` or ``.lora.down.weight``: ``A``;
* ``.lora_B.weight``, ``.lora_up.weight`` or ``.lora.up.weight``: ``B``;
* ``.lora_B.bias``: ``β``;  ``.alpha``: ``α`` (a tensor holding one number);
* ``.diff``: the full delta of ``<name>.weight`` — or, when the name is itself a parameter with
  no ``.weight`` (Wan's ``blocks.0.modulation``), of that parameter, as ComfyUI reads it;
* ``.diff_b``: the full delta of ``<name>.bias``.

What precedes the suffix names the layer (the module, for a full delta: the parameter), read
by its prefix:

* **diffusers / PEFT**: ``transformer.<module>``, ``base_model.model.<module>`` or a bare
  ``<module>``: a diffusers module name.  Without an ``.alpha`` tensor, ``α`` comes from
  the file's diffusers metadata when it has some: the safetensors metadata entry
  ``lora_adapter_metadata``, the JSON of PEFT's ``LoraConfig`` with keys prefixed
  ``transformer.`` (``lora_alpha`` — PEFT's default 8 when absent — ``alpha_pattern``,
  ``r``, ``rank_pattern``, ``use_rslora``; patterns match module names as PEFT matches
  them: ``re.match(rf"(.*\\.)?({pattern})$", module)``, the first that matches wins).  The
  metadata's rank must be the rank found in the file; ``use_dora`` is refused.
* **kohya**: ``lora_unet_<name>`` or ``lora_transformer_<name>``: a module name with its dots
  written as underscores (``lora_unet_transformer_blocks_0_attn_to_out_0``).  Underscores are
  ambiguous (``to_out_0`` is ``to_out.0``), so the name is resolved by writing every name the
  model knows — its diffusers modules and parameters, its original layout's modules and
  parameters — the same way; a form two different names share is refused as ambiguous.
* **original layout** (BFL / ComfyUI): ``diffusion_model.<name>``, a module of the model's
  original checkpoint layout (Flux: ``double_blocks.0.img_attn.qkv``; Wan:
  ``blocks.0.self_attn.q``, ``blocks.0.norm3``).  How it becomes diffusers modules is
  model-specific (Flux splits a fused qkv projection into three diffusers modules), so the
  model passes an :class:`OriginalLayout` hook; without one these keys are refused.  Kohya
  names that resolve to an original module go through it as well.  A full delta of an
  original linear module goes through the hook's pair conversion as the pair ``B = Δ``,
  ``A = I`` (``β = Δ_b``), so its rows land where the pair's would; one of another original
  parameter through the hook's table of parameters (:attr:`OriginalLayout.params`).

Full deltas and diffusers
-------------------------
diffusers (0.42) reads ``.diff`` / ``.diff_b`` keys only in Wan's original layout
(``WanLoraLoaderMixin.lora_state_dict``); what it does with each, and what is done here:

* ``.diff_b`` of a linear layer (attention, FFN, text / time embedder, time projection, head,
  image embedder): diffusers makes it PEFT's ``lora_B.bias``, fused as ``b + s · (r / r) · Δ``
  (its alpha is folded into ``A`` and ``B``, not into the bias): ``b' = b + s · Δ``, as here.
  diffusers drops it for the time projection when the file has no pair for it (silently) and
  for the image embedder without pair (logged), and fails on a text / time embedder one
  without pair; here it is applied all the same.
* ``head.head.diff`` (diffusers needs ``head.head.diff_b`` with it): diffusers loads it as the
  pair ``A = Δ``, ``B = I``, i.e. ``W' = W + s · Δ``, as here.
* ``.diff`` / ``.diff_b`` of a norm (every key with ``norm`` in it: ``norm3``, ``norm_q``,
  ``norm_k``, ``norm_k_img``): diffusers drops them (a debug log: the files it was written for
  hold zeros there).  ``.diff`` of any other linear layer and full deltas of parameters it has
  no rule for (``patch_embedding``, ``modulation``, ``img_emb.proj.0`` / ``.4``): diffusers
  drops them with an info log.  Here all of them are applied as ComfyUI applies them (``P' = P
  + s · Δ``): their meaning is unambiguous, a user loading such a file wants them, and a key is
  never skipped — it changes the weights or the file is refused.  For zero deltas both agree.
* kohya / musubi names (``lora_unet_blocks_0_norm3.diff``), which diffusers refuses for Wan,
  and diffusers names (``transformer.blocks.0.norm2.diff``) follow the same rule.
* A ``.diff`` and a pair for the same weight, or a ``.diff_b`` and a ``lora_B.bias`` for the
  same bias, in one file: ComfyUI (and diffusers, for ``head.head``) keep the full delta and
  drop the pair; refused here, as either reading drops a key.

Errors
------
Everything is checked before any weight changes, and one ``ValueError`` lists the problems
of all the files (a limited number of keys each), naming the keys: keys that match no format;
pairs naming no linear layer of the model and full deltas naming no parameter of it;
original-layout keys without a hook; ambiguous kohya names; ``A`` without ``B`` (or ``B``
without ``A``, or ``α`` / ``β`` alone — an ``α`` next to full deltas only scales nothing); one
pair given twice (as ``lora_A`` and ``lora_down``); tensors that are not floating point;
wrong shapes (``A`` not ``(r, in)``, ``B`` not ``(out, r)``, ``ΔW`` not the weight's shape,
``β`` not ``(out,)``, ``α`` not one finite number, a full delta not its parameter's shape); an
up bias for a layer without bias; two pairs for one layer, or two full deltas for one
parameter, in one file; a parameter given a pair and a full delta in one file; a hook whose
conversion changes ``A`` (it cannot carry a full delta); metadata that does not fit.  A file
that cannot be read as safetensors (never pickle) raises ``ValueError`` naming it; a missing
file ``FileNotFoundError``.

Public API
----------
* :func:`merge_lora` ``(model, weight_map, loras, *, original=None, what="model") -> int``:
  ``loras`` a sequence of ``(path, scale)``; merges in place, returns the number of layers
  changed;
* :func:`lora_contents` ``(path, targets, params, *, original=None, what="model") ->
  (list[LoraLayer], list[FullDelta])``: one file's pairs and full deltas, normalised to
  diffusers names and checked (nothing changes); :func:`lora_layers` ``(path, targets, *,
  original=None, what="model", params=None) -> list[LoraLayer]``: its pairs only;
* :func:`read_lora_file` ``(path) -> (tensors, peft_config)``;
* :func:`linear_targets` ``(model, weight_map) -> {diffusers module: LoraTarget}``;
  :func:`param_targets` ``(model, weight_map) -> {diffusers key: ParamTarget}``;
* :class:`LoraLayer` (one normalised pair), :class:`FullDelta` (one normalised full delta),
  :class:`LoraTarget` (one linear layer of the model), :class:`ParamTarget` (one parameter),
  :class:`OriginalLayout` (the per-model hook for original-layout keys).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from safetensors import SafetensorError

from cfgzero_theory.ports.loading import FLOAT_DTYPES, LINEAR, Transform, WeightMap, open_safetensors
from cfgzero_theory.validation import check_real, limited_list

__all__ = [
    "METADATA_KEY", "FullDelta", "LoraLayer", "LoraTarget", "OriginalLayout", "ParamTarget", "linear_targets",
    "lora_contents", "lora_layers", "merge_lora", "param_targets", "read_lora_file",
]

METADATA_KEY = "lora_adapter_metadata"
"""The safetensors metadata entry in which diffusers saves PEFT's ``LoraConfig`` (JSON)."""
_CONFIG_PREFIX = "transformer."
_PEFT_DEFAULT_ALPHA = 8  # LoraConfig's defaults, which diffusers gets for keys its metadata lacks
_PEFT_DEFAULT_RANK = 8

_SUFFIXES = (
    (".lora_A.weight", "down"), (".lora_down.weight", "down"), (".lora.down.weight", "down"),
    (".lora_B.weight", "up"), (".lora_up.weight", "up"), (".lora.up.weight", "up"),
    (".lora_B.bias", "up_bias"), (".alpha", "alpha"), (".diff", "diff"), (".diff_b", "diff_b"),
)
_PAIR_ROLES = ("down", "up", "up_bias", "alpha")
_DELTA_SUFFIXES = {"diff": ".diff", "diff_b": ".diff_b"}
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
_ORIGINAL_PREFIX = "diffusion_model."
_DIFFUSERS_PREFIXES = ("transformer.", "base_model.model.")


class LoraLayer(NamedTuple):
    """One LoRA pair, normalised: ``ΔW = s · factor · up @ down`` for the layer ``module``.

    ``module``: the diffusers module name of the target linear (before an
    :class:`OriginalLayout` hook converts it: the original layout's name); ``down``: ``A (r,
    in)``; ``up``: ``B (out, r)``; ``up_bias``: ``β (out,)`` or ``None``; ``factor``: ``f = α /
    r`` (1 without ``α``), taken from the stored pair, so that pieces a hook cuts out of it
    keep it; ``key``: the pair's key stem in the file, for messages.  Arrays are kept in the
    file's dtype.
    """

    module: str
    down: np.ndarray
    up: np.ndarray
    up_bias: np.ndarray | None
    factor: float
    key: str


class FullDelta(NamedTuple):
    """One full delta, normalised: ``P' = P + s · delta`` for the parameter ``key`` (its
    diffusers key, e.g. ``blocks.0.norm2.weight``; ``delta`` in the diffusers layout and the
    file's dtype); ``source``: the key in the file it comes from, for messages."""

    key: str
    delta: np.ndarray
    source: str


class LoraTarget(NamedTuple):
    """One linear layer of the model: its kernel's state path (a tuple, as ``nnx`` flat states
    name it), the weight's diffusers shape ``(out, in)``, the weight-map row's transform and the
    bias's state path (``None`` without bias)."""

    weight: tuple
    shape: tuple[int, int]
    transform: Transform
    bias: tuple | None


class ParamTarget(NamedTuple):
    """One parameter of the model: its state path, its shape in the diffusers layout and the
    weight-map row's transform (diffusers layout → ours)."""

    path: tuple
    shape: tuple
    transform: Transform


class OriginalLayout(NamedTuple):
    """A model's hook for LoRA keys in its original checkpoint layout (``diffusion_model.*``).

    ``modules``: the linear modules of the original layout (e.g. Flux's
    ``double_blocks.0.img_attn.qkv``): a pair naming a name outside it is reported as naming
    no layer, and kohya names are resolved against it too.  ``to_diffusers(layer)``: the
    :class:`LoraLayer` of an original module (``layer.module`` its original name) as a list of
    diffusers layers — e.g. a fused qkv pair ``B (3D, r)`` as three layers sharing ``A``, each
    with a ``D``-row slice of ``B`` (and of ``β``): ``layer._replace(module=..., up=...,
    up_bias=...)``.  The pieces keep ``layer.factor``; they are checked like any other layer.

    Full deltas of an original linear module's weight ``Δ (out, in)`` and bias ``Δ_b (out,)``
    go through ``to_diffusers`` too, as the layer ``B = Δ``, ``A = I``, ``β = Δ_b`` (``B`` of
    shape ``(out, 0)`` without ``Δ``): each piece's ``B`` and ``β`` are the deltas of its
    module's weight and bias.  ``A`` stands for the identity and is not a real array, so a hook
    must pass it on unchanged (``_replace`` without ``down``); a conversion that changes it
    cannot carry a full delta and is refused.

    ``params`` (optional): ``{original parameter key: diffusers key}`` for the other
    parameters of the original layout that are one diffusers parameter each, in the same
    layout (Wan: ``blocks.0.norm3.weight`` → ``blocks.0.norm2.weight``,
    ``blocks.0.modulation`` → ``blocks.0.scale_shift_table``); their full deltas are mapped
    through it, and kohya names are resolved against its keys' module names too.
    """

    modules: frozenset[str]
    to_diffusers: Callable[[LoraLayer], Sequence[LoraLayer]]
    params: Mapping[str, str] = MappingProxyType({})


# ----------------------------------------------------------------------------- the model's layers


def _path_name(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def linear_targets(model: nnx.Module, weight_map: WeightMap) -> dict[str, LoraTarget]:
    """``{diffusers module: LoraTarget}`` for every parameter of ``model`` whose weight-map row
    (found through its diffusers key ``<module>.weight``) has the ``LINEAR`` transform."""
    params = {_path_name(path): (path, var) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    targets = {}
    for name, (path, var) in params.items():
        key = weight_map.to_diffusers(name)
        found = weight_map.to_ours(key) if key.endswith(".weight") else None
        if found is None or found[0] != name or found[1] is not LINEAR:
            continue
        module = key[: -len(".weight")]
        bias = weight_map.to_ours(f"{module}.bias")
        bias_path = params[bias[0]][0] if bias is not None and bias[0] in params else None
        targets[module] = LoraTarget(path, LINEAR.source_shape(var.shape, None), found[1], bias_path)
    return targets


def param_targets(model: nnx.Module, weight_map: WeightMap) -> dict[str, ParamTarget]:
    """``{diffusers key: ParamTarget}`` for every variable of ``model`` that the weight map
    loads (parameters and tables such as Wan's modulation tables alike); the shapes are the
    diffusers ones (the rows' ``source_shape`` with ``model.config``)."""
    config = getattr(model, "config", None)
    targets = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        name = _path_name(path)
        key = weight_map.to_diffusers(name)
        found = weight_map.to_ours(key)
        if found is not None and found[0] == name:
            targets[key] = ParamTarget(path, tuple(found[1].source_shape(tuple(var.shape), config)), found[1])
    return targets


def _stems(keys: Iterable[str]) -> set[str]:
    """The names a parameter key is written with before ``.diff`` / ``.diff_b``: its module
    (``<module>.weight`` / ``<module>.bias``) or, for a bare parameter, the key itself."""
    return {key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key for key in keys}


def _param_key(name: str, role: str, known: Collection[str]) -> str | None:
    """The parameter key a full delta of ``name`` is for (``None`` when ``known`` has none):
    ``<name>.bias`` for ``diff_b``; ``<name>.weight``, else the bare parameter ``name``, for ``diff``."""
    if role == "diff_b":
        return f"{name}.bias" if f"{name}.bias" in known else None
    if f"{name}.weight" in known:
        return f"{name}.weight"
    return name if name in known and not name.endswith((".weight", ".bias")) else None


# ----------------------------------------------------------------------------- reading


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(tensors, peft_config)`` of a LoRA safetensors file (never pickle).

    ``tensors``: ``{key: NumPy array}`` in the stored dtypes (bf16 as ``ml_dtypes.bfloat16``);
    ``peft_config``: the entries of the diffusers metadata (:data:`METADATA_KEY`) prefixed
    ``transformer.``, without the prefix (``{}`` when there is none).  Raises
    ``FileNotFoundError`` for a missing file, ``ValueError`` for one that is not readable
    safetensors or whose metadata is not a JSON object of the expected types.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such LoRA file: {path}")
    with open_safetensors(path) as file:
        metadata = file.metadata() or {}
        try:
            tensors = {key: file.get_tensor(key) for key in file.keys()}
        except (SafetensorError, ValueError, TypeError) as err:
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    return tensors, _peft_config(path, metadata.get(METADATA_KEY))


def _peft_config(path: str, raw: str | None) -> dict[str, Any]:
    """The ``transformer.`` entries of the diffusers LoRA metadata, checked for the types used here."""
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{path}: the {METADATA_KEY} metadata is not JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: the {METADATA_KEY} metadata must be a JSON object")
    config = {key[len(_CONFIG_PREFIX):]: value for key, value in config.items() if key.startswith(_CONFIG_PREFIX)}
    for name in ("lora_alpha", "r"):
        if name in config:
            check_real(f"{path}: metadata {_CONFIG_PREFIX}{name}", config[name])
    for name in ("alpha_pattern", "rank_pattern"):
        patterns = config.get(name) or {}
        if not isinstance(patterns, dict):
            raise ValueError(f"{path}: metadata {_CONFIG_PREFIX}{name} must be a JSON object, got {patterns!r}")
        for pattern, value in patterns.items():
            check_real(f"{path}: metadata {_CONFIG_PREFIX}{name}[{pattern!r}]", value)
    return config


# ----------------------------------------------------------------------------- normalising


def _split_key(key: str) -> tuple[str, str] | None:
    """``(stem, role)`` of a key, role one of ``down``, ``up``, ``up_bias``, ``alpha``,
    ``diff``, ``diff_b``; ``None`` when the key has no known suffix."""
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


def _stem_format(stem: str) -> tuple[str, str]:
    """``(format, name)``: ``kohya``, ``original`` or ``diffusers`` by the stem's prefix."""
    for prefix in _KOHYA_PREFIXES:
        if stem.startswith(prefix):
            return "kohya", stem[len(prefix):]
    if stem.startswith(_ORIGINAL_PREFIX):
        return "original", stem[len(_ORIGINAL_PREFIX):]
    for prefix in _DIFFUSERS_PREFIXES:
        if stem.startswith(prefix):
            return "diffusers", stem[len(prefix):]
    return "diffusers", stem


def _kohya_index(diffusers: Iterable[str], original: Iterable[str]) -> dict[str, tuple[str, bool] | None]:
    """``{name with dots as underscores: (name, is_original)}``; ``None`` for a form that two
    different names share (a name in both layouts counts once, as a diffusers name)."""
    index: dict[str, tuple[str, bool] | None] = {}
    for is_original, names in ((False, diffusers), (True, original)):
        for name in names:
            flat = name.replace(".", "_")
            known = index.setdefault(flat, (name, is_original))
            if known is not None and known[0] != name:
                index[flat] = None
    return index


class _Problems:
    """Problems of one file, gathered by kind: ``add(kind, item)``, ``lines()``."""

    def __init__(self, what: str):
        self.what = what
        self.items: dict[str, list[str]] = {}

    def add(self, kind: str, item: str) -> None:
        self.items.setdefault(kind, []).append(item)

    def lines(self) -> list[str]:
        return [f"{kind.format(what=self.what)} {limited_list(items, str)}" for kind, items in self.items.items()]


_UNKNOWN = ("keys matching no LoRA key format (…lora_A/lora_B/lora_down/lora_up.weight, .diff, .diff_b, "
            ".lora_B.bias, .alpha)")
_NO_LAYER = "pairs naming no linear layer of the {what}"
_NO_PARAM = "full deltas naming no parameter of the {what}"
_NO_HOOK = "original-layout pairs (diffusion_model.*), which the {what} has no conversion for"
_NO_HOOK_DELTA = "original-layout full deltas (diffusion_model.*), which the {what} has no conversion for"
_NO_IDENTITY = "full deltas that the {what}'s original-layout conversion cannot carry (it changes A or drops the bias)"
_AMBIGUOUS = "kohya names that several module names of the {what} write alike"
_UNPAIRED = "incomplete pairs"
_TWICE = "pairs given twice"
_DTYPE = "tensors that are not float16, bfloat16, float32 or float64 (an alpha may be an integer)"
_SHAPE = "wrong shapes:"
_DOUBLE = "layers with more than one pair in the file"
_DOUBLE_DELTA = "parameters with more than one full delta in the file"
_BOTH = "parameters given both a LoRA pair and a full delta in the file (ComfyUI would drop the pair)"
_METADATA = "metadata that does not fit:"
_ROLE_NAMES = {"down": "A", "up": "B", "up_bias": "up bias", "alpha": "alpha", "diff": "weight delta",
               "diff_b": "bias delta"}


def _resolve(fmt: str, name: str, targets: Mapping[str, LoraTarget], original: OriginalLayout | None,
             kohya: Mapping[str, tuple[str, bool] | None]) -> tuple[str, bool] | str:
    """``(module, is_original)`` for a pair's name, or the kind of problem that stops it."""
    if fmt == "diffusers":
        return (name, False) if name in targets else _NO_LAYER
    if fmt == "original":
        if original is None:
            return _NO_HOOK
        return (name, True) if name in original.modules else _NO_LAYER
    if name not in kohya:
        return _NO_LAYER
    if kohya[name] is None:
        return _AMBIGUOUS
    module, is_original = kohya[name]
    linear = module in original.modules if is_original else module in targets
    return (module, is_original) if linear else _NO_LAYER


def _pattern_value(patterns: Mapping[str, Any], default, module: str):
    """PEFT's pattern lookup: the value of the first pattern matching the module name's tail."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _factor(stem: str, module: str, rank: int, alpha: np.ndarray | None, config: Mapping[str, Any],
            fmt: str, problems: _Problems) -> float:
    """``f = α / r`` (``α / √r`` with ``use_rslora``) from the ``.alpha`` tensor, else (for a
    diffusers-format pair) the metadata; 1 without ``α``."""
    if alpha is not None:
        value = float(np.asarray(alpha, np.float64).reshape(()))
    elif fmt == "diffusers" and config:
        stated = _pattern_value(config.get("rank_pattern") or {}, config.get("r", _PEFT_DEFAULT_RANK), module)
        if stated != rank:
            problems.add(_METADATA, f"{stem!r}: the metadata gives rank {stated}, A has {rank} rows")
        value = _pattern_value(config.get("alpha_pattern") or {}, config.get("lora_alpha", _PEFT_DEFAULT_ALPHA), module)
    else:
        return 1.0
    return value / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _stored_problem(stem: str, roles: Mapping[str, np.ndarray]) -> str | None:
    """Why a stored pair cannot be read (``None`` when it can): ``A`` must be 2-D (its rows are
    the rank ``r``), ``α`` one finite number."""
    down, alpha = roles["down"], roles.get("alpha")
    if down.ndim != 2:
        return f"{stem!r}: A has shape {down.shape}, expected (r, in)"
    if alpha is not None and not (alpha.size == 1 and np.isfinite(np.asarray(alpha, np.float64)).all()):
        return f"{stem!r}: alpha must be one finite number, got shape {alpha.shape}"
    return None


def _layer_problem(layer: LoraLayer, target: LoraTarget) -> str | None:
    """Why a layer does not fit its target: ``A (r, in)``, ``B (out, r)``, ``β (out,)`` with
    ``(out, in)`` the weight's shape and a bias to add ``β`` to (``None`` when it fits)."""
    down, up, bias = layer.down, layer.up, layer.up_bias
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        return f"{layer.key!r}: A {down.shape} and B {up.shape} are not (r, in) and (out, r)"
    if (up.shape[0], down.shape[1]) != target.shape:
        return f"{layer.key!r}: B A is {(up.shape[0], down.shape[1])}, but {layer.module}.weight is {target.shape}"
    if bias is not None and bias.shape != (up.shape[0],):
        return f"{layer.key!r}: the up bias has shape {bias.shape}, expected ({up.shape[0]},)"
    if bias is not None and target.bias is None:
        return f"{layer.key!r}: an up bias for {layer.module}, which has no bias"
    return None


def _group(tensors: Mapping[str, np.ndarray], problems: _Problems) -> dict[str, dict[str, np.ndarray]]:
    """``{stem: {role: tensor}}``; unknown keys, non-float tensors and doubled roles go to ``problems``."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            problems.add(_UNKNOWN, repr(key))
            continue
        stem, role = split
        numeric = tensor.dtype.name in FLOAT_DTYPES.values() or (role == "alpha" and tensor.dtype.kind in "iu")
        if not numeric:
            problems.add(_DTYPE, f"{key!r} ({tensor.dtype})")
        elif role in groups.setdefault(stem, {}):
            problems.add(_TWICE, f"{stem!r} ({_ROLE_NAMES[role]})")
        else:
            groups[stem][role] = tensor
    return groups


def _pair(stem: str, fmt: str, name: str, roles: Mapping[str, np.ndarray], targets: Mapping[str, LoraTarget],
          original: OriginalLayout | None, kohya: Mapping, config: Mapping[str, Any],
          problems: _Problems) -> list[LoraLayer]:
    """The diffusers layers of one stem's pair (``roles``: its ``A``, ``B``, ``β``, ``α``)."""
    resolved = _resolve(fmt, name, targets, original, kohya)
    missing = [_ROLE_NAMES[role] for role in ("down", "up") if role not in roles]
    if isinstance(resolved, str):
        problems.add(resolved, repr(stem))
    elif missing:
        present = ", ".join(_ROLE_NAMES[role] for role in roles)
        problems.add(_UNPAIRED, f"{stem!r}: {present} without {' and '.join(missing)}")
    elif problem := _stored_problem(stem, roles):
        problems.add(_SHAPE, problem)
    else:
        module, is_original = resolved
        rank = roles["down"].shape[0]
        layer = LoraLayer(module, roles["down"], roles["up"], roles.get("up_bias"),
                          _factor(stem, module, rank, roles.get("alpha"), config, fmt, problems), stem)
        return list(original.to_diffusers(layer)) if is_original else [layer]
    return []


def _through_hook(stem: str, module: str, roles: Mapping[str, np.ndarray], original: OriginalLayout,
                  problems: _Problems) -> list[FullDelta]:
    """The full deltas of an original linear module, carried through the hook's pair
    conversion as ``B = Δ``, ``A = I``, ``β = Δ_b`` (:class:`OriginalLayout`)."""
    diff, diff_b = roles.get("diff"), roles.get("diff_b")
    if diff is not None and diff.ndim != 2:
        problems.add(_SHAPE, f"{stem + '.diff'!r}: shape {diff.shape}, expected (out, in) of the linear {module}")
        return []
    rows = diff.shape[0] if diff is not None else None
    if diff_b is not None and (diff_b.ndim != 1 or rows not in (None, diff_b.shape[0])):
        out = "out" if rows is None else rows
        problems.add(_SHAPE, f"{stem + '.diff_b'!r}: shape {diff_b.shape}, expected ({out},) of the linear {module}")
        return []
    width = diff.shape[1] if diff is not None else 0
    identity = np.broadcast_to(np.zeros((), np.float32), (width, width))  # stands for I; never computed with
    up = diff if diff is not None else np.zeros((diff_b.shape[0], 0), np.float32)
    deltas = []
    for piece in original.to_diffusers(LoraLayer(module, identity, up, diff_b, 1.0, stem)):
        if piece.down is not identity or (diff_b is not None and piece.up_bias is None):
            problems.add(_NO_IDENTITY, repr(stem))
            return []
        if diff is not None:
            deltas.append(FullDelta(f"{piece.module}.weight", piece.up, f"{stem}.diff"))
        if diff_b is not None:
            deltas.append(FullDelta(f"{piece.module}.bias", piece.up_bias, f"{stem}.diff_b"))
    return deltas


def _deltas(stem: str, fmt: str, name: str, roles: Mapping[str, np.ndarray], params: Mapping[str, ParamTarget],
            original: OriginalLayout | None, kohya: Mapping, problems: _Problems) -> list[FullDelta]:
    """The diffusers full deltas of one stem (``roles``: its ``.diff`` and / or ``.diff_b``)."""
    keys = [f"{stem}{_DELTA_SUFFIXES[role]}" for role in roles]
    is_original = fmt == "original"
    if fmt == "kohya" and kohya.get(name) is None:
        for key in keys:
            problems.add(_NO_PARAM if name not in kohya else _AMBIGUOUS, repr(key))
        return []
    if fmt == "kohya":
        name, is_original = kohya[name]
    if is_original and original is None:
        for key in keys:
            problems.add(_NO_HOOK_DELTA, repr(key))
        return []
    if is_original and name in original.modules:
        return _through_hook(stem, name, roles, original, problems)
    table = original.params if is_original else None
    deltas = []
    for role, tensor in roles.items():
        key = _param_key(name, role, table if is_original else params)
        if key is None:
            problems.add(_NO_PARAM, repr(f"{stem}{_DELTA_SUFFIXES[role]}"))
        else:
            deltas.append(FullDelta(table[key] if is_original else key, tensor, f"{stem}{_DELTA_SUFFIXES[role]}"))
    return deltas


def _checked_file(path, targets: Mapping[str, LoraTarget], params: Mapping[str, ParamTarget],
                  original: OriginalLayout | None, what: str) -> tuple[list[LoraLayer], list[FullDelta], list[str]]:
    """One file's diffusers layers, its full deltas and its problems (see the module docstring)."""
    tensors, config = read_lora_file(path)
    problems = _Problems(what)
    if config.get("use_dora"):
        problems.add(_METADATA, "use_dora (DoRA is not supported)")
    original_names = set(original.modules) | _stems(original.params) if original else set()
    kohya = _kohya_index(set(targets) | _stems(params), original_names)
    layers: list[LoraLayer] = []
    deltas: list[FullDelta] = []
    for stem, roles in _group(tensors, problems).items():
        fmt, name = _stem_format(stem)
        pair = {role: tensor for role, tensor in roles.items() if role in _PAIR_ROLES}
        full = {role: tensor for role, tensor in roles.items() if role not in _PAIR_ROLES}
        if pair:
            layers += _pair(stem, fmt, name, pair, targets, original, kohya, config, problems)
        if full:
            deltas += _deltas(stem, fmt, name, full, params, original, kohya, problems)
    fitting, paired, seen = [], {}, set()
    for layer in layers:
        if layer.module not in targets:
            problems.add(_NO_LAYER, f"{layer.module!r} (converted from {layer.key!r})")
        elif layer.module in seen:
            problems.add(_DOUBLE, repr(layer.module))
        elif problem := _layer_problem(layer, targets[layer.module]):
            problems.add(_SHAPE, problem)
        else:
            seen.add(layer.module)
            fitting.append(layer)
            paired[f"{layer.module}.weight"] = layer.key
            if layer.up_bias is not None:
                paired[f"{layer.module}.bias"] = layer.key
    fitting_deltas, seen = [], set()
    for delta in deltas:
        target = params.get(delta.key)
        if target is None:
            problems.add(_NO_PARAM, f"{delta.key!r} (converted from {delta.source!r})")
        elif delta.key in seen:
            problems.add(_DOUBLE_DELTA, f"{delta.key!r} ({delta.source!r})")
        elif delta.key in paired:
            problems.add(_BOTH, f"{delta.key!r} ({delta.source!r} and the pair {paired[delta.key]!r})")
        elif delta.delta.shape != target.shape:
            problems.add(_SHAPE, f"{delta.source!r}: the delta has shape {delta.delta.shape}, but {delta.key} "
                                 f"is {target.shape}")
        else:
            seen.add(delta.key)
            fitting_deltas.append(delta)
    return fitting, fitting_deltas, problems.lines()


def lora_contents(
    path: str | os.PathLike, targets: Mapping[str, LoraTarget], params: Mapping[str, ParamTarget], *,
    original: OriginalLayout | None = None, what: str = "model",
) -> tuple[list[LoraLayer], list[FullDelta]]:
    """The pairs and full deltas of one LoRA file as diffusers :class:`LoraLayer` s and
    :class:`FullDelta` s, checked against ``targets`` (:func:`linear_targets`) and ``params``
    (:func:`param_targets`); nothing is changed.  ``original``: the model's hook for
    original-layout keys; ``what`` names the model in messages.  Raises ``ValueError`` listing
    every problem of the file (see the module docstring)."""
    layers, deltas, problems = _checked_file(path, targets, params, original, what)
    if problems:
        raise ValueError(f"{os.fspath(path)} does not fit the {what}: " + "; ".join(problems))
    return layers, deltas


def lora_layers(path: str | os.PathLike, targets: Mapping[str, LoraTarget], *, original: OriginalLayout | None = None,
                what: str = "model", params: Mapping[str, ParamTarget] | None = None) -> list[LoraLayer]:
    """The pairs of one LoRA file (:func:`lora_contents`'s first list); its full deltas are
    checked against ``params`` (without it: refused, as naming no parameter)."""
    return lora_contents(path, targets, params or {}, original=original, what=what)[0]


# ----------------------------------------------------------------------------- merging


class _Term(NamedTuple):
    """One term of a parameter's delta in the diffusers layout: ``coefficient · first`` or,
    with ``second``, ``coefficient · first @ second`` (a pair's ``B A``)."""

    coefficient: float
    first: np.ndarray
    second: np.ndarray | None = None

    def value(self, compute) -> np.ndarray:
        first = self.first.astype(compute)
        product = first if self.second is None else first @ self.second.astype(compute)
        return np.asarray(self.coefficient, compute) * product


def _add_rounded(variable: nnx.Variable, delta: np.ndarray) -> None:
    """``variable ← round(variable + delta)``: the sum in ``delta``'s dtype, rounded once to the
    variable's dtype, placed as the variable was (same devices, same sharding, and uncommitted
    when it was: a committed array would be a new input signature for ``jit``)."""
    value = variable.get_value()
    merged = (value.astype(delta.dtype) + delta).astype(value.dtype)
    variable.set_value(merged if merged.sharding == value.sharding else jax.device_put(merged, value.sharding))


def _terms(layers: Iterable[LoraLayer], deltas: Iterable[FullDelta], scale: float) -> Iterable[tuple[str, _Term]]:
    """``(diffusers key, term)`` of one file's pairs (``s·f·B A``, ``s·f·β``) and full deltas (``s·Δ``)."""
    for layer in layers:
        yield f"{layer.module}.weight", _Term(scale * layer.factor, layer.up, layer.down)
        if layer.up_bias is not None:
            yield f"{layer.module}.bias", _Term(scale * layer.factor, layer.up_bias)
    for delta in deltas:
        yield delta.key, _Term(scale, delta.delta)


def _module(key: str) -> str:
    return key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key


def merge_lora(model: nnx.Module, weight_map: WeightMap, loras: Sequence[tuple[str | os.PathLike, float]], *,
               original: OriginalLayout | None = None, what: str = "model") -> int:
    """Merge LoRA files into ``model`` in place: ``W ← W + Σ s · f · B A`` for the pairs,
    ``P ← P + Σ s · Δ`` for the full deltas.

    Args:
      model: the loaded NNX module (its parameters may be on any devices, sharded or not; the
        merged ones keep their dtype, shape and placement, so compiled functions taking
        ``nnx.state(model)`` as input are not recompiled).
      weight_map: the model's diffusers ↔ ours table (:func:`linear_targets` and
        :func:`param_targets` find the layers and parameters).
      loras: ``(path, scale)`` pairs, ``scale`` (``s``) a finite real number; all their terms
        for one parameter are summed before the one rounding to its dtype.
      original: the model's :class:`OriginalLayout` hook for original-layout keys (``None``:
        such keys are refused).
      what: the model's name in messages (``"SD3 transformer"``).

    Returns the number of layers changed (modules — linear layers, norms, … — whose weight or
    bias changes; a bare parameter such as a modulation table counts as one).  Raises
    ``ValueError`` (a missing file ``FileNotFoundError``) before changing anything when a
    scale or any file does not fit; the message lists every file's problems (see the module
    docstring).
    """
    if isinstance(loras, (str, os.PathLike)) or not all(isinstance(item, (tuple, list)) and len(item) == 2
                                                          for item in loras):
        raise ValueError(f"loras must be a sequence of (path, scale) pairs, got {loras!r}")
    loras = [(path, check_real("scale", scale)) for path, scale in loras]
    targets, params = linear_targets(model, weight_map), param_targets(model, weight_map)
    terms: dict[str, list[_Term]] = {}
    problems = []
    for path, scale in loras:
        layers, deltas, found = _checked_file(path, targets, params, original, what)
        if found:
            problems.append(f"{os.fspath(path)}: " + "; ".join(found))
        for key, term in _terms(layers, deltas, scale):
            terms.setdefault(key, []).append(term)
    if problems:
        raise ValueError(f"no LoRA merged into the {what}, nothing changed:\n" + "\n".join(problems))
    variables = dict(nnx.to_flat_state(nnx.state(model)))
    for key, key_terms in terms.items():
        target = params[key]
        variable = variables[target.path]
        compute = np.float64 if variable.get_value().dtype == np.float64 else np.float32
        _add_rounded(variable, target.transform.apply(sum(term.value(compute) for term in key_terms)))
    return len({_module(key) for key in terms})
