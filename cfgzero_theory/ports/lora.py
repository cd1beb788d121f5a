"""LoRA files merged into the linear layers of a loaded model: diffusers / PEFT, kohya and original-layout keys.

The formula
-----------
A LoRA pair for a linear layer ``y = W x + b`` (``W`` of shape ``(out, in)``, torch's layout)
is a down matrix ``A (r, in)`` and an up matrix ``B (out, r)``, optionally an up bias
``β (out,)`` and a number ``α``.  Merged with strength ``s``::

    W' = W + s · f · B A,        b' = b + s · f · β,        f = α / r

(``r`` the rows of ``A``; ``f = α / √r`` when the file's diffusers metadata sets
``use_rslora``).  A pair without ``α`` has ``f = 1``: diffusers loads such a file with PEFT's
``lora_alpha = r``.  The terms are computed in float32 (float64 for float64 weights), summed,
added to the weight and rounded **once** to the weight's dtype; several files merged in one
:func:`merge_lora` call add all their terms before that one rounding.  ``ΔW = s · f · B A``
is in the diffusers layout: the model's :class:`~cfgzero_theory.ports.loading.WeightMap`
maps ``<module>.weight`` to our state path and its row's transform
(:data:`~cfgzero_theory.ports.loading.LINEAR`: a transpose) to our kernel's layout, as it does
for the weight itself.

Targets: the model's linear layers, i.e. every parameter whose weight-map row has the
``LINEAR`` transform; each is named by its diffusers module (``<module>.weight`` being its
diffusers key, e.g. ``transformer_blocks.0.attn.to_q``).

Key formats
-----------
Every key ends in one of these suffixes:

* ``.lora_A.weight``, ``.lora_down.weight`` or ``.lora.down.weight``: ``A``;
* ``.lora_B.weight``, ``.lora_up.weight`` or ``.lora.up.weight``: ``B``;
* ``.lora_B.bias``: ``β``;  ``.alpha``: ``α`` (a tensor holding one number).

What precedes the suffix names the layer, read by its prefix:

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
  ambiguous (``to_out_0`` is ``to_out.0``), so the name is resolved by writing every module
  name the model knows — its diffusers modules and its original layout's modules — the same
  way; a form two different names share is refused as ambiguous.
* **original layout** (BFL / ComfyUI): ``diffusion_model.<name>``, a module of the model's
  original checkpoint layout (Flux: ``double_blocks.0.img_attn.qkv``).  How such a pair
  becomes diffusers pairs is model-specific (Flux splits a fused qkv projection into three
  diffusers modules), so the model passes an :class:`OriginalLayout` hook; without one these
  keys are refused.  Kohya names that resolve to an original module go through it as well.

Errors
------
Everything is checked before any weight changes, and one ``ValueError`` lists the problems
of all the files (a limited number of keys each): keys that match no format; keys naming no
linear layer of the model; original-layout keys without a hook; ambiguous kohya names; ``A``
without ``B`` (or ``B`` without ``A``, or ``α`` / ``β`` alone); one pair given twice (as
``lora_A`` and ``lora_down``); tensors that are not floating point; wrong shapes (``A`` not
``(r, in)``, ``B`` not ``(out, r)``, ``ΔW`` not the weight's shape, ``β`` not ``(out,)``,
``α`` not one finite number); an up bias for a layer without bias; two pairs for one layer in
one file; metadata that does not fit.  A file that cannot be read as safetensors (never
pickle) raises ``ValueError`` naming it; a missing file ``FileNotFoundError``.

Public API
----------
* :func:`merge_lora` ``(model, weight_map, loras, *, original=None, what="model") -> int``:
  ``loras`` a sequence of ``(path, scale)``; merges in place, returns the number of linear
  layers changed;
* :func:`lora_layers` ``(path, targets, *, original=None, what="model") -> list[LoraLayer]``:
  one file's pairs, normalised to diffusers modules and checked (nothing changes);
* :func:`read_lora_file` ``(path) -> (tensors, peft_config)``;
* :func:`linear_targets` ``(model, weight_map) -> {diffusers module: LoraTarget}``;
* :class:`LoraLayer` (one normalised pair), :class:`LoraTarget` (one linear layer of the
  model), :class:`OriginalLayout` (the per-model hook for original-layout keys).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from safetensors import SafetensorError

from cfgzero_theory.ports.loading import FLOAT_DTYPES, LINEAR, Transform, WeightMap, open_safetensors
from cfgzero_theory.validation import check_real, limited_list

__all__ = [
    "METADATA_KEY", "LoraLayer", "LoraTarget", "OriginalLayout", "linear_targets", "lora_layers", "merge_lora",
    "read_lora_file",
]

METADATA_KEY = "lora_adapter_metadata"
"""The safetensors metadata entry in which diffusers saves PEFT's ``LoraConfig`` (JSON)."""
_CONFIG_PREFIX = "transformer."
_PEFT_DEFAULT_ALPHA = 8  # LoraConfig's defaults, which diffusers gets for keys its metadata lacks
_PEFT_DEFAULT_RANK = 8

