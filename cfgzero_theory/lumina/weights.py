"""Loading a diffusers ``LuminaNextDiT2DModel`` folder, and the transformer as a sampler model.

* :data:`WEIGHT_MAP` — rows ``(diffusers key, our state path, transform)``: ``{i}`` numbers a
  block, ``{x}`` is ``q``/``k``/``v``, ``{n}`` ``1``/``2`` (``1``/``2``/``3`` for the FFN);
* :func:`load_lumina_transformer` ``(folder, *, dtype=None, variant=None, sharding=None)`` through
  the shared loader (:func:`cfgzero_theory.ports.loading.load_module`);
* :func:`lumina_model_fn` ``(model, height, width, *, scaling_watershed=1.0, ...)``: a
  ``model_fn`` for :func:`~cfgzero_theory.sampling.sample_flow` in diffusers' σ convention, as
  ``LuminaPipeline`` drives the network (time-aware RoPE, proportional attention, the negated
  first half of the output channels).
"""

from __future__ import annotations

import math
import os

import jax.numpy as jnp
from flax import nnx

from cfgzero_theory.lumina.convention import lumina_next_model
from cfgzero_theory.lumina.transformer import DIFFUSERS_CLASS_NAME, LuminaConfig, LuminaTransformer, rope_for
from cfgzero_theory.ports.loading import (
    IDENTITY, LINEAR, WeightMap, linear_rows, load_module, module_graphdef, norm_rows,
)
from cfgzero_theory.ports.sharding import ParamSharding
from cfgzero_theory.validation import check_int, check_real

__all__ = ["WEIGHT_MAP", "load_lumina_transformer", "lumina_model_fn", "weight_map"]

TRANSFORMS = {"identity": IDENTITY, "linear": LINEAR}

_B = "layers.{i}"
WEIGHT_MAP: tuple[tuple[str, str, str], ...] = (
    ("pad_token", "pad_token", "identity"),
    *linear_rows("patch_embedder.proj", "patch_proj"),  # a Linear over (c, i, j)-flattened patches
    *linear_rows("time_caption_embed.timestep_embedder.linear_{n}", "time_mlp.fc{n}"),
    *norm_rows("time_caption_embed.caption_embedder.0", "caption_norm"),
    *linear_rows("time_caption_embed.caption_embedder.1", "caption_proj"),
    *linear_rows(f"{_B}.norm1.linear", "blocks.{i}.modulation"),
    (f"{_B}.norm1.norm.weight", "blocks.{i}.norm.scale", "identity"),
    (f"{_B}.attn1.to_{{x}}.weight", "blocks.{i}.self_attn.{x}.kernel", "linear"),
    *norm_rows(f"{_B}.attn1.norm_{{x}}", "blocks.{i}.self_attn.{x}_norm"),
    (f"{_B}.attn2.to_{{x}}.weight", "blocks.{i}.cross_attn.{x}.kernel", "linear"),
    *norm_rows(f"{_B}.attn2.norm_{{x}}", "blocks.{i}.cross_attn.{x}_norm"),
    (f"{_B}.attn2.to_out.0.weight", "blocks.{i}.cross_attn.out.kernel", "linear"),
    (f"{_B}.norm1_context.weight", "blocks.{i}.context_norm.scale", "identity"),
    (f"{_B}.gate", "blocks.{i}.gate", "identity"),
    (f"{_B}.norm2.weight", "blocks.{i}.attn_norm.scale", "identity"),
    (f"{_B}.ffn_norm{{n}}.weight", "blocks.{i}.ffn_norm{n}.scale", "identity"),
    (f"{_B}.feed_forward.linear_{{f}}.weight", "blocks.{i}.ffn.fc{f}.kernel", "linear"),
    *linear_rows("norm_out.linear_1", "out_modulation"),
    *linear_rows("norm_out.linear_2", "out_proj"),
)
"""The Lumina-Next transformer's weight mapping (module docstring); ``{f}`` is ``1``/``2``/``3``."""

weight_map = WeightMap(WEIGHT_MAP, {"i": r"\d+", "x": "q|k|v", "n": "[12]", "f": "[123]"}, TRANSFORMS)
""":data:`WEIGHT_MAP` compiled (``to_ours`` / ``to_diffusers``)."""


def load_lumina_transformer(
    folder: str | os.PathLike, *, dtype=None, variant: str | None = None, sharding: ParamSharding | None = None,
) -> LuminaTransformer:
    """Load a diffusers ``LuminaNextDiT2DModel`` folder (``.../transformer``) into an NNX module.

    ``dtype`` casts every floating tensor (diffusers declares no ``_keep_in_fp32_modules`` for
    this model; ``None`` keeps the stored dtypes); ``variant`` reads
    ``diffusion_pytorch_model.<variant>.safetensors``; ``sharding`` splits the weights over a
    device mesh as they are read.  Raises ``ValueError`` naming every missing, unexpected or
    wrongly shaped key, and a config whose layer count differs from the file's.
    """
    return load_module(
        folder, LuminaTransformer, LuminaConfig, weight_map,
        class_name=DIFFUSERS_CLASS_NAME, what="Lumina-Next transformer/", dtype=dtype, variant=variant,
        sharding=sharding, repeats={"i": ("num_layers", lambda config: config.num_layers)},
    )


