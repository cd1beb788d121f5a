"""Lumina-Next in JAX (Flax NNX), numerically faithful to diffusers.

The Lumina model folder (its shared pieces live in :mod:`cfgzero_theory.ports`; the Gemma text
encoder is :mod:`cfgzero_theory.ports.gemma`, the SDXL VAE the shared ``AutoencoderKL``):

* :mod:`cfgzero_theory.lumina.convention` — how diffusers' ``LuminaPipeline`` drives the
  network (time ``t = 1 − τ/1000``, the time-aware RoPE factors, the negated prediction of the
  first half of the channels), as a ``model_fn`` adapter (:func:`lumina_next_model`);
* :mod:`cfgzero_theory.lumina.transformer` — Next-DiT (:class:`LuminaTransformer`,
  :class:`LuminaConfig`), matching ``diffusers.LuminaNextDiT2DModel``;
* :mod:`cfgzero_theory.lumina.weights` — its weight map, loader and sampler adapter;
* :mod:`cfgzero_theory.lumina.captions` — the optional caption cleaner (``[captions]`` extra);
* :mod:`cfgzero_theory.lumina.pipeline` — :class:`LuminaPipeline`, diffusers' ``LuminaPipeline``;
* :mod:`cfgzero_theory.lumina.tiny` — random diffusers Lumina checkpoints for tests and benchmarks.
"""

from cfgzero_theory.lumina.convention import lumina_next_model, lumina_time, rope_scaling_factors
from cfgzero_theory.lumina.pipeline import LuminaPipeline
from cfgzero_theory.lumina.transformer import LuminaConfig, LuminaTransformer
from cfgzero_theory.lumina.weights import load_lumina_transformer, lumina_model_fn

__all__ = ["LuminaConfig", "LuminaPipeline", "LuminaTransformer", "load_lumina_transformer", "lumina_model_fn",
           "lumina_next_model", "lumina_time", "rope_scaling_factors"]
