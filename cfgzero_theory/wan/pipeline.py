"""Text- and image-to-video with a diffusers Wan2.1 folder, the sampling loop in JAX.

Public API
----------
* :func:`prompt_clean` ``(text)`` — the prompt cleaning of diffusers' Wan pipelines;
* :func:`encode_prompt` ``(components, prompts, negative_prompts=None, max_sequence_length=512)
  -> (prompt_embeds, negative_prompt_embeds)``;
* :func:`preprocess_image` ``(image, height, width)`` — a picture as the VAE's input frame;
* :class:`WanPipeline` — ``WanPipeline.from_pretrained(folder, dtype=None, sharding=None)`` for a
  ``WanPipeline`` (T2V) or ``WanImageToVideoPipeline`` (I2V) folder;
  ``pipeline(prompts, image=None, ...) -> (latents, videos)`` and its stages
  ``encode_prompt``, ``encode_image``, ``initial_latents``, ``sample`` (the loop alone),
  ``decode``, ``load_lora``.

Prompts (``WanPipeline._get_t5_prompt_embeds``)
-----------------------------------------------
Each prompt is cleaned (:func:`prompt_clean`: ``ftfy.fix_text``, HTML entities unescaped twice,
runs of whitespace made one space, stripped), tokenised to ``max_sequence_length`` (512) with
its attention mask, and encoded by UMT5 with that mask; the output is cut to the prompt's real
length and zero-padded back, i.e. multiplied by the mask.  The negative prompt defaults to ``""``
(diffusers' default when guidance is on); a single negative prompt serves every prompt.

Latents
-------
``(B, 16, f, h, w)`` with ``f = (F − 1)/4 + 1``, ``h = H/8``, ``w = W/8`` (the VAE's factors),
float32; only the transformer's input is cast to the weights' dtype, as diffusers does.  ``F``
must be ``4k + 1`` and ``H``, ``W`` multiples of 16 (the VAE factor times the patch size);
diffusers rounds other values with a warning, here they are a ``ValueError``.  ``latents=`` takes
this layout.  Decoding applies ``z · latents_std + latents_mean`` and the causal VAE; videos come
back as ``(B, F, H, W, 3)`` in ``[0, 1]``.

Image-to-video conditioning (``WanImageToVideoPipeline``)
----------------------------------------------------------
* the CLIP image embeddings: the folder's ``CLIPImageProcessor`` (resize, centre crop,
  normalise) on the original picture, then ``hidden_states[-2]`` of the vision tower; the same
  embeddings go to both guidance branches;
* the conditioning latents: the picture resized to ``W × H`` (Lanczos) and scaled to
  ``[−1, 1]``, followed by ``F − 1`` zero frames, encoded by the VAE (posterior mean) and
  normalised ``(z − latents_mean) / latents_std``;
* the mask: 4 channels, 1 on latent frame 0 (the given first frame) and 0 elsewhere;
* the transformer reads ``[latents; mask; conditioning latents]`` (36 channels).

Schedule and guidance
---------------------
diffusers' ``UniPCMultistepScheduler`` in flow mode (:mod:`cfgzero_theory.unipc`, order and
solver type from the folder's scheduler config), with the model fed **integer-truncated**
timesteps ``int(σ·1000)`` while the sigmas stay float.  Defaults come from the presets — the
paper's and the official repository's settings: T2V 50 steps, ``flow_shift`` 3.0 up to 480p
and 5.0 above (``"wan2.1-t2v-480p"`` / ``"wan2.1-t2v-720p"``); I2V 40 steps, ``flow_shift``
5.0 (``"wan2.1-i2v"``); CFG-Zero* with scale 5.0 and the first ``K = 2`` steps zeroed (the
official repository's ``zero_steps=1``).  ``flow_shift=`` overrides the preset (the folder's
scheduler config carries one value for every resolution, so it is not used as the default).
Every rule kind of :data:`cfgzero_theory.guidance.KINDS` is available; both branches are one
batched call per step.

Scale
-----
``sharding=`` (a :class:`~cfgzero_theory.ports.sharding.ParamSharding`) splits the weights over
a device mesh as they load; ``batch_sharding=`` (a ``jax.sharding.NamedSharding`` whose spec
names the batch axis, e.g. ``P("data")``) places the latents and every conditioning input,
so the guidance batch of the compiled loop splits over that mesh axis.

Not ported: Wan2.2 (``transformer_2`` and ``boundary_ratio``, ``expand_timesteps``), the
first-last-frame variant (``last_image``); their folders or arguments are refused by name.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cfgzero_theory import presets
from cfgzero_theory.compilation import enable_compilation_cache
from cfgzero_theory.ports.clip import load_clip_vision_encoder
from cfgzero_theory.ports.lora import merge_lora
from cfgzero_theory.ports.pipeline_parts import (
    as_prompt_list, encode_tokens, initial_noise, load_tokenizer, pipeline_components, read_json, tokens_and_mask,
)
from cfgzero_theory.ports.sharding import ParamSharding
from cfgzero_theory.ports.t5 import load_t5_encoder
from cfgzero_theory.sampling import FlowSampleResult, sample_flow
from cfgzero_theory.unipc import UniPC, unipc_flow_schedule
from cfgzero_theory.validation import check_int, check_real
from cfgzero_theory.wan.vae import load_wan_vae
from cfgzero_theory.wan.weights import load_wan_transformer, original_layout, wan_model_fn, weight_map

__all__ = ["ImageConditioning", "WanPipeline", "encode_prompt", "preprocess_image", "prompt_clean"]

PIPELINE_CLASSES = ("WanPipeline", "WanImageToVideoPipeline")
REQUIRED = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
OPTIONAL = ("image_encoder", "image_processor", "transformer_2")
SCHEDULER_CLASS = "UniPCMultistepScheduler"
MAX_SEQUENCE_LENGTH = 512
MASK_CHANNELS = 4
DEFAULT_SIZE = (480, 832)
DEFAULT_FRAMES = 81
PRESETS = {"t2v-480p": presets.get("wan2.1-t2v-480p"), "t2v-720p": presets.get("wan2.1-t2v-720p"),
           "i2v": presets.get("wan2.1-i2v")}
#: Scheduler-config values this port reproduces; any other value is refused by name.
SCHEDULER_REQUIREMENTS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "predict_x0": True,
                          "thresholding": False, "final_sigmas_type": "zero", "use_karras_sigmas": False,
                          "use_exponential_sigmas": False, "use_beta_sigmas": False, "solver_p": None,
                          "use_dynamic_shifting": False}


# ----------------------------------------------------------------------------- prompts


def prompt_clean(text: str) -> str:
    """diffusers' Wan prompt cleaning: ``ftfy.fix_text``, HTML entities unescaped twice, stripped,
    then every run of whitespace made one space and stripped again."""
    try:
        import ftfy
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError('Wan prompts are cleaned with ftfy: pip install -e ".[sd3]"') from err
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def encode_prompt(components, prompts, negative_prompts=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
    """UMT5 embeddings ``(prompt_embeds, negative_prompt_embeds)``, each ``(B, L, d_model)`` with
    the padding positions zero (module docstring).  ``components`` is a :class:`WanPipeline`;
    ``negative_prompts`` defaults to ``""`` and may be one prompt or one per prompt."""
    length = check_int("max_sequence_length", max_sequence_length, minimum=1, maximum=MAX_SEQUENCE_LENGTH)
    prompts = as_prompt_list(prompts, "prompts")
    negative = as_prompt_list("" if negative_prompts is None else negative_prompts, "negative_prompts")
    negative = negative * len(prompts) if len(negative) == 1 else negative
    if len(negative) != len(prompts):
        raise ValueError(f"negative_prompts must hold one prompt or as many as prompts ({len(prompts)}), "
                         f"got {len(negative)}")

    def encode(texts):
        ids, mask = tokens_and_mask(components.tokenizer, [prompt_clean(t) for t in texts], length)
        embeds = encode_tokens(components.text_encoder, ids, mask)
        return embeds * mask[..., None].astype(embeds.dtype)

    return encode(prompts), encode(negative)


# ----------------------------------------------------------------------------- images


def _as_pil(image):
    """A PIL image, a path to one, or an ``(H, W, 3)`` array (uint8, or floats in ``[0, 1]``) as RGB PIL."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        try:
            image = Image.open(os.fspath(image))
        except OSError as err:
            raise ValueError(f"image: cannot read {os.fspath(image)!r}: {err}") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image must be a PIL image, a path or an (H, W, 3) array, got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating) or not np.all((array >= 0) & (array <= 1)):
            raise ValueError("an image array must be uint8 or floats in [0, 1]")
        array = np.round(array * 255).astype(np.uint8)
    return Image.fromarray(array)


