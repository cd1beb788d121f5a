"""Loading a diffusers ``FluxTransformer2DModel`` folder, and the transformer as a sampler model.

* :data:`WEIGHT_MAP` — rows ``(diffusers key, our state path, transform)``: ``{i}`` numbers a
  double-stream block, ``{j}`` a single-stream block, ``{x}`` is ``q``/``k``/``v``, ``{n}``
  ``1``/``2``;
* :func:`load_flux_transformer` ``(folder, *, dtype=None, variant=None, sharding=None)``: the
  shared loader (:func:`cfgzero_theory.ports.loading.load_module`: every header problem
  reported at once, tensors placed one at a time, optionally sharded);
* :func:`flux_model_fn` ``(model, grid)``: a ``model_fn`` for
  :func:`~cfgzero_theory.sampling.sample_flow`;
* :func:`original_layout` ``(config)``: how a LoRA written for Black Forest Labs' original
  checkpoint layout (``diffusion_model.double_blocks.0.img_attn.qkv``, ComfyUI's and kohya's
  Flux LoRAs) maps onto diffusers' modules, for :func:`cfgzero_theory.ports.lora.merge_lora`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cfgzero_theory.flux.transformer import DIFFUSERS_CLASS_NAME, MLP_RATIO, FluxConfig, FluxTransformer
from cfgzero_theory.ports.layers import round_to
from cfgzero_theory.ports.loading import (
    IDENTITY, LINEAR, WeightMap, linear_rows, load_module, module_graphdef, norm_rows,
)
from cfgzero_theory.ports.lora import LoraLayer, OriginalLayout
from cfgzero_theory.ports.sharding import ParamSharding
from cfgzero_theory.validation import check_int

__all__ = ["WEIGHT_MAP", "flux_model_fn", "load_flux_transformer", "original_layout", "weight_map"]

_D = "transformer_blocks.{i}"
_S = "single_transformer_blocks.{j}"
WEIGHT_MAP: tuple[tuple[str, str, str], ...] = (
    *linear_rows("x_embedder", "x_embedder"),
    *linear_rows("context_embedder", "context_embedder"),
    *linear_rows("time_text_embed.timestep_embedder.linear_{n}", "time_mlp.fc{n}"),
    *linear_rows("time_text_embed.guidance_embedder.linear_{n}", "guidance_mlp.fc{n}"),
    *linear_rows("time_text_embed.text_embedder.linear_{n}", "pooled_mlp.fc{n}"),
    *linear_rows(f"{_D}.norm1.linear", "double_blocks.{i}.img_mod"),
    *linear_rows(f"{_D}.norm1_context.linear", "double_blocks.{i}.txt_mod"),
    *linear_rows(f"{_D}.attn.to_{{x}}", "double_blocks.{i}.img_qkv.{x}"),
    *linear_rows(f"{_D}.attn.add_{{x}}_proj", "double_blocks.{i}.txt_qkv.{x}"),
    *norm_rows(f"{_D}.attn.norm_{{x}}", "double_blocks.{i}.img_qkv.{x}_norm"),
    *norm_rows(f"{_D}.attn.norm_added_{{x}}", "double_blocks.{i}.txt_qkv.{x}_norm"),
    *linear_rows(f"{_D}.attn.to_out.0", "double_blocks.{i}.img_out"),
    *linear_rows(f"{_D}.attn.to_add_out", "double_blocks.{i}.txt_out"),
    *linear_rows(f"{_D}.ff.net.0.proj", "double_blocks.{i}.img_mlp.fc1"),
    *linear_rows(f"{_D}.ff.net.2", "double_blocks.{i}.img_mlp.fc2"),
    *linear_rows(f"{_D}.ff_context.net.0.proj", "double_blocks.{i}.txt_mlp.fc1"),
    *linear_rows(f"{_D}.ff_context.net.2", "double_blocks.{i}.txt_mlp.fc2"),
    *linear_rows(f"{_S}.norm.linear", "single_blocks.{j}.mod"),
    *linear_rows(f"{_S}.attn.to_{{x}}", "single_blocks.{j}.qkv.{x}"),
    *norm_rows(f"{_S}.attn.norm_{{x}}", "single_blocks.{j}.qkv.{x}_norm"),
    *linear_rows(f"{_S}.proj_mlp", "single_blocks.{j}.proj_mlp"),
    *linear_rows(f"{_S}.proj_out", "single_blocks.{j}.proj_out"),
    *linear_rows("norm_out.linear", "out_mod"),
    *linear_rows("proj_out", "out_proj"),
)
"""The Flux transformer's weight mapping (module docstring)."""

