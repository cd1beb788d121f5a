"""One Wan2.1 configuration of ``python -m experiments.bench_pipeline --model wan``.

A random text-to-video ``WanPipeline`` of the size ``name`` (:data:`cfgzero_theory.wan.tiny.PIPELINE_SIZES`:
``tiny``, ``mid``, ``1.3b``; built with diffusers and saved) is loaded by our
:class:`~cfgzero_theory.wan.pipeline.WanPipeline`; both sides sample the size's ``video_size``
(frames, height, width) like for like: the same prompt (repeated ``--batch`` times) and empty
negative prompt, UMT5 at 512 tokens, the same initial latents (``torch.randn`` of ``--seed``,
shape ``(B, 16, f, h, w)``, **float32 whatever ``--dtype``**: Wan keeps its latents float32 and
casts only the transformer's input to the weights' dtype), the same steps of flow-mode UniPC
with the checkpoint's ``flow_shift`` (3.0; ours is handed the value of diffusers' scheduler
config) and plain CFG at scale 5.  Ours is also timed with CFG-Zero* (``guidance="cfg-zero-star"``,
scale 5, the first ``K = 2`` steps zeroed: the paper's Wan setting), reported apart.  The paper
samples Wan with 50 steps (the ``wan2.1-t2v-480p`` preset); ``--steps`` keeps bench_pipeline's
default, so pass ``--steps 50`` for the paper's loop.

Sections (as for SD3, :mod:`experiments.bench_pipeline`):

* ``step``: one transformer call on the doubled CFG batch ``2B`` — ours the jitted
  :func:`~cfgzero_theory.wan.weights.wan_model_fn` on ``(params, x, sigma, timestep, (text,))``
  (the pipeline's own model function; our loop makes this one call per step), diffusers
  ``pipe.transformer(...)`` under ``no_grad`` on the concatenated batch;
* ``encode``: the prompt and the empty negative prompt through UMT5 (``max_sequence_length``
  512 on both sides);
* ``denoise``: the loop given the embeddings — ours ``pipe.sample`` (one ``lax.scan``),
  diffusers the loop of ``WanPipeline.__call__`` replicated step for step (``set_timesteps``,
  ``set_begin_index(0)``; per step the latents cast to the transformer's dtype, **two**
  transformer calls of batch ``B`` (cond, then uncond, each in its ``cache_context`` as
  ``__call__`` does), the CFG combination, UniPC's ``scheduler.step``); ``loop_per_step``;
* ``decode``: final latents to ``[0, 1]`` NumPy videos (the ``latents_std`` / ``latents_mean``
  de-normalisation, the causal VAE, post-processing); ``decode_memory``: the peak device memory
  of one decode on a GPU (diffusers: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``; ours: the device's ``memory_stats()["peak_bytes_in_use"]``, which
  JAX cannot reset — exact when the decode raised it, ``ours_peak_set_by_decode``, otherwise an
  upper bound set earlier in the run), ``null`` on a CPU;
* ``end_to_end``: prompt to NumPy videos (ours after its first call, ``compile_s``; diffusers'
  first call is ``first_call_s``).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.bench_common import (
    agreement, build_pipeline_pair, decode_memory, dtypes, finish_report, time_call, weights_note,
)

GUIDANCE_SCALE = 5.0
ZERO_INIT_STEPS = 2
MAX_SEQUENCE_LENGTH = 512
PROMPT = "a photo of a cat"
CFG = {"guidance": "cfg", "scale": GUIDANCE_SCALE}
CFG_ZERO_STAR = {"guidance": "cfg-zero-star", "scale": GUIDANCE_SCALE, "zero_init_steps": ZERO_INIT_STEPS}
#: Report settings that differ from SD3's for Wan (bench_pipeline's ``settings``).
SETTINGS = {"guidance_scale": GUIDANCE_SCALE, "zero_init_steps": ZERO_INIT_STEPS, "negative_prompt": "",
            "paper_steps": 50}
TEXT_ENCODER_NOTE = {
    "tiny": "tiny UMT5 (width 24, 2 layers)",
    "mid": "small UMT5 (width 256, 2 layers)",
    "1.3b": ("UMT5 SHRUNK: UMT5-XXL's width 4096 but 1 layer, d_ff 1024 and 4 heads, a tiny hand-written "
             "tokenizer (encode is not representative); the transformer and VAE are Wan2.1 T2V 1.3B's"),
}
#: What the sections mean for Wan (they replace SD3's in the report).
DEFINITIONS = {
    "step": "one transformer call on the doubled CFG batch 2B (ours: jitted wan_model_fn, one call per loop "
            "step; diffusers: pipe.transformer under no_grad on the concatenated batch, whereas its own loop "
            "calls it twice on B)",
    "encode": "prompt + empty negative prompt through UMT5, max_sequence_length 512",
    "denoise": "the sampling loop given embeddings, flow-mode UniPC with the checkpoint's flow_shift (ours: "
               "WanPipeline.sample, one lax.scan; diffusers: the loop of WanPipeline.__call__, replicated: "
               "cond and uncond transformer calls of batch B per step)",
    "decode": "latents_std/latents_mean de-normalisation + causal VAE decode + post-processing to [0, 1] NumPy "
              "videos; decode_memory: peak device memory of one decode (GPU only)",
    "end_to_end": "prompt -> NumPy videos, plain CFG scale 5 (ours after compilation); "
                  "end_to_end_cfg_zero_star: ours with CFG-Zero* (scale 5, K = 2 zeroed steps)",
}


def bench_wan_config(name: str, args, torch, device: str, torch_device: str, jax_device) -> dict:
    """Time configuration ``name`` (module docstring); returns its report."""
    from diffusers import UniPCMultistepScheduler

    from cfgzero_theory.wan.pipeline import WanPipeline
    from cfgzero_theory.wan.tiny import PIPELINE_SIZES, build_random_pipeline
    from cfgzero_theory.wan.weights import wan_model_fn

    torch_dtype, jax_dtype = dtypes(args.dtype, torch)
    size, steps, batch, seq = PIPELINE_SIZES[name], args.steps, args.batch, args.max_sequence_length
    if seq != MAX_SEQUENCE_LENGTH:
        raise ValueError(f"Wan encodes prompts to {MAX_SEQUENCE_LENGTH} UMT5 tokens; --max-sequence-length {seq} "
                         "is not benchmarked")
    prompts = [PROMPT] * batch
    gpu = device == "gpu"

    def sync():
        if gpu:
            torch.cuda.synchronize()

    result = {"model": "wan", "config": name, "steps": steps, "batch": batch, "model_batch": 2 * batch,
              "dtype": args.dtype, "max_sequence_length": seq, "guidance_scale": GUIDANCE_SCALE,
              "zero_init_steps": ZERO_INIT_STEPS, "prompt": PROMPT, "negative_prompt": "",
              "sizes": {k: (dict(v) if isinstance(v, dict) else v) for k, v in size.items()},
              "text_encoders": TEXT_ENCODER_NOTE[name], "weights": weights_note(size["perturb"])}
    print(f"[wan {name}] building the random pipeline ...", flush=True)
    cache = not getattr(args, "no_compilation_cache", False)  # SD3Pipeline/FluxPipeline loads always turn it on
    load = functools.partial(WanPipeline.from_pretrained, compilation_cache=cache)
    peer, ours, seconds = build_pipeline_pair(build_random_pipeline, load, name, args.seed, torch_dtype, jax_dtype,
                                              jax_device, torch_device)
    result.update(seconds)
    num_frames, height, width = size["video_size"]
    shape = ours.latent_shape(batch, num_frames, height, width)
    pt, ph, pw = ours.transformer.config.patch_size
    tokens = (shape[2] // pt) * (shape[3] // ph) * (shape[4] // pw)
    flow_shift = float(peer.scheduler.config.flow_shift)
    transformer_dtype = peer.transformer.dtype
    result.update(video_size=[num_frames, height, width], latent_shape=list(shape), video_tokens=tokens,
                  text_tokens=seq, flow_shift=flow_shift,
                  transformer_params=int(sum(p.numel() for p in peer.transformer.parameters())),
                  text_encoder_params=int(sum(p.numel() for p in peer.text_encoder.parameters())),
                  vae_params=int(sum(p.numel() for p in peer.vae.parameters())),
                  diffusers_transformer_calls_per_step=2, ours_transformer_calls_per_step=1)
    print(f"[wan {name}] built in {result['build_s']:.1f}s, loaded ours in {result['load_ours_s']:.1f}s; "
          f"transformer {result['transformer_params'] / 1e6:.1f}M params, video {num_frames}x{height}x{width}, "
          f"latents {list(shape)}, {tokens} video tokens", flush=True)

    generator = torch.Generator().manual_seed(args.seed)
    init_t = torch.randn(shape, generator=generator)  # float32 on both sides, whatever --dtype
    init_j = jax.device_put(jnp.asarray(init_t.numpy()), jax_device)
    init_dev = init_t.to(torch_device)
    video_options = dict(height=height, width=width, num_frames=num_frames)
    ours_sec, peer_sec = {}, {}

    with jax.default_device(jax_device), torch.no_grad():
        # ---- end to end, first (compiling) calls of ours
        def ours_e2e(options):
            latents, videos = ours(prompts, **options, num_steps=steps, flow_shift=flow_shift, latents=init_j,
                                   max_sequence_length=seq)
            return np.asarray(latents), np.asarray(videos)

        print(f"[wan {name}] ours: first calls (compilation) ...", flush=True)
        start = time.perf_counter()
        ours_latents, ours_videos = ours_e2e(CFG)
        compile_cfg = time.perf_counter() - start
        start = time.perf_counter()
        zero_latents, _ = ours_e2e(CFG_ZERO_STAR)
        compile_zero = time.perf_counter() - start

        def peer_e2e(output_type="np"):
            out = peer(prompts, latents=init_dev.clone(), output_type=output_type, num_inference_steps=steps,
                       guidance_scale=GUIDANCE_SCALE, max_sequence_length=seq, **video_options).frames
            sync()
            return out

        print(f"[wan {name}] diffusers: first calls ...", flush=True)
        start = time.perf_counter()
        peer_videos = peer_e2e()
        peer_first = time.perf_counter() - start
        peer_latents = peer_e2e("latent").float().cpu().numpy()
        result["agreement"] = agreement("videos", ours_latents, peer_latents, ours_videos, peer_videos, zero_latents)

        # ---- encode
        cond, uncond = ours.encode_prompt(prompts, None, seq)
        ours_sec["encode"] = time_call(lambda: jax.block_until_ready(ours.encode_prompt(prompts, None, seq)),
                                       args.repeats)
        peer_sec["encode"] = time_call(lambda: peer.encode_prompt(prompts, None, max_sequence_length=seq,
                                                                  device=torch_device), args.repeats, sync)
        pe, npe = (e.to(transformer_dtype) for e in peer.encode_prompt(prompts, None, max_sequence_length=seq,
                                                                        device=torch_device))

        # ---- one transformer step on the doubled batch
        weights_dtype = jax.tree_util.tree_leaves(nnx.state(ours.transformer))[0].dtype
        schedule = ours.schedule(steps, flow_shift)
        params = nnx.state(ours.transformer)
        step_fn = jax.jit(wan_model_fn(ours.transformer))
        step_args = (params, jnp.concatenate([init_j, init_j]), schedule.sigmas[0], schedule.timesteps[0],
                     (jnp.concatenate([cond, uncond]).astype(weights_dtype),))
        out = step_fn(*step_args)
        result["ours_step_output_dtype"] = str(out.dtype)
        del out
        ours_sec["step"] = time_call(lambda: step_fn(*step_args).block_until_ready(), args.step_repeats)
        scheduler = UniPCMultistepScheduler.from_config(peer.scheduler.config)
        scheduler.set_timesteps(steps, device=torch_device)
        t0 = scheduler.timesteps[0]
        x2_t, pe2 = torch.cat([init_dev, init_dev]), torch.cat([pe, npe])

        def peer_step():
            return peer.transformer(hidden_states=x2_t.to(transformer_dtype), timestep=t0.expand(x2_t.shape[0]),
                                    encoder_hidden_states=pe2, return_dict=False)[0]

        peer_sec["step"] = time_call(peer_step, args.step_repeats, sync)

        # ---- the denoising loop alone
        def ours_denoise(options):
            return ours.sample((cond, uncond), init_j, **options, num_steps=steps,
                               flow_shift=flow_shift).samples.block_until_ready()

        ours_sec["denoise"] = time_call(lambda: ours_denoise(CFG), args.repeats)
        ours_sec["denoise_cfg_zero_star"] = time_call(lambda: ours_denoise(CFG_ZERO_STAR), args.repeats)

        def peer_denoise():  # WanPipeline.__call__'s loop, step for step
            scheduler.set_timesteps(steps, device=torch_device)
            timesteps = scheduler.timesteps
            scheduler.set_begin_index(0)
            x = init_dev.clone()
            for i, t in enumerate(timesteps):
                inp = x.to(transformer_dtype)
                timestep = t.expand(x.shape[0])
                context = dict(step_index=i, sigma=float(scheduler.sigmas[i]), num_inference_steps=len(timesteps))
                with peer.transformer.cache_context("cond", **context):
                    v_c = peer.transformer(hidden_states=inp, timestep=timestep, encoder_hidden_states=pe,
                                           attention_kwargs=None, return_dict=False)[0]
                with peer.transformer.cache_context("uncond", **context):
                    v_u = peer.transformer(hidden_states=inp, timestep=timestep, encoder_hidden_states=npe,
                                           attention_kwargs=None, return_dict=False)[0]
                x = scheduler.step(v_u + GUIDANCE_SCALE * (v_c - v_u), t, x, return_dict=False)[0]
            return x

        peer_sec["denoise"] = time_call(peer_denoise, args.repeats, sync)
        final_ours = ours_denoise(CFG)

        # ---- decode
        ours_sec["decode"] = time_call(lambda: np.asarray(ours.decode(final_ours)), args.repeats)
        final_peer = peer_denoise()
        vae_cfg = peer.vae.config

        def peer_decode():  # WanPipeline.__call__'s decoding
            z = final_peer.to(peer.vae.dtype)
            mean = torch.tensor(vae_cfg.latents_mean).view(1, vae_cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
            inv_std = 1.0 / torch.tensor(vae_cfg.latents_std).view(1, vae_cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
            video = peer.vae.decode(z / inv_std + mean, return_dict=False)[0]
            return peer.video_processor.postprocess_video(video, output_type="np")

        peer_sec["decode"] = time_call(peer_decode, args.repeats, sync)
        result["decode_memory"] = decode_memory(gpu, torch, jax_device, lambda: np.asarray(ours.decode(final_ours)),
                                                peer_decode, sync)

        # ---- end to end, compiled / warmed
        ours_sec["end_to_end"] = time_call(lambda: ours_e2e(CFG), args.repeats, warmup=0)
        ours_sec["end_to_end_cfg_zero_star"] = time_call(lambda: ours_e2e(CFG_ZERO_STAR), args.repeats, warmup=0)
        peer_sec["end_to_end"] = time_call(peer_e2e, args.repeats, warmup=0)  # first call above was the warm-up

    return finish_report(result, ours_sec, peer_sec, steps, compile_s=compile_cfg, variant_compile_s=compile_zero,
                         first_call_s=peer_first)
