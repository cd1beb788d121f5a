"""One Flux configuration of ``python -m experiments.bench_pipeline --model flux``.

A random ``FluxPipeline`` of the size ``name`` (:data:`cfgzero_theory.flux.tiny.PIPELINE_SIZES`,
built with diffusers and saved) is loaded by our :class:`~cfgzero_theory.flux.pipeline.FluxPipeline`;
both sides sample it like for like on the paper's Flux path: FLUX.1-dev's distilled guidance
(3.5) embedded, **one** transformer call per step, no negative prompt.  Ours is also timed with
zero-init of the first step (``zero_init_steps=1``, CFG-Zero*'s part for Flux), reported apart.

Sections (as for SD3, :mod:`experiments.bench_pipeline`): ``step`` (one transformer call on the
batch ``B``), ``encode`` (CLIP-L pooled + T5), ``denoise`` (the loop given the embeddings; diffusers'
``FluxPipeline.__call__`` loop replicated), ``loop_per_step``, ``decode`` (unpack, VAE, images)
and ``end_to_end`` (prompt to NumPy images).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.bench_common import (
    COMPARED_SECTIONS, agreement, build_pipeline_pair, dtypes, per_step, ratio, time_call, weights_note,
)

DISTILLED_GUIDANCE = 3.5
PROMPT = "a photo of a cat"
#: What the sections mean for Flux (they replace SD3's in the report).
DEFINITIONS = {
    "step": "one transformer call on the batch B (one branch: distilled guidance 3.5 embedded; ours: jitted "
            "model_fn; diffusers: pipe.transformer under no_grad)",
    "encode": "the prompt through CLIP-L (pooled) and T5",
    "denoise": "the sampling loop given embeddings (ours: sample_flow with uncond_context=None, one lax.scan; "
               "diffusers: the loop of FluxPipeline.__call__, replicated)",
    "end_to_end": "prompt -> NumPy images, distilled guidance 3.5, no zero-init (ours after compilation); "
                  "end_to_end_zero_init: ours with the first step zeroed",
}


def bench_flux_config(name: str, args, torch, device: str, torch_device: str, jax_device) -> dict:
    """Time configuration ``name`` (module docstring); returns its report."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from cfgzero_theory.flux.pipeline import FluxPipeline, pack_latents
    from cfgzero_theory.flux.tiny import PIPELINE_SIZES, build_random_pipeline

    torch_dtype, jax_dtype = dtypes(args.dtype, torch)
    size, steps, batch, seq = PIPELINE_SIZES[name], args.steps, args.batch, args.max_sequence_length
    prompts = [PROMPT] * batch
    gpu = device == "gpu"

    def sync():
        if gpu:
            torch.cuda.synchronize()

    result = {"model": "flux", "config": name, "steps": steps, "batch": batch, "model_batch": batch,
              "dtype": args.dtype, "max_sequence_length": seq, "distilled_guidance": DISTILLED_GUIDANCE,
              "prompt": PROMPT, "sizes": {k: (dict(v) if isinstance(v, dict) else v) for k, v in size.items()},
              "weights": weights_note(size["perturb"])}
    print(f"[flux {name}] building the random pipeline ...", flush=True)
    peer, ours, seconds = build_pipeline_pair(build_random_pipeline, FluxPipeline.from_pretrained, name, args.seed,
                                              torch_dtype, jax_dtype, jax_device, torch_device)
    result.update(seconds)
    height = width = size["image_size"]
    h, w = ours.latent_size(height, width)
    tokens = (h // 2) * (w // 2)
    result.update(image_size=[height, width], latent_grid=[h, w], image_tokens=tokens, text_tokens=seq,
                  transformer_params=int(sum(p.numel() for p in peer.transformer.parameters())))
    print(f"[flux {name}] built in {result['build_s']:.1f}s, loaded ours in {result['load_ours_s']:.1f}s; "
          f"transformer {result['transformer_params'] / 1e6:.1f}M params, {tokens} image tokens", flush=True)

    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((batch, ours.transformer.config.in_channels // 4, h, w), generator=generator)
    init_np = np.array(pack_latents(jnp.asarray(noise.numpy())))
    init_t = torch.from_numpy(init_np).to(torch_dtype).to(torch_device)
    init_j = jax.device_put(jnp.asarray(init_np).astype(jax_dtype), jax_device)
    size_options = dict(height=height, width=width)
    ours_sec, peer_sec = {}, {}

    with jax.default_device(jax_device), torch.no_grad():
        def ours_e2e(zero_init_steps):
            latents, images = ours(prompts, zero_init_steps=zero_init_steps, num_steps=steps, latents=init_j,
                                   max_sequence_length=seq, **size_options)
            return np.asarray(latents.astype(jnp.float32)), np.asarray(images)

        print(f"[flux {name}] ours: first calls (compilation) ...", flush=True)
        start = time.perf_counter()
        ours_latents, ours_images = ours_e2e(0)
        compile_plain = time.perf_counter() - start

        def peer_e2e(output_type="np"):
            out = peer(prompts, latents=init_t.clone(), output_type=output_type, num_inference_steps=steps,
                       guidance_scale=DISTILLED_GUIDANCE, max_sequence_length=seq, **size_options).images
            sync()
            return out

        print(f"[flux {name}] diffusers: first calls ...", flush=True)
        start = time.perf_counter()
        peer_images = peer_e2e()
        peer_first = time.perf_counter() - start
        peer_latents = peer_e2e("latent").float().cpu().numpy()
        result["agreement"] = agreement("images", ours_latents, peer_latents, ours_images, peer_images)

        embeddings = ours.encode_prompt(prompts, None, seq)
        ours_sec["encode"] = time_call(lambda: jax.block_until_ready(ours.encode_prompt(prompts, None, seq)),
                                       args.repeats)
        peer_sec["encode"] = time_call(lambda: peer.encode_prompt(prompts, None, device=torch_device,
                                                                  max_sequence_length=seq), args.repeats, sync)
        prompt_embeds, pooled, text_ids = peer.encode_prompt(prompts, None, device=torch_device,
                                                             max_sequence_length=seq)

        schedule = ours.schedule(steps, tokens)
        params = nnx.state(ours.transformer)
        guidance = jnp.full((batch,), DISTILLED_GUIDANCE, jnp.float32)
        step_fn = jax.jit(ours.model_fn((h // 2, w // 2)))
        step_args = (params, init_j, schedule.sigmas[0], schedule.timesteps[0], (*embeddings[:2], guidance))
        ours_sec["step"] = time_call(lambda: step_fn(*step_args).block_until_ready(), args.step_repeats)
        img_ids = peer._prepare_latent_image_ids(batch, h // 2, w // 2, torch_device, torch_dtype)
        g = torch.full((batch,), DISTILLED_GUIDANCE, device=torch_device)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(peer.scheduler.config)

        def set_timesteps():
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(tokens),
                                    device=torch_device)

        set_timesteps()
        t0 = scheduler.timesteps[0]

        def peer_call(x, t):
            return peer.transformer(hidden_states=x, timestep=t.expand(batch).to(x.dtype) / 1000, guidance=g,
                                    pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                                    img_ids=img_ids, return_dict=False)[0]

        peer_sec["step"] = time_call(lambda: peer_call(init_t, t0), args.step_repeats, sync)

        def ours_denoise(zero_init_steps):
            return ours.sample(embeddings, init_j, zero_init_steps=zero_init_steps, num_steps=steps,
                               **size_options).samples.block_until_ready()

        ours_sec["denoise"] = time_call(lambda: ours_denoise(0), args.repeats)
        ours_sec["denoise_zero_init"] = time_call(lambda: ours_denoise(1), args.repeats)

        def peer_denoise():  # FluxPipeline.__call__'s loop, step for step
            set_timesteps()
            x = init_t.clone()
            for t in scheduler.timesteps:
                x = scheduler.step(peer_call(x, t), t, x, return_dict=False)[0]
            return x

        peer_sec["denoise"] = time_call(peer_denoise, args.repeats, sync)
        final_ours = ours_denoise(0)
        ours_sec["decode"] = time_call(lambda: np.asarray(ours.decode(final_ours, **size_options)), args.repeats)
        final_peer = peer_denoise()
        vae_config = peer.vae.config

        def peer_decode():
            z = peer._unpack_latents(final_peer, height, width, peer.vae_scale_factor)
            image = peer.vae.decode(z / vae_config.scaling_factor + vae_config.shift_factor, return_dict=False)[0]
            return peer.image_processor.postprocess(image, output_type="np")

        peer_sec["decode"] = time_call(peer_decode, args.repeats, sync)
        ours_sec["end_to_end"] = time_call(lambda: ours_e2e(0), args.repeats, warmup=0)
        ours_sec["end_to_end_zero_init"] = time_call(lambda: ours_e2e(1), args.repeats, warmup=1)
        peer_sec["end_to_end"] = time_call(peer_e2e, args.repeats, warmup=0)

    ours_sec["loop_per_step"] = per_step(ours_sec["denoise"], steps)
    peer_sec["loop_per_step"] = per_step(peer_sec["denoise"], steps)
    ours_sec["compile_s"], peer_sec["first_call_s"] = compile_plain, peer_first
    result["ours"], result["diffusers"] = ours_sec, peer_sec
    result["ratios_diffusers_over_ours"] = {key: ratio(peer_sec[key], ours_sec[key]) for key in COMPARED_SECTIONS}
    return result
