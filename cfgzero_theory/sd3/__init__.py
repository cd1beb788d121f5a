"""Stable Diffusion 3 / 3.5 in JAX (Flax NNX), numerically faithful to diffusers.

The SD3 model folder (its shared pieces live in :mod:`cfgzero_theory.ports`):

* :mod:`cfgzero_theory.sd3.transformer` — the MMDiT denoiser (:class:`SD3Transformer`) and its
  configuration (:class:`SD3Config`), matching ``diffusers.SD3Transformer2DModel`` in fp32;
* :mod:`cfgzero_theory.sd3.weights` — loading a diffusers ``transformer/`` folder
  (safetensors only) and the ``model_fn`` adapter for :func:`cfgzero_theory.sampling.sample_flow`;
* :mod:`cfgzero_theory.sd3.pipeline` — text-to-image with a whole ``StableDiffusion3Pipeline``
  folder (:class:`SD3Pipeline`, :func:`encode_prompt`);
* :mod:`cfgzero_theory.sd3.flops` — the transformer's FLOPs per step.

The pipeline also uses the shared CLIP and T5 text encoders (:mod:`cfgzero_theory.ports.clip`,
:mod:`cfgzero_theory.ports.t5`), the KL autoencoder (:mod:`cfgzero_theory.ports.autoencoder`),
loading and sharding; their names are re-exported here.  None of these modules imports torch
or diffusers; those are only the references of the parity tests.  The pipeline's tokenizers
come from transformers (``AutoTokenizer``, no torch needed), imported only when a pipeline is
loaded (``pip install -e ".[sd3]"``).
"""

from cfgzero_theory.ports.autoencoder import VAE_WEIGHT_MAP, AutoencoderKL, VAEConfig, load_vae, sample_latent
from cfgzero_theory.ports.clip import CLIPTextConfig, CLIPTextEncoder, load_clip_text_encoder
from cfgzero_theory.ports.pipeline_parts import save_png
from cfgzero_theory.ports.sharding import ParamSharding, mesh_sharding
from cfgzero_theory.ports.t5 import T5Config, T5Encoder, load_t5_encoder
from cfgzero_theory.sd3.pipeline import SD3Pipeline, encode_prompt
from cfgzero_theory.sd3.transformer import SD3Config, SD3Transformer
from cfgzero_theory.sd3.weights import WEIGHT_MAP, load_sd3_transformer, sd3_model_fn

__all__ = [
    "AutoencoderKL", "CLIPTextConfig", "CLIPTextEncoder", "ParamSharding", "SD3Config", "SD3Pipeline",
    "SD3Transformer", "T5Config", "T5Encoder", "VAEConfig", "VAE_WEIGHT_MAP", "WEIGHT_MAP", "encode_prompt",
    "load_clip_text_encoder", "load_sd3_transformer", "load_t5_encoder", "load_vae", "mesh_sharding",
    "sample_latent", "save_png", "sd3_model_fn",
]
