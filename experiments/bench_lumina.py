"""One Lumina-Next configuration of ``python -m experiments.bench_pipeline --model lumina``.

A random ``LuminaPipeline`` of the size ``name`` (:data:`cfgzero_theory.lumina.tiny.PIPELINE_SIZES`:
``tiny``, ``mid``, ``next``; built with diffusers and saved) is loaded by our
:class:`~cfgzero_theory.lumina.pipeline.LuminaPipeline`; both sides sample the size's
``image_size`` (square) like for like: the same prompt (repeated ``--batch`` times) and the empty
negative prompt, diffusers with ``clean_caption=False`` (its ``__call__`` defaults to ``True``;
without the cleaner both sides lower-case and strip the prompt), Gemma at the tokenizer's padding
(the prompt's own length rounded up to a multiple of 8, truncated at 256: diffusers'
``LuminaPipeline`` fixes that cap in ``self.max_sequence_length`` and ignores its
``max_sequence_length`` argument, so ``--max-sequence-length`` must be 256 or left out for Lumina),
the same initial latents (``torch.randn`` of ``--seed``, shape ``(B, 4, H/8, W/8)``, cast to
``--dtype``: diffusers keeps given latents as they are, in the prompt embeddings' dtype), the same
steps of ``FlowMatchEulerDiscreteScheduler`` (shift 1), plain CFG at scale 4 on the first three
latent channels (diffusers' ``guidance_scale=4.0``; ours ``guidance="cfg", scale=4.0``),
``scaling_watershed=1.0`` and ``proportional_attn=True``.  Ours is also timed with CFG-Zero*
(the ``"lumina-next"`` preset's default: scale 4, the first ``K = 1`` step zeroed), reported apart.
Lumina-Next samples 30 steps by default (the preset's and diffusers' ``num_inference_steps``);
``--steps`` keeps bench_pipeline's default 28, so pass ``--steps 30`` for that loop.

Sections (as for SD3, :mod:`experiments.bench_pipeline`):

* ``step``: one transformer call on the doubled CFG batch ``2B`` (prompt then negative, as both
  loops order them) at the first step — ours the jitted ``pipe.model_fn(H, W, 1.0, True)`` on
  ``(params, x, sigma, timestep, (captions, masks))`` (the step's RoPE table, chosen inside the
  program from two tables built once, and the proportional-attention base); diffusers
  ``get_2d_rotary_pos_embed_lumina(head_dim, 384, 384, linear_factor=, ntk_factor=)`` — built on
  the host at every step by its ``__call__``, so timed here too — then ``pipe.transformer(...)``
  under ``no_grad`` with ``cross_attention_kwargs={"base_sequence_length": (default_image_size
  // 16)²}``;
* ``encode``: the prompt and the empty negative prompt through Gemma (``hidden_states[-2]``; ours
  ``pipe.encode_prompt``, diffusers ``pipe.encode_prompt(..., clean_caption=False)``);
* ``denoise``: the loop given the embeddings — ours ``pipe.sample`` (one ``lax.scan``), diffusers
  the loop of ``LuminaPipeline.__call__`` replicated step for step (``set_timesteps``; per step
  ``cat``, ``t = 1 − τ/1000``, the watershed test, the RoPE table, one transformer call of ``2B``,
  the variance half dropped, CFG on three channels, the negation, ``scheduler.step``);
  ``loop_per_step``;
* ``decode``: final latents to ``[0, 1]`` NumPy images (``latents / scaling_factor``, the SDXL-style
  VAE, post-processing); ``decode_memory``: the peak device memory of one decode on a GPU
  (:func:`experiments.bench_common.decode_memory`), ``null`` on a CPU;
* ``end_to_end``: prompt to NumPy images (ours after its first call, ``compile_s``; diffusers'
  first call is ``first_call_s``).
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cfgzero_theory import presets
from experiments.bench_common import (
    agreement, build_pipeline_pair, decode_memory, dtypes, finish_report, time_call, weights_note,
)

GUIDANCE_SCALE = 4.0
ZERO_INIT_STEPS = 1
#: diffusers' ``LuminaPipeline.max_sequence_length``: the Gemma truncation cap, not a padding length.
MAX_SEQUENCE_LENGTH = 256
GUIDANCE_CHANNELS = 3
SCALING_WATERSHED = 1.0
PROPORTIONAL_ATTN = True
#: Lumina-Next's default step count (the ``"lumina-next"`` preset's; diffusers' ``num_inference_steps`` too).
PRESET_STEPS = presets.get("lumina-next").num_steps
#: The side of diffusers' RoPE table (``get_2d_rotary_pos_embed_lumina(head_dim, 384, 384, ...)``).
ROPE_TABLE_SIDE = 384
PROMPT = "a photo of a cat"
CFG = {"guidance": "cfg", "scale": GUIDANCE_SCALE}
CFG_ZERO_STAR = {"guidance": "cfg-zero-star", "scale": GUIDANCE_SCALE, "zero_init_steps": ZERO_INIT_STEPS}
SAMPLER_OPTIONS = {"scaling_watershed": SCALING_WATERSHED, "proportional_attn": PROPORTIONAL_ATTN}
#: Report settings for Lumina (merged into bench_pipeline's ``settings``).
SETTINGS = {"guidance_scale": GUIDANCE_SCALE, "zero_init_steps": ZERO_INIT_STEPS, "negative_prompt": "",
            "clean_caption": False, "guidance_channels": GUIDANCE_CHANNELS, "scaling_watershed": SCALING_WATERSHED,
            "proportional_attn": PROPORTIONAL_ATTN, "preset_steps": PRESET_STEPS,
            "max_sequence_length_note": "Gemma truncation cap, fixed at 256 by diffusers' LuminaPipeline; prompts "
                                        "are padded to a multiple of 8 of their own token length (caption_tokens)"}
TEXT_ENCODER_NOTE = {
    "tiny": "tiny Gemma (width 24, 2 layers, one key/value head)",
    "mid": "small Gemma (width 256, 2 layers, one key/value head)",
    "next": ("Gemma SHRUNK: Gemma-2B's width 2048, d_ff 16384, 8 heads of 256 and one key/value head, but 2 layers "
             "(of 18) and a tiny hand-written tokenizer (encode is not representative); the transformer (Next-DiT "
             "2B) and VAE are Lumina-Next-SFT's"),
}
#: What the sections mean for Lumina (they replace SD3's in the report).
DEFINITIONS = {
    "step": "one transformer call on the doubled CFG batch 2B with the step's RoPE table and proportional-attention "
            "base (ours: jitted LuminaPipeline.model_fn; diffusers: get_2d_rotary_pos_embed_lumina, rebuilt every "
            "step by its __call__ and timed, + pipe.transformer under no_grad)",
    "encode": "prompt (lower-cased and stripped: clean_caption=False) + empty negative prompt through Gemma "
              "(hidden_states[-2]), padded to a multiple of 8 of the prompt's tokens, cap 256",
    "denoise": "the sampling loop given embeddings, FlowMatchEuler shift 1, CFG on the first three latent channels "
               "(ours: LuminaPipeline.sample, one lax.scan; diffusers: the loop of LuminaPipeline.__call__, "
               "replicated: RoPE table rebuilt and one transformer call of 2B per step)",
    "decode": "latents / scaling_factor + VAE decode + post-processing to [0, 1] NumPy images; decode_memory: peak "
              "device memory of one decode (GPU only)",
    "end_to_end": "prompt -> NumPy images, plain CFG scale 4 on three channels, scaling_watershed 1.0, "
                  "proportional_attn (ours after compilation); end_to_end_cfg_zero_star: ours with CFG-Zero* "
                  "(scale 4, K = 1 zeroed step)",
}


def bench_lumina_config(name: str, args, torch, device: str, torch_device: str, jax_device) -> dict:
    """Time configuration ``name`` (module docstring); returns its report."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    from cfgzero_theory.lumina.pipeline import LuminaPipeline
    from cfgzero_theory.lumina.tiny import PIPELINE_SIZES, build_random_pipeline

    torch_dtype, jax_dtype = dtypes(args.dtype, torch)
    size, steps, batch, seq = PIPELINE_SIZES[name], args.steps, args.batch, args.max_sequence_length
    if seq != MAX_SEQUENCE_LENGTH:
        raise ValueError(f"diffusers' LuminaPipeline truncates prompts at {MAX_SEQUENCE_LENGTH} Gemma tokens; "
                         f"--max-sequence-length {seq} is not benchmarked")
    prompts = [PROMPT] * batch
    gpu = device == "gpu"

    def sync():
        if gpu:
            torch.cuda.synchronize()

    result = {"model": "lumina", "config": name, "steps": steps, "batch": batch, "model_batch": 2 * batch,
              "dtype": args.dtype, "max_sequence_length": seq, "guidance_scale": GUIDANCE_SCALE,
              "zero_init_steps": ZERO_INIT_STEPS, "guidance_channels": GUIDANCE_CHANNELS,
              "scaling_watershed": SCALING_WATERSHED, "proportional_attn": PROPORTIONAL_ATTN, "prompt": PROMPT,
              "negative_prompt": "", "clean_caption": False,
              "sizes": {k: (dict(v) if isinstance(v, dict) else v) for k, v in size.items()},
              "text_encoders": TEXT_ENCODER_NOTE[name], "weights": weights_note(size["perturb"])}
    print(f"[lumina {name}] building the random pipeline ...", flush=True)
    cache = not getattr(args, "no_compilation_cache", False)  # SD3Pipeline/FluxPipeline loads always turn it on
    load = functools.partial(LuminaPipeline.from_pretrained, compilation_cache=cache)
    peer, ours, seconds = build_pipeline_pair(build_random_pipeline, load, name, args.seed, torch_dtype, jax_dtype,
                                              jax_device, torch_device)
    result.update(seconds)
    height = width = size["image_size"]
    h, w = ours.latent_size(height, width)
    shape = (batch, ours.transformer.config.in_channels, h, w)
    patch = ours.transformer.config.patch_size
    tokens = (h // patch) * (w // patch)
    scaling_factor = math.sqrt(width * height / peer.default_image_size ** 2)
    cross_attention_kwargs = {"base_sequence_length": (peer.default_image_size // 16) ** 2}
    result.update(image_size=[height, width], latent_grid=[h, w], latent_shape=list(shape), image_tokens=tokens,
                  resolution_scaling_factor=scaling_factor,
                  base_sequence_length=cross_attention_kwargs["base_sequence_length"],
                  transformer_params=int(sum(p.numel() for p in peer.transformer.parameters())),
                  text_encoder_params=int(sum(p.numel() for p in peer.text_encoder.parameters())),
                  vae_params=int(sum(p.numel() for p in peer.vae.parameters())))
    print(f"[lumina {name}] built in {result['build_s']:.1f}s, loaded ours in {result['load_ours_s']:.1f}s; "
          f"transformer {result['transformer_params'] / 1e6:.1f}M params, image {height}x{width}, latents "
          f"{list(shape)}, {tokens} image tokens", flush=True)

    generator = torch.Generator().manual_seed(args.seed)
    init_t = torch.randn(shape, generator=generator).to(torch_dtype)  # the prompt embeddings' dtype, as diffusers
    init_j = jax.device_put(jnp.asarray(init_t.float().numpy()).astype(jax_dtype), jax_device)
    init_dev = init_t.to(torch_device)
    ours_sec, peer_sec = {}, {}

    with jax.default_device(jax_device), torch.no_grad():
        # ---- end to end, first (compiling) calls of ours
        def ours_e2e(options):
            latents, images = ours(prompts, **options, **SAMPLER_OPTIONS, num_steps=steps, latents=init_j,
                                   max_sequence_length=seq, clean_caption=False)
            return np.asarray(latents.astype(jnp.float32)), np.asarray(images)

        print(f"[lumina {name}] ours: first calls (compilation) ...", flush=True)
        start = time.perf_counter()
        ours_latents, ours_images = ours_e2e(CFG)
        compile_cfg = time.perf_counter() - start
        start = time.perf_counter()
        zero_latents, _ = ours_e2e(CFG_ZERO_STAR)
        compile_zero = time.perf_counter() - start

        def peer_e2e(output_type="np"):
            out = peer(prompts, height=height, width=width, latents=init_dev.clone(), output_type=output_type,
                       num_inference_steps=steps, guidance_scale=GUIDANCE_SCALE, clean_caption=False,
                       max_sequence_length=seq, **SAMPLER_OPTIONS).images
            sync()
            return out

        print(f"[lumina {name}] diffusers: first calls ...", flush=True)
        start = time.perf_counter()
        peer_images = peer_e2e()
        peer_first = time.perf_counter() - start
        peer_latents = peer_e2e("latent").float().cpu().numpy()
        result["agreement"] = agreement("images", ours_latents, peer_latents, ours_images, peer_images, zero_latents)

        # ---- encode
        def peer_encode():
            return peer.encode_prompt(prompts, True, negative_prompt=None, device=torch_device, clean_caption=False)

        cond, mask, uncond, uncond_mask = ours.encode_prompt(prompts, None, seq)
        ours_sec["encode"] = time_call(lambda: jax.block_until_ready(ours.encode_prompt(prompts, None, seq)),
                                       args.repeats)
        peer_sec["encode"] = time_call(peer_encode, args.repeats, sync)
        pe, pm, npe, npm = peer_encode()
        pe2, pm2 = torch.cat([pe, npe]), torch.cat([pm, npm])  # LuminaPipeline.__call__'s order: prompt, negative
        result["caption_tokens"], result["caption_tokens_diffusers"] = int(cond.shape[1]), int(pe.shape[1])

        # ---- one transformer step on the doubled batch
        schedule = ours.schedule(steps)
        params = nnx.state(ours.transformer)
        step_fn = jax.jit(ours.model_fn(height, width, SCALING_WATERSHED, PROPORTIONAL_ATTN))
        step_args = (params, jnp.concatenate([init_j, init_j]), schedule.sigmas[0], schedule.timesteps[0],
                     (jnp.concatenate([cond, uncond]), jnp.concatenate([mask, uncond_mask])))
        out = step_fn(*step_args)
        result["ours_step_output_dtype"] = str(out.dtype)
        del out
        ours_sec["step"] = time_call(lambda: step_fn(*step_args).block_until_ready(), args.step_repeats)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(peer.scheduler.config)
        num_train_timesteps = scheduler.config.num_train_timesteps

        def peer_call(x2, t):  # one step of LuminaPipeline.__call__ up to the transformer's output
            current = (t[None] if t.ndim == 0 else t).to(x2.device).expand(x2.shape[0])
            current = 1 - current / num_train_timesteps
            if current[0] < SCALING_WATERSHED:
                linear_factor, ntk_factor = scaling_factor, 1.0
            else:
                linear_factor, ntk_factor = 1.0, scaling_factor
            rope = get_2d_rotary_pos_embed_lumina(peer.transformer.head_dim, ROPE_TABLE_SIDE, ROPE_TABLE_SIDE,
                                                  linear_factor=linear_factor, ntk_factor=ntk_factor)
            return peer.transformer(hidden_states=x2, timestep=current, encoder_hidden_states=pe2, encoder_mask=pm2,
                                    image_rotary_emb=rope, cross_attention_kwargs=cross_attention_kwargs,
                                    return_dict=False)[0]

        scheduler.set_timesteps(steps, device=torch_device)
        t0 = scheduler.timesteps[0]
        x2_t = torch.cat([init_dev, init_dev])
        peer_sec["step"] = time_call(lambda: peer_call(x2_t, t0), args.step_repeats, sync)

        # ---- the denoising loop alone
        def ours_denoise(options):
            return ours.sample((cond, mask, uncond, uncond_mask), init_j, **options, **SAMPLER_OPTIONS,
                               num_steps=steps).samples.block_until_ready()

        ours_sec["denoise"] = time_call(lambda: ours_denoise(CFG), args.repeats)
        ours_sec["denoise_cfg_zero_star"] = time_call(lambda: ours_denoise(CFG_ZERO_STAR), args.repeats)

        def peer_denoise():  # LuminaPipeline.__call__'s loop, step for step
            scheduler.set_timesteps(steps, device=torch_device)
            x = init_dev.clone()
            for t in scheduler.timesteps:
                v = peer_call(torch.cat([x, x]), t).chunk(2, dim=1)[0]  # drop the learned variance
                eps, rest = v[:, :GUIDANCE_CHANNELS], v[:, GUIDANCE_CHANNELS:]
                v_c, v_u = torch.split(eps, len(eps) // 2, dim=0)
                half = v_u + GUIDANCE_SCALE * (v_c - v_u)
                v, _ = torch.cat([torch.cat([half, half], dim=0), rest], dim=1).chunk(2, dim=0)
                x = scheduler.step(-v, t, x, return_dict=False)[0]
            return x

        peer_sec["denoise"] = time_call(peer_denoise, args.repeats, sync)
        final_ours = ours_denoise(CFG)

        # ---- decode
        ours_sec["decode"] = time_call(lambda: np.asarray(ours.decode(final_ours)), args.repeats)
        final_peer = peer_denoise()
        scaling = peer.vae.config.scaling_factor

        def peer_decode():  # LuminaPipeline.__call__'s decoding
            image = peer.vae.decode(final_peer / scaling, return_dict=False)[0]
            return peer.image_processor.postprocess(image, output_type="np")

        peer_sec["decode"] = time_call(peer_decode, args.repeats, sync)
        result["decode_memory"] = decode_memory(gpu, torch, jax_device, lambda: np.asarray(ours.decode(final_ours)),
                                                peer_decode, sync)

        # ---- end to end, compiled / warmed
        ours_sec["end_to_end"] = time_call(lambda: ours_e2e(CFG), args.repeats, warmup=0)
        ours_sec["end_to_end_cfg_zero_star"] = time_call(lambda: ours_e2e(CFG_ZERO_STAR), args.repeats, warmup=0)
        peer_sec["end_to_end"] = time_call(peer_e2e, args.repeats, warmup=0)  # first call above was the warm-up

    return finish_report(result, ours_sec, peer_sec, steps, compile_s=compile_cfg, variant_compile_s=compile_zero,
                         first_call_s=peer_first)
