"""FLUX.1 (dev and schnell) in JAX (Flax NNX), numerically faithful to diffusers.

The Flux model folder (its shared pieces live in :mod:`cfgzero_theory.ports`):

* :mod:`cfgzero_theory.flux.transformer` — the double/single-stream denoiser
  (:class:`FluxTransformer`, :class:`FluxConfig`), matching ``diffusers.FluxTransformer2DModel``;
* :mod:`cfgzero_theory.flux.weights` — its weight map, loader and sampler adapter.
"""

from cfgzero_theory.flux.transformer import FluxConfig, FluxTransformer
from cfgzero_theory.flux.weights import WEIGHT_MAP, flux_model_fn, load_flux_transformer

__all__ = ["FluxConfig", "FluxTransformer", "WEIGHT_MAP", "flux_model_fn", "load_flux_transformer"]