_SUFFIXES = (
    (".lora_A.weight", "down"), (".lora_down.weight", "down"), (".lora.down.weight", "down"),
    (".lora_B.weight", "up"), (".lora_up.weight", "up"), (".lora.up.weight", "up"),
    (".lora_B.bias", "up_bias"), (".alpha", "alpha"),
)
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


class LoraTarget(NamedTuple):
    """One linear layer of the model: its kernel's state path (a tuple, as ``nnx`` flat states
    name it), the weight's diffusers shape ``(out, in)``, the weight-map row's transform and the
    bias's state path (``None`` without bias)."""

    weight: tuple
    shape: tuple[int, int]
    transform: Transform
    bias: tuple | None


class OriginalLayout(NamedTuple):
    """A model's hook for LoRA keys in its original checkpoint layout (``diffusion_model.*``).

    ``modules``: the linear modules of the original layout (e.g. Flux's
    ``double_blocks.0.img_attn.qkv``): a name outside it is reported as naming no layer, and
    kohya names are resolved against it too.  ``to_diffusers(layer)``: the
    :class:`LoraLayer` of an original module (``layer.module`` its original name) as a list of
    diffusers layers — e.g. a fused qkv pair ``B (3D, r)`` as three layers sharing ``A``, each
    with a ``D``-row slice of ``B`` (and of ``β``): ``layer._replace(module=..., up=...,
    up_bias=...)``.  The pieces keep ``layer.factor``; they are checked like any other layer.
    """

    modules: frozenset[str]
    to_diffusers: Callable[[LoraLayer], Sequence[LoraLayer]]


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
    """``(stem, role)`` of a key, role one of ``down``, ``up``, ``up_bias``, ``alpha``; ``None``
    when the key has no LoRA suffix."""
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
    """``{name with dots as underscores: (module, is_original)}``; ``None`` for a form that two
    different names share (a name in both layouts counts once, as a diffusers module)."""
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


_UNKNOWN = "keys matching no LoRA key format (…lora_A/lora_B/lora_down/lora_up.weight, .lora_B.bias, .alpha)"
_NO_LAYER = "pairs naming no linear layer of the {what}"
_NO_HOOK = "original-layout pairs (diffusion_model.*), which the {what} has no conversion for"
_AMBIGUOUS = "kohya names that several module names of the {what} write alike"
_UNPAIRED = "incomplete pairs"
_TWICE = "pairs given twice"
_DTYPE = "tensors that are not float16, bfloat16, float32 or float64 (an alpha may be an integer)"
_SHAPE = "wrong shapes:"
_DOUBLE = "layers with more than one pair in the file"
_METADATA = "metadata that does not fit:"
_ROLE_NAMES = {"down": "A", "up": "B", "up_bias": "up bias", "alpha": "alpha"}


def _resolve(fmt: str, name: str, targets: Mapping[str, LoraTarget], original: OriginalLayout | None,
             kohya: Mapping[str, tuple[str, bool] | None]) -> tuple[str, bool] | str:
    """``(module, is_original)`` for a stem's name, or the kind of problem that stops it."""
    if fmt == "diffusers":
        return (name, False) if name in targets else _NO_LAYER
    if fmt == "original":
        if original is None:
            return _NO_HOOK
        return (name, True) if name in original.modules else _NO_LAYER
    if name not in kohya:
        return _NO_LAYER
    return kohya[name] or _AMBIGUOUS


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


def _checked_layers(path, targets: Mapping[str, LoraTarget], original: OriginalLayout | None,
                    what: str) -> tuple[list[LoraLayer], list[str]]:
    """One file's diffusers layers and its problems (see the module docstring)."""
    tensors, config = read_lora_file(path)
    problems = _Problems(what)
    if config.get("use_dora"):
        problems.add(_METADATA, "use_dora (DoRA is not supported)")
    kohya = _kohya_index(targets, original.modules if original else ())
    layers: list[LoraLayer] = []
    for stem, roles in _group(tensors, problems).items():
        fmt, name = _stem_format(stem)
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
            layers += list(original.to_diffusers(layer)) if is_original else [layer]
    seen: set[str] = set()
    fitting = []
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
    return fitting, problems.lines()