weight_map = WeightMap(WEIGHT_MAP, {"i": r"\d+", "j": r"\d+", "x": "[qkv]", "n": "[12]"},
                       {"identity": IDENTITY, "linear": LINEAR})
""":data:`WEIGHT_MAP` compiled (``to_ours`` / ``to_diffusers``), also what LoRA merging maps through."""


def load_flux_transformer(
    folder: str | os.PathLike, *, dtype=None, variant: str | None = None, sharding: ParamSharding | None = None,
) -> FluxTransformer:
    """Load a diffusers ``FluxTransformer2DModel`` folder (``.../transformer``) into an NNX module.

    ``dtype`` casts every floating tensor (``None`` keeps the stored dtypes); ``variant`` reads
    ``diffusion_pytorch_model.<variant>.safetensors``; ``sharding`` (a
    :class:`~cfgzero_theory.ports.sharding.ParamSharding`) splits the weights over a device
    mesh as they are read.  Raises ``ValueError`` naming every missing, unexpected or wrongly
    shaped key, and a config whose block counts differ from the file's.
    """
    return load_module(
        folder, FluxTransformer, FluxConfig, weight_map,
        class_name=DIFFUSERS_CLASS_NAME, what="Flux transformer/", dtype=dtype, variant=variant, sharding=sharding,
        repeats={"i": ("num_layers", lambda config: config.num_layers),
                 "j": ("num_single_layers", lambda config: config.num_single_layers)},
    )


def flux_model_fn(model, grid: Sequence[int]):
    """A ``model_fn(params, x, sigma, timestep, context)`` for :func:`~cfgzero_theory.sampling.sample_flow`.

    ``model`` is a :class:`FluxTransformer` (or its ``nnx.GraphDef``), ``grid = (h, w)`` the
    packed latent grid (static: one function per image size); call ``sample_flow`` with
    ``params = nnx.state(model)``, packed latents ``(B, h·w, in_channels)`` and ``context =
    (prompt_embeds, pooled)`` — plus the distilled guidance ``(B,)`` for a guidance-embedding
    model.  As in ``FluxPipeline``, the scheduler timestep ``τ = σ·1000`` is rounded to the
    latents' dtype and divided by 1000 in it, and the transformer's prediction is the flow
    velocity the scheduler steps with.
    """
    graphdef = module_graphdef(model, FluxTransformer)
    grid = tuple(check_int("grid entry", g, minimum=1) for g in grid)
    if len(grid) != 2:
        raise ValueError(f"grid must be (h, w), got {grid}")

    def model_fn(params, x, sigma, timestep, context):
        del sigma  # Flux is conditioned on the timestep only
        prompt_embeds, pooled, *guidance = context
        t = round_to(round_to(jnp.broadcast_to(jnp.asarray(timestep), (x.shape[0],)), x.dtype) / 1000, x.dtype)
        transformer = nnx.merge(graphdef, params)
        return transformer(x, prompt_embeds, pooled, t, guidance[0] if guidance else None, grid=grid)

    return model_fn


