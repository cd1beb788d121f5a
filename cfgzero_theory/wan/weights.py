"""Loading a diffusers ``WanTransformer3DModel`` folder, and the transformer as a sampler model.

* :data:`WEIGHT_MAP` — rows ``(diffusers key, our state path, transform)``: ``{i}`` numbers a
  block, ``{x}`` is ``q``/``k``/``v``, ``{n}`` ``1``/``2``;
* :func:`load_wan_transformer` ``(folder, *, dtype=None, variant=None, sharding=None)`` through
  the shared loader (:func:`cfgzero_theory.ports.loading.load_module`);
* :func:`wan_model_fn` ``(model)``: a ``model_fn`` for :func:`~cfgzero_theory.sampling.sample_flow`;
* :func:`original_layout` ``(config)``: Wan's original module names (ComfyUI's
  ``diffusion_model.blocks.0.self_attn.q``, musubi/kohya's ``lora_unet_blocks_0_self_attn_q``) as
  diffusers modules, for :func:`cfgzero_theory.ports.lora.merge_lora`.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from cfgzero_theory.ports.loading import (
    IDENTITY, LINEAR, Transform, WeightMap, linear_rows, load_module, module_graphdef, norm_rows,
)
from cfgzero_theory.ports.lora import LoraLayer, OriginalLayout
from cfgzero_theory.ports.sharding import ParamSharding
from cfgzero_theory.wan.transformer import DIFFUSERS_CLASS_NAME, WanConfig, WanTransformer

__all__ = ["WEIGHT_MAP", "load_wan_transformer", "original_layout", "wan_model_fn", "weight_map"]

TRANSFORMS = {
    "identity": IDENTITY,
    "linear": LINEAR,
    # Conv3d (out, in, kt, kh, kw) -> a linear kernel over patches flattened in (c, t, h, w) order
    "conv_patch": Transform(lambda a: a.reshape(a.shape[0], -1).T,
                            lambda shape, cfg: (shape[1], cfg.in_channels, *cfg.patch_size)),
}

_B = "blocks.{i}"
WEIGHT_MAP: tuple[tuple[str, str, str], ...] = (
    ("patch_embedding.weight", "patch_proj.kernel", "conv_patch"),
    ("patch_embedding.bias", "patch_proj.bias", "identity"),
    *linear_rows("condition_embedder.time_embedder.linear_{n}", "time_mlp.fc{n}"),
    *linear_rows("condition_embedder.time_proj", "time_proj"),
    *linear_rows("condition_embedder.text_embedder.linear_{n}", "text_mlp.fc{n}"),
    *norm_rows("condition_embedder.image_embedder.norm1", "image_embedder.norm1"),
    *linear_rows("condition_embedder.image_embedder.ff.net.0.proj", "image_embedder.mlp.fc1"),
    *linear_rows("condition_embedder.image_embedder.ff.net.2", "image_embedder.mlp.fc2"),
    *norm_rows("condition_embedder.image_embedder.norm2", "image_embedder.norm2"),
    *linear_rows(f"{_B}.attn1.to_{{x}}", "blocks.{i}.self_attn.{x}"),
    *linear_rows(f"{_B}.attn1.to_out.0", "blocks.{i}.self_attn.out"),
    *norm_rows(f"{_B}.attn1.norm_{{x}}", "blocks.{i}.self_attn.{x}_norm"),
    *linear_rows(f"{_B}.attn2.to_{{x}}", "blocks.{i}.cross_attn.{x}"),
    *linear_rows(f"{_B}.attn2.to_out.0", "blocks.{i}.cross_attn.out"),
    *norm_rows(f"{_B}.attn2.norm_{{x}}", "blocks.{i}.cross_attn.{x}_norm"),
    *linear_rows(f"{_B}.attn2.add_{{x}}_proj", "blocks.{i}.cross_attn.add_{x}"),
    *norm_rows(f"{_B}.attn2.norm_added_k", "blocks.{i}.cross_attn.add_k_norm"),
    *norm_rows(f"{_B}.norm2", "blocks.{i}.cross_norm"),
    *linear_rows(f"{_B}.ffn.net.0.proj", "blocks.{i}.ffn.fc1"),
    *linear_rows(f"{_B}.ffn.net.2", "blocks.{i}.ffn.fc2"),
    (f"{_B}.scale_shift_table", "blocks.{i}.table", "identity"),
    ("scale_shift_table", "out_table", "identity"),
    *linear_rows("proj_out", "out_proj"),
)
"""The Wan transformer's weight mapping (module docstring)."""

KEEP_FLOAT32 = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
"""diffusers' ``WanTransformer3DModel._keep_in_fp32_modules`` (less ``rope``, which has no weights):
a ``dtype`` cast leaves these modules' weights in float32, as diffusers loads them."""

weight_map = WeightMap(WEIGHT_MAP, {"i": r"\d+", "x": "q|k|v", "n": "[12]"}, TRANSFORMS)
""":data:`WEIGHT_MAP` compiled (``to_ours`` / ``to_diffusers``)."""


def load_wan_transformer(
    folder: str | os.PathLike, *, dtype=None, variant: str | None = None, sharding: ParamSharding | None = None,
) -> WanTransformer:
    """Load a diffusers ``WanTransformer3DModel`` folder (``.../transformer``) into an NNX module.

    ``dtype`` casts every floating tensor but those of :data:`KEEP_FLOAT32`, which become float32
    (``None`` keeps the stored dtypes); ``variant`` reads
    ``diffusion_pytorch_model.<variant>.safetensors``; ``sharding`` splits the weights over a
    device mesh as they are read.  Raises ``ValueError`` naming every missing, unexpected or
    wrongly shaped key, and a config whose block count differs from the file's.
    """
    return load_module(
        folder, WanTransformer, WanConfig, weight_map,
        class_name=DIFFUSERS_CLASS_NAME, what="Wan transformer/", dtype=dtype, variant=variant, sharding=sharding,
        repeats={"i": ("num_layers", lambda config: config.num_layers)}, keep_float32=KEEP_FLOAT32,
    )


