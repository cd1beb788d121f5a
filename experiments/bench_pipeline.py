"""Our JAX SD3 (or Flux, Wan2.1, Lumina-Next) pipeline against diffusers' PyTorch pipeline, same weights.

    python -m experiments.bench_pipeline                         # tiny,mid on CPU; tiny,mid,medium on a GPU
    python -m experiments.bench_pipeline --model flux --config mid   # FluxPipeline (experiments.bench_flux)
    python -m experiments.bench_pipeline --model wan --config mid    # Wan2.1 T2V (experiments.bench_wan)
    python -m experiments.bench_pipeline --model wan --config 1.3b --device gpu --dtype bfloat16 --steps 50
    python -m experiments.bench_pipeline --model lumina --config mid # Lumina-Next (experiments.bench_lumina)
    python -m experiments.bench_pipeline --model lumina --config next --device gpu --dtype bfloat16 --steps 30
    python -m experiments.bench_pipeline --config mid --steps 4 --repeats 1
    python -m experiments.bench_pipeline --config medium --device gpu --dtype bfloat16
    python -m experiments.bench_pipeline --quick --out /tmp/bench.json   # tiny, 2 steps, 1 repeat (tests)

For each ``--config`` (sizes: :data:`cfgzero_theory.sd3.tiny.PIPELINE_SIZES`) a random
pipeline is built with diffusers / transformers classes
(:func:`cfgzero_theory.sd3.tiny.build_random_pipeline`, hand-written tiny tokenizers, nothing
downloaded), saved with safetensors to a temporary folder and loaded by
:meth:`SD3Pipeline.from_pretrained`; the diffusers pipeline is the built object itself, moved
with ``.to(device, dtype)``.  Both sides get the same prompt (repeated ``--batch`` times), the
same initial latents (``torch.randn`` of ``--seed``, cast to ``--dtype``), the same number of
steps and plain CFG at guidance scale 4 with the empty negative prompt (like for like); our
CFG-Zero* (``guidance="cfg-zero-star"``, zero-init 1) is timed as well, reported apart.

Timed (medians over ``--repeats`` for whole-pipeline sections, ``--step-repeats`` for one
transformer call; every section warmed up first; JAX results ``block_until_ready``, torch
``cuda.synchronize`` on a GPU, results copied to the host as NumPy where the pipeline
returns images):

* ``step``: one transformer evaluation on the doubled CFG batch ``2B`` — ours the jitted
  ``pipe.model_fn(nnx.state(transformer), ...)``, diffusers ``pipe.transformer(...)`` under
  ``torch.no_grad()``;
* ``encode``: the prompt and negative prompt through the three text encoders (ours
  ``pipe.encode_prompt``, diffusers ``pipe.encode_prompt``);
* ``denoise``: the whole sampling loop given the embeddings — ours ``pipe.sample`` (one
  compiled ``sample_flow`` ``lax.scan``), diffusers the loop of ``StableDiffusion3Pipeline.__call__``
  replicated step for step (``set_timesteps``; per step ``cat``, ``t.expand``, transformer,
  ``chunk``, CFG combine, ``scheduler.step``); ``loop_per_step = denoise / steps``;
* ``decode``: latents to ``[0, 1]`` images (VAE decoder and post-processing);
* ``end_to_end``: prompt to NumPy images — ours ``pipe(prompts, guidance="cfg", scale=4,
  latents=...)`` after its first call, whose time (tracing + compilation of encoders, loop
  and decoder + one run) is ``compile_s`` (the persistent compilation cache of
  :mod:`cfgzero_theory.compilation` is on unless ``--no-compilation-cache``: when it already
  holds the programs, ``compile_s`` is mostly loading them); diffusers ``pipe(prompts, latents=...,
  num_inference_steps=N, guidance_scale=4, output_type="np")`` (its first call is reported
  as ``first_call_s``).

Ratios are diffusers / ours (> 1: ours faster).  Agreement: our final CFG latents against
``pipe(..., output_type="latent")`` and our images against diffusers' (``max |ours − diffusers|
/ max(1, max |diffusers|)``) — a sanity number (≈1e-5 in float32 on a CPU; looser in bfloat16
or with TF32), not a test.  With ``--fp32-matmul highest`` (default) float32 matmuls are full
precision on both sides (``jax_default_matmul_precision="highest"``, torch TF32 off);
``tf32`` allows TF32 on both.  ``medium`` needs ~20 GB and is refused on a CPU unless
``--allow-cpu-medium``.

Wan2.1 (``--model wan``, :mod:`experiments.bench_wan`; sizes ``tiny``, ``mid`` and ``1.3b`` of
:data:`cfgzero_theory.wan.tiny.PIPELINE_SIZES`, text-to-video, each at its ``video_size``):
the same sections on videos, plain CFG at scale 5 (CFG-Zero* with ``K = 2`` timed apart), UMT5
prompts of 512 tokens (``--max-sequence-length`` must be 512 or left out for Wan: other values
are refused), float32 latents whatever ``--dtype``, diffusers' loop making two transformer
calls of ``B`` per step where ours makes one of ``2B``, and ``decode_memory`` on a GPU.  The paper
samples Wan with 50 steps: pass ``--steps 50`` (the default stays 28).  ``1.3b`` (Wan2.1 T2V
1.3B's transformer and VAE at 81 frames of 480×832) is refused on a CPU unless
``--allow-cpu-medium``.

Lumina-Next (``--model lumina``, :mod:`experiments.bench_lumina`; sizes ``tiny``, ``mid`` and
``next`` of :data:`cfgzero_theory.lumina.tiny.PIPELINE_SIZES`, each at its square ``image_size``):
the same sections, plain CFG at scale 4 on the first three latent channels with
``scaling_watershed=1.0`` and ``proportional_attn=True`` (CFG-Zero* with ``K = 1`` timed apart),
diffusers with ``clean_caption=False`` (both sides lower-case and strip the prompt), Gemma at the
tokenizer's padding (a multiple of 8 of the prompt's own length) under diffusers' fixed cap of 256
tokens (``--max-sequence-length`` must be 256 or left out for Lumina: diffusers' ``LuminaPipeline``
ignores the argument, other values are refused), latents in ``--dtype`` (the prompt embeddings'
dtype), the ``step`` timing diffusers' per-step RoPE table build, and ``decode_memory`` on a GPU.
``next`` (Lumina-Next-SFT's 2B transformer and the SDXL-sized VAE at 1024², Gemma shrunk to two
layers) is refused on a CPU unless ``--allow-cpu-medium``.

FLOPs of one step: ``transformer_step_flops`` counted from the architecture
(:func:`cfgzero_theory.sd3.flops.mmdit_step_flops`; ``achieved_tflops`` divides it by the
step medians) and ``transformer_step_flops_xla``, XLA's cost analysis of our step compiled with
the head-major attention (XLA counts the blocked CPU attention's loop body once, and is blind to
cuDNN's fused attention on a GPU).

Output: progress lines and a table, then the report as one strict JSON object on the last
stdout line (also written to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import sys
import time

import numpy as np

# Both frameworks share the GPU: JAX must not grab 75% of its memory up front (read when JAX
# first initialises its backends, which this module does not do at import).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from cfgzero_theory.compilation import enable_compilation_cache  # noqa: E402
from cfgzero_theory.ports.attention import forced_implementation  # noqa: E402
from cfgzero_theory.sd3.flops import mmdit_step_flops  # noqa: E402
from experiments._common import prepare_output_dir, run_or_exit, strict_json, write_json  # noqa: E402
from experiments.bench_common import environment as machine_environment  # noqa: E402
from experiments.bench_common import (  # noqa: E402
    agreement, build_pipeline_pair, dtypes, finish_report, loadavg, print_report, time_call, weights_note,
    xla_flops,
)
from experiments.bench_flux import DEFINITIONS as FLUX_DEFINITIONS  # noqa: E402
from experiments.bench_flux import bench_flux_config  # noqa: E402
from experiments.bench_lumina import DEFINITIONS as LUMINA_DEFINITIONS  # noqa: E402
from experiments.bench_lumina import MAX_SEQUENCE_LENGTH as LUMINA_MAX_SEQUENCE_LENGTH  # noqa: E402
from experiments.bench_lumina import SETTINGS as LUMINA_SETTINGS  # noqa: E402
from experiments.bench_lumina import bench_lumina_config  # noqa: E402
from experiments.bench_wan import DEFINITIONS as WAN_DEFINITIONS  # noqa: E402
from experiments.bench_wan import MAX_SEQUENCE_LENGTH as WAN_MAX_SEQUENCE_LENGTH  # noqa: E402
from experiments.bench_wan import SETTINGS as WAN_SETTINGS  # noqa: E402
from experiments.bench_wan import bench_wan_config  # noqa: E402

CONFIGS = ("tiny", "mid", "medium")
#: Flux sizes (:data:`cfgzero_theory.flux.tiny.PIPELINE_SIZES`); ``dev`` is FLUX.1-dev's transformer.
FLUX_CONFIGS = ("tiny", "mid", "dev")
#: Wan2.1 T2V sizes (:data:`cfgzero_theory.wan.tiny.PIPELINE_SIZES`); ``1.3b`` is Wan2.1 T2V 1.3B at 480p.
WAN_CONFIGS = ("tiny", "mid", "1.3b")
#: Lumina-Next sizes (:data:`cfgzero_theory.lumina.tiny.PIPELINE_SIZES`); ``next`` is Lumina-Next-SFT's at 1024².
LUMINA_CONFIGS = ("tiny", "mid", "next")
LARGE = {"sd3": "medium", "flux": "dev", "wan": "1.3b", "lumina": "next"}
PROMPT = "a photo of a cat"
GUIDANCE_SCALE = 4.0
ZERO_INIT_STEPS = 1
TEXT_ENCODERS_NOTE = {
    "tiny": "tiny text encoders (CLIP widths 8/16, T5 width 32, 2 layers each)",
    "mid": "small text encoders (CLIP widths 64/128, T5 width 256, 2 layers each)",
    "medium": ("text encoders SHRUNK: SD3 widths (CLIP-L 768, CLIP-bigG 1280, T5 4096) but 1 layer each, T5 d_ff "
               "1024 and 4 heads, tiny hand-written tokenizers; the transformer and VAE are SD3-medium's"),
}


def guidance_options(guidance: str) -> dict:
    """Our pipeline's options for the two timed rules: CFG at :data:`GUIDANCE_SCALE`, and
    CFG-Zero* at the same scale with :data:`ZERO_INIT_STEPS` zeroed steps (CFG takes no ``K``)."""
    if guidance == "cfg":
        return {"guidance": "cfg", "scale": GUIDANCE_SCALE}
    return {"guidance": "cfg-zero-star", "scale": GUIDANCE_SCALE, "zero_init_steps": ZERO_INIT_STEPS}


# --------------------------------------------------------------------------- timing
def _count(tree) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))


# --------------------------------------------------------------------------- device / dtype
def resolve_device(requested: str, torch) -> tuple[str, str, object]:
    """``(device, torch_device, jax_device)``: ``cpu`` or ``gpu`` on both sides."""
    jax_gpu = [d for d in jax.devices() if d.platform != "cpu"]
    torch_gpu = bool(torch.cuda.is_available())
    if requested == "auto":
        requested = "gpu" if (jax_gpu and torch_gpu) else "cpu"
    if requested == "gpu":
        if not (jax_gpu and torch_gpu):
            raise ValueError(f"--device gpu needs a GPU for both JAX (backend {jax.default_backend()!r}) and torch "
                             f"(cuda available: {torch_gpu})")
        return "gpu", "cuda", jax_gpu[0]
    return "cpu", "cpu", jax.devices("cpu")[0]


def set_fp32_matmul(mode: str, torch, dtype: str) -> None:
    """float32 matmul precision on both sides (``highest``: full float32; ``tf32``: TF32 allowed)."""
    if dtype != "float32":
        return
    jax.config.update("jax_default_matmul_precision", "highest" if mode == "highest" else "tensorfloat32")
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
        torch.backends.cudnn.allow_tf32 = mode == "tf32"


def environment(torch, diffusers, device: str, jax_device) -> dict:
    env = machine_environment()
    env.pop("dtype", None)
    env.update(
        platform=platform.platform(),
        jax_backend=jax.default_backend(),
        jax_device=str(jax_device),
        jax_device_kind=getattr(jax_device, "device_kind", None),
        torch_version=torch.__version__,
        diffusers_version=diffusers.__version__,
        torch_num_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
        torch_device_name=torch.cuda.get_device_name(0) if device == "gpu" else env.get("cpu_model"),
        torch_cuda_version=torch.version.cuda,
        torch_matmul_allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32),
        torch_cudnn_allow_tf32=bool(torch.backends.cudnn.allow_tf32),
        jax_default_matmul_precision=str(jax.config.jax_default_matmul_precision),
        xla_python_client_preallocate=os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
    )
    try:
        import transformers

        env["transformers_version"] = transformers.__version__
    except ImportError:  # pragma: no cover
        env["transformers_version"] = None
    return env


# --------------------------------------------------------------------------- one configuration
def _bench_config(name: str, args, torch, device: str, torch_device: str, jax_device) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from cfgzero_theory.sd3.pipeline import SD3Pipeline
    from cfgzero_theory.sd3.tiny import PIPELINE_SIZES, build_random_pipeline

    torch_dtype, jax_dtype = dtypes(args.dtype, torch)
    size = PIPELINE_SIZES[name]
    steps = args.steps
    batch = args.batch
    prompts = [PROMPT] * batch
    seq = args.max_sequence_length
    gpu = device == "gpu"

    def sync():
        if gpu:
            torch.cuda.synchronize()

    result = {"config": name, "steps": steps, "batch": batch, "model_batch": 2 * batch, "dtype": args.dtype,
              "max_sequence_length": seq, "guidance_scale": GUIDANCE_SCALE, "prompt": PROMPT,
              "sizes": {k: (dict(v) if isinstance(v, dict) else v) for k, v in size.items()},
              "text_encoders": TEXT_ENCODERS_NOTE[name],
              "weights": weights_note(size["perturb"])}
    print(f"[{name}] building the random pipeline ...", flush=True)
    peer, ours, seconds = build_pipeline_pair(build_random_pipeline, SD3Pipeline.from_pretrained, name, args.seed,
                                              torch_dtype, jax_dtype, jax_device, torch_device)
    result.update(seconds)
    tcfg = ours.transformer.config
    factor = ours.vae_scale_factor
    latent_hw = tcfg.sample_size
    result.update(
        latent_shape=[batch, tcfg.in_channels, latent_hw, latent_hw],
        image_size=[latent_hw * factor, latent_hw * factor],
        transformer_params_ours=_count(nnx.state(ours.transformer)),
        transformer_params_diffusers=int(sum(p.numel() for p in peer.transformer.parameters())),
        vae_params=int(sum(p.numel() for p in peer.vae.parameters())),
        text_encoder_params=int(sum(p.numel() for enc in (peer.text_encoder, peer.text_encoder_2, peer.text_encoder_3)
                                    for p in enc.parameters())),
        transformer_params_note="ours also counts the fixed positional table pos_embed (a buffer in diffusers)",
        image_tokens=(latent_hw // tcfg.patch_size) ** 2,
        text_tokens=77 + seq,
    )
    print(f"[{name}] built in {result['build_s']:.1f}s, loaded ours in {result['load_ours_s']:.1f}s; transformer "
          f"{result['transformer_params_ours'] / 1e6:.1f}M params, latents {result['latent_shape']}, images "
          f"{result['image_size']}", flush=True)

    generator = torch.Generator().manual_seed(args.seed)
    init_t = torch.randn(tuple(result["latent_shape"]), generator=generator).to(torch_dtype)
    init_np = init_t.float().numpy()
    init_j = jax.device_put(jnp.asarray(init_np).astype(jax_dtype), jax_device)
    init_dev = init_t.to(torch_device)
    e2e_common = dict(num_inference_steps=steps, guidance_scale=GUIDANCE_SCALE, max_sequence_length=seq)
    ours_sec, peer_sec = {}, {}

    with jax.default_device(jax_device), torch.no_grad():
        # ---- end to end, first (compiling) calls of ours
        def ours_e2e(guidance):
            latents, images = ours(prompts, **guidance_options(guidance), num_steps=steps, latents=init_j,
                                   max_sequence_length=seq)
            return np.asarray(latents.astype(jnp.float32)), np.asarray(images)

        print(f"[{name}] ours: first calls (compilation) ...", flush=True)
        start = time.perf_counter()
        ours_latents, ours_images = ours_e2e("cfg")
        compile_cfg = time.perf_counter() - start
        start = time.perf_counter()
        zero_latents, _ = ours_e2e("cfg-zero-star")
        compile_zero = time.perf_counter() - start

        def peer_e2e(output_type="np"):
            out = peer(prompts, latents=init_dev.clone(), output_type=output_type, **e2e_common).images
            sync()
            return out

        print(f"[{name}] diffusers: first calls ...", flush=True)
        start = time.perf_counter()
        peer_images = peer_e2e()
        peer_first = time.perf_counter() - start
        peer_latents = peer_e2e("latent").float().cpu().numpy()
        result["agreement"] = agreement("images", ours_latents, peer_latents, ours_images, peer_images, zero_latents)

        # ---- encode
        cond, pooled, uncond, uncond_pooled = ours.encode_prompt(prompts, None, seq)
        ours_sec["encode"] = time_call(lambda: jax.block_until_ready(ours.encode_prompt(prompts, None, seq)),
                                   args.repeats)
        peer_sec["encode"] = time_call(lambda: peer.encode_prompt(prompts, None, None, device=torch_device,
                                                              max_sequence_length=seq), args.repeats, sync)
        pe, npe, pp, npp = peer.encode_prompt(prompts, None, None, device=torch_device, max_sequence_length=seq)
        pe2, pp2 = torch.cat([npe, pe]), torch.cat([npp, pp])

        # ---- one transformer step on the doubled batch
        schedule = ours.schedule(steps)
        params = nnx.state(ours.transformer)
        both = (jnp.concatenate([cond, uncond]), jnp.concatenate([pooled, uncond_pooled]))
        x2 = jnp.concatenate([init_j, init_j])
        step_fn = jax.jit(ours.model_fn)
        step_args = (params, x2, schedule.sigmas[0], schedule.timesteps[0], both)
        try:  # counted on the head-major attention: XLA counts the blocked CPU loop's body once
            with forced_implementation("head_major"):
                flops = xla_flops(jax.jit(lambda *a: ours.model_fn(*a)).lower(*step_args).compile())
        except Exception:  # noqa: BLE001
            flops = None
        out = step_fn(*step_args)
        result["ours_step_output_dtype"] = str(out.dtype)
        ours_sec["step"] = time_call(lambda: step_fn(*step_args).block_until_ready(), args.step_repeats)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(peer.scheduler.config)
        scheduler.set_timesteps(steps, device=torch_device)
        t0 = scheduler.timesteps[0]
        x2_t = torch.cat([init_dev, init_dev])

        def peer_step():
            return peer.transformer(hidden_states=x2_t, timestep=t0.expand(x2_t.shape[0]), encoder_hidden_states=pe2,
                                    pooled_projections=pp2, return_dict=False)[0]

        peer_sec["step"] = time_call(peer_step, args.step_repeats, sync)
        result["transformer_step_flops_xla"] = flops
        p = ours.transformer.config.patch_size
        result["transformer_step_flops"] = mmdit_step_flops(
            ours.transformer.config, (init_j.shape[2] // p) * (init_j.shape[3] // p), cond.shape[1], x2.shape[0])
        del out

        # ---- the denoising loop alone
        def ours_denoise(guidance):
            return ours.sample((cond, pooled, uncond, uncond_pooled), init_j, **guidance_options(guidance),
                               num_steps=steps).samples.block_until_ready()

        ours_sec["denoise"] = time_call(lambda: ours_denoise("cfg"), args.repeats)
        ours_sec["denoise_cfg_zero_star"] = time_call(lambda: ours_denoise("cfg-zero-star"), args.repeats)

        def peer_denoise():  # StableDiffusion3Pipeline.__call__'s loop, step for step
            scheduler.set_timesteps(steps, device=torch_device)
            x = init_dev.clone()
            for t in scheduler.timesteps:
                inp = torch.cat([x, x])
                v = peer.transformer(hidden_states=inp, timestep=t.expand(inp.shape[0]), encoder_hidden_states=pe2,
                                     pooled_projections=pp2, return_dict=False)[0]
                v_u, v_c = v.chunk(2)
                x = scheduler.step(v_u + GUIDANCE_SCALE * (v_c - v_u), t, x, return_dict=False)[0]
            return x

        peer_sec["denoise"] = time_call(peer_denoise, args.repeats, sync)
        final_ours = ours_denoise("cfg")

        # ---- decode
        ours_sec["decode"] = time_call(lambda: np.asarray(ours.decode(final_ours)), args.repeats)
        final_peer = peer_denoise()
        vae_cfg = peer.vae.config

        def peer_decode():
            z = final_peer / vae_cfg.scaling_factor + vae_cfg.shift_factor
            image = peer.vae.decode(z, return_dict=False)[0]
            return peer.image_processor.postprocess(image, output_type="np")

        peer_sec["decode"] = time_call(peer_decode, args.repeats, sync)

        # ---- end to end, compiled / warmed
        ours_sec["end_to_end"] = time_call(lambda: ours_e2e("cfg"), args.repeats, warmup=0)
        ours_sec["end_to_end_cfg_zero_star"] = time_call(lambda: ours_e2e("cfg-zero-star"), args.repeats, warmup=0)
        peer_sec["end_to_end"] = time_call(peer_e2e, args.repeats, warmup=0)  # first call above was the warm-up

    finish_report(result, ours_sec, peer_sec, steps, compile_s=compile_cfg, variant_compile_s=compile_zero,
                  first_call_s=peer_first)
    result["achieved_tflops"] = {
        "ours": result["transformer_step_flops"] / ours_sec["step"]["median_s"] / 1e12,
        "diffusers": result["transformer_step_flops"] / peer_sec["step"]["median_s"] / 1e12,
    }

    return result


def bench_config(name: str, args, torch, device: str, torch_device: str, jax_device, model: str = "sd3") -> dict:
    """:func:`_bench_config` (Flux: :func:`experiments.bench_flux.bench_flux_config`, Wan:
    :func:`experiments.bench_wan.bench_wan_config`, Lumina: :func:`experiments.bench_lumina.bench_lumina_config`),
    then free both pipelines and the compiled programs (all locals of the measurement are gone once
    it returns) before the next configuration."""
    measure = {"sd3": _bench_config, "flux": bench_flux_config, "wan": bench_wan_config,
               "lumina": bench_lumina_config}[model]
    try:
        return measure(name, args, torch, device, torch_device, jax_device)
    finally:
        gc.collect()
        if device == "gpu":
            torch.cuda.empty_cache()
        jax.clear_caches()
        gc.collect()


# --------------------------------------------------------------------------- CLI
def _fmt_s(seconds) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    return f"{seconds * 1e3:.1f}ms" if seconds < 1 else f"{seconds:.2f}s"


def table(results: list[dict]) -> str:
    rows = [f"{'config':8s} {'section':22s} {'ours':>10s} {'diffusers':>10s} {'diff/ours':>9s}"]
    for r in results:
        for key in ("step", "loop_per_step", "encode", "denoise", "decode", "end_to_end"):
            o, p = r["ours"][key]["median_s"], r["diffusers"][key]["median_s"]
            rows.append(f"{r['config']:8s} {key:22s} {_fmt_s(o):>10s} {_fmt_s(p):>10s} {p / o:8.2f}x")
        for key in (k for k in r["ours"] if k.startswith("end_to_end_")):
            rows.append(f"{r['config']:8s} {key.replace('end_to_end_', 'end_to_end '):22s} "
                        f"{_fmt_s(r['ours'][key]['median_s']):>10s} {'':>10s}")
        rows.append(f"{r['config']:8s} {'first call':22s} {_fmt_s(r['ours']['compile_s']):>10s} "
                    f"{_fmt_s(r['diffusers']['first_call_s']):>10s}")
        agree = r["agreement"]["final_latents"]
        rows.append(f"{r['config']:8s} latents max|diff|/scale {agree['relative']:.1e}; config runtime "
                    f"{_fmt_s(r['runtime_s'])}")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_pipeline",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("sd3", "flux", "wan", "lumina"), default="sd3",
                   help="the pipeline: sd3 (CFG on the doubled batch), flux (FLUX.1-dev's distilled guidance, "
                   "one branch; experiments.bench_flux), wan (Wan2.1 text-to-video, CFG scale 5; "
                   "experiments.bench_wan) or lumina (Lumina-Next, CFG scale 4 on three channels; "
                   "experiments.bench_lumina) (default: sd3)")
    p.add_argument("--config", action="append", default=None,
                   help=f"pipeline size(s): sd3 {CONFIGS}, flux {FLUX_CONFIGS}, wan {WAN_CONFIGS}, lumina "
                   f"{LUMINA_CONFIGS}; repeat or comma-separate (default tiny,mid on a CPU, and the large one on a "
                   "GPU)")
    p.add_argument("--steps", type=int, default=28,
                   help="denoising steps (default 28; the paper samples Wan with 50)")
    p.add_argument("--batch", type=int, default=1, help="prompts per call, B (the transformer sees 2B)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of whole-pipeline sections (default 3)")
    p.add_argument("--step-repeats", type=int, default=10, help="timed single transformer calls (default 10)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--fp32-matmul", choices=("highest", "tf32"), default="highest",
                   help="float32 matmul precision on both sides (GPU only matters; default highest)")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="T5 tokens (default 256, as SD3, for sd3 and flux; wan: UMT5's 512, the only value "
                   "accepted; lumina: Gemma's truncation cap, fixed at 256 by diffusers' LuminaPipeline, the only "
                   "value accepted — prompts are padded to a multiple of 8 of their own length)")
    p.add_argument("--seed", type=int, default=0, help="weights and initial latents seed")
    p.add_argument("--allow-cpu-medium", action="store_true",
                   help="allow the large config (sd3 medium, flux dev, wan 1.3b, lumina next) on a CPU (~20 GB / "
                   "~50 GB / hours / ~20 GB)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="also write the JSON report to this file (default: stdout only, its last line)")
    p.add_argument("--no-compilation-cache", action="store_true",
                   help="compile from scratch: no persistent compilation cache (with it, a repeated run's compile_s "
                   "is mostly the time to load the cached programs)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny only, 2 steps, 1 repeat, 2 step repeats")
    return p


def parse_configs(values, device: str, model: str = "sd3") -> list[str]:
    if not values:
        return ["tiny", "mid"] + ([LARGE[model]] if device == "gpu" else [])
    known = {"sd3": CONFIGS, "flux": FLUX_CONFIGS, "wan": WAN_CONFIGS, "lumina": LUMINA_CONFIGS}[model]
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise ValueError(f"--config must name some of {known} for --model {model}, got {values!r}")
    return list(dict.fromkeys(names))


def run(args) -> dict:
    started = time.perf_counter()
    try:
        import diffusers
        import torch
    except ImportError as err:
        raise ValueError(f"bench_pipeline needs torch and diffusers: {err}") from None
    if args.quick:
        args.config, args.steps, args.repeats, args.step_repeats = ["tiny"], 2, 1, 2
    if args.max_sequence_length is None:
        args.max_sequence_length = {"wan": WAN_MAX_SEQUENCE_LENGTH, "lumina": LUMINA_MAX_SEQUENCE_LENGTH}.get(
            args.model, 256)
    if args.model == "wan" and args.max_sequence_length != WAN_MAX_SEQUENCE_LENGTH:
        raise ValueError(f"--model wan encodes prompts to {WAN_MAX_SEQUENCE_LENGTH} UMT5 tokens (Wan2.1's text "
                         f"length); leave --max-sequence-length out or pass {WAN_MAX_SEQUENCE_LENGTH}, "
                         f"got {args.max_sequence_length}")
    if args.model == "lumina" and args.max_sequence_length != LUMINA_MAX_SEQUENCE_LENGTH:
        raise ValueError(f"--model lumina truncates prompts at {LUMINA_MAX_SEQUENCE_LENGTH} Gemma tokens, a cap "
                         "diffusers' LuminaPipeline fixes (it ignores max_sequence_length; prompts are padded to a "
                         f"multiple of 8 of their own length); leave --max-sequence-length out or pass "
                         f"{LUMINA_MAX_SEQUENCE_LENGTH}, got {args.max_sequence_length}")
    for name in ("steps", "batch", "repeats", "step_repeats", "max_sequence_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")
    device, torch_device, jax_device = resolve_device(args.device, torch)
    configs = parse_configs(args.config, device, args.model)
    large = LARGE[args.model]
    if large in configs and device == "cpu" and not args.allow_cpu_medium:
        raise ValueError(f"--config {large} needs tens of GB and hours on a CPU; use a GPU or pass --allow-cpu-medium")
    set_fp32_matmul(args.fp32_matmul, torch, args.dtype)
    env = environment(torch, diffusers, device, jax_device)
    print(f"jax {env['jax_version']} on {env['jax_device_kind']} ({env['jax_backend']}); torch {env['torch_version']} "
          f"({torch_device}, {env['torch_num_threads']} threads), diffusers {env['diffusers_version']}; "
          f"{args.dtype}; configs {configs}, {args.steps} steps, batch {args.batch}", flush=True)

    results = []
    for name in configs:
        start = time.perf_counter()
        result = bench_config(name, args, torch, device, torch_device, jax_device, args.model)
        result["runtime_s"] = time.perf_counter() - start
        results.append(result)
        r = result["ratios_diffusers_over_ours"]
        print(f"[{name}] done in {result['runtime_s']:.1f}s: step {r['step']:.2f}x, loop/step "
              f"{r['loop_per_step']:.2f}x, end-to-end {r['end_to_end']:.2f}x (diffusers/ours)", flush=True)

    report = {
        "benchmark": "bench_pipeline",
        **env,
        "device": device,
        "torch_device": torch_device,
        "dtype": args.dtype,
        "settings": {
            "model": args.model, "configs": configs, "steps": args.steps, "batch": args.batch, "repeats": args.repeats,
            "step_repeats": args.step_repeats, "max_sequence_length": args.max_sequence_length, "seed": args.seed,
            "guidance_scale": GUIDANCE_SCALE, "zero_init_steps": ZERO_INIT_STEPS, "fp32_matmul": args.fp32_matmul,
            "quick": bool(args.quick),
            "compilation_cache_dir": jax.config.jax_compilation_cache_dir or None,
        },
        "definitions": {
            "step": "one transformer call on the doubled CFG batch 2B (ours: jitted model_fn; diffusers: "
                    "pipe.transformer under no_grad)",
            "encode": "prompt + empty negative prompt through CLIP-L, CLIP-bigG, T5",
            "denoise": "the sampling loop given embeddings (ours: sample_flow, one lax.scan; diffusers: the loop "
                       "of StableDiffusion3Pipeline.__call__, replicated)",
            "loop_per_step": "denoise / steps",
            "decode": "VAE decode + post-processing to [0, 1] NumPy images",
            "end_to_end": "prompt -> NumPy images, plain CFG scale 4 (ours after compilation)",
            "compile_s": "ours' first end-to-end call (tracing + XLA compilation + one run; with a persistent "
                         "compilation cache that already holds the programs, loading them instead of compiling: "
                         "settings.compilation_cache_dir)",
            "first_call_s": "diffusers' first end-to-end call",
            "ratios": "diffusers median / ours median (> 1: ours faster)",
            "timing": "medians; whole-pipeline sections over --repeats, step over --step-repeats; one warm-up "
                      "call each; JAX block_until_ready, torch cuda.synchronize on GPU",
        },
        "configs": results,
        "loadavg_at_end": loadavg(),
        "runtime_s": time.perf_counter() - started,
    }
    if args.model == "flux":
        report["definitions"].update(FLUX_DEFINITIONS)
    if args.model == "wan":
        report["definitions"].update(WAN_DEFINITIONS)
        report["settings"].update(WAN_SETTINGS)
    if args.model == "lumina":
        report["definitions"].update(LUMINA_DEFINITIONS)
        report["settings"].update(LUMINA_SETTINGS)
    print(table(results), flush=True)
    if args.out is not None:
        write_json(args.out, report)
        print(f"wrote {args.out}", flush=True)
    print_report(report)
    return strict_json(report)


def main(argv=None):
    """Run the benchmark: a folder for ``--out`` that cannot be written is refused before any
    work; the persistent compilation cache is on unless ``--no-compilation-cache``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is not None:
        prepare_output_dir(parser, os.path.dirname(os.path.abspath(args.out)))
    if not args.no_compilation_cache:
        enable_compilation_cache()
    return run_or_exit(run, args)


if __name__ == "__main__":
    main(sys.argv[1:])