def lora_layers(path: str | os.PathLike, targets: Mapping[str, LoraTarget], *, original: OriginalLayout | None = None,
                what: str = "model") -> list[LoraLayer]:
    """The pairs of one LoRA file as diffusers :class:`LoraLayer` s, checked against ``targets``
    (:func:`linear_targets`); nothing is changed.  ``original``: the model's hook for
    original-layout keys; ``what`` names the model in messages.  Raises ``ValueError`` listing
    every problem of the file (see the module docstring)."""
    layers, problems = _checked_layers(path, targets, original, what)
    if problems:
        raise ValueError(f"{os.fspath(path)} does not fit the {what}: " + "; ".join(problems))
    return layers


# ----------------------------------------------------------------------------- merging


def _add_rounded(variable: nnx.Variable, delta: np.ndarray) -> None:
    """``variable ← round(variable + delta)``: the sum in ``delta``'s dtype, rounded once to the
    variable's dtype, placed as the variable was (same devices, same sharding, and uncommitted
    when it was: a committed array would be a new input signature for ``jit``)."""
    value = variable.get_value()
    merged = (value.astype(delta.dtype) + delta).astype(value.dtype)
    variable.set_value(merged if merged.sharding == value.sharding else jax.device_put(merged, value.sharding))


def _merge_layer(params: Mapping[tuple, nnx.Variable], target: LoraTarget,
                 terms: Sequence[tuple[LoraLayer, float]]) -> None:
    """Add ``Σ s · f · B A`` (and ``Σ s · f · β``) to one linear layer, rounding once."""
    weight = params[target.weight]
    compute = np.float64 if weight.get_value().dtype == np.float64 else np.float32
    delta = sum(np.asarray(scale * layer.factor, compute) * (layer.up.astype(compute) @ layer.down.astype(compute))
                for layer, scale in terms)
    _add_rounded(weight, target.transform.apply(delta))
    biases = [(layer.up_bias, scale * layer.factor) for layer, scale in terms if layer.up_bias is not None]
    if biases:
        _add_rounded(params[target.bias], sum(np.asarray(c, compute) * b.astype(compute) for b, c in biases))


def merge_lora(model: nnx.Module, weight_map: WeightMap, loras: Sequence[tuple[str | os.PathLike, float]], *,
               original: OriginalLayout | None = None, what: str = "model") -> int:
    """Merge LoRA files into ``model``'s linear layers in place: ``W ← W + Σ s · f · B A``.

    Args:
      model: the loaded NNX module (its parameters may be on any devices, sharded or not; the
        merged ones keep their dtype, shape and placement, so compiled functions taking
        ``nnx.state(model)`` as input are not recompiled).
      weight_map: the model's diffusers ↔ ours table (:func:`linear_targets` finds the layers).
      loras: ``(path, scale)`` pairs, ``scale`` (``s``) a finite real number; all their terms
        for one layer are summed before the one rounding to the weight's dtype.
      original: the model's :class:`OriginalLayout` hook for original-layout keys (``None``:
        such keys are refused).
      what: the model's name in messages (``"SD3 transformer"``).

    Returns the number of linear layers changed.  Raises ``ValueError`` (a missing file
    ``FileNotFoundError``) before changing anything when a scale or any file does not fit; the
    message lists every file's problems (see the module docstring).
    """
    if isinstance(loras, (str, os.PathLike)) or not all(isinstance(item, (tuple, list)) and len(item) == 2
                                                          for item in loras):
        raise ValueError(f"loras must be a sequence of (path, scale) pairs, got {loras!r}")
    loras = [(path, check_real("scale", scale)) for path, scale in loras]
    targets = linear_targets(model, weight_map)
    terms: dict[str, list[tuple[LoraLayer, float]]] = {}
    problems = []
    for path, scale in loras:
        layers, found = _checked_layers(path, targets, original, what)
        if found:
            problems.append(f"{os.fspath(path)}: " + "; ".join(found))
        for layer in layers:
            terms.setdefault(layer.module, []).append((layer, scale))
    if problems:
        raise ValueError(f"no LoRA merged into the {what}, nothing changed:\n" + "\n".join(problems))
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for module, module_terms in terms.items():
        _merge_layer(params, targets[module], module_terms)
    return len(terms)
