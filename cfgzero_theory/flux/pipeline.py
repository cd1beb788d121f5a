"""Text-to-image with a diffusers FLUX.1 (dev or schnell) folder, the sampling loop in JAX.

Public API
----------
* :func:`encode_prompt` ``(components, prompts, negative_prompts=None, max_sequence_length=512, *,
  prompts_2=None, negative_prompts_2=None) -> (prompt_embeds, pooled, negative_prompt_embeds,
  negative_pooled)`` (the negative pair is ``None`` without negative prompts);
* :class:`FluxPipeline` — ``FluxPipeline.from_pretrained(folder, dtype=None, sharding=None)``,
  ``pipeline(prompts or embeddings=..., ...) -> (latents, images)``, and its stages
  ``encode_prompt``, ``initial_latents``, ``sample`` (the loop alone, with
  ``return_trajectory``), ``decode``, ``load_lora`` (LoRA files in the diffusers, BFL/ComfyUI
  and kohya formats), :func:`pack_latents` / :func:`unpack_latents`.

Prompt encoding (``diffusers.FluxPipeline.encode_prompt``)
-----------------------------------------------------------
CLIP-L (``text_encoder/``, a ``CLIPTextModel``) reads ``prompts`` at 77 tokens and gives the
pooled embedding ``(B, 768)``; T5 (``text_encoder_2/``) reads ``prompts_2`` (default: the
prompts) at ``max_sequence_length`` tokens (≤ 512) and gives the sequence ``(B, L, 4096)``,
without an attention mask.  Text positions are zeros.

Latents
-------
The noise is drawn ``(B, C, 2⌊H/2f⌋, 2⌊W/2f⌋)`` (``f`` the VAE factor, ``C = in_channels / 4``)
and packed into 2×2 patches, ``(B, h·w/4, 4C)`` with channels in ``(C, 2, 2)`` order
(:func:`pack_latents`); ``latents=`` takes this packed layout, as ``diffusers.FluxPipeline``
does.  Decoding unpacks, applies ``z / scaling_factor + shift_factor`` (from ``vae/config.json``)
and the VAE.

Schedule
--------
``FlowMatchEulerDiscreteScheduler`` with the pipeline's sigmas ``linspace(1, 1/N, N)`` and, when
the scheduler config says ``use_dynamic_shifting`` (dev), the exponential time shift with
``μ = calculate_shift(h·w/4, base_image_seq_len, max_image_seq_len, base_shift, max_shift)``;
schnell's config has a static shift of 1.

Guidance
--------
Two ways, as the paper's official code and diffusers sample Flux:

* **one branch** (no negative prompt): the guidance-distilled model sees ``distilled_guidance``
  (default 3.5; dev only — schnell embeds none) and one forward per step evaluates the
  conditional branch; the rule kind is ``"conditional"`` and ``zero_init_steps`` zeroes the
  first ``K`` steps (the paper's Flux setting: ``K = 1``, the ``"flux-dev"`` preset);
* **true CFG** (a negative prompt, diffusers' ``true_cfg_scale``): two forwards per step, any
  rule kind of :data:`cfgzero_theory.guidance.KINDS` with its ``scale`` (defaults from the
  ``"flux-dev-true-cfg"`` preset: CFG-Zero*, 4.0, ``K = 1``); the distilled guidance is
  embedded in both branches.

Step counts default to the model's preset: 50 for dev (the paper; diffusers' default is 28),
4 for schnell.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from cfgzero_theory import presets
from cfgzero_theory.compilation import enable_compilation_cache
from cfgzero_theory.flux.weights import flux_model_fn, load_flux_transformer, original_layout, weight_map
from cfgzero_theory.guidance import KINDS as GUIDANCE_KINDS
from cfgzero_theory.ports.autoencoder import load_vae
from cfgzero_theory.ports.clip import load_clip_text_encoder
from cfgzero_theory.ports.lora import merge_lora
from cfgzero_theory.ports.pipeline_parts import (
    as_prompt_list, encode_tokens, initial_noise, load_tokenizer, pipeline_components, read_json, token_ids,
)
from cfgzero_theory.ports.sharding import ParamSharding
from cfgzero_theory.ports.t5 import load_t5_encoder
from cfgzero_theory.sampling import FlowSampleResult, sample_flow
from cfgzero_theory.schedules import flow_match_euler_schedule, flux_mu, flux_sigmas
from cfgzero_theory.validation import check_choice, check_int, check_real

__all__ = ["GUIDANCE_KINDS", "FluxPipeline", "encode_prompt", "pack_latents", "unpack_latents"]

PIPELINE_CLASSES = ("FluxPipeline",)
REQUIRED = ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
SCHEDULE_KEYS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "time_shift_type", "shift_terminal",
                 "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
"""Keys of ``scheduler_config.json`` handed to :func:`flow_match_euler_schedule` when present."""
SHIFT_KEYS = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
MAX_SEQUENCE_LENGTH = 512
DISTILLED_GUIDANCE = 3.5
#: One-branch defaults per model (steps and ``K``), and the true-CFG defaults (kind, scale, ``K``).
PRESETS = {"dev": presets.get("flux-dev"), "schnell": presets.get("flux-schnell")}
TRUE_CFG_PRESET = presets.get("flux-dev-true-cfg")


# ----------------------------------------------------------------------------- prompts


def encode_prompt(components, prompts, negative_prompts=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH, *,
                  prompts_2=None, negative_prompts_2=None):
    """Flux's text conditioning: ``(prompt_embeds (B, L, J), pooled (B, P), negative_prompt_embeds,
    negative_pooled)`` (module docstring); the negative pair is ``None`` when ``negative_prompts``
    is.  ``components`` is a :class:`FluxPipeline`.  A single negative prompt serves every prompt."""
    max_sequence_length = check_int("max_sequence_length", max_sequence_length, minimum=1,
                                    maximum=MAX_SEQUENCE_LENGTH)
    clip_prompts = as_prompt_list(prompts, "prompts")
    t5_prompts = as_prompt_list(prompts if prompts_2 is None else prompts_2, "prompts_2")
    batch = len(clip_prompts)
    if len(t5_prompts) != batch:
        raise ValueError(f"prompts_2 must hold as many prompts as prompts ({batch}), got {len(t5_prompts)}")

    def encode(clip_texts, t5_texts):
        _, pooled = encode_tokens(components.text_encoder, token_ids(
            components.tokenizer, clip_texts, components.tokenizer.model_max_length))
        embeds = encode_tokens(components.text_encoder_2, token_ids(components.tokenizer_2, t5_texts,
                                                                    max_sequence_length))
        return embeds, pooled

    positive = encode(clip_prompts, t5_prompts)
    if negative_prompts is None:
        if negative_prompts_2 is not None:
            raise ValueError("negative_prompts_2 needs negative_prompts")
        return (*positive, None, None)
    negative = []
    for name, texts in (("negative_prompts", negative_prompts),
                        ("negative_prompts_2", negative_prompts if negative_prompts_2 is None else negative_prompts_2)):
        texts = as_prompt_list(texts, name)
        texts = texts * batch if len(texts) == 1 else texts
        if len(texts) != batch:
            raise ValueError(f"{name} must hold one prompt or as many as prompts ({batch}), got {len(texts)}")
        negative.append(texts)
    return (*positive, *encode(*negative))


# ----------------------------------------------------------------------------- latents


def pack_latents(latents) -> jax.Array:
    """``(B, C, h, w) -> (B, h·w/4, 4C)``: 2×2 patches, channels in ``(C, 2, 2)`` order."""
    b, c, h, w = latents.shape
    x = jnp.reshape(latents, (b, c, h // 2, 2, w // 2, 2)).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens, h: int, w: int) -> jax.Array:
    """The inverse of :func:`pack_latents` for a latent grid of ``h × w``."""
    b, _, c4 = tokens.shape
    x = jnp.reshape(tokens, (b, h // 2, w // 2, c4 // 4, 2, 2)).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


# ----------------------------------------------------------------------------- the pipeline


class FluxPipeline:
    """A loaded FLUX.1 dev or schnell text-to-image pipeline (see the module docstring)."""

    def __init__(self, *, transformer, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2,
                 scheduler_config: dict):
        if scheduler_config.get("_class_name", SCHEDULER_CLASS) != SCHEDULER_CLASS:
            raise ValueError(f"the scheduler must be {SCHEDULER_CLASS}, got {scheduler_config.get('_class_name')!r}")
        if text_encoder.config.with_projection:
            raise ValueError("text_encoder must be a CLIPTextModel (pooled output, no projection), as Flux's is")
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.scheduler_config = dict(scheduler_config)
        self._model_fns = {}
        vae_graph = nnx.graphdef(vae)
        self._decode = jax.jit(lambda state, z: nnx.merge(vae_graph, state).decode(z))

    @property
    def variant(self) -> str:
        """``"dev"`` when the transformer embeds the distilled guidance, else ``"schnell"``."""
        return "dev" if self.transformer.config.guidance_embeds else "schnell"

    @property
    def preset(self) -> presets.SamplerPreset:
        """The one-branch sampler defaults of this model (steps and ``K``)."""
        return PRESETS[self.variant]

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, dtype=None, sharding: ParamSharding | None = None, *,
                        compilation_cache: bool = True) -> FluxPipeline:
        """Load a diffusers ``FluxPipeline`` folder (``model_index.json`` and subfolders).

        ``dtype`` casts every weight (``None`` keeps the stored dtypes); ``sharding`` splits every
        model's weights over a device mesh as they are read; ``compilation_cache`` turns on JAX's
        persistent compilation cache.  Raises ``ValueError`` when the folder is not a Flux
        pipeline or a subfolder it lists is missing.
        """
        if compilation_cache:
            enable_compilation_cache()
        root = Path(folder)
        present = pipeline_components(root, "a Flux pipeline", PIPELINE_CLASSES, REQUIRED)
        options = dict(dtype=dtype, sharding=sharding)
        return cls(
            transformer=load_flux_transformer(present["transformer"], **options),
            vae=load_vae(present["vae"], **options),
            text_encoder=load_clip_text_encoder(present["text_encoder"], architecture="CLIPTextModel", **options),
            text_encoder_2=load_t5_encoder(present["text_encoder_2"], **options),
            tokenizer=load_tokenizer(present["tokenizer"]),
            tokenizer_2=load_tokenizer(present["tokenizer_2"]),
            scheduler_config=read_json(root / "scheduler" / "scheduler_config.json", "the scheduler config"),
        )

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> int:
        """Merge a LoRA safetensors file into the transformer, in place: ``W ← W + scale · (α/r) · B A``
        computed in float32 and rounded once to the weights' dtype.

        Keys may be diffusers / PEFT (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``),
        Black Forest Labs / ComfyUI (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``
        or ``lora_down``, with ``.alpha``) or kohya (``lora_unet_double_blocks_0_img_attn_qkv``):
        :func:`cfgzero_theory.ports.lora.merge_lora` with Flux's
        :func:`~cfgzero_theory.flux.weights.original_layout`.  Every key is checked before any
        weight changes; an unknown or unmatched key is a ``ValueError`` naming it (no half
        LoRA is ever applied).  One call per file, each with its ``scale``; the next sampling
        call uses the merged weights without recompiling.  Returns the number of linear layers
        changed.
        """
        return merge_lora(self.transformer, weight_map, [(path, scale)],
                          original=original_layout(self.transformer.config), what="Flux transformer")

    def schedule(self, num_steps: int, image_seq_len: int):
        """The σ schedule ``FluxPipeline`` builds for ``num_steps`` steps and ``image_seq_len`` packed tokens."""
        config = self.scheduler_config
        options = {key: config[key] for key in SCHEDULE_KEYS if key in config}
        mu = flux_mu(image_seq_len, *(config.get(key, default) for key, default in
                                      zip(SHIFT_KEYS, (256, 4096, 0.5, 1.15))))
        return flow_match_euler_schedule(num_steps, sigmas=flux_sigmas(num_steps), mu=mu, **options)

    def model_fn(self, grid: tuple[int, int]):
        """The transformer as a :func:`~cfgzero_theory.sampling.sample_flow` model on the packed
        ``grid`` (one function object per grid, so each image size compiles once)."""
        grid = tuple(grid)
        if grid not in self._model_fns:
            self._model_fns[grid] = flux_model_fn(self.transformer, grid)
        return self._model_fns[grid]

    def encode_prompt(self, prompts, negative_prompts=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                      **options):
        """:func:`encode_prompt` with this pipeline's components (``options``: ``prompts_2``, ``negative_prompts_2``)."""
        return encode_prompt(self, prompts, negative_prompts, max_sequence_length, **options)

    def latent_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """The unpacked latent grid ``(h, w)`` for an image of ``height × width`` pixels
        (default 1024² for the real model: 128 × the VAE factor); both sides must be positive
        multiples of twice the VAE factor."""
        factor = self.vae_scale_factor
        multiple = 2 * factor
        height = 128 * factor if height is None else check_int("height", height, minimum=1)
        width = 128 * factor if width is None else check_int("width", width, minimum=1)
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}×{width}")
        return height // factor, width // factor

    def initial_latents(self, batch: int, height: int | None = None, width: int | None = None, seed: int = 0,
                        dtype=jnp.float32) -> jax.Array:
        """Packed initial noise ``(batch, h·w/4, in_channels)``: ``N(0, I)`` drawn unpacked with
        ``PRNGKey(seed)`` (:func:`~cfgzero_theory.ports.pipeline_parts.initial_noise`), then packed."""
        h, w = self.latent_size(height, width)
        batch = check_int("batch", batch, minimum=1)
        return pack_latents(initial_noise(seed, (batch, self.transformer.config.in_channels // 4, h, w), dtype))

    def decode(self, latents, height: int | None = None, width: int | None = None) -> jax.Array:
        """Packed latents of a ``height × width`` image → images ``(B, H, W, 3)`` in ``[0, 1]`` (float32)."""
        z = self.vae.latents_to_vae(unpack_latents(jnp.asarray(latents), *self.latent_size(height, width)))
        image = self._decode(nnx.state(self.vae), z).astype(jnp.float32)
        return jnp.clip(jnp.transpose(image, (0, 2, 3, 1)) / 2 + 0.5, 0.0, 1.0)

    def rule(self, two_branches: bool, guidance: str | None, scale: float | None, zero_init_steps: int | None):
        """The guidance rule: with ``two_branches`` (true CFG) any kind, defaults from the true-CFG
        preset; otherwise only ``"conditional"``, with this model's ``K``."""
        if two_branches:
            if guidance == "conditional":
                raise ValueError("guidance='conditional' samples one branch: leave negative_prompts out")
            return TRUE_CFG_PRESET.rule(guidance, scale=scale, zero_init_steps=zero_init_steps)
        if guidance not in (None, "conditional"):
            check_choice("guidance", guidance, GUIDANCE_KINDS)
            raise ValueError(f"guidance={guidance!r} is true CFG and needs negative_prompts (e.g. ''); without them "
                             "Flux samples the conditional branch only (guidance='conditional')")
        if scale is not None:
            raise ValueError("scale is the true-CFG scale and needs negative_prompts; the one-branch path uses "
                             "distilled_guidance")
        return self.preset.rule("conditional", zero_init_steps=zero_init_steps)

    def sample(self, embeddings, latents, *, height: int | None = None, width: int | None = None,
               guidance: str | None = None, scale: float | None = None, zero_init_steps: int | None = None,
               num_steps: int | None = None, distilled_guidance: float | None = None,
               return_trajectory: bool = False) -> FlowSampleResult:
        """The denoising loop alone, one compiled :func:`~cfgzero_theory.sampling.sample_flow`.

        ``embeddings`` is :meth:`encode_prompt`'s 4-tuple (the negative pair ``None`` for the
        one-branch path); ``latents`` the packed initial noise of a ``height × width`` image, cast
        to the prompt embeddings' dtype as diffusers does.  Guidance as in the module docstring;
        ``distilled_guidance`` (dev only, default 3.5) is embedded in every branch.  Returns the
        :class:`~cfgzero_theory.sampling.FlowSampleResult` (per-step predictions with
        ``return_trajectory``).
        """
        if not (isinstance(embeddings, (tuple, list)) and len(embeddings) == 4):
            raise ValueError("embeddings must be (cond, pooled, uncond, uncond_pooled) as encode_prompt returns")
        cond, pooled = jnp.asarray(embeddings[0]), jnp.asarray(embeddings[1])
        two_branches = embeddings[2] is not None
        rule = self.rule(two_branches, guidance, scale, zero_init_steps)
        num_steps = check_int("num_steps", self.preset.num_steps if num_steps is None else num_steps, minimum=1)
        h, w = self.latent_size(height, width)
        batch, config = cond.shape[0], self.transformer.config
        latents = jnp.asarray(latents)
        expected = (batch, (h // 2) * (w // 2), config.in_channels)
        if latents.shape != expected:
            raise ValueError(f"latents must be packed noise of shape {expected} for a {h * self.vae_scale_factor}×"
                             f"{w * self.vae_scale_factor} image, got {latents.shape}")
        extra = ()
        if config.guidance_embeds:
            g = check_real("distilled_guidance", DISTILLED_GUIDANCE if distilled_guidance is None else distilled_guidance)
            extra = (jnp.full((batch,), g, jnp.float32),)
        elif distilled_guidance is not None:
            raise ValueError("distilled_guidance needs a guidance-distilled model (FLUX.1-dev); this one embeds none")
        context = (cond, pooled, *extra)
        uncond = (jnp.asarray(embeddings[2]), jnp.asarray(embeddings[3]), *extra) if two_branches else None
        return sample_flow(self.model_fn((h // 2, w // 2)), nnx.state(self.transformer), latents.astype(cond.dtype),
                           self.schedule(num_steps, expected[1]), context, uncond, rule,
                           return_trajectory=return_trajectory)

    def __call__(self, prompts=None, *, negative_prompts=None, embeddings=None, guidance: str | None = None,
                 scale: float | None = None, zero_init_steps: int | None = None, num_steps: int | None = None,
                 distilled_guidance: float | None = None, height: int | None = None, width: int | None = None,
                 seed: int = 0, latents=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH, prompts_2=None,
                 negative_prompts_2=None):
        """Generate images; returns ``(packed latents (B, h·w/4, 4C), images (B, H, W, 3) in [0, 1])``.

        Either ``prompts`` (encoded by :meth:`encode_prompt` with the negative and T5 prompts) or
        precomputed ``embeddings``.  ``latents`` (packed initial noise) overrides ``seed``; the
        other options are :meth:`sample`'s, and the result goes through :meth:`decode`.
        """
        if (prompts is None) == (embeddings is None):
            raise ValueError("give exactly one of prompts and embeddings")
        if embeddings is None:
            embeddings = self.encode_prompt(prompts, negative_prompts, max_sequence_length, prompts_2=prompts_2,
                                            negative_prompts_2=negative_prompts_2)
        if latents is None:
            latents = self.initial_latents(jnp.shape(embeddings[0])[0], height, width, seed)
        result = self.sample(embeddings, latents, height=height, width=width, guidance=guidance, scale=scale,
                             zero_init_steps=zero_init_steps, num_steps=num_steps,
                             distilled_guidance=distilled_guidance)
        return result.samples, self.decode(result.samples, height, width)

    generate = __call__
