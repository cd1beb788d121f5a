"""Load a diffusers SD3 ``transformer/`` folder into :class:`~cfgzero_theory.sd3.SD3Transformer`.

Public API
----------
* :data:`WEIGHT_MAP` — the one declarative table ``(diffusers key, our state path,
  transform)`` applied to every stored tensor;
* :func:`load_sd3_transformer` ``(folder, *, dtype=None, variant=None, sharding=None) -> SD3Transformer``;
* :func:`sd3_model_fn` ``(model, *, skip_layers=()) -> model_fn`` for
  :func:`cfgzero_theory.sampling.sample_flow`, called with ``params = nnx.state(model)``.

The folder reading, checks and tensor loading are :func:`cfgzero_theory.ports.loading.load_module`
(shared with :func:`cfgzero_theory.ports.autoencoder.load_vae`); this module supplies the table.

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
tensors not stored as float16/bfloat16/float32/float64, a ``num_layers`` other than the
number of ``transformer_blocks.{i}`` in the file (checked before the model's structure is
built, so an absurd ``num_layers`` fails at once), missing keys, unexpected keys and wrongly
shaped tensors (``key 'x': expected shape (16, 4, 2, 2), found (16, 4, 3, 3)``, shapes in the
file's layout).  All checks run on the headers before any tensor data is read.

Memory
------
Tensors are read one at a time with ``safetensors.safe_open(framework="numpy")``,
transformed, cast (``dtype``; ``None`` keeps the stored dtype, bf16 included) and placed on
the default device — or, with ``sharding``, split straight from the host onto a device mesh
(:mod:`cfgzero_theory.ports.sharding`) — before the next is read, so the host never holds a
second full copy and, sharded, no device holds the full set of weights.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from cfgzero_theory.ports.loading import (
    IDENTITY, LINEAR, Transform, WeightMap, linear_rows, load_module, module_graphdef, norm_rows,
)
from cfgzero_theory.ports.sharding import ParamSharding
from cfgzero_theory.sd3.transformer import DIFFUSERS_CLASS_NAME, SD3Config, SD3Transformer, sincos_pos_embed

__all__ = ["OPTIONAL_TARGETS", "TRANSFORMS", "WEIGHT_MAP", "load_sd3_transformer", "sd3_model_fn", "weight_map"]


TRANSFORMS: dict[str, Transform] = {
    "identity": IDENTITY,
    "linear": LINEAR,
    "conv_patch": Transform(
        lambda a: a.reshape(a.shape[0], -1).T,
        lambda shape, cfg: (shape[1], cfg.in_channels, cfg.patch_size, cfg.patch_size),
    ),
}


_B = "transformer_blocks.{i}"
WEIGHT_MAP: tuple[tuple[str, str, str], ...] = (
    # (diffusers key, our state path, transform)
    ("pos_embed.proj.weight", "patch_proj.kernel", "conv_patch"),
    ("pos_embed.proj.bias", "patch_proj.bias", "identity"),
    ("pos_embed.pos_embed", "pos_embed", "identity"),
    *linear_rows("time_text_embed.timestep_embedder.linear_{n}", "time_mlp.fc{n}"),
    *linear_rows("time_text_embed.text_embedder.linear_{n}", "pooled_mlp.fc{n}"),
    *linear_rows("context_embedder", "context_proj"),
    *linear_rows(f"{_B}.norm1.linear", "blocks.{i}.img_mod"),
    *linear_rows(f"{_B}.norm1_context.linear", "blocks.{i}.txt_mod"),
    *linear_rows(f"{_B}.attn.to_{{x}}", "blocks.{i}.attn.img_{x}"),
    *linear_rows(f"{_B}.attn.add_{{x}}_proj", "blocks.{i}.attn.txt_{x}"),
    *linear_rows(f"{_B}.attn.to_out.0", "blocks.{i}.attn.img_out"),
    *linear_rows(f"{_B}.attn.to_add_out", "blocks.{i}.attn.txt_out"),
    *norm_rows(f"{_B}.attn.norm_{{x}}", "blocks.{i}.attn.img_{x}_norm"),
    *norm_rows(f"{_B}.attn.norm_added_{{x}}", "blocks.{i}.attn.txt_{x}_norm"),
    *linear_rows(f"{_B}.attn2.to_{{x}}", "blocks.{i}.self_attn.{x}"),
    *linear_rows(f"{_B}.attn2.to_out.0", "blocks.{i}.self_attn.out"),
    *norm_rows(f"{_B}.attn2.norm_{{x}}", "blocks.{i}.self_attn.{x}_norm"),
    *linear_rows(f"{_B}.ff.net.0.proj", "blocks.{i}.img_mlp.fc1"),
    *linear_rows(f"{_B}.ff.net.2", "blocks.{i}.img_mlp.fc2"),
    *linear_rows(f"{_B}.ff_context.net.0.proj", "blocks.{i}.txt_mlp.fc1"),
    *linear_rows(f"{_B}.ff_context.net.2", "blocks.{i}.txt_mlp.fc2"),
    *linear_rows("norm_out.linear", "out_mod"),
    *linear_rows("proj_out", "out_proj"),
)
"""The weight mapping: every row ``(diffusers key template, our state path template, transform)``."""

OPTIONAL_TARGETS = frozenset({"pos_embed"})
"""Our paths a checkpoint may omit (recomputed): the fixed positional table."""

weight_map = WeightMap(WEIGHT_MAP, {"i": r"\d+", "x": "[qkv]", "n": "[12]"}, TRANSFORMS)


# ----------------------------------------------------------------------------- loading


def load_sd3_transformer(
    folder: str | os.PathLike, *, dtype=None, variant: str | None = None, sharding: ParamSharding | None = None,
) -> SD3Transformer:
    """Load a diffusers ``SD3Transformer2DModel`` folder (``.../transformer``) into an NNX module.

    Args:
      folder: the folder holding ``config.json`` and the safetensors weights.
      dtype: cast every floating tensor to this dtype (e.g. ``jnp.float32``); ``None`` keeps
        the stored dtypes.
      variant: diffusers' weight variant (``"fp16"`` reads ``diffusion_pytorch_model.fp16.safetensors``).
      sharding: a :class:`~cfgzero_theory.ports.sharding.ParamSharding` (e.g.
        ``mesh_sharding()``) to split the weights over a device mesh as they are read;
        ``None`` puts them on the default device.

    Returns the module, ready to call; ``nnx.split(module)`` gives ``(graphdef, state)``.
    Raises ``ValueError`` naming every problem (see the module docstring).  The loading itself
    is :func:`cfgzero_theory.ports.loading.load_module`.
    """
    return load_module(
        folder, SD3Transformer, SD3Config, weight_map,
        class_name=DIFFUSERS_CLASS_NAME, what="SD3 transformer/", dtype=dtype, variant=variant,
        optional={target: sincos_pos_embed for target in OPTIONAL_TARGETS}, sharding=sharding,
        repeats={"i": ("num_layers", lambda config: config.num_layers)},
    )


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
    graphdef = module_graphdef(model, SD3Transformer)
    skip_layers = tuple(skip_layers)

    def model_fn(params, x, sigma, timestep, context):
        del sigma  # SD3 is conditioned on the timestep only
        prompt_embeds, pooled_prompt_embeds = context
        transformer = nnx.merge(graphdef, params)
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (x.shape[0],))
        return transformer(x, prompt_embeds, pooled_prompt_embeds, timestep, skip_layers=skip_layers)

    return model_fn
