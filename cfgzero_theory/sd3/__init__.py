"""Stable Diffusion 3 / 3.5 in JAX (Flax NNX), numerically faithful to diffusers.

* :mod:`cfgzero_theory.sd3.transformer` — the MMDiT denoiser (:class:`SD3Transformer`) and its
  configuration (:class:`SD3Config`), matching ``diffusers.SD3Transformer2DModel`` in fp32;
* :mod:`cfgzero_theory.sd3.weights` — loading a diffusers ``transformer/`` folder
  (safetensors only) and the ``model_fn`` adapter for :func:`cfgzero_theory.sampling.sample_flow`.

Neither module imports torch or diffusers; those are only the references of the parity tests.
"""

from cfgzero_theory.sd3.transformer import SD3Config, SD3Transformer
from cfgzero_theory.sd3.weights import WEIGHT_MAP, load_sd3_transformer, sd3_model_fn

__all__ = ["SD3Config", "SD3Transformer", "WEIGHT_MAP", "load_sd3_transformer", "sd3_model_fn"]
