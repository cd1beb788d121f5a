"""Loading a diffusers or transformers model folder (``config.json`` + safetensors) into a Flax NNX module.

The one mechanism behind :func:`~cfgzero_theory.sd3.weights.load_sd3_transformer`,
:func:`~cfgzero_theory.ports.autoencoder.load_vae` and :func:`~cfgzero_theory.ports.clip.load_clip_text_encoder`;
each of those supplies only its config class, its module class, its weight table and (for a
transformers folder) ``folder_kind=TRANSFORMERS``.

Public API
----------
* :class:`Transform` and the generic transforms :data:`IDENTITY`, :data:`LINEAR`,
  :data:`CONV`; the row helpers :func:`linear_rows`, :func:`norm_rows`, :func:`conv_rows`;
* :class:`WeightMap` — a declarative table of rows ``(diffusers key template, our state path
  template, transform name)`` with ``to_ours(key)`` and ``to_diffusers(path)``;
* :func:`read_diffusers_config` ``(folder, class_name) -> dict`` and :func:`config_kwargs`
  ``(config_class, config, class_name) -> dict`` (for ``from_diffusers_config``);
* :func:`weight_files` ``(folder, variant, weights_name=...)`` and :func:`open_safetensors` ``(path)``;
* :class:`FolderKind` and its two values :data:`DIFFUSERS` (the default) and :data:`TRANSFORMERS`;
  :data:`TRANSFORMERS_METADATA_KEYS` for ``config_kwargs(..., ignore=...)``;
* :func:`load_module` ``(folder, module_class, config_class, weight_map, *, ..., folder_kind=DIFFUSERS,
  sharding=None, repeats=None)``; :func:`abstract_module` ``(module_class, config)``: a module's
  structure and shapes without initialising (or tracing the initialisation of) any parameter;
  :func:`module_graphdef` ``(model, module_class)``;
* :data:`FLOAT_DTYPES`: the stored dtypes a parameter may have.

Templates
---------
``{name}`` in a template stands for a placeholder whose regular expression the
:class:`WeightMap` is given (e.g. ``{"i": r"\\d+", "x": "[qkv]"}``); the value matched on one
side fills the same placeholder on the other.

The folder
----------
A diffusers folder (:data:`DIFFUSERS`): ``config.json`` (a JSON object whose ``_class_name`` is
the expected diffusers class; its keys go to ``config_class.from_diffusers_config``) and either
``diffusion_pytorch_model.safetensors`` or a sharded
``diffusion_pytorch_model.safetensors.index.json`` with its shards (a ``variant`` such as
``"fp16"`` inserts ``.fp16`` before ``.safetensors``, as diffusers does).  A transformers
folder (:data:`TRANSFORMERS`) is the same with ``model`` for ``diffusion_pytorch_model``, a
``config.json`` whose ``architectures`` list holds the expected class instead of
``_class_name``, and ``config_class.from_transformers_config`` reading it.  Safetensors only:
a folder holding only pickled ``.bin`` weights is refused.

Checks and errors
-----------------
All ``ValueError`` (a nonexistent folder is ``FileNotFoundError``): no ``config.json`` or an
unreadable one, a wrong ``_class_name`` (or ``architectures``), missing weight files or
shards, a file that is not readable safetensors (named), and — gathered into one message —
keys listed by the index but absent from their shard, keys stored twice, tensors stored in a
dtype that is not floating (``key 'x' is stored as I32``; parameters must be one of
:data:`FLOAT_DTYPES`: float16, bfloat16, float32, float64), a config whose number of
repeated blocks (``repeats``, e.g. ``num_layers``) differs from the blocks in the file,
missing keys, unexpected keys (no row matches, or the row's target does not exist in the
model built from the config) and wrongly shaped tensors (``key 'x': expected shape (16, 4,
2, 2), found (16, 4, 3, 3)``, shapes in the file's layout).  All checks run on the headers
before any tensor data is read, in two rounds: the header-only problems (shards, duplicates,
dtypes, block counts) are checked first and reported before the model's structure is built —
so a config asking for 200 000 layers against a file of 24 fails at once — and the rest once
the structure is known.

Memory
------
Tensors are read one at a time with ``safetensors.safe_open(framework="numpy")``, transformed,
cast (``dtype``; ``None`` keeps the stored dtype, bf16 included) and placed before the next is
read, so the host never holds a second full copy.  They are placed on the default device, or,
given ``sharding`` (a :class:`~cfgzero_theory.ports.sharding.ParamSharding`), put from the host
array straight onto the mesh with ``jax.device_put(array, sharding.sharding_for(path,
shape))``: each device receives only its slice of a split tensor (and the whole of a small,
replicated one), so no device ever holds the full set of weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from cfgzero_theory.ports.sharding import ParamSharding
from cfgzero_theory.validation import check_float_dtype, limited_list

__all__ = [
    "CONV", "DIFFUSERS", "FLOAT_DTYPES", "IDENTITY", "LINEAR", "TRANSFORMERS", "TRANSFORMERS_METADATA_KEYS", "FolderKind",
    "Transform", "WeightMap", "abstract_module", "config_kwargs", "conv_rows", "linear_rows", "load_module", "norm_rows",
    "open_safetensors", "read_diffusers_config", "weight_files",
]

WEIGHTS_NAME = "diffusion_pytorch_model"
TRANSFORMERS_METADATA_KEYS = frozenset({"architectures", "model_type", "transformers_version", "dtype", "torch_dtype"})
"""Keys every transformers ``config.json`` may carry that say nothing about the numerics."""

FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
"""The safetensors dtypes a parameter may be stored in (header name -> NumPy name)."""

Row = tuple[str, str, str]


class FolderKind(NamedTuple):
    """Which library wrote a model folder: its name (for messages), the stem of its weight
    files, the ``config.json`` key naming the model class and the config class's constructor
    that reads ``config.json``."""

    library: str
    weights_name: str
    class_key: str
    from_config: str


DIFFUSERS = FolderKind("diffusers", WEIGHTS_NAME, "_class_name", "from_diffusers_config")
"""``diffusion_pytorch_model[.variant].safetensors[.index.json]``, ``_class_name`` in ``config.json``."""
TRANSFORMERS = FolderKind("transformers", "model", "architectures", "from_transformers_config")
"""``model[.variant].safetensors[.index.json]``, ``architectures`` in ``config.json``."""


class Transform(NamedTuple):
    """How a stored tensor becomes ours: ``apply(array)`` and the stored shape expected for
    our parameter shape, ``source_shape(our_shape, config)``."""

    apply: Callable[[np.ndarray], np.ndarray]
    source_shape: Callable[[tuple, Any], tuple]


IDENTITY = Transform(lambda a: a, lambda shape, cfg: tuple(shape))
"""Stored as is."""
LINEAR = Transform(lambda a: a.T, lambda shape, cfg: tuple(shape)[::-1])
"""torch ``Linear.weight`` ``(out, in)`` -> NNX ``kernel`` ``(in, out)``."""
CONV = Transform(lambda a: a.transpose(2, 3, 1, 0), lambda shape, cfg: (shape[3], shape[2], shape[0], shape[1]))
"""torch ``Conv2d.weight`` ``(out, in, kh, kw)`` -> HWIO ``(kh, kw, in, out)``."""


def _param_rows(diffusers: str, ours: str, weight: str, kind: str) -> tuple[Row, ...]:
    return ((f"{diffusers}.weight", f"{ours}.{weight}", kind), (f"{diffusers}.bias", f"{ours}.bias", "identity"))


def linear_rows(diffusers: str, ours: str) -> tuple[Row, ...]:
    """Rows for a torch ``Linear`` -> NNX ``Linear`` (``kernel`` transform ``"linear"``, ``bias``)."""
    return _param_rows(diffusers, ours, "kernel", "linear")


def norm_rows(diffusers: str, ours: str) -> tuple[Row, ...]:
    """Rows for an affine norm (torch ``weight`` -> our ``scale``, ``bias``)."""
    return _param_rows(diffusers, ours, "scale", "identity")


def conv_rows(diffusers: str, ours: str) -> tuple[Row, ...]:
    """Rows for a torch ``Conv2d`` -> HWIO ``kernel`` (transform ``"conv"``) and ``bias``."""
    return _param_rows(diffusers, ours, "kernel", "conv")


def _template_regex(template: str, placeholders: Mapping[str, str]) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(
        re.escape(part) if k % 2 == 0 else f"(?P<{part}>{placeholders[part]})" for k, part in enumerate(parts)
    )
    return re.compile(pattern)


class WeightMap:
    """A declarative mapping between diffusers tensor names and our NNX state paths.

    Args:
      rows: ``(diffusers key template, our state path template, transform name)`` rows; the
        first row that matches wins.
      placeholders: ``{placeholder: regular expression}`` for the ``{name}`` fields of the templates.
      transforms: ``{transform name: Transform}`` for the third column.

    Raises ``KeyError`` at construction for an unknown placeholder or transform name.
    """

    def __init__(self, rows: Iterable[Row], placeholders: Mapping[str, str], transforms: Mapping[str, Transform]):
        self.rows = tuple(rows)
        self._rules = tuple(
            (_template_regex(src, placeholders), src, _template_regex(dst, placeholders), dst, transforms[kind])
            for src, dst, kind in self.rows
        )

    def to_ours(self, key: str) -> tuple[str, Transform] | None:
        """``(our state path, transform)`` for a diffusers key, or ``None`` when no row matches."""
        found = self.match(key)
        return None if found is None else found[:2]

    def match(self, key: str) -> tuple[str, Transform, dict[str, str]] | None:
        """``(our state path, transform, {placeholder: matched text})`` for a diffusers key, or
        ``None`` when no row matches (the placeholders say e.g. which block a key belongs to)."""
        for src_re, _, _, dst, transform in self._rules:
            match = src_re.fullmatch(key)
            if match:
                fields = match.groupdict()
                return dst.format(**fields), transform, fields
        return None

    def to_diffusers(self, path: str) -> str:
        """The diffusers key for one of our state paths (for naming missing keys)."""
        for _, src, dst_re, _, _ in self._rules:
            match = dst_re.fullmatch(path)
            if match:
                return src.format(**match.groupdict())
        return f"<no diffusers key maps to {path}>"  # pragma: no cover - the tables cover the models


# ----------------------------------------------------------------------------- folder


def _class_error(config: Mapping, class_name: str, class_key: str) -> str | None:
    """Why ``config`` is not a config of ``class_name`` (``None`` when it is): a diffusers
    ``_class_name`` must equal it, a transformers ``architectures`` list must contain it."""
    found = config.get(class_key)
    if class_key == "architectures":
        ok = isinstance(found, list) and class_name in found
        return None if ok else f"architectures is {found!r}, expected [{class_name!r}]"
    return None if found == class_name else f"{class_key} is {found!r}, expected {class_name!r}"


def read_diffusers_config(
    folder: str, class_name: str, *, what: str | None = None, folder_kind: FolderKind = DIFFUSERS,
) -> dict:
    """The parsed ``config.json`` of a diffusers model folder whose ``_class_name`` must be
    ``class_name`` (of a transformers folder, ``folder_kind=TRANSFORMERS``: whose
    ``architectures`` must contain it); ``what`` names the folder in the message for a missing
    file (e.g. ``"vae/"``).  Raises ``ValueError`` for a missing or unreadable file, a
    non-object, or a wrong ``_class_name`` / ``architectures``."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no config.json: expected a {folder_kind.library} {what or class_name} folder")
    try:
        with open(path, encoding="utf-8") as file:
            raw = json.load(file)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable JSON config: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    error = _class_error(raw, class_name, folder_kind.class_key)
    if error:
        raise ValueError(f"{path}: {error}")
    return raw