def preprocess_image(image, height: int, width: int) -> jax.Array:
    """The first frame as the VAE reads it: resized to ``width × height`` with Lanczos (diffusers'
    ``VideoProcessor.preprocess``), scaled to ``[−1, 1]``: ``(1, 3, height, width)`` float32."""
    from PIL import Image

    pixels = np.asarray(_as_pil(image).resize((width, height), resample=Image.LANCZOS), np.float32) / 255.0
    return jnp.asarray(pixels.transpose(2, 0, 1)[None] * 2.0 - 1.0)


class ImageConditioning(NamedTuple):
    """What image-to-video adds to every guidance branch (module docstring)."""

    image_embeds: jax.Array
    """CLIP ``hidden_states[-2]`` ``(B, 1 + g², image_dim)``."""
    condition: jax.Array
    """``[mask; conditioning latents]`` ``(B, 4 + 16, f, h, w)`` float32."""


# ----------------------------------------------------------------------------- the pipeline


def _clip_image_processor(folder):
    """The folder's ``CLIPImageProcessor`` in its PIL / NumPy implementation (transformers 5 names
    it ``CLIPImageProcessorPil``; the default one there needs torchvision)."""
    import transformers

    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return processor_class.from_pretrained(os.fspath(folder))


def _scheduler_solver(config: dict) -> tuple[UniPC, int]:
    """UniPC and ``num_train_timesteps`` from a scheduler config; ``ValueError`` for a setting
    this port does not reproduce."""
    if config.get("_class_name", SCHEDULER_CLASS) != SCHEDULER_CLASS:
        raise ValueError(f"the scheduler must be {SCHEDULER_CLASS} (Wan2.1's), got {config.get('_class_name')!r}")
    for key, value in SCHEDULER_REQUIREMENTS.items():
        if key in config and config[key] != value:
            raise ValueError(f"scheduler config {key}={config[key]!r} is not supported (Wan2.1 uses {value!r})")
    if not config.get("use_flow_sigmas", False):
        raise ValueError("the scheduler config must set use_flow_sigmas=true (Wan's flow-mode UniPC)")
    solver = UniPC(order=config.get("solver_order", 2), solver_type=config.get("solver_type", "bh2"),
                   lower_order_final=config.get("lower_order_final", True),
                   disable_corrector=tuple(config.get("disable_corrector", ()) or ()))
    return solver, check_int("num_train_timesteps", config.get("num_train_timesteps", 1000), minimum=2)