def wan_model_fn(model):
    """A ``model_fn(params, x, sigma, timestep, context)`` for :func:`~cfgzero_theory.sampling.sample_flow`.

    ``model`` is a :class:`WanTransformer` (or its ``nnx.GraphDef``); ``context`` is ``(text,)``
    for T2V or ``(text, image, condition)`` for I2V, where ``condition`` ``(B, C_cond, F, H, W)``
    (the mask and conditioning-latent channels) is concatenated after ``x`` along the channels.
    The transformer's input is cast to the text embeddings' dtype (the pipelines hand them over
    in the weights' dtype, so latents stay float32 outside the network, as diffusers keeps
    them).  The timestep is handed over as the scheduler gives it (Wan's UniPC: integer-valued
    ``σ·1000``), broadcast to the batch.
    """
    graphdef = module_graphdef(model, WanTransformer)

    def model_fn(params, x, sigma, timestep, context):
        del sigma  # Wan is conditioned on the timestep only
        text, *image_and_condition = context
        image, condition = image_and_condition if image_and_condition else (None, None)
        if condition is not None:
            x = jnp.concatenate([x, condition.astype(x.dtype)], axis=1)
        transformer = nnx.merge(graphdef, params)
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (x.shape[0],))
        return transformer(x.astype(text.dtype), timestep, text, image)

    return model_fn


def original_layout(config: WanConfig) -> OriginalLayout:
    """The :class:`~cfgzero_theory.ports.lora.OriginalLayout` of Wan for ``config``: every original
    linear module is one diffusers module (``self_attn`` → ``attn1``, ``cross_attn`` → ``attn2``,
    ``o`` → ``to_out.0``, ``k_img``/``v_img`` → ``add_k_proj``/``add_v_proj``, ``ffn.0``/``ffn.2`` →
    ``ffn.net.0.proj``/``ffn.net.2``, and the embedders and head by name).  Its other parameters
    (``params``, for full deltas: ComfyUI's ``.diff`` / ``.diff_b``) are one diffusers parameter
    each, in the same layout, as diffusers' conversion renames them: the attention norms
    ``norm_q``/``norm_k`` (``norm_k_img`` → ``attn2.norm_added_k``), the affine cross-attention
    norm ``norm3`` → ``norm2`` (the original's ``norm1``/``norm2`` have no parameters),
    ``modulation`` → ``scale_shift_table`` (a block's; ``head.modulation`` the output's),
    ``patch_embedding`` and the image embedder's norms ``img_emb.proj.0``/``.4`` →
    ``norm1``/``norm2``.  Image modules exist only for I2V models, so a T2V LoRA on an I2V model
    leaves the image branch untouched and an I2V LoRA on a T2V model is refused by name."""
    table = {"text_embedding.0": "condition_embedder.text_embedder.linear_1",
             "text_embedding.2": "condition_embedder.text_embedder.linear_2",
             "time_embedding.0": "condition_embedder.time_embedder.linear_1",
             "time_embedding.2": "condition_embedder.time_embedder.linear_2",
             "time_projection.1": "condition_embedder.time_proj",
             "head.head": "proj_out"}
    params = {"patch_embedding.weight": "patch_embedding.weight", "patch_embedding.bias": "patch_embedding.bias",
              "head.modulation": "scale_shift_table"}
    if config.image_to_video:
        table |= {"img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
                  "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2"}
        params |= {f"img_emb.proj.{o}.{p}": f"condition_embedder.image_embedder.{d}.{p}"
                   for o, d in (("0", "norm1"), ("4", "norm2")) for p in ("weight", "bias")}
    attention = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
    image = {"k_img": "add_k_proj", "v_img": "add_v_proj"} if config.image_to_video else {}
    norms = {"norm_q": "norm_q", "norm_k": "norm_k"} if config.qk_norm else {}
    image_norm = {"norm_k_img": "norm_added_k"} if config.qk_norm and config.image_to_video else {}
    for i in range(config.num_layers):
        table |= {f"blocks.{i}.self_attn.{o}": f"blocks.{i}.attn1.{d}" for o, d in attention.items()}
        table |= {f"blocks.{i}.cross_attn.{o}": f"blocks.{i}.attn2.{d}" for o, d in {**attention, **image}.items()}
        table |= {f"blocks.{i}.ffn.0": f"blocks.{i}.ffn.net.0.proj", f"blocks.{i}.ffn.2": f"blocks.{i}.ffn.net.2"}
        params[f"blocks.{i}.modulation"] = f"blocks.{i}.scale_shift_table"
        params |= {f"blocks.{i}.self_attn.{o}.weight": f"blocks.{i}.attn1.{d}.weight" for o, d in norms.items()}
        params |= {f"blocks.{i}.cross_attn.{o}.weight": f"blocks.{i}.attn2.{d}.weight"
                   for o, d in {**norms, **image_norm}.items()}
        if config.cross_attn_norm:
            params |= {f"blocks.{i}.norm3.{p}": f"blocks.{i}.norm2.{p}" for p in ("weight", "bias")}

    def to_diffusers(layer: LoraLayer) -> list[LoraLayer]:
        return [layer._replace(module=table[layer.module])]

    return OriginalLayout(frozenset(table), to_diffusers, params)