def lumina_model_fn(model, height: int, width: int, *, scaling_watershed: float = 1.0,
                    proportional_attn: bool = True, vae_scale_factor: int = 8, num_train_timesteps: int = 1000):
    """A ``model_fn(params, x, sigma, timestep, context)`` for :func:`~cfgzero_theory.sampling.sample_flow`.

    ``model`` is a :class:`~cfgzero_theory.lumina.transformer.LuminaTransformer` (or its
    ``nnx.GraphDef``; the size checks then wait for the first call); ``height × width`` the image
    size in pixels, as ``LuminaPipeline`` takes it (multiples of ``vae_scale_factor ·
    patch_size``; the latents ``x`` are ``(2B, C, height / vae_scale_factor, width /
    vae_scale_factor)``); ``context = (caption_embeds (B, L, D_txt), caption_mask (B, L))``.  As
    the pipeline computes them:

    * ``scaling_factor = √(width · height) / default_image_size`` with ``default_image_size =
      sample_size · vae_scale_factor``, and the network time ``t = 1 − τ/num_train_timesteps``
      (:func:`~cfgzero_theory.lumina.convention.lumina_next_model`);
    * the RoPE tables of the step: linear interpolation (``linear_factor = scaling_factor``) while
      ``t < scaling_watershed``, NTK scaling (``ntk_factor = scaling_factor``) after — diffusers'
      default watershed is ``1.0`` (linear at every step but ``t = 1``), the original Lumina-Next
      sampler's ``0.3``.  Both tables are built once in float64 on the host
      (:func:`~cfgzero_theory.lumina.transformer.rope_for`) and the step's one selected by the
      traced ``linear_factor`` (``≠ 1`` exactly on the linear side when ``scaling_factor ≠ 1``;
      with ``scaling_factor = 1`` the two tables coincide), so the whole loop stays one
      ``lax.scan``;
    * ``proportional_attn``: ``base_sequence_length = (default_image_size // 16)²``;
    * the first ``C`` output channels, negated (``v_σ = −u_t``); the variance half is dropped.

    The latents are cast to the caption's dtype before the network, as the pipeline prepares
    them in the prompt embeddings' dtype.
    """
    graphdef = module_graphdef(model, LuminaTransformer)
    height = check_int("height", height, minimum=1)
    width = check_int("width", width, minimum=1)
    vae_scale_factor = check_int("vae_scale_factor", vae_scale_factor, minimum=1)
    scaling_watershed = check_real("scaling_watershed", scaling_watershed)
    num_train_timesteps = check_int("num_train_timesteps", num_train_timesteps, minimum=1)
    if not isinstance(proportional_attn, bool):
        raise ValueError(f"proportional_attn must be a bool, got {proportional_attn!r}")
    built: dict[LuminaConfig, object] = {}

    def for_config(config: LuminaConfig):
        if config not in built:
            built[config] = _pipeline_step(graphdef, config, height, width, scaling_watershed, proportional_attn,
                                           vae_scale_factor, num_train_timesteps)
        return built[config]

    if isinstance(model, LuminaTransformer):
        for_config(model.config)  # the size checks, now

    def model_fn(params, x, sigma, timestep, context):
        config = nnx.merge(graphdef, params).config
        return for_config(config)(params, x, sigma, timestep, context)

    return model_fn


def _pipeline_step(graphdef, config: LuminaConfig, height, width, scaling_watershed, proportional_attn,
                   vae_scale_factor, num_train_timesteps):
    """:func:`lumina_model_fn`'s ``model_fn`` for one model config."""
    step = vae_scale_factor * config.patch_size
    if height % step or width % step:
        raise ValueError(f"height and width ({height}, {width}) must be multiples of vae_scale_factor · patch_size "
                         f"= {step}")
    default_image_size = config.sample_size * vae_scale_factor
    scaling_factor = math.sqrt(width * height / default_image_size ** 2)
    base_sequence_length = (default_image_size // 16) ** 2 if proportional_attn else None
    latent = (height // vae_scale_factor, width // vae_scale_factor)
    grid = (latent[0] // config.patch_size, latent[1] // config.patch_size)
    linear_rope = rope_for(config, *grid, linear_factor=scaling_factor)
    ntk_rope = rope_for(config, *grid, ntk_factor=scaling_factor)

    def network_fn(params, x, t, context, linear_factor, ntk_factor):
        del ntk_factor  # the table follows from linear_factor (lumina_model_fn's docstring)
        caption, mask = context
        if tuple(x.shape[2:]) != latent:
            raise ValueError(f"latents of spatial size {tuple(x.shape[2:])} do not match the {height}×{width} image "
                             f"this model_fn was built for (latents {latent})")
        linear_side = jnp.ravel(linear_factor)[0] != 1
        rope = tuple(jnp.where(linear_side, lin, ntk) for lin, ntk in zip(linear_rope, ntk_rope))
        transformer = nnx.merge(graphdef, params)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        return transformer(x.astype(caption.dtype), t, caption, mask, rope, base_sequence_length=base_sequence_length)

    return lumina_next_model(network_fn, scaling_factor=scaling_factor, scaling_watershed=scaling_watershed,
                             num_train_timesteps=num_train_timesteps)
