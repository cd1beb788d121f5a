"""Text-to-image with a diffusers Stable Diffusion 3 / 3.5 folder, the sampling loop in JAX.

Public API
----------
* :func:`encode_prompt` ``(components, prompts, negative_prompts=None, max_sequence_length=256, *,
  prompts_2=None, prompts_3=None, negative_prompts_2=None, negative_prompts_3=None, clip_skip=None)
  -> (prompt_embeds, pooled, negative_prompt_embeds, negative_pooled)``;
* :class:`SD3Pipeline` — ``SD3Pipeline.from_pretrained(folder, dtype=None, sharding=None)``,
  ``pipeline(prompts or embeddings=..., ...) -> (latents, images)`` (also ``pipeline.generate``),
  and its stages ``encode_prompt``, ``initial_latents``, ``sample`` (the loop alone, with
  ``return_trajectory``), ``decode``, ``skip_layer_guidance`` and the ``model_fn`` property;
* :func:`cfgzero_theory.ports.pipeline_parts.save_png` ``(images, path)`` writes the images.

Prompt encoding (the conditioning of ``StableDiffusion3Pipeline``)
-------------------------------------------------------------------
Each prompt is tokenised three times, padded to a fixed length and truncated: by
``tokenizer/`` and ``tokenizer_2/`` to their ``model_max_length`` (77 for SD3), by
``tokenizer_3/`` to ``max_sequence_length`` (special tokens added: T5's ``</s>``).  The two
CLIP towers give their penultimate hidden states ``(B, 77, 768)`` and ``(B, 77, 1280)``,
joined on the feature axis and zero-padded on it to the T5 width ``J`` (4096); the T5 states
``(B, max_sequence_length, J)`` follow on the sequence axis, giving ``(B, 77 +
max_sequence_length, J)``.  The pooled embedding is both towers' projected ``text_embeds``
joined, ``(B, 768 + 1280)``.  The negative prompt defaults to ``""``.  Without a T5 encoder
(``text_encoder_3`` null in ``model_index.json``) its part is zeros of width
``joint_attention_dim``.

Sampling
--------
``latents ~ N(0, I)`` of shape ``(B, in_channels, H / f, W / f)`` (``f`` the VAE's
downsampling factor; or the caller's ``latents``), the scheduler's σ schedule
(:func:`~cfgzero_theory.schedules.flow_match_euler_schedule` with the ``shift`` of
``scheduler/scheduler_config.json``), the guidance rule of
:meth:`cfgzero_theory.presets.SamplerPreset.rule` (kinds ``"cfg"``, ``"cfg-star"``, ``"zero-init"``,
``"cfg-zero-star"``, ``"conditional"``; defaults from the ``"sd3"`` preset), and the whole loop one compiled
:func:`~cfgzero_theory.sampling.sample_flow`.  Then the decoder receives ``latents /
scaling_factor + shift_factor`` and the images are ``clip(x / 2 + 1/2, 0, 1)`` in NHWC.

Per-encoder prompts (``prompts_2`` → CLIP-bigG, ``prompts_3`` → T5) and ``clip_skip`` are
diffusers' ``prompt_2`` / ``prompt_3`` / ``clip_skip``; skip-layer guidance (SD3.5-medium)
is a :class:`~cfgzero_theory.sampling.PerturbedGuidance` term on top of any rule.

LoRA files merge into the transformer with :meth:`SD3Pipeline.load_lora`.  Not supported: IP-adapters, dynamic shifting, and schedulers other than
``FlowMatchEulerDiscreteScheduler``.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from cfgzero_theory import presets
from cfgzero_theory.compilation import enable_compilation_cache
from cfgzero_theory.guidance import KINDS as GUIDANCE_KINDS
from cfgzero_theory.sampling import FlowSampleResult, PerturbedGuidance, sample_flow
from cfgzero_theory.schedules import flow_match_euler_schedule
from cfgzero_theory.ports.autoencoder import load_vae
from cfgzero_theory.ports.clip import load_clip_text_encoder
from cfgzero_theory.ports.lora import merge_lora
from cfgzero_theory.ports.moved import moved_attributes
from cfgzero_theory.ports.pipeline_parts import (
    as_prompt_list, encode_tokens, initial_noise, load_tokenizer, pipeline_components, read_json, token_ids,
)
from cfgzero_theory.ports.sharding import ParamSharding
from cfgzero_theory.ports.t5 import load_t5_encoder
from cfgzero_theory.sd3.weights import weight_map, load_sd3_transformer, sd3_model_fn
from cfgzero_theory.validation import check_int

__all__ = ["GUIDANCE_KINDS", "SD3Pipeline", "encode_prompt"]

__getattr__ = moved_attributes(__name__, {
    "save_png": "cfgzero_theory.ports.pipeline_parts:save_png",
    "to_uint8": "cfgzero_theory.ports.pipeline_parts:to_uint8",
})

#: The sampler defaults of :meth:`SD3Pipeline.sample` (guidance kind, scale, ``K``, steps).
PRESET = presets.get("sd3")
PIPELINE_CLASSES = ("StableDiffusion3Pipeline",)
REQUIRED = ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
OPTIONAL = ("text_encoder_3", "tokenizer_3")
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
SCHEDULE_KEYS = ("num_train_timesteps", "shift", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                 "use_beta_sigmas")
"""Keys of ``scheduler_config.json`` handed to :func:`flow_match_euler_schedule` when present."""


# ----------------------------------------------------------------------------- prompts


def _encode(components, prompts: tuple[list[str], list[str], list[str]], max_sequence_length: int,
            clip_skip: int | None) -> tuple[jax.Array, jax.Array]:
    clip_states, pooled = [], []
    for texts, tokenizer, encoder in ((prompts[0], components.tokenizer, components.text_encoder),
                                      (prompts[1], components.tokenizer_2, components.text_encoder_2)):
        ids = token_ids(tokenizer, texts, tokenizer.model_max_length)
        hidden, text_embeds = encode_tokens(encoder, ids, clip_skip=clip_skip)
        clip_states.append(hidden)
        pooled.append(text_embeds)
    clip = jnp.concatenate(clip_states, axis=-1)
    if components.text_encoder_3 is None:
        t5 = jnp.zeros((len(prompts[2]), max_sequence_length, components.joint_attention_dim), clip.dtype)
    else:
        t5 = encode_tokens(components.text_encoder_3, token_ids(components.tokenizer_3, prompts[2], max_sequence_length))
    width = t5.shape[-1]
    if clip.shape[-1] > width:
        raise ValueError(f"the CLIP states ({clip.shape[-1]} features) are wider than the T5 states ({width})")
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
    return jnp.concatenate([clip, t5.astype(clip.dtype)], axis=1), jnp.concatenate(pooled, axis=-1)


def _per_encoder(first, second, third, what: str, batch: int | None = None) -> tuple[list[str], ...]:
    """The three encoders' prompt lists: ``second``/``third`` fall back to ``first`` when empty
    (diffusers' ``prompt_2 or prompt``); a single string is repeated ``batch`` times."""
    lists = []
    for suffix, texts in (("", first), ("_2", second or first), ("_3", third or first)):
        texts = as_prompt_list(texts, what + suffix)
        if batch is not None and len(texts) == 1:
            texts = texts * batch
        lists.append(texts)
    sizes = {len(texts) for texts in lists}
    if len(sizes) != 1 or (batch is not None and sizes != {batch}):
        raise ValueError(f"{what}, {what}_2 and {what}_3 must hold the same number of prompts"
                         f"{'' if batch is None else f' as prompts ({batch})'}, got {[len(t) for t in lists]}")
    return tuple(lists)


def encode_prompt(components, prompts, negative_prompts=None, max_sequence_length: int = 256, *,
                  prompts_2=None, prompts_3=None, negative_prompts_2=None, negative_prompts_3=None,
                  clip_skip: int | None = None):
    """SD3's text conditioning of ``prompts`` and ``negative_prompts`` (default ``""``).

    ``components`` is an :class:`SD3Pipeline` (anything with its ``tokenizer*`` /
    ``text_encoder*`` attributes and ``joint_attention_dim``).  ``prompts_2`` / ``prompts_3``
    go to CLIP-bigG / T5 instead of ``prompts`` (each defaults to ``prompts``), likewise the
    negative ones (defaulting to ``negative_prompts``); a single negative prompt is used for
    every prompt.  ``clip_skip`` takes both CLIP towers' ``hidden_states[-(clip_skip + 2)]``
    for the prompts; as in diffusers, the negative prompts always use the penultimate layer.
    Returns ``(prompt_embeds (B, L_clip + max_sequence_length, J), pooled (B, P),
    negative_prompt_embeds, negative_pooled)``.
    """
    positive = _per_encoder(prompts, prompts_2, prompts_3, "prompts")
    batch = len(positive[0])
    negative = _per_encoder("" if negative_prompts is None else negative_prompts, negative_prompts_2,
                            negative_prompts_3, "negative_prompts", batch)
    max_sequence_length = check_int("max_sequence_length", max_sequence_length, minimum=1)
    if clip_skip is not None:
        clip_skip = check_int("clip_skip", clip_skip, minimum=0)
    return (*_encode(components, positive, max_sequence_length, clip_skip),
            *_encode(components, negative, max_sequence_length, None))


# ----------------------------------------------------------------------------- the pipeline


class SD3Pipeline:
    """A loaded SD3 / SD3.5 text-to-image pipeline (see the module docstring)."""

    def __init__(self, *, transformer, vae, text_encoder, text_encoder_2, text_encoder_3, tokenizer, tokenizer_2,
                 tokenizer_3, scheduler_config: dict):
        if scheduler_config.get("_class_name", SCHEDULER_CLASS) != SCHEDULER_CLASS:
            raise ValueError(f"the scheduler must be {SCHEDULER_CLASS}, got {scheduler_config.get('_class_name')!r}")
        if scheduler_config.get("use_dynamic_shifting", False):
            raise ValueError("schedulers with use_dynamic_shifting are not supported")
        if (text_encoder_3 is None) != (tokenizer_3 is None):
            raise ValueError("text_encoder_3 and tokenizer_3 must be given together")
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoder, text_encoder_2, text_encoder_3
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self.scheduler_config = dict(scheduler_config)
        self._model_fn = sd3_model_fn(transformer)
        self._skip_model_fns = {}
        vae_graph = nnx.graphdef(vae)
        self._decode = jax.jit(lambda state, z: nnx.merge(vae_graph, state).decode(z))

    @property
    def model_fn(self):
        """The transformer as a :func:`~cfgzero_theory.sampling.sample_flow` model (one function
        object per pipeline, so the loop compiles once); its params are ``nnx.state(self.transformer)``."""
        return self._model_fn

    @property
    def joint_attention_dim(self) -> int:
        return self.transformer.config.joint_attention_dim

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def shift(self) -> float:
        return float(self.scheduler_config.get("shift", 1.0))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, dtype=None, sharding: ParamSharding | None = None, *,
                        compilation_cache: bool = True) -> SD3Pipeline:
        """Load a diffusers ``StableDiffusion3Pipeline`` folder (``model_index.json`` and subfolders).

        ``dtype`` casts every weight (``None`` keeps the stored dtypes); ``sharding`` (e.g.
        :func:`~cfgzero_theory.ports.sharding.mesh_sharding` ``()``) splits every model's weights
        over a device mesh as they are read, for models that do not fit one device.  Raises ``ValueError``
        when the folder is not an SD3 pipeline or a subfolder it lists is missing.
        ``compilation_cache`` turns on JAX's persistent compilation cache
        (:func:`cfgzero_theory.compilation.enable_compilation_cache`), so a second process
        reuses the compiled sampling loop.
        """
        if compilation_cache:
            enable_compilation_cache()
        root = Path(folder)
        present = pipeline_components(root, "an SD3 pipeline", PIPELINE_CLASSES, REQUIRED, OPTIONAL)
        scheduler = read_json(root / "scheduler" / "scheduler_config.json", "the scheduler config")
        t5_folder = present["text_encoder_3"]
        tok3_folder = present["tokenizer_3"]
        return cls(
            transformer=load_sd3_transformer(present["transformer"], dtype=dtype, sharding=sharding),
            vae=load_vae(present["vae"], dtype=dtype, sharding=sharding),
            text_encoder=load_clip_text_encoder(present["text_encoder"], dtype=dtype, sharding=sharding),
            text_encoder_2=load_clip_text_encoder(present["text_encoder_2"], dtype=dtype, sharding=sharding),
            text_encoder_3=None if t5_folder is None else load_t5_encoder(t5_folder, dtype=dtype, sharding=sharding),
            tokenizer=load_tokenizer(present["tokenizer"]),
            tokenizer_2=load_tokenizer(present["tokenizer_2"]),
            tokenizer_3=None if tok3_folder is None else load_tokenizer(tok3_folder),
            scheduler_config=scheduler,
        )

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> int:
        """Merge a LoRA safetensors file into the transformer, in place: ``W ← W + scale · (α/r) · B A``.

        :func:`cfgzero_theory.ports.lora.merge_lora` with SD3's weight map: diffusers / PEFT
        keys (with or without ``transformer.``) and kohya ``lora_unet_*`` keys of diffusers
        module names; the formula, the formats and the checks are documented there.  The
        transformer only: a file with text-encoder keys is refused.  Each call merges one file
        (several LoRAs: one call each, with its own ``scale``); the weights keep their dtype,
        rounded once per call.  The next sampling call uses the merged weights without
        recompiling (the loop takes them as inputs).  A merge is not undone: reload the
        pipeline to drop it.

        Returns the number of linear layers changed.  Raises ``ValueError`` when ``scale`` is
        not a finite real number or the file does not fit the transformer (then no weight has
        changed); ``FileNotFoundError`` for a missing file.
        """
        return merge_lora(self.transformer, weight_map, [(path, scale)], what="SD3 transformer")

    def schedule(self, num_steps: int):
        """The σ schedule of ``scheduler_config.json`` for ``num_steps`` steps."""
        options = {key: self.scheduler_config[key] for key in SCHEDULE_KEYS if key in self.scheduler_config}
        return flow_match_euler_schedule(num_steps, **options)

    def encode_prompt(self, prompts, negative_prompts=None, max_sequence_length: int = 256, **options):
        """:func:`encode_prompt` with this pipeline's components (``options``: ``prompts_2``, …, ``clip_skip``)."""
        return encode_prompt(self, prompts, negative_prompts, max_sequence_length, **options)

    def skip_layer_guidance(self, layers, scale: float | None = None, start: float | None = None,
                            stop: float | None = None):
        """Skip-layer guidance as a :class:`~cfgzero_theory.sampling.PerturbedGuidance` term.

        The perturbed prediction is the transformer with the blocks ``layers`` skipped
        (SD3.5-medium's model card: ``(7, 8, 9)``); one model function per ``layers`` tuple is
        kept, so repeated calls reuse the compiled loop.  ``scale``, ``start`` and ``stop``
        default to :class:`~cfgzero_theory.sampling.PerturbedGuidance`'s (diffusers' defaults).
        """
        num_layers = self.transformer.config.num_layers
        try:
            layers = tuple(sorted({check_int("skip_guidance_layers entry", i, minimum=0, maximum=num_layers - 1)
                                   for i in layers}))
        except TypeError:
            raise ValueError(f"skip_guidance_layers must be a sequence of block indices, got {layers!r}") from None
        if not layers:
            raise ValueError(f"skip_guidance_layers must hold at least one block index in [0, {num_layers}), got ()")
        if layers not in self._skip_model_fns:
            self._skip_model_fns[layers] = sd3_model_fn(self.transformer, skip_layers=layers)
        options = {k: v for k, v in dict(scale=scale, start=start, stop=stop).items() if v is not None}
        return PerturbedGuidance(self._skip_model_fns[layers], **options)

    def decode(self, latents) -> jax.Array:
        """Denoiser latents ``(B, C, h, w)`` → images ``(B, H, W, 3)`` in ``[0, 1]`` (float32)."""
        z = self.vae.latents_to_vae(jnp.asarray(latents))
        image = self._decode(nnx.state(self.vae), z).astype(jnp.float32)
        return jnp.clip(jnp.transpose(image, (0, 2, 3, 1)) / 2 + 0.5, 0.0, 1.0)

    def initial_latents(self, batch: int, height: int | None = None, width: int | None = None, seed: int = 0,
                        dtype=jnp.float32) -> jax.Array:
        """The pipeline's initial noise ``(batch, in_channels, height / f, width / f)``:
        ``jax.random.normal(PRNGKey(seed))``; the size defaults to the transformer's
        ``sample_size`` times the VAE factor ``f``."""
        config = self.transformer.config
        factor = self.vae_scale_factor
        height = config.sample_size * factor if height is None else height
        width = config.sample_size * factor if width is None else width
        multiple = factor * config.patch_size
        height, width = check_int("height", height, minimum=1), check_int("width", width, minimum=1)
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}×{width}")
        batch = check_int("batch", batch, minimum=1)
        return initial_noise(seed, (batch, config.in_channels, height // factor, width // factor), dtype)

    def sample(self, embeddings, latents, *, guidance: str | None = None, scale: float | None = None,
               zero_init_steps: int | None = None, num_steps: int | None = None, skip_guidance_layers=None,
               skip_layer_guidance_scale: float | None = None, skip_layer_guidance_start: float | None = None,
               skip_layer_guidance_stop: float | None = None, return_trajectory: bool = False) -> FlowSampleResult:
        """The denoising loop alone, one compiled :func:`~cfgzero_theory.sampling.sample_flow`.

        ``embeddings`` is :meth:`encode_prompt`'s ``(cond, pooled, uncond, uncond_pooled)``
        (precomputed embeddings are fine); ``latents`` the initial noise ``(B, C, h, w)``, cast
        to the embeddings' dtype as diffusers does (bf16 weights sample bf16 latents).
        ``guidance`` is a rule kind of :data:`cfgzero_theory.guidance.KINDS`; ``guidance``,
        ``scale``, ``zero_init_steps`` and ``num_steps`` left ``None`` take the ``"sd3"``
        preset's values (:data:`PRESET`: CFG-Zero*, scale 7.0 — diffusers' default — ``K = 1``,
        28 steps).  ``skip_guidance_layers`` adds skip-layer guidance
        (:meth:`skip_layer_guidance`, diffusers' names and defaults).
        Returns the :class:`~cfgzero_theory.sampling.FlowSampleResult` (per-step predictions
        and ``s*`` with ``return_trajectory``).
        """
        num_steps = check_int("num_steps", PRESET.num_steps if num_steps is None else num_steps, minimum=1)
        if not (isinstance(embeddings, (tuple, list)) and len(embeddings) == 4):
            raise ValueError("embeddings must be (cond, pooled, uncond, uncond_pooled) as encode_prompt returns")
        cond, pooled, uncond, uncond_pooled = (jnp.asarray(e) for e in embeddings)
        batch, config = cond.shape[0], self.transformer.config
        latents = jnp.asarray(latents)
        if latents.ndim != 4 or latents.shape[:2] != (batch, config.in_channels):
            raise ValueError(f"latents must have shape ({batch}, {config.in_channels}, h, w), got {latents.shape}")
        perturbed = None if skip_guidance_layers is None else self.skip_layer_guidance(
            skip_guidance_layers, skip_layer_guidance_scale, skip_layer_guidance_start, skip_layer_guidance_stop)
        rule = PRESET.rule(guidance, scale=scale, zero_init_steps=zero_init_steps)
        return sample_flow(self._model_fn, nnx.state(self.transformer), latents.astype(cond.dtype),
                           self.schedule(num_steps), (cond, pooled), (uncond, uncond_pooled), rule,
                           perturbed=perturbed, return_trajectory=return_trajectory)

    def __call__(self, prompts=None, *, negative_prompts=None, embeddings=None, guidance: str | None = None,
                 scale: float | None = None, zero_init_steps: int | None = None, num_steps: int | None = None,
                 height: int | None = None, width: int | None = None, seed: int = 0, latents=None,
                 max_sequence_length: int = 256, prompts_2=None, prompts_3=None, negative_prompts_2=None,
                 negative_prompts_3=None, clip_skip: int | None = None, skip_guidance_layers=None,
                 skip_layer_guidance_scale: float | None = None, skip_layer_guidance_start: float | None = None,
                 skip_layer_guidance_stop: float | None = None):
        """Generate images; returns ``(latents (B, C, h, w), images (B, H, W, 3) float in [0, 1])``.

        Either ``prompts`` (encoded by :meth:`encode_prompt` with the negative and per-encoder
        prompts and ``clip_skip``) or precomputed ``embeddings``.  ``latents`` (the initial
        noise at ``σ_0``) overrides ``seed``, ``height`` and ``width``
        (:meth:`initial_latents`).  The remaining options (``guidance``, ``scale``,
        ``zero_init_steps``, ``num_steps`` and the ``skip_*`` skip-layer guidance options) are
        :meth:`sample`'s; the result goes through :meth:`decode`.
        """
        if (prompts is None) == (embeddings is None):
            raise ValueError("give exactly one of prompts and embeddings")
        if embeddings is None:
            embeddings = self.encode_prompt(
                prompts, negative_prompts, max_sequence_length, prompts_2=prompts_2, prompts_3=prompts_3,
                negative_prompts_2=negative_prompts_2, negative_prompts_3=negative_prompts_3, clip_skip=clip_skip)
        if latents is None:
            latents = self.initial_latents(jnp.shape(embeddings[0])[0], height, width, seed)
        result = self.sample(embeddings, latents, guidance=guidance, scale=scale, zero_init_steps=zero_init_steps,
                             num_steps=num_steps, skip_guidance_layers=skip_guidance_layers,
                             skip_layer_guidance_scale=skip_layer_guidance_scale,
                             skip_layer_guidance_start=skip_layer_guidance_start,
                             skip_layer_guidance_stop=skip_layer_guidance_stop)
        return result.samples, self.decode(result.samples)

    generate = __call__
