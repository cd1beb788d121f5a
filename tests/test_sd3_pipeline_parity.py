"""Parity of :mod:`cfgzero_theory.sd3.pipeline` with ``diffusers.StableDiffusion3Pipeline``.

A tiny random pipeline (``cfgzero_theory.sd3.tiny.build_tiny_random_pipeline``: two tiny
CLIP towers and a tiny T5 with hand-written tokenizer vocabularies, a 2-layer transformer, a
16-channel VAE) is saved once per module and loaded with :meth:`SD3Pipeline.from_pretrained`.

Tolerance (float32, CPU): ``max |ours − diffusers| ≤ 1e-4 · max(1, max |diffusers|)`` for the
prompt embeddings (observed ≈ 2e-6 absolute on values of scale ≈ 3), the latents after four
guided steps and the decoded images in ``[0, 1]``.
"""

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cfgzero_theory.ports.pipeline_parts import save_png
from cfgzero_theory.sd3.pipeline import SD3Pipeline

pytestmark = pytest.mark.parity

RTOL = 1e-4
SEQ = 16  # T5 tokens (the pipeline's max_sequence_length)
STEPS = 4
PROMPTS = ["a photo of a cat", "a red dog on the beach"]


def _close(ours, ref):
    ref = ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    ours = np.asarray(ours)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = float(np.max(np.abs(ours - ref)))
    assert err <= RTOL * max(1.0, float(np.max(np.abs(ref)))), err
    return err


@pytest.fixture(scope="module")
def tiny(torch, diffusers, tmp_path_factory):
    from cfgzero_theory.sd3.tiny import build_tiny_random_pipeline

    folder = tmp_path_factory.mktemp("sd3_pipeline")
    reference = build_tiny_random_pipeline(folder, seed=0)
    return reference, folder, SD3Pipeline.from_pretrained(folder)


def _initial_latents(torch, batch=2):
    generator = torch.Generator().manual_seed(3)
    return torch.randn((batch, 16, 16, 16), generator=generator)


@pytest.mark.parametrize("negative", [None, ["", "blue sky"]])
def test_encode_prompt_matches_diffusers(torch, tiny, negative):
    reference, _, ours = tiny
    with torch.no_grad():
        cond, uncond, pooled, uncond_pooled = reference.encode_prompt(
            PROMPTS, None, None, device="cpu", negative_prompt=negative, max_sequence_length=SEQ)
    got = ours.encode_prompt(PROMPTS, negative, max_sequence_length=SEQ)
    assert got[0].shape == (2, 77 + SEQ, 32) and got[1].shape == (2, 24)
    for mine, ref in zip(got, (cond, pooled, uncond, uncond_pooled)):
        _close(mine, ref)
    # the CLIP part is zero-padded from 8 + 16 features to T5's 32
    assert np.all(np.asarray(got[0])[:, :77, 24:] == 0)


def test_truncation_matches_diffusers(torch, tiny):
    reference, _, ours = tiny
    long = [" ".join(["a red dog on the beach"] * 20)]  # longer than both 77 CLIP and 8 T5 tokens
    with torch.no_grad():
        cond, _, pooled, _ = reference.encode_prompt(long, None, None, device="cpu", max_sequence_length=8)
    got = ours.encode_prompt(long, max_sequence_length=8)
    _close(got[0], cond)
    _close(got[1], pooled)


def test_cfg_latents_and_images_match_diffusers(torch, tiny):
    reference, _, ours = tiny
    init = _initial_latents(torch)
    common = dict(prompt=PROMPTS, negative_prompt=["", "blue sky"], num_inference_steps=STEPS, guidance_scale=5.0,
                  max_sequence_length=SEQ)
    with torch.no_grad():
        ref_latents = reference(**common, latents=init.clone(), output_type="latent").images
        ref_images = reference(**common, latents=init.clone(), output_type="np").images
    latents, images = ours(PROMPTS, negative_prompts=["", "blue sky"], guidance="cfg", scale=5.0, num_steps=STEPS,
                           latents=jnp.asarray(init.numpy()), max_sequence_length=SEQ)
    _close(latents, ref_latents)
    _close(images, ref_images)
    assert images.shape == (2, 32, 32, 3) and 0.0 <= float(images.min()) and float(images.max()) <= 1.0


