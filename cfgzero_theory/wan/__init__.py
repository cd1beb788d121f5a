"""Wan2.1 (text- and image-to-video) in JAX (Flax NNX), numerically faithful to diffusers.

The Wan model folder (its shared pieces live in :mod:`cfgzero_theory.ports`):

* :mod:`cfgzero_theory.wan.transformer` — the video denoiser (:class:`WanTransformer`,
  :class:`WanConfig`), matching ``diffusers.WanTransformer3DModel`` for T2V and I2V;
* :mod:`cfgzero_theory.wan.weights` — its weight map, loader, sampler adapter and LoRA layout;
* :mod:`cfgzero_theory.wan.vae` — the causal 3-D autoencoder (:class:`WanVAE`), matching
  ``diffusers.AutoencoderKLWan``;
* :mod:`cfgzero_theory.wan.pipeline` — :class:`WanPipeline`, the equivalent of diffusers'
  ``WanPipeline`` and ``WanImageToVideoPipeline``;
* :mod:`cfgzero_theory.wan.tiny` — random diffusers Wan checkpoints for tests and benchmarks.
"""

from cfgzero_theory.wan.pipeline import WanPipeline
from cfgzero_theory.wan.transformer import WanConfig, WanTransformer
from cfgzero_theory.wan.vae import WanVAE, WanVAEConfig, load_wan_vae
from cfgzero_theory.wan.weights import WEIGHT_MAP, load_wan_transformer, wan_model_fn

__all__ = ["WEIGHT_MAP", "WanConfig", "WanPipeline", "WanTransformer", "WanVAE", "WanVAEConfig",
           "load_wan_transformer", "load_wan_vae", "wan_model_fn"]
