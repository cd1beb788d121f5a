"""Text-to-image with a diffusers Lumina-Next folder, the sampling loop in JAX.

Public API
----------
* :func:`encode_prompt` ``(components, prompts, negative_prompts=None, max_sequence_length=256,
  clean_caption=False) -> (prompt_embeds, prompt_mask, negative_prompt_embeds, negative_prompt_mask)``;
* :class:`LuminaPipeline` — ``LuminaPipeline.from_pretrained(folder, dtype=None, sharding=None)``,
  ``pipeline(prompts, ...) -> (latents, images)`` and its stages ``encode_prompt``,
  ``initial_latents``, ``sample`` (the loop alone, with ``return_trajectory``), ``decode``.

Prompts (``diffusers.LuminaPipeline.encode_prompt``)
-----------------------------------------------------
The prompts are lower-cased and stripped — or, with ``clean_caption=True``, passed twice through
DeepFloyd IF's caption cleaner (:mod:`cfgzero_theory.lumina.captions`, the ``[captions]``
extra).  diffusers' default is ``clean_caption=True``, but it silently falls back to lower-casing
when BeautifulSoup or ftfy is missing; here the cleaner is off by default, and asking for it
without the libraries is an ``ImportError`` naming the extra.  Then they are tokenised by
Gemma's tokenizer (BOS first) with ``padding=True``, ``pad_to_multiple_of=8``, truncated at
``max_sequence_length`` (256), and encoded by Gemma with their attention mask; the embeddings
are ``hidden_states[-2]``, the penultimate layer's raw output.  The negative prompts (default
``""``; one, or one per prompt) are **not** lower-cased — diffusers does not — and are padded
to exactly the prompts' token length, so that both branches share one caption length.

Latents and schedule
--------------------
Latents ``(B, 4, H/8, W/8)`` in the prompt embeddings' dtype (diffusers' layout for
``latents=``); ``H`` and ``W`` positive multiples of 16 (the VAE factor times the patch
size), by default the transformer's ``sample_size × 8`` (1024²).  ``FlowMatchEulerDiscreteScheduler``
with the folder's config (shift 1: timesteps ``linspace(1000, 1, N)``); the network sees
``t = 1 − τ/1000`` and its rotary embedding is rescaled for the resolution: ``s = √(H·W)/
(sample_size·8)``, linear interpolation for ``t < scaling_watershed`` (default 1.0, diffusers';
the original sampler's is 0.3), NTK scaling after; self-attention is scaled proportionally to
the token count relative to ``(sample_size/2)²`` (``proportional_attn``, default on).
Decoding divides by the VAE's ``scaling_factor`` (SDXL's 0.13025, no shift).

Guidance
--------
Two branches per step.  As in diffusers, guidance acts on the first **three** latent channels
only; the fourth takes the conditional prediction (the ``"lumina-next"`` preset's
``guidance_channels=3``); the learned-variance half of the output is dropped and the prediction
negated into diffusers' σ convention (:mod:`cfgzero_theory.lumina.convention`).  Every rule
kind of :data:`cfgzero_theory.guidance.KINDS`; defaults from the preset: CFG-Zero* at 4.0 —
diffusers' default scale — with ``K = 1``, 30 steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cfgzero_theory import presets
from cfgzero_theory.compilation import enable_compilation_cache
from cfgzero_theory.lumina.captions import preprocess_prompts
from cfgzero_theory.lumina.weights import load_lumina_transformer, lumina_model_fn
from cfgzero_theory.ports.autoencoder import load_vae
from cfgzero_theory.ports.gemma import load_gemma_encoder
from cfgzero_theory.ports.pipeline_parts import (
    as_prompt_list, encode_tokens, initial_noise, load_tokenizer, pipeline_components, read_json,
)
from cfgzero_theory.ports.sharding import ParamSharding
from cfgzero_theory.sampling import FlowSampleResult, sample_flow
from cfgzero_theory.schedules import flow_match_euler_schedule
from cfgzero_theory.validation import check_int, check_real

__all__ = ["LuminaPipeline", "encode_prompt"]

#: ``LuminaText2ImgPipeline`` is the name older diffusers releases wrote into ``model_index.json``.
PIPELINE_CLASSES = ("LuminaPipeline", "LuminaText2ImgPipeline")
REQUIRED = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
SCHEDULE_KEYS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "time_shift_type", "shift_terminal",
                 "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
MAX_SEQUENCE_LENGTH = 256
TOKEN_MULTIPLE = 8
HIDDEN_LAYER = -2
VAE_FACTOR = 8
SCALING_WATERSHED = 1.0
PRESET = presets.get("lumina-next")


# ----------------------------------------------------------------------------- prompts


def _tokens(tokenizer, texts: list[str], **options) -> tuple[jax.Array, jax.Array]:
    tokens = tokenizer(texts, truncation=True, return_attention_mask=True, return_tensors="np", **options)
    return (jnp.asarray(np.asarray(tokens["input_ids"]), jnp.int32),
            jnp.asarray(np.asarray(tokens["attention_mask"]), jnp.int32))


def encode_prompt(components, prompts, negative_prompts=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                  clean_caption: bool = False):
    """Gemma's ``hidden_states[-2]`` of the prompts and negative prompts, with their attention masks
    (module docstring): ``(prompt_embeds (B, L, D), prompt_mask (B, L), negative_prompt_embeds,
    negative_prompt_mask)``, ``L`` the prompts' padded token length.  ``components`` is a
    :class:`LuminaPipeline`; ``clean_caption`` as the module docstring says."""
    length = check_int("max_sequence_length", max_sequence_length, minimum=1)
    texts = preprocess_prompts(as_prompt_list(prompts, "prompts"), clean=clean_caption)
    negative = as_prompt_list("" if negative_prompts is None else negative_prompts, "negative_prompts")
    negative = negative * len(texts) if len(negative) == 1 else negative
    if len(negative) != len(texts):
        raise ValueError(f"negative_prompts must hold one prompt or as many as prompts ({len(texts)}), "
                         f"got {len(negative)}")
    ids, mask = _tokens(components.tokenizer, texts, padding=True, pad_to_multiple_of=TOKEN_MULTIPLE,
                        max_length=length)
    negative_ids, negative_mask = _tokens(components.tokenizer, negative, padding="max_length",
                                          max_length=ids.shape[1])

    def encode(token_ids, token_mask):
        return encode_tokens(components.text_encoder, token_ids, token_mask, hidden_layer=HIDDEN_LAYER)

    return encode(ids, mask), mask, encode(negative_ids, negative_mask), negative_mask


# ----------------------------------------------------------------------------- the pipeline


class LuminaPipeline:
    """A loaded Lumina-Next text-to-image pipeline (see the module docstring)."""

    def __init__(self, *, transformer, vae, text_encoder, tokenizer, scheduler_config: dict):
        if scheduler_config.get("_class_name", SCHEDULER_CLASS) != SCHEDULER_CLASS:
            raise ValueError(f"the scheduler must be {SCHEDULER_CLASS}, got {scheduler_config.get('_class_name')!r}")
        if vae.config.latent_channels != transformer.config.in_channels:
            raise ValueError(f"the VAE has {vae.config.latent_channels} latent channels but the transformer reads "
                             f"{transformer.config.in_channels}")
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.scheduler_config = dict(scheduler_config)
        self._model_fns = {}
        vae_graph = nnx.graphdef(vae)
        self._decode = jax.jit(lambda state, z: nnx.merge(vae_graph, state).decode(z))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, dtype=None, sharding: ParamSharding | None = None, *,
                        compilation_cache: bool = True) -> LuminaPipeline:
        """Load a diffusers ``LuminaPipeline`` folder (``model_index.json`` and subfolders).

        ``dtype`` casts every weight (``None`` keeps the stored dtypes); ``sharding`` splits every
        model's weights over a device mesh as they are read; ``compilation_cache`` turns on JAX's
        persistent compilation cache.  Raises ``ValueError`` when the folder is not a Lumina
        pipeline or a component it lists is missing.
        """
        if compilation_cache:
            enable_compilation_cache()
        root = Path(folder)
        present = pipeline_components(root, "a Lumina-Next pipeline", PIPELINE_CLASSES, REQUIRED)
        options = dict(dtype=dtype, sharding=sharding)
        return cls(
            transformer=load_lumina_transformer(present["transformer"], **options),
            vae=load_vae(present["vae"], **options),
            text_encoder=load_gemma_encoder(present["text_encoder"], **options),
            tokenizer=load_tokenizer(present["tokenizer"]),
            scheduler_config=read_json(root / "scheduler" / "scheduler_config.json", "the scheduler config"),
        )

    @property
    def default_image_size(self) -> int:
        """The side the model was trained at, ``sample_size · 8`` pixels (1024 for Lumina-Next)."""
        return self.transformer.config.sample_size * VAE_FACTOR

    def encode_prompt(self, prompts, negative_prompts=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                      clean_caption: bool = False):
        """:func:`encode_prompt` with this pipeline's Gemma."""
        return encode_prompt(self, prompts, negative_prompts, max_sequence_length, clean_caption)

    def latent_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """The latent grid ``(H/8, W/8)``; sides default to :attr:`default_image_size` and must be
        positive multiples of 8 × the patch size (16)."""
        multiple = VAE_FACTOR * self.transformer.config.patch_size
        height = self.default_image_size if height is None else check_int("height", height, minimum=1)
        width = self.default_image_size if width is None else check_int("width", width, minimum=1)
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}×{width}")
        return height // VAE_FACTOR, width // VAE_FACTOR

    def initial_latents(self, batch: int, height: int | None = None, width: int | None = None, seed: int = 0,
                        dtype=jnp.float32) -> jax.Array:
        """Initial noise ``N(0, I)`` of shape ``(batch, C, H/8, W/8)``, drawn with ``PRNGKey(seed)``."""
        h, w = self.latent_size(height, width)
        return initial_noise(seed, (check_int("batch", batch, minimum=1), self.transformer.config.in_channels, h, w),
                             dtype)

    def schedule(self, num_steps: int):
        """The σ schedule of the folder's ``FlowMatchEulerDiscreteScheduler`` for ``num_steps`` steps."""
        options = {key: self.scheduler_config[key] for key in SCHEDULE_KEYS if key in self.scheduler_config}
        return flow_match_euler_schedule(num_steps, **options)

    def model_fn(self, height: int, width: int, scaling_watershed: float, proportional_attn: bool):
        """The transformer as a :func:`~cfgzero_theory.sampling.sample_flow` model for images of
        ``height × width`` (one function object per setting, so each compiles once)."""
        key = (height, width, float(scaling_watershed), bool(proportional_attn))
        if key not in self._model_fns:
            self._model_fns[key] = lumina_model_fn(self.transformer, height, width,
                                                   scaling_watershed=scaling_watershed,
                                                   proportional_attn=proportional_attn)
        return self._model_fns[key]

    def sample(self, embeddings, latents, *, guidance: str | None = None, scale: float | None = None,
               zero_init_steps: int | None = None, num_steps: int | None = None,
               scaling_watershed: float = SCALING_WATERSHED, proportional_attn: bool = True,
               return_trajectory: bool = False) -> FlowSampleResult:
        """The denoising loop alone, one compiled :func:`~cfgzero_theory.sampling.sample_flow`.

        ``embeddings`` is :meth:`encode_prompt`'s 4-tuple; ``latents`` the initial noise
        ``(B, C, H/8, W/8)``, cast to the embeddings' dtype as diffusers does.  ``guidance``,
        ``scale``, ``zero_init_steps`` and ``num_steps`` left ``None`` take the ``"lumina-next"``
        preset's values; the rule acts on the first three channels.
        """
        if not (isinstance(embeddings, (tuple, list)) and len(embeddings) == 4):
            raise ValueError("embeddings must be (prompt_embeds, prompt_mask, negative_prompt_embeds, "
                             "negative_prompt_mask) as encode_prompt returns")
        cond, mask, uncond, uncond_mask = (jnp.asarray(e) for e in embeddings)
        if cond.shape != uncond.shape or mask.shape != uncond_mask.shape or mask.shape != cond.shape[:2]:
            raise ValueError(f"prompt and negative embeddings and masks must share one shape, got {cond.shape}, "
                             f"{mask.shape}, {uncond.shape}, {uncond_mask.shape}")
        latents = jnp.asarray(latents)
        channels = self.transformer.config.in_channels
        if latents.ndim != 4 or latents.shape[:2] != (cond.shape[0], channels):
            raise ValueError(f"latents must have shape ({cond.shape[0]}, {channels}, H/8, W/8) for {cond.shape[0]} "
                             f"prompts, got {latents.shape}")
        height, width = latents.shape[2] * VAE_FACTOR, latents.shape[3] * VAE_FACTOR
        self.latent_size(height, width)
        watershed = check_real("scaling_watershed", scaling_watershed)
        num_steps = check_int("num_steps", PRESET.num_steps if num_steps is None else num_steps, minimum=1)
        rule = PRESET.rule(guidance, scale=scale, zero_init_steps=zero_init_steps)
        return sample_flow(self.model_fn(height, width, watershed, proportional_attn), nnx.state(self.transformer),
                           latents.astype(cond.dtype), self.schedule(num_steps), (cond, mask), (uncond, uncond_mask),
                           rule, return_trajectory=return_trajectory)

    def decode(self, latents) -> jax.Array:
        """Latents ``(B, C, h, w)`` → images ``(B, 8h, 8w, 3)`` in ``[0, 1]`` (float32): the VAE on
        ``latents / scaling_factor``."""
        z = self.vae.latents_to_vae(jnp.asarray(latents))
        image = self._decode(nnx.state(self.vae), z).astype(jnp.float32)
        return jnp.clip(jnp.transpose(image, (0, 2, 3, 1)) / 2 + 0.5, 0.0, 1.0)

    def __call__(self, prompts=None, *, negative_prompts=None, embeddings=None, guidance: str | None = None,
                 scale: float | None = None, zero_init_steps: int | None = None, num_steps: int | None = None,
                 height: int | None = None, width: int | None = None, seed: int = 0, latents=None,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, scaling_watershed: float = SCALING_WATERSHED,
                 proportional_attn: bool = True, clean_caption: bool = False):
        """Generate images; returns ``(latents (B, C, H/8, W/8), images (B, H, W, 3) in [0, 1])``.

        Either ``prompts`` (encoded by :meth:`encode_prompt` with ``negative_prompts``, default
        ``""``, and ``clean_caption``) or precomputed ``embeddings``.  ``latents`` (initial noise
        in diffusers' layout) overrides ``seed`` and sets the size; the other options are
        :meth:`sample`'s.
        """
        if (prompts is None) == (embeddings is None):
            raise ValueError("give exactly one of prompts and embeddings")
        if embeddings is None:
            embeddings = self.encode_prompt(prompts, negative_prompts, max_sequence_length, clean_caption)
        if latents is None:
            latents = self.initial_latents(jnp.shape(embeddings[0])[0], height, width, seed)
        result = self.sample(embeddings, latents, guidance=guidance, scale=scale, zero_init_steps=zero_init_steps,
                             num_steps=num_steps, scaling_watershed=scaling_watershed,
                             proportional_attn=proportional_attn)
        return result.samples, self.decode(result.samples)

    generate = __call__
