"""Wan2.1 (text- and image-to-video) in JAX (Flax NNX), numerically faithful to diffusers.

The Wan model folder (its shared pieces live in :mod:`cfgzero_theory.ports`):

* :mod:`cfgzero_theory.wan.transformer` — the video denoiser (:class:`WanTransformer`,
  :class:`WanConfig`), matching ``diffusers.WanTransformer3DModel`` for T2V and I2V;
* :mod:`cfgzero_theory.wan.weights` — its weight map, loader and sampler adapter.

The causal 3-D autoencoder, the pipelines and video files are still to come.
"""

from cfgzero_theory.wan.transformer import WanConfig, WanTransformer
from cfgzero_theory.wan.weights import WEIGHT_MAP, load_wan_transformer, wan_model_fn

__all__ = ["WEIGHT_MAP", "WanConfig", "WanTransformer", "load_wan_transformer", "wan_model_fn"]