def test_cfg_zero_star_matches_diffusers_guider_loop(torch, diffusers, tiny):
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    reference, _, ours = tiny
    scale, zero_init = 4.0, 1
    init = _initial_latents(torch, batch=1)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(reference.scheduler.config)
    scheduler.set_timesteps(STEPS)
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=scale, zero_init_steps=zero_init)
    with torch.no_grad():
        cond, uncond, pooled, uncond_pooled = reference.encode_prompt(
            PROMPTS[:1], None, None, device="cpu", max_sequence_length=SEQ)
        x = init.clone()
        for i, t in enumerate(scheduler.timesteps):
            guider.set_state(step=i, num_inference_steps=STEPS, timestep=t)
            v = reference.transformer(
                hidden_states=torch.cat([x, x]), timestep=t.expand(2), encoder_hidden_states=torch.cat([cond, uncond]),
                pooled_projections=torch.cat([pooled, uncond_pooled]), return_dict=False)[0]
            pred = guider.forward(v[:1], v[1:]).pred
            x = scheduler.step(pred, t, x, return_dict=False)[0]
        z = x / reference.vae.config.scaling_factor + reference.vae.config.shift_factor
        ref_images = (reference.vae.decode(z, return_dict=False)[0] / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    latents, images = ours(PROMPTS[0], guidance="cfg-zero-star", scale=scale, zero_init_steps=zero_init,
                           num_steps=STEPS, latents=jnp.asarray(init.numpy()), max_sequence_length=SEQ)
    _close(latents, x)
    _close(images, ref_images)


def test_per_encoder_prompts_and_clip_skip_match_diffusers(torch, tiny):
    reference, _, ours = tiny
    texts = dict(prompt_2=["a blue cat", ""], prompt_3=["the dog", "a cat"], negative_prompt="red",
                 negative_prompt_3=["blue", "beach"])
    with torch.no_grad():
        ref = reference.encode_prompt(PROMPTS, texts["prompt_2"], texts["prompt_3"], device="cpu",
                                      negative_prompt=texts["negative_prompt"],
                                      negative_prompt_3=texts["negative_prompt_3"], clip_skip=1,
                                      max_sequence_length=SEQ)
    got = ours.encode_prompt(PROMPTS, "red", max_sequence_length=SEQ, prompts_2=texts["prompt_2"],
                             prompts_3=texts["prompt_3"], negative_prompts_3=texts["negative_prompt_3"], clip_skip=1)
    for mine, theirs in zip(got, (ref[0], ref[2], ref[1], ref[3])):
        _close(mine, theirs)
    plain = ours.encode_prompt(PROMPTS, "red", max_sequence_length=SEQ)
    assert not np.allclose(np.asarray(plain[0]), np.asarray(got[0]))  # prompts_2/3 and clip_skip changed something
    with pytest.raises(ValueError, match="clip_skip"):
        ours.encode_prompt(PROMPTS, clip_skip=2)  # the tiny CLIP towers have 2 layers
    with pytest.raises(ValueError, match="prompts_2 and prompts_3|same number"):
        ours.encode_prompt(PROMPTS, prompts_2=["a", "b", "c"])


@pytest.mark.parametrize("guidance", ["cfg", "cfg-zero-star"])
def test_skip_layer_guidance_matches_diffusers(torch, tiny, guidance):
    """SD3.5-medium's skip-layer guidance: diffusers' pipeline (CFG) or the pipeline's SLG
    lines written around the official CFG-Zero* guider (CFG-Zero*)."""
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    reference, _, ours = tiny
    steps, layers, slg = 6, [1], dict(skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.1,
                                      skip_layer_guidance_stop=0.7)  # active at steps 1 … 4
    init = _initial_latents(torch, batch=1)
    with torch.no_grad():
        if guidance == "cfg":
            x = reference(prompt=PROMPTS[:1], num_inference_steps=steps, guidance_scale=5.0, max_sequence_length=SEQ,
                          latents=init.clone(), output_type="latent", skip_guidance_layers=layers, **slg).images
        else:
            cond, uncond, pooled, uncond_pooled = reference.encode_prompt(
                PROMPTS[:1], None, None, device="cpu", max_sequence_length=SEQ)
            scheduler = type(reference.scheduler).from_config(reference.scheduler.config)
            scheduler.set_timesteps(steps)
            guider = ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=1)
            x = init.clone()
            for i, t in enumerate(scheduler.timesteps):
                guider.set_state(step=i, num_inference_steps=steps, timestep=t)
                v = reference.transformer(hidden_states=torch.cat([x, x]), timestep=t.expand(2),
                                          encoder_hidden_states=torch.cat([cond, uncond]),
                                          pooled_projections=torch.cat([pooled, uncond_pooled]), return_dict=False)[0]
                pred = guider.forward(v[:1], v[1:]).pred
                if steps * slg["skip_layer_guidance_start"] < i < steps * slg["skip_layer_guidance_stop"]:
                    v_skip = reference.transformer(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=cond,
                                                   pooled_projections=pooled, return_dict=False,
                                                   skip_layers=layers)[0]
                    pred = pred + (v[:1] - v_skip) * slg["skip_layer_guidance_scale"]
                x = scheduler.step(pred, t, x, return_dict=False)[0]
    latents, _ = ours(PROMPTS[0], guidance=guidance, scale=5.0, num_steps=steps, latents=jnp.asarray(init.numpy()),
                      max_sequence_length=SEQ, skip_guidance_layers=layers, **slg)
    _close(latents, x)
    plain, _ = ours(PROMPTS[0], guidance=guidance, scale=5.0, num_steps=steps, latents=jnp.asarray(init.numpy()),
                    max_sequence_length=SEQ)
    assert float(np.max(np.abs(np.asarray(plain) - np.asarray(latents)))) > 1e-3  # the term did something
    with pytest.raises(ValueError, match="skip_guidance_layers"):
        ours(PROMPTS[0], num_steps=2, max_sequence_length=SEQ, skip_guidance_layers=[2])


