"""Stable Diffusion 3 / 3.5 in JAX (Flax NNX), numerically faithful to diffusers.

* :mod:`cfgzero_theory.sd3.transformer` — the MMDiT denoiser (:class:`SD3Transformer`) and its
  configuration (:class:`SD3Config`), matching ``diffusers.SD3Transformer2DModel`` in fp32;
* :mod:`cfgzero_theory.sd3.weights` — loading a diffusers ``transformer/`` folder
  (safetensors only) and the ``model_fn`` adapter for :func:`cfgzero_theory.sampling.sample_flow`;
* :mod:`cfgzero_theory.sd3.vae` — the image autoencoder (:class:`AutoencoderKL`,
  :class:`VAEConfig`, :func:`sample_latent`) and loading a diffusers ``vae/`` folder;
* :mod:`cfgzero_theory.sd3.clip` — the two CLIP text encoders (:class:`CLIPTextEncoder`,
  :class:`CLIPTextConfig`) and loading a transformers ``text_encoder/`` / ``text_encoder_2/`` folder;
* :mod:`cfgzero_theory.sd3.t5` — the T5 text encoder (:class:`T5Encoder`, :class:`T5Config`)
  and loading a transformers ``text_encoder_3/`` folder;
* :mod:`cfgzero_theory.sd3.loading` — the folder / safetensors loading machinery all loaders use;
* :mod:`cfgzero_theory.sd3.sharding` — how weights are split over a device mesh as they load
  (:class:`ParamSharding`, :func:`mesh_sharding`; every loader's ``sharding=`` argument);
* :mod:`cfgzero_theory.sd3.pipeline` — text-to-image with a whole ``StableDiffusion3Pipeline``
  folder (:class:`SD3Pipeline`, :func:`encode_prompt`, :func:`save_png`).

None of these modules imports torch or diffusers; those are only the references of the parity
tests.  The pipeline's tokenizers come from transformers (``AutoTokenizer``, no torch needed),
imported only when a pipeline is loaded (``pip install -e ".[sd3]"``).
"""

from cfgzero_theory.sd3.clip import CLIPTextConfig, CLIPTextEncoder, load_clip_text_encoder
from cfgzero_theory.sd3.pipeline import SD3Pipeline, encode_prompt, save_png
from cfgzero_theory.sd3.sharding import ParamSharding, mesh_sharding
from cfgzero_theory.sd3.t5 import T5Config, T5Encoder, load_t5_encoder
from cfgzero_theory.sd3.transformer import SD3Config, SD3Transformer
from cfgzero_theory.sd3.vae import VAE_WEIGHT_MAP, AutoencoderKL, VAEConfig, load_vae, sample_latent
from cfgzero_theory.sd3.weights import WEIGHT_MAP, load_sd3_transformer, sd3_model_fn

__all__ = [
    "AutoencoderKL", "CLIPTextConfig", "CLIPTextEncoder", "ParamSharding", "SD3Config", "SD3Pipeline",
    "SD3Transformer", "T5Config", "T5Encoder", "VAEConfig", "VAE_WEIGHT_MAP", "WEIGHT_MAP", "encode_prompt",
    "load_clip_text_encoder", "load_sd3_transformer", "load_t5_encoder", "load_vae", "mesh_sharding",
    "sample_latent", "save_png", "sd3_model_fn",
]