def config_kwargs(config_class, config: Mapping, class_name: str, *, ignore: Iterable[str] = ()) -> dict:
    """The keyword arguments of the dataclass ``config_class`` found in a diffusers config dict.

    Keys starting with ``_`` are metadata; ``_class_name``, when present, must be
    ``class_name``.  Keys in ``ignore`` (for a transformers config: its metadata keys
    :data:`TRANSFORMERS_METADATA_KEYS` and training-only keys) are dropped — ``architectures``,
    when ignored and present, must still contain ``class_name``.  Any other key that is not a
    field raises ``ValueError`` naming it; missing keys are left to the dataclass defaults.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a mapping (a parsed config.json), got {type(config).__name__}")
    found = config.get("_class_name", class_name)
    if found != class_name:
        raise ValueError(f"_class_name must be {class_name!r}, got {found!r}")
    ignore = frozenset(ignore)
    if "architectures" in ignore and "architectures" in config:
        error = _class_error(config, class_name, "architectures")
        if error:
            raise ValueError(error)
    known = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(key for key in config if not str(key).startswith("_") and key not in known and key not in ignore)
    if unknown:
        raise ValueError(f"unsupported {class_name} config key(s) {unknown}")
    return {key: value for key, value in config.items() if key in known}


def weight_files(folder: str, variant: str | None, weights_name: str = WEIGHTS_NAME) -> dict[str, set[str] | None]:
    """``{shard path: keys the index assigns to it (None for a single file)}`` for the weights
    ``{weights_name}[.{variant}].safetensors`` (or its ``.index.json`` and shards)."""
    name = f"{weights_name}.{variant}.safetensors" if variant else f"{weights_name}.safetensors"
    single = os.path.join(folder, name)
    index = os.path.join(folder, f"{name}.index.json")
    if os.path.isfile(single):
        return {single: None}
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as file:
                weight_map = json.load(file)["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to file names")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a readable safetensors index: {err}") from err
        shards: dict[str, set[str]] = {}
        for key, shard in weight_map.items():
            if os.path.basename(shard) != shard:
                raise ValueError(f"{index}: shard name {shard!r} (for {key!r}) must be a plain file name")
            shards.setdefault(os.path.join(folder, shard), set()).add(key)
        absent = sorted(os.path.basename(path) for path in shards if not os.path.isfile(path))
        if absent:
            raise ValueError(f"{index} lists shard(s) missing from {folder}: {limited_list(absent)}")
        return shards
    pickled = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    hint = f" (found {limited_list(pickled)}: pickled weights are never loaded)" if pickled else ""
    raise ValueError(f"{folder} has neither {name} nor {name}.index.json{hint}")


def open_safetensors(path: str):
    """``safe_open(path, framework="numpy")``, a failure raised as ``ValueError`` naming the file."""
    try:
        return safe_open(path, framework="numpy")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err


# ----------------------------------------------------------------------------- loading


class _AbstractRngs:
    """Stands in for ``nnx.Rngs`` while a module is built for its structure and shapes only.

    Every stream (``rngs.params()``, ``rngs()``) returns the same key and nothing is counted.
    A real ``nnx.Rngs`` inside ``nnx.eval_shape`` updates a traced counter for every
    parameter, and flax asks each new traced value for its ``sharding``, an ``AttributeError``
    whose message JAX builds by walking every equation traced so far: building an SD3
    transformer that way costs time quadratic in ``num_layers`` (measured: 1.1 s at 10 layers,
    14 s at 40 of a tiny width).  The values drawn here are never used.
    """

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self) -> jax.Array:
        return jax.random.key(0)


def module_graphdef(model, module_class) -> nnx.GraphDef:
    """The ``nnx.GraphDef`` of ``model``, a ``module_class`` instance or already its graph
    definition (what the sampler adapters close over); ``ValueError`` naming the class otherwise."""
    if isinstance(model, nnx.GraphDef):
        return model
    if isinstance(model, module_class):
        return nnx.graphdef(model)
    raise ValueError(f"model must be a {module_class.__name__} or its nnx.GraphDef, got {type(model).__name__}")


def abstract_module(module_class: Callable[..., nnx.Module], config, **kwargs) -> nnx.Module:
    """``module_class(config, rngs=..., **kwargs)`` with abstract arrays (``nnx.eval_shape``):
    the structure, shapes and dtypes of the module, no parameter initialised, in time linear in
    the number of parameters (see :class:`_AbstractRngs`)."""
    return nnx.eval_shape(lambda: module_class(config, rngs=_AbstractRngs(), **kwargs))


class _Header(NamedTuple):
    """One stored tensor as its safetensors header describes it."""

    path: str
    shape: tuple[int, ...]
    dtype: str


def _read_headers(files: Mapping[str, set[str] | None]) -> tuple[dict[str, _Header], list[str], list[str]]:
    """``({key: header}, keys listed by an index but absent from their shard, keys stored twice)``."""
    headers: dict[str, _Header] = {}
    missing_from_shard, duplicated = [], []
    for path, listed in files.items():
        with open_safetensors(path) as f:
            keys = list(f.keys())
            if listed is not None:
                missing_from_shard += [f"{key} (in {os.path.basename(path)})" for key in sorted(listed - set(keys))]
            for key in keys:
                if key in headers:
                    duplicated.append(key)
                    continue
                try:
                    tensor = f.get_slice(key)
                    headers[key] = _Header(path, tuple(tensor.get_shape()), str(tensor.get_dtype()))
                except SafetensorError as err:
                    raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    return headers, missing_from_shard, sorted(set(duplicated))


def _repeat_problems(headers: Mapping[str, _Header], weight_map: WeightMap, config,
                     repeats: Mapping[str, tuple[str, Callable[[Any], int]]]) -> tuple[list[str], list[str]]:
    """Where the config's number of repeated blocks differs from the blocks the file holds:
    ``(problems, keys of blocks beyond the config's count)``."""
    indices: dict[str, dict[str, int]] = {placeholder: {} for placeholder in repeats}  # placeholder -> {key: index}
    for key in headers:
        matched = weight_map.match(key)
        if matched is not None:
            for placeholder, value in matched[2].items():
                if placeholder in indices and value.isdigit():
                    indices[placeholder][key] = int(value)
    problems, beyond = [], []
    for placeholder, (what, count) in repeats.items():
        expected, found = count(config), indices[placeholder]
        largest = max(found.values(), default=-1)
        if largest + 1 != expected:
            example = next((key for key, index in found.items() if index == largest), None)
            held = f"blocks 0 … {largest} (e.g. {example!r})" if example is not None else "no such block"
            problems.append(f"{what} = {expected} in the config, but the weights hold {held}")
            beyond += [key for key, index in found.items() if index >= expected]
    return problems, beyond


def load_module(
    folder: str | os.PathLike,
    module_class: Callable[..., nnx.Module],
    config_class: Any,
    weight_map: WeightMap,
    *,
    class_name: str,
    what: str,
    dtype=None,
    variant: str | None = None,
    optional: Mapping[str, Callable[[Any], np.ndarray]] | None = None,
    folder_kind: FolderKind = DIFFUSERS,
    sharding: ParamSharding | None = None,
    repeats: Mapping[str, tuple[str, Callable[[Any], int]]] | None = None,
    keep_float32: Collection[str] = (),
) -> nnx.Module:
    """Load a diffusers (or transformers) model folder into ``module_class(config, rngs=...)``.

    Args:
      folder: the folder holding ``config.json`` and the safetensors weights.
      module_class: called as ``module_class(config, rngs=..., param_dtype=...)`` (only abstractly,
        :func:`abstract_module`: no parameter is initialised).
      config_class: its ``from_diffusers_config(dict)`` builds the config (for a transformers
        folder ``from_transformers_config(dict)``: ``folder_kind.from_config``).
      weight_map: maps every stored tensor to a state path of the module.
      class_name: the diffusers ``_class_name`` the config must carry (a transformers config:
        one of its ``architectures``); also used in messages.
      what: how the folder is named in messages (e.g. ``"vae/"``).
      dtype: cast every tensor to this floating dtype (except ``keep_float32``); ``None`` keeps the
        stored dtypes.
      variant: the weight variant (``"fp16"`` reads ``diffusion_pytorch_model.fp16.safetensors``).
      optional: ``{our path: compute(config) -> array}`` for parameters a checkpoint may
        omit; when absent from the file they are computed (and cast).
      folder_kind: :data:`DIFFUSERS` (default) or :data:`TRANSFORMERS`: the weight file stem,
        the config constructor and the library named in messages.
      sharding: a :class:`~cfgzero_theory.ports.sharding.ParamSharding` to lay every parameter
        out on its mesh as it is read; ``None`` places everything on the default device.
      repeats: ``{placeholder: (config key, count(config))}`` for the weight map's placeholders
        that number repeated blocks (e.g. ``{"i": ("num_layers", lambda c: c.num_layers)}``):
        the keys of the file must number exactly ``count(config)`` of them (indices ``0 …
        count − 1``), checked on the headers before the model's structure is built.
      keep_float32: module names whose parameters a ``dtype`` cast leaves in float32 — the
        library's ``_keep_in_fp32_modules``, with its rule: a stored key is kept when one of
        these names is one of its dot-separated parts (``"norm2"`` keeps
        ``blocks.0.norm2.weight``); such tensors are cast to float32 instead of ``dtype``.

    Returns the populated module.  Raises as the module docstring says.
    """
    if sharding is not None and not isinstance(sharding, ParamSharding):
        raise ValueError(f"sharding must be a cfgzero_theory.ports.sharding.ParamSharding or None, got {sharding!r}")
    folder = os.fspath(folder)
    if not os.path.exists(folder):
        raise FileNotFoundError(f"no such folder: {folder}")
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is not a folder: expected a {folder_kind.library} {what} folder")
    cast = None if dtype is None else check_float_dtype("dtype", dtype)
    if cast is not None and not np.issubdtype(cast, np.floating) and cast != np.dtype(jnp.bfloat16):
        raise ValueError(f"dtype must be a floating dtype, got {cast}")
    optional = dict(optional or {})
    raw_config = read_diffusers_config(folder, class_name, what=what, folder_kind=folder_kind)
    config = getattr(config_class, folder_kind.from_config)(raw_config)
    files = weight_files(folder, variant, folder_kind.weights_name)

    def fail(problems):
        raise ValueError(f"{folder} does not match {class_name} with config {config}: " + "; ".join(problems))

    # round 1: headers only, before anything is built — shards, duplicates, dtypes, block counts
    headers, missing_from_shard, duplicated = _read_headers(files)
    problems = []
    if missing_from_shard:
        problems.append(f"keys listed in the index but absent from their shard {limited_list(missing_from_shard)}")
    if duplicated:
        problems.append(f"keys stored in more than one shard {limited_list(duplicated)}")
    not_float = [f"key {key!r} is stored as {h.dtype}" for key, h in sorted(headers.items()) if h.dtype not in FLOAT_DTYPES]
    if not_float:
        problems.append("parameters must be stored as float16, bfloat16, float32 or float64: "
                        + limited_list(not_float, str)[1:-1])
    repeat_problems, beyond = _repeat_problems(headers, weight_map, config, repeats or {})
    problems += repeat_problems
    if problems:
        unexpected = sorted({key for key in headers if weight_map.to_ours(key) is None} | set(beyond))
        fail(problems + ([f"unexpected keys {limited_list(unexpected)}"] if unexpected else []))

    # round 2: the model's structure — match every key, check every shape
    graphdef, abstract = nnx.split(abstract_module(module_class, config))
    targets = {".".join(str(part) for part in path): (path, var) for path, var in nnx.to_flat_state(abstract)}
    plan: list[tuple[str, str, str, Transform]] = []  # (file, key, target, transform)
    filled: set[str] = set()
    unexpected, shape_errors = [], []
    for key, header in headers.items():
        mapped = weight_map.to_ours(key)
        if mapped is None or mapped[0] not in targets:
            unexpected.append(key)
            continue
        target, transform = mapped
        want = transform.source_shape(targets[target][1].shape, config)
        if header.shape != want:
            shape_errors.append(f"key {key!r}: expected shape {want}, found {header.shape}")
            continue
        filled.add(target)
        plan.append((header.path, key, target, transform))
    missing = sorted(weight_map.to_diffusers(t) for t in targets if t not in filled and t not in optional)
    problems = []
    if missing:
        problems.append(f"missing keys {limited_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {limited_list(sorted(unexpected))}")
    problems += shape_errors
    if problems:
        fail(problems)

    keep_float32 = frozenset(keep_float32)

    def place(target: str, array: np.ndarray, key: str | None = None) -> jax.Array:
        wanted = cast
        if cast is not None and key is not None and keep_float32.intersection(key.split(".")):
            wanted = np.dtype(np.float32)
        if wanted is not None and array.dtype != wanted:
            array = array.astype(wanted)
        array = np.ascontiguousarray(array)
        return jax.device_put(array, None if sharding is None else sharding.sharding_for(target, array.shape))

    # tensor data, one tensor at a time
    values: dict[str, jax.Array] = {}
    for path in files:
        entries = [entry for entry in plan if entry[0] == path]
        if not entries:
            continue
        with open_safetensors(path) as f:
            for _, key, target, transform in entries:
                try:
                    array = f.get_tensor(key)
                except (SafetensorError, ValueError, TypeError) as err:
                    raise ValueError(f"{path} is not a readable safetensors file (tensor {key!r}): {err}") from err
                values[target] = place(target, transform.apply(array), key)
                del array
    for target, compute in optional.items():
        if target in targets and target not in values:
            values[target] = place(target, np.asarray(compute(config)))

    # rebuild the structure in the weights' dtype: modules keep static dtypes (nnx.Embed's output
    # dtype is fixed at construction), which must not silently upcast bf16 weights to float32
    param_dtype = _dominant_float_dtype(values.values())
    if param_dtype is not None and param_dtype != jnp.float32:
        graphdef = nnx.graphdef(abstract_module(module_class, config, param_dtype=param_dtype))
    state = nnx.from_flat_state([(path, var.replace(values[name])) for name, (path, var) in targets.items()])
    return nnx.merge(graphdef, state)


def _dominant_float_dtype(arrays) -> np.dtype | None:
    """The floating dtype holding the most elements among ``arrays`` (``None`` if none is floating)."""
    counts: dict[np.dtype, int] = {}
    for array in arrays:
        if jnp.issubdtype(array.dtype, jnp.floating):
            counts[array.dtype] = counts.get(array.dtype, 0) + array.size
    return max(counts, key=counts.get) if counts else None