def test_bfloat16_end_to_end(torch, tiny):
    """bf16 weights: latents stay bf16 through the loop (as in diffusers), the result is finite
    and close to float32 (bf16 rounding, relative ≤ 5e-2), and equals diffusers' bf16 pipeline
    to bf16 precision."""
    reference, folder, ours = tiny
    half = SD3Pipeline.from_pretrained(folder, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(nnx.state(half.transformer))} == {jnp.dtype(jnp.bfloat16)}
    init = _initial_latents(torch, batch=1)
    common = dict(guidance="cfg", scale=5.0, num_steps=STEPS, max_sequence_length=SEQ)
    cond, pooled, uncond, uncond_pooled = half.encode_prompt(PROMPTS[0], max_sequence_length=SEQ)
    assert cond.dtype == pooled.dtype == jnp.bfloat16  # the encoders compute in bf16 too
    step = half.model_fn(nnx.state(half.transformer), jnp.asarray(init.numpy(), jnp.bfloat16), 1.0, 1000.0,
                         (cond, pooled))
    assert step.dtype == jnp.bfloat16  # no silent promotion to float32 inside the transformer
    latents16, images16 = half(PROMPTS[0], latents=jnp.asarray(init.numpy()), **common)
    latents32, images32 = ours(PROMPTS[0], latents=jnp.asarray(init.numpy()), **common)
    assert latents16.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(images16)))
    scale = float(np.max(np.abs(np.asarray(latents32))))
    assert float(np.max(np.abs(np.asarray(latents16, np.float32) - np.asarray(latents32)))) <= 5e-2 * scale
    assert float(np.max(np.abs(np.asarray(images16) - np.asarray(images32)))) <= 5e-2
    ref16 = copy.deepcopy(reference).to(dtype=torch.bfloat16)
    with torch.no_grad():
        theirs = ref16(prompt=PROMPTS[:1], latents=init.to(torch.bfloat16), num_inference_steps=STEPS,
                       guidance_scale=5.0, max_sequence_length=SEQ, output_type="latent").images
    assert float(np.max(np.abs(np.asarray(latents16, np.float32) - theirs.float().numpy()))) <= 5e-2 * scale


