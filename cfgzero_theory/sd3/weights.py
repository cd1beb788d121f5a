"""Load a diffusers SD3 ``transformer/`` folder into :class:`~cfgzero_theory.sd3.SD3Transformer`.

Public API
----------
* :data:`WEIGHT_MAP` — the one declarative table ``(diffusers key, our state path,
  transform)`` applied to every stored tensor;
* :func:`load_sd3_transformer` ``(folder, *, dtype=None, variant=None) -> SD3Transformer``;
* :func:`sd3_model_fn` ``(model, *, skip_layers=()) -> model_fn`` for
  :func:`cfgzero_theory.sampling.sample_flow`, called with ``params = nnx.state(model)``.

The folder
----------
``config.json`` (its ``_class_name`` must be ``SD3Transformer2DModel``; keys are read by
:meth:`SD3Config.from_diffusers_config`) and either ``diffusion_pytorch_model.safetensors``
or a sharded ``diffusion_pytorch_model.safetensors.index.json`` with its shards (a
``variant`` such as ``"fp16"`` inserts ``.fp16`` before ``.safetensors``, as diffusers
does).  Safetensors only: a folder holding only pickled ``.bin`` weights is refused.

Mapping
-------
Each row of :data:`WEIGHT_MAP` is a pair of key templates and a transform.  ``{i}`` stands
for a block index, ``{x}`` for one of ``q``/``k``/``v``, ``{n}`` for ``1``/``2``; the same
placeholders fill the other side.  Transforms: ``identity``; ``linear`` (torch
``Linear.weight`` ``(out, in)`` -> NNX ``kernel`` ``(in, out)``); ``conv_patch`` (the
patch-embedding ``Conv2d.weight`` ``(D, C, p, p)`` -> ``(C·p·p, D)``, rows in ``(c, i, j)``
order, the order :meth:`SD3Transformer.patchify` flattens patches in).  Every tensor of the
checkpoint must match exactly one row whose target exists in the model built from
``config.json`` (e.g. ``attn2.*`` only in ``dual_attention_layers``, ``to_add_out`` and
``ff_context`` never in the last block); every parameter must be filled, except the
positional table ``pos_embed.pos_embed`` (a persistent buffer in diffusers), which is taken
from the file when present and recomputed otherwise.

Errors
------
All ``ValueError`` (a nonexistent folder is ``FileNotFoundError``): no ``config.json`` or an
unreadable one, a wrong ``_class_name``, unknown config keys, missing weight files or
shards, a file that is not readable safetensors (named), and — gathered into one message —
missing keys, unexpected keys and wrongly shaped tensors (``key 'x': expected shape (16, 4,
2, 2), found (16, 4, 3, 3)``, shapes in the file's layout).  All checks run on the headers
before any tensor data is read.

Memory
------
Tensors are read one at a time with ``safetensors.safe_open(framework="numpy")``,
transformed, cast (``dtype``; ``None`` keeps the stored dtype, bf16 included) and placed on
the default device before the next is read, so the host never holds a second full copy.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from cfgzero_theory.sd3.transformer import DIFFUSERS_CLASS_NAME, SD3Config, SD3Transformer, sincos_pos_embed

__all__ = ["OPTIONAL_TARGETS", "TRANSFORMS", "WEIGHT_MAP", "load_sd3_transformer", "sd3_model_fn"]

WEIGHTS_NAME = "diffusion_pytorch_model"
_MAX_LISTED = 12


class Transform(NamedTuple):
    """How a stored tensor becomes ours: ``apply(array)`` and the stored shape expected for
    our parameter shape, ``source_shape(our_shape, config)``."""

    apply: Callable[[np.ndarray], np.ndarray]
    source_shape: Callable[[tuple, SD3Config], tuple]


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(lambda a: a, lambda shape, cfg: tuple(shape)),
    "linear": Transform(lambda a: a.T, lambda shape, cfg: tuple(shape)[::-1]),
    "conv_patch": Transform(
        lambda a: a.reshape(a.shape[0], -1).T,
        lambda shape, cfg: (shape[1], cfg.in_channels, cfg.patch_size, cfg.patch_size),
    ),
}


def _linear(diffusers: str, ours: str) -> tuple[tuple[str, str, str], ...]:
    return ((f"{diffusers}.weight", f"{ours}.kernel", "linear"), (f"{diffusers}.bias", f"{ours}.bias", "identity"))


def _norm(diffusers: str, ours: str) -> tuple[tuple[str, str, str], ...]:
    return ((f"{diffusers}.weight", f"{ours}.scale", "identity"), (f"{diffusers}.bias", f"{ours}.bias", "identity"))


_B = "transformer_blocks.{i}"
WEIGHT_MAP: tuple[tuple[str, str, str], ...] = (
    # (diffusers key, our state path, transform)
    ("pos_embed.proj.weight", "patch_proj.kernel", "conv_patch"),
    ("pos_embed.proj.bias", "patch_proj.bias", "identity"),
    ("pos_embed.pos_embed", "pos_embed", "identity"),
    *_linear("time_text_embed.timestep_embedder.linear_{n}", "time_mlp.fc{n}"),
    *_linear("time_text_embed.text_embedder.linear_{n}", "pooled_mlp.fc{n}"),
    *_linear("context_embedder", "context_proj"),
    *_linear(f"{_B}.norm1.linear", "blocks.{i}.img_mod"),
    *_linear(f"{_B}.norm1_context.linear", "blocks.{i}.txt_mod"),
    *_linear(f"{_B}.attn.to_{{x}}", "blocks.{i}.attn.img_{x}"),
    *_linear(f"{_B}.attn.add_{{x}}_proj", "blocks.{i}.attn.txt_{x}"),
    *_linear(f"{_B}.attn.to_out.0", "blocks.{i}.attn.img_out"),
    *_linear(f"{_B}.attn.to_add_out", "blocks.{i}.attn.txt_out"),
    *_norm(f"{_B}.attn.norm_{{x}}", "blocks.{i}.attn.img_{x}_norm"),
    *_norm(f"{_B}.attn.norm_added_{{x}}", "blocks.{i}.attn.txt_{x}_norm"),
    *_linear(f"{_B}.attn2.to_{{x}}", "blocks.{i}.self_attn.{x}"),
    *_linear(f"{_B}.attn2.to_out.0", "blocks.{i}.self_attn.out"),
    *_norm(f"{_B}.attn2.norm_{{x}}", "blocks.{i}.self_attn.{x}_norm"),
    *_linear(f"{_B}.ff.net.0.proj", "blocks.{i}.img_mlp.fc1"),
    *_linear(f"{_B}.ff.net.2", "blocks.{i}.img_mlp.fc2"),
    *_linear(f"{_B}.ff_context.net.0.proj", "blocks.{i}.txt_mlp.fc1"),
    *_linear(f"{_B}.ff_context.net.2", "blocks.{i}.txt_mlp.fc2"),
    *_linear("norm_out.linear", "out_mod"),
    *_linear("proj_out", "out_proj"),
)
"""The weight mapping: every row ``(diffusers key template, our state path template, transform)``."""

OPTIONAL_TARGETS = frozenset({"pos_embed"})
"""Our paths a checkpoint may omit (recomputed): the fixed positional table."""

_PLACEHOLDERS = {"i": r"\d+", "x": "[qkv]", "n": "[12]"}


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(
        re.escape(part) if k % 2 == 0 else f"(?P<{part}>{_PLACEHOLDERS[part]})" for k, part in enumerate(parts)
    )
    return re.compile(pattern)


_RULES = tuple((_template_regex(src), src, _template_regex(dst), dst, TRANSFORMS[kind]) for src, dst, kind in WEIGHT_MAP)


def _to_ours(key: str) -> tuple[str, Transform] | None:
    for src_re, _, _, dst, transform in _RULES:
        match = src_re.fullmatch(key)
        if match:
            return dst.format(**match.groupdict()), transform
    return None


def _to_diffusers(path: str) -> str:
    for _, src, dst_re, _, _ in _RULES:
        match = dst_re.fullmatch(path)
        if match:
            return src.format(**match.groupdict())
    return f"<no diffusers key maps to {path}>"  # pragma: no cover - the table covers the model


def _limited(items) -> str:
    items = list(items)
    shown = ", ".join(repr(item) for item in items[:_MAX_LISTED])
    return f"[{shown}{f', … ({len(items) - _MAX_LISTED} more)' if len(items) > _MAX_LISTED else ''}]"


# ----------------------------------------------------------------------------- folder


def _read_config(folder: str) -> SD3Config:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no config.json: expected a diffusers SD3 transformer/ folder")
    try:
        with open(path, encoding="utf-8") as file:
            raw = json.load(file)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable JSON config: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    class_name = raw.get("_class_name")
    if class_name != DIFFUSERS_CLASS_NAME:
        raise ValueError(f"{path}: _class_name is {class_name!r}, expected {DIFFUSERS_CLASS_NAME!r}")
    return SD3Config.from_diffusers_config(raw)


def _weight_files(folder: str, variant: str | None) -> dict[str, set[str] | None]:
    """``{shard path: keys the index assigns to it (None for a single file)}``."""
    name = f"{WEIGHTS_NAME}.{variant}.safetensors" if variant else f"{WEIGHTS_NAME}.safetensors"
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
            raise ValueError(f"{index} lists shard(s) missing from {folder}: {_limited(absent)}")
        return shards
    pickled = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    hint = f" (found {_limited(pickled)}: pickled weights are never loaded)" if pickled else ""
    raise ValueError(f"{folder} has neither {name} nor {name}.index.json{hint}")


def _open(path: str):
    try:
        return safe_open(path, framework="numpy")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err


# ----------------------------------------------------------------------------- loading


def load_sd3_transformer(folder: str | os.PathLike, *, dtype=None, variant: str | None = None) -> SD3Transformer:
    """Load a diffusers ``SD3Transformer2DModel`` folder (``.../transformer``) into an NNX module.

    Args:
      folder: the folder holding ``config.json`` and the safetensors weights.
      dtype: cast every floating tensor to this dtype (e.g. ``jnp.float32``); ``None`` keeps
        the stored dtypes.
      variant: diffusers' weight variant (``"fp16"`` reads ``diffusion_pytorch_model.fp16.safetensors``).

    Returns the module, ready to call; ``nnx.split(module)`` gives ``(graphdef, state)``.
    Raises ``ValueError`` naming every problem (see the module docstring).
    """
    folder = os.fspath(folder)
    if not os.path.exists(folder):
        raise FileNotFoundError(f"no such folder: {folder}")
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is not a folder: expected a diffusers SD3 transformer/ folder")
    cast = None if dtype is None else np.dtype(dtype)
    if cast is not None and not np.issubdtype(cast, np.floating) and cast != np.dtype(jnp.bfloat16):
        raise ValueError(f"dtype must be a floating dtype, got {cast}")
    config = _read_config(folder)
    files = _weight_files(folder, variant)

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: SD3Transformer(config, rngs=nnx.Rngs(0))))
    targets = {".".join(str(part) for part in path): (path, var) for path, var in nnx.to_flat_state(abstract)}

    # pass 1: headers only — match every key, check every shape
    plan: list[tuple[str, str, str, Transform]] = []  # (file, key, target, transform)
    seen_keys: dict[str, str] = {}
    filled: set[str] = set()
    missing_from_shard, duplicated, unexpected, shape_errors = [], [], [], []
    for path, listed in files.items():
        with _open(path) as f:
            keys = list(f.keys())
            if listed is not None:
                missing_from_shard += [f"{key} (in {os.path.basename(path)})" for key in sorted(listed - set(keys))]
            for key in keys:
                if key in seen_keys:
                    duplicated.append(key)
                    continue
                seen_keys[key] = path
                mapped = _to_ours(key)
                if mapped is None or mapped[0] not in targets:
                    unexpected.append(key)
                    continue
                target, transform = mapped
                try:
                    shape = tuple(f.get_slice(key).get_shape())
                except SafetensorError as err:
                    raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
                want = transform.source_shape(targets[target][1].shape, config)
                if shape != want:
                    shape_errors.append(f"key {key!r}: expected shape {want}, found {shape}")
                    continue
                filled.add(target)
                plan.append((path, key, target, transform))
    missing = sorted(_to_diffusers(t) for t in targets if t not in filled and t not in OPTIONAL_TARGETS)
    problems = []
    if missing_from_shard:
        problems.append(f"keys listed in the index but absent from their shard {_limited(missing_from_shard)}")
    if duplicated:
        problems.append(f"keys stored in more than one shard {_limited(sorted(set(duplicated)))}")
    if missing:
        problems.append(f"missing keys {_limited(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_limited(sorted(unexpected))}")
    problems += shape_errors
    if problems:
        raise ValueError(
            f"{folder} does not match SD3Transformer2DModel with config {config}: " + "; ".join(problems)
        )

    # pass 2: tensor data, one tensor at a time
    values: dict[str, jax.Array] = {}
    for path in files:
        entries = [entry for entry in plan if entry[0] == path]
        if not entries:
            continue
        with _open(path) as f:
            for _, key, target, transform in entries:
                try:
                    array = f.get_tensor(key)
                except (SafetensorError, ValueError, TypeError) as err:
                    raise ValueError(f"{path} is not a readable safetensors file (tensor {key!r}): {err}") from err
                array = transform.apply(array)
                if cast is not None and array.dtype != cast:
                    array = array.astype(cast)
                values[target] = jax.device_put(np.ascontiguousarray(array))
                del array
    for target in OPTIONAL_TARGETS - set(values):
        table = sincos_pos_embed(config)
        values[target] = jax.device_put(table if cast is None else table.astype(cast))

    state = nnx.from_flat_state([(path, var.replace(values[name])) for name, (path, var) in targets.items()])
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- sampler adapter


def sd3_model_fn(model, *, skip_layers: tuple[int, ...] = ()):
    """A ``model_fn(params, x, sigma, timestep, context)`` for :func:`~cfgzero_theory.sampling.sample_flow`.

    ``model`` is an :class:`SD3Transformer` (or its ``nnx.GraphDef``); call ``sample_flow``
    with ``params = nnx.state(model)`` and ``context = (prompt_embeds (B, L, J),
    pooled_prompt_embeds (B, P))``.  The transformer is called with the scheduler timestep
    (diffusers passes ``σ·1000``) broadcast to the batch, and returns the flow prediction
    ``v = ε − x_data``, which SD3's pipelines hand to the scheduler unchanged.  Reuse the
    returned function: ``sample_flow`` compiles once per function object.
    """
    if isinstance(model, nnx.GraphDef):
        graphdef = model
    elif isinstance(model, SD3Transformer):
        graphdef = nnx.graphdef(model)
    else:
        raise ValueError(f"model must be an SD3Transformer or its nnx.GraphDef, got {type(model).__name__}")
    skip_layers = tuple(skip_layers)

    def model_fn(params, x, sigma, timestep, context):
        del sigma  # SD3 is conditioned on the timestep only
        prompt_embeds, pooled_prompt_embeds = context
        transformer = nnx.merge(graphdef, params)
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (x.shape[0],))
        return transformer(x, prompt_embeds, pooled_prompt_embeds, timestep, skip_layers=skip_layers)

    return model_fn