def _original_modules(config: FluxConfig) -> dict[str, list[tuple[str, np.ndarray | None]]]:
    """``{original module: [(diffusers module, output rows or None for all), ...]}``.

    The original layout fuses q, k and v into one ``qkv`` projection per stream, and a single
    block's q, k, v and MLP input into one ``linear1`` (rows ``D, D, D, 4D``); its final
    modulation is ordered ``(shift, scale)`` where diffusers' ``norm_out`` is ``(scale, shift)``.
    """
    dim = config.inner_dim
    rows = lambda start, stop: np.arange(start * dim, stop * dim)  # noqa: E731
    qkv = lambda prefix, names: [(f"{prefix}.{name}", rows(k, k + 1)) for k, name in enumerate(names)]  # noqa: E731
    table = {
        "img_in": [("x_embedder", None)], "txt_in": [("context_embedder", None)],
        "time_in.in_layer": [("time_text_embed.timestep_embedder.linear_1", None)],
        "time_in.out_layer": [("time_text_embed.timestep_embedder.linear_2", None)],
        "vector_in.in_layer": [("time_text_embed.text_embedder.linear_1", None)],
        "vector_in.out_layer": [("time_text_embed.text_embedder.linear_2", None)],
        "final_layer.linear": [("proj_out", None)],
        "final_layer.adaLN_modulation.1": [("norm_out.linear", np.concatenate([rows(1, 2), rows(0, 1)]))],
    }
    if config.guidance_embeds:
        table["guidance_in.in_layer"] = [("time_text_embed.guidance_embedder.linear_1", None)]
        table["guidance_in.out_layer"] = [("time_text_embed.guidance_embedder.linear_2", None)]
    for i in range(config.num_layers):
        ours, theirs = f"transformer_blocks.{i}", f"double_blocks.{i}"
        table |= {
            f"{theirs}.img_attn.qkv": qkv(f"{ours}.attn", ("to_q", "to_k", "to_v")),
            f"{theirs}.txt_attn.qkv": qkv(f"{ours}.attn", ("add_q_proj", "add_k_proj", "add_v_proj")),
            f"{theirs}.img_attn.proj": [(f"{ours}.attn.to_out.0", None)],
            f"{theirs}.txt_attn.proj": [(f"{ours}.attn.to_add_out", None)],
            f"{theirs}.img_mlp.0": [(f"{ours}.ff.net.0.proj", None)],
            f"{theirs}.img_mlp.2": [(f"{ours}.ff.net.2", None)],
            f"{theirs}.txt_mlp.0": [(f"{ours}.ff_context.net.0.proj", None)],
            f"{theirs}.txt_mlp.2": [(f"{ours}.ff_context.net.2", None)],
            f"{theirs}.img_mod.lin": [(f"{ours}.norm1.linear", None)],
            f"{theirs}.txt_mod.lin": [(f"{ours}.norm1_context.linear", None)],
        }
    for j in range(config.num_single_layers):
        ours, theirs = f"single_transformer_blocks.{j}", f"single_blocks.{j}"
        table |= {
            f"{theirs}.linear1": [*qkv(f"{ours}.attn", ("to_q", "to_k", "to_v")),
                                  (f"{ours}.proj_mlp", rows(3, 3 + MLP_RATIO))],
            f"{theirs}.linear2": [(f"{ours}.proj_out", None)],
            f"{theirs}.modulation.lin": [(f"{ours}.norm.linear", None)],
        }
    return table


def original_layout(config: FluxConfig) -> OriginalLayout:
    """The :class:`~cfgzero_theory.ports.lora.OriginalLayout` of Flux for ``config``: a LoRA pair of
    an original module becomes one pair per diffusers module, sharing ``A`` and taking that
    module's rows of ``B`` (and of the up bias) — fused projections split, the final
    modulation's halves swapped (:func:`_original_modules`)."""
    table = _original_modules(config)

    def to_diffusers(layer: LoraLayer) -> list[LoraLayer]:
        pieces = []
        for module, rows in table[layer.module]:
            take = (lambda a: a) if rows is None else (lambda a: None if a is None else a[rows])
            pieces.append(layer._replace(module=module, up=take(layer.up), up_bias=take(layer.up_bias)))
        return pieces

    return OriginalLayout(frozenset(table), to_diffusers)