def test_seeded_noise_and_default_size(tiny):
    _, _, ours = tiny
    a, images = ours("a cat", num_steps=2, seed=5, max_sequence_length=SEQ)
    b, _ = ours("a cat", num_steps=2, seed=5, max_sequence_length=SEQ)
    assert a.shape == (1, 16, 16, 16) and images.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the stages: precomputed embeddings and the loop alone give the same latents
    embeddings = ours.encode_prompt("a cat", max_sequence_length=SEQ)
    c, _ = ours(embeddings=embeddings, num_steps=2, seed=5)
    result = ours.sample(embeddings, ours.initial_latents(1, seed=5), num_steps=2, return_trajectory=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(result.samples))
    assert result.trajectory.shape == (3, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="exactly one of prompts and embeddings"):
        ours("a cat", embeddings=embeddings)
    with pytest.raises(ValueError, match="embeddings must be"):
        ours.sample(embeddings[:2], ours.initial_latents(1))
    with pytest.raises(ValueError, match="multiples of 4"):
        ours("a cat", height=30, max_sequence_length=SEQ)
    with pytest.raises(ValueError, match="guidance must be one of"):
        ours("a cat", guidance="apg")


def test_numbers_follow_the_validation_rules(tiny):
    """bool is never a number (True used to pass as 1), NumPy integers are accepted."""
    _, _, ours = tiny
    assert ours.initial_latents(np.int64(1), np.int64(32), np.int32(32), seed=np.int64(5)).shape == (1, 16, 16, 16)
    for kwargs, name in ((dict(batch=True), "batch"), (dict(batch=1, height=32.0), "height"),
                         (dict(batch=1, width=True), "width"), (dict(batch=1, seed=1.5), "seed")):
        with pytest.raises(ValueError, match=name):
            ours.initial_latents(**kwargs)
    for kwargs, name in ((dict(max_sequence_length=True), "max_sequence_length"), (dict(clip_skip=True), "clip_skip"),
                         (dict(clip_skip=-1), "clip_skip")):
        with pytest.raises(ValueError, match=name):
            ours.encode_prompt("a cat", **kwargs)
    for layers in ([True], [0.5], [], 3):
        with pytest.raises(ValueError, match="skip_guidance_layers"):
            ours.skip_layer_guidance(layers)
    assert ours.skip_layer_guidance([np.int64(1)]) is not None


def test_missing_subfolder_and_wrong_pipeline(tiny, tmp_path):
    _, folder, _ = tiny
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken, ignore=lambda d, names: ["text_encoder_2"] if d == str(folder) else [])
    with pytest.raises(ValueError, match="text_encoder_2/ subfolder is missing"):
        SD3Pipeline.from_pretrained(broken)
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="not an SD3 pipeline"):
        SD3Pipeline.from_pretrained(other)
    with pytest.raises(ValueError, match="cannot read the pipeline index"):
        SD3Pipeline.from_pretrained(folder / "vae")


def test_save_png_round_trip(tmp_path):
    from PIL import Image

    images = np.linspace(0, 1, 2 * 4 * 5 * 3, dtype=np.float32).reshape(2, 4, 5, 3)
    path = save_png(images, tmp_path / "sub" / "x.png")
    pixels = np.asarray(Image.open(path))
    assert pixels.shape == (4, 10, 3)  # the batch tiled left to right
    np.testing.assert_array_equal(pixels[:, :5], np.round(images[0] * 255).astype(np.uint8))
    assert os.listdir(tmp_path / "sub") == ["x.png"]