class WanPipeline:
    """A loaded Wan2.1 text-to-video or image-to-video pipeline (see the module docstring)."""

    def __init__(self, *, transformer, vae, text_encoder, tokenizer, scheduler_config: dict, image_encoder=None,
                 image_processor=None):
        self.solver, self.num_train_timesteps = _scheduler_solver(scheduler_config)
        if transformer.config.image_to_video and (image_encoder is None or image_processor is None):
            raise ValueError("an image-to-video transformer needs image_encoder and image_processor")
        if transformer.config.out_channels != vae.config.z_dim:
            raise ValueError(f"the transformer predicts {transformer.config.out_channels} channels but the VAE has "
                             f"{vae.config.z_dim} latent channels")
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.image_encoder, self.image_processor = image_encoder, image_processor
        self.scheduler_config = dict(scheduler_config)
        self._model_fn = wan_model_fn(transformer)
        vae_graph = nnx.graphdef(vae)
        self._decode = jax.jit(lambda state, z: nnx.merge(vae_graph, state).decode(z))
        self._encode = jax.jit(lambda state, x: nnx.merge(vae_graph, state).encode(x)[0])

    @property
    def image_to_video(self) -> bool:
        return self.transformer.config.image_to_video

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, dtype=None, sharding: ParamSharding | None = None, *,
                        vae_dtype=None, compilation_cache: bool = True) -> WanPipeline:
        """Load a diffusers ``WanPipeline`` or ``WanImageToVideoPipeline`` folder.

        ``dtype`` casts the transformer's and the encoders' weights (``None`` keeps the stored
        dtypes); the VAE keeps its stored dtype unless ``vae_dtype`` says otherwise (diffusers'
        Wan examples run it in float32 under a bf16 transformer); ``sharding`` splits every
        model's weights over a device mesh as they are read; ``compilation_cache`` turns on
        JAX's persistent compilation cache.  Raises ``ValueError`` when the folder is not a
        Wan2.1 pipeline or a component it lists is missing.
        """
        if compilation_cache:
            enable_compilation_cache()
        root = Path(folder)
        present = pipeline_components(root, "a Wan pipeline", PIPELINE_CLASSES, REQUIRED, OPTIONAL)
        index = read_json(root / "model_index.json", "the pipeline index")
        if present["transformer_2"] is not None or index.get("boundary_ratio") is not None:
            raise ValueError(f"{root} is a two-stage Wan2.2 pipeline (transformer_2, boundary_ratio): not ported")
        if index.get("expand_timesteps"):
            raise ValueError(f"{root} sets expand_timesteps (Wan2.2 TI2V): not ported")
        options = dict(dtype=dtype, sharding=sharding)
        transformer = load_wan_transformer(present["transformer"], **options)
        image = {}
        if transformer.config.image_to_video:
            for name in ("image_encoder", "image_processor"):
                if present[name] is None:
                    raise ValueError(f"{root}: an image-to-video transformer needs the {name}/ component")
            image = dict(image_encoder=load_clip_vision_encoder(present["image_encoder"], **options),
                         image_processor=_clip_image_processor(present["image_processor"]))
        return cls(
            transformer=transformer,
            vae=load_wan_vae(present["vae"], dtype=vae_dtype, sharding=sharding),
            text_encoder=load_t5_encoder(present["text_encoder"], **options),
            tokenizer=load_tokenizer(present["tokenizer"]),
            scheduler_config=read_json(root / "scheduler" / "scheduler_config.json", "the scheduler config"),
            **image,
        )

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> int:
        """Merge a Wan LoRA safetensors file into the transformer, in place (``W ← W + scale ·
        (α/r) · B A`` in float32, rounded once): diffusers / PEFT keys
        (``transformer.blocks.0.attn1.to_q.lora_A.weight``), original / ComfyUI keys
        (``diffusion_model.blocks.0.self_attn.q.lora_A.weight`` with ``.alpha``) or musubi / kohya
        keys (``lora_unet_blocks_0_self_attn_q``), through
        :func:`cfgzero_theory.ports.lora.merge_lora` with Wan's
        :func:`~cfgzero_theory.wan.weights.original_layout`.  Every key is checked before any
        weight changes; keys that map to nothing are a ``ValueError`` naming them.  A T2V LoRA
        on an I2V model leaves the image branch as it is.  Returns the number of layers changed.
        """
        return merge_lora(self.transformer, weight_map, [(path, scale)],
                          original=original_layout(self.transformer.config), what="Wan transformer")

    def encode_prompt(self, prompts, negative_prompts=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        """:func:`encode_prompt` with this pipeline's UMT5."""
        return encode_prompt(self, prompts, negative_prompts, max_sequence_length)

    def video_size(self, num_frames: int | None = None, height: int | None = None,
                   width: int | None = None) -> tuple[int, int, int]:
        """``(F, H, W)`` checked (defaults 81 frames at 480 × 832): ``F = 4k + 1``, ``H`` and ``W``
        positive multiples of the VAE's spatial factor times the patch size (16)."""
        temporal, spatial = self.vae.config.temporal_factor, self.vae.config.spatial_factor
        multiple = spatial * self.transformer.config.patch_size[1]
        num_frames = check_int("num_frames", DEFAULT_FRAMES if num_frames is None else num_frames, minimum=1)
        if (num_frames - 1) % temporal:
            raise ValueError(f"num_frames must be {temporal}k + 1 (1, {1 + temporal}, {1 + 2 * temporal}, …, 81), "
                             f"got {num_frames}")
        height = check_int("height", DEFAULT_SIZE[0] if height is None else height, minimum=1)
        width = check_int("width", DEFAULT_SIZE[1] if width is None else width, minimum=1)
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}×{width}")
        return num_frames, height, width

    def latent_shape(self, batch: int, num_frames: int | None = None, height: int | None = None,
                     width: int | None = None) -> tuple[int, ...]:
        """``(B, 16, (F − 1)/4 + 1, H/8, W/8)`` for a video of ``F`` frames of ``H × W``."""
        num_frames, height, width = self.video_size(num_frames, height, width)
        temporal, spatial = self.vae.config.temporal_factor, self.vae.config.spatial_factor
        return (check_int("batch", batch, minimum=1), self.vae.config.z_dim, (num_frames - 1) // temporal + 1,
                height // spatial, width // spatial)

    def initial_latents(self, batch: int, num_frames: int | None = None, height: int | None = None,
                        width: int | None = None, seed: int = 0) -> jax.Array:
        """Initial noise ``N(0, I)`` of :meth:`latent_shape`, float32, drawn with ``PRNGKey(seed)``."""
        return initial_noise(seed, self.latent_shape(batch, num_frames, height, width))

    def encode_image(self, image, batch: int, num_frames: int | None = None, height: int | None = None,
                     width: int | None = None) -> ImageConditioning:
        """The image-to-video conditioning of ``image`` (a PIL image, a path or an ``(H, W, 3)``
        array) for ``batch`` videos of ``F`` frames of ``H × W`` (module docstring)."""
        if not self.image_to_video:
            raise ValueError("image is for image-to-video models; this transformer is text-to-video")
        shape = self.latent_shape(batch, num_frames, height, width)
        num_frames, height, width = self.video_size(num_frames, height, width)
        picture = _as_pil(image)
        pixels = self.image_processor(images=picture, return_tensors="np")["pixel_values"]
        hidden = encode_tokens(self.image_encoder, jnp.asarray(pixels)).hidden
        first = preprocess_image(picture, height, width)
        video = jnp.concatenate([first[:, :, None], jnp.zeros((1, 3, num_frames - 1, height, width))], axis=2)
        vae_dtype = jax.tree_util.tree_leaves(nnx.state(self.vae))[0].dtype
        mean = self._encode(nnx.state(self.vae), video.astype(vae_dtype)).astype(jnp.float32)
        latents = self.vae.vae_to_latents(mean)
        mask = jnp.zeros((1, MASK_CHANNELS, *shape[2:]), jnp.float32).at[:, :, 0].set(1.0)
        condition = jnp.concatenate([mask, latents], axis=1)
        return ImageConditioning(jnp.repeat(hidden, shape[0], axis=0), jnp.repeat(condition, shape[0], axis=0))

    def preset(self, height: int, width: int) -> presets.SamplerPreset:
        """The sampler defaults for videos of ``height × width``: I2V's, or T2V's at 480p (up to
        480 · 832 pixels) or 720p."""
        if self.image_to_video:
            return PRESETS["i2v"]
        return PRESETS["t2v-480p" if height * width <= DEFAULT_SIZE[0] * DEFAULT_SIZE[1] else "t2v-720p"]

    def schedule(self, num_steps: int, flow_shift: float):
        """UniPC's flow sigmas and integer timesteps for ``num_steps`` steps (:func:`unipc_flow_schedule`)."""
        return unipc_flow_schedule(num_steps, flow_shift=flow_shift, num_train_timesteps=self.num_train_timesteps)

    def sample(self, embeddings, latents, *, conditioning: ImageConditioning | None = None,
               guidance: str | None = None, scale: float | None = None, zero_init_steps: int | None = None,
               num_steps: int | None = None, flow_shift: float | None = None,
               batch_sharding: jax.sharding.Sharding | None = None,
               return_trajectory: bool = False) -> FlowSampleResult:
        """The denoising loop alone, one compiled :func:`~cfgzero_theory.sampling.sample_flow`.

        ``embeddings`` is :meth:`encode_prompt`'s pair; ``latents`` the initial noise of
        :meth:`latent_shape` (kept float32); ``conditioning`` :meth:`encode_image`'s result, which
        an I2V model needs and a T2V model refuses.  ``guidance``, ``scale``,
        ``zero_init_steps``, ``num_steps`` and ``flow_shift`` left ``None`` take the preset's
        values (:meth:`preset`).  ``batch_sharding`` places the latents and every conditioning
        input (module docstring).
        """
        if not (isinstance(embeddings, (tuple, list)) and len(embeddings) == 2):
            raise ValueError("embeddings must be (prompt_embeds, negative_prompt_embeds) as encode_prompt returns")
        cond, uncond = (jnp.asarray(e) for e in embeddings)
        if cond.shape != uncond.shape:
            raise ValueError(f"prompt and negative embeddings differ in shape: {cond.shape} and {uncond.shape}")
        latents = jnp.asarray(latents, jnp.float32)
        config, spatial = self.transformer.config, self.vae.config.spatial_factor
        if latents.ndim != 5 or latents.shape[:2] != (cond.shape[0], config.out_channels):
            raise ValueError(f"latents must have shape ({cond.shape[0]}, {config.out_channels}, f, h, w) for "
                             f"{cond.shape[0]} prompts, got {latents.shape}")
        self.video_size(1 + self.vae.config.temporal_factor * (latents.shape[2] - 1),
                        latents.shape[3] * spatial, latents.shape[4] * spatial)
        if self.image_to_video != (conditioning is not None):
            raise ValueError("an image-to-video model needs conditioning=encode_image(...)" if self.image_to_video
                             else "conditioning is for image-to-video models; this transformer is text-to-video")
        preset = self.preset(latents.shape[3] * spatial, latents.shape[4] * spatial)
        num_steps = check_int("num_steps", preset.num_steps if num_steps is None else num_steps, minimum=1)
        flow_shift = check_real("flow_shift", preset.shift if flow_shift is None else flow_shift, positive=True)
        dtype = jax.tree_util.tree_leaves(nnx.state(self.transformer))[0].dtype
        shared = ()
        if conditioning is not None:
            image, condition = (jnp.asarray(a) for a in conditioning)
            if condition.shape != (latents.shape[0], config.in_channels - config.out_channels, *latents.shape[2:]):
                raise ValueError(f"conditioning.condition has shape {condition.shape}; it must match the latents "
                                 f"{latents.shape} with {config.in_channels - config.out_channels} channels")
            shared = (image.astype(dtype), condition)
        context, uncond_context = (cond.astype(dtype), *shared), (uncond.astype(dtype), *shared)
        if batch_sharding is not None:
            latents, context, uncond_context = jax.device_put((latents, context, uncond_context), batch_sharding)
        return sample_flow(self._model_fn, nnx.state(self.transformer), latents,
                           self.schedule(num_steps, flow_shift), context, uncond_context,
                           preset.rule(guidance, scale=scale, zero_init_steps=zero_init_steps), solver=self.solver,
                           return_trajectory=return_trajectory)

    def decode(self, latents) -> jax.Array:
        """Latents ``(B, 16, f, h, w)`` → videos ``(B, F, H, W, 3)`` in ``[0, 1]`` (float32)."""
        latents = jnp.asarray(latents, jnp.float32)
        vae_dtype = jax.tree_util.tree_leaves(nnx.state(self.vae))[0].dtype
        video = self._decode(nnx.state(self.vae), self.vae.latents_to_vae(latents).astype(vae_dtype))
        return jnp.clip(jnp.transpose(video.astype(jnp.float32), (0, 2, 3, 4, 1)) / 2 + 0.5, 0.0, 1.0)

    def __call__(self, prompts=None, image=None, *, negative_prompts=None, embeddings=None,
                 guidance: str | None = None, scale: float | None = None, zero_init_steps: int | None = None,
                 num_steps: int | None = None, num_frames: int | None = None, height: int | None = None,
                 width: int | None = None, seed: int = 0, latents=None, flow_shift: float | None = None,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                 batch_sharding: jax.sharding.Sharding | None = None):
        """Generate videos; returns ``(latents (B, 16, f, h, w), videos (B, F, H, W, 3) in [0, 1])``.

        Either ``prompts`` (encoded with ``negative_prompts``, default ``""``) or precomputed
        ``embeddings``; ``image`` (the first frame) for I2V models.  ``latents`` (initial noise)
        overrides ``seed``; the frame count and size then come from it.  The other options are
        :meth:`sample`'s; the result goes through :meth:`decode`.
        """
        if (prompts is None) == (embeddings is None):
            raise ValueError("give exactly one of prompts and embeddings")
        if self.image_to_video and image is None:
            raise ValueError("this is an image-to-video model: pass image= (the first frame)")
        if embeddings is None:
            embeddings = self.encode_prompt(prompts, negative_prompts, max_sequence_length)
        batch = jnp.shape(embeddings[0])[0]
        if latents is None:
            latents = self.initial_latents(batch, num_frames, height, width, seed)
        else:
            latents = jnp.asarray(latents, jnp.float32)
            if latents.ndim != 5:
                raise ValueError(f"latents must have shape (B, C, f, h, w), got {latents.shape}")
            spatial = self.vae.config.spatial_factor
            implied = {"num_frames": 1 + self.vae.config.temporal_factor * (latents.shape[2] - 1),
                       "height": latents.shape[3] * spatial, "width": latents.shape[4] * spatial}
            for name, given in (("num_frames", num_frames), ("height", height), ("width", width)):
                if given is not None and given != implied[name]:
                    raise ValueError(f"{name}={given} disagrees with latents of shape {latents.shape}, which make "
                                     f"{name} {implied[name]}; leave it out")
            num_frames, height, width = implied["num_frames"], implied["height"], implied["width"]
        conditioning = None if image is None else self.encode_image(image, batch, num_frames, height, width)
        result = self.sample(embeddings, latents, conditioning=conditioning, guidance=guidance, scale=scale,
                             zero_init_steps=zero_init_steps, num_steps=num_steps, flow_shift=flow_shift,
                             batch_sharding=batch_sharding)
        return result.samples, self.decode(result.samples)

    generate = __call__
