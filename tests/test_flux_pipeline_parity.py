"""Parity of the JAX Flux pipeline (``cfgzero_theory.flux.pipeline``) with ``diffusers.FluxPipeline``.

Tiny random pipelines (``cfgzero_theory.flux.tiny``: a dev-like one with the guidance embedding
and dynamic shift, a schnell-like one without either; CLIP-L ``CLIPTextModel``, T5, a
16-channel VAE with Flux's scaling and shift; hand-written tokenizers) are built once per
module with diffusers, saved, and loaded with :func:`cfgzero_theory.pipelines.from_pretrained`.
Both sides start from the same packed latents on a non-square image (32×48 pixels, a 16×24
latent grid, 96 packed tokens).

Tolerance (float32): ``max |ours − diffusers| ≤ 1e-4 · max(1, max |diffusers|)`` for prompt
embeddings, final latents and images; bf16 weights: ``≤ 5e-2`` of the latents' scale against
diffusers' own bf16 pipeline (the tolerance measured for SD3).
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cfgzero_theory import pipelines
from cfgzero_theory.flux.pipeline import FluxPipeline, pack_latents, unpack_latents

pytestmark = pytest.mark.parity

RTOL = 1e-4
SEQ = 16
STEPS = 3
HEIGHT, WIDTH = 32, 48
PROMPTS = ["a photo of a cat", "a red dog on the beach"]


def _close(ours, ref, rtol=RTOL):
    ref = ref.detach().float().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    ours = np.asarray(ours, np.float32)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = float(np.max(np.abs(ours - ref)))
    assert err <= rtol * max(1.0, float(np.max(np.abs(ref)))), err
    return err


def _build(tmp_path_factory, schnell):
    from cfgzero_theory.flux.tiny import build_tiny_random_pipeline

    folder = tmp_path_factory.mktemp("flux_schnell" if schnell else "flux_dev")
    reference = build_tiny_random_pipeline(folder, seed=0, schnell=schnell)
    return reference, folder, pipelines.from_pretrained(folder, compilation_cache=False)


@pytest.fixture(scope="module")
def dev(torch, diffusers, tmp_path_factory):
    return _build(tmp_path_factory, schnell=False)


@pytest.fixture(scope="module")
def schnell(torch, diffusers, tmp_path_factory):
    return _build(tmp_path_factory, schnell=True)


def _packed_noise(torch, batch=2):
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn((batch, 16, HEIGHT // 2, WIDTH // 2), generator=generator)
    return noise.view(batch, 16, HEIGHT // 4, 2, WIDTH // 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(batch, -1, 64)


def test_entry_point_and_packing(dev, torch, diffusers):
    _, _, ours = dev
    assert isinstance(ours, FluxPipeline) and ours.variant == "dev"
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 6, 10))
    packed = pack_latents(x)
    assert packed.shape == (2, 15, 64)
    np.testing.assert_array_equal(np.asarray(unpack_latents(packed, 6, 10)), np.asarray(x))
    theirs = diffusers.FluxPipeline._pack_latents(torch.from_numpy(np.array(x)), 2, 16, 6, 10)
    np.testing.assert_array_equal(np.asarray(packed), theirs.numpy())


@pytest.mark.parametrize("negative", [None, ["", "blue sky"]])
def test_encode_prompt_matches_diffusers(torch, dev, negative):
    reference, _, ours = dev
    got = ours.encode_prompt(PROMPTS, negative, max_sequence_length=SEQ, prompts_2=["a blue cat", "the dog"])
    with torch.no_grad():
        cond, pooled, text_ids = reference.encode_prompt(PROMPTS, ["a blue cat", "the dog"], device="cpu",
                                                         max_sequence_length=SEQ)
        assert not text_ids.any()
        _close(got[0], cond)
        _close(got[1], pooled)
        if negative is None:
            assert got[2] is None and got[3] is None
        else:
            uncond, uncond_pooled, _ = reference.encode_prompt(negative, None, device="cpu", max_sequence_length=SEQ)
            _close(got[2], uncond)
            _close(got[3], uncond_pooled)
    assert got[0].shape == (2, SEQ, 24) and got[1].shape == (2, 12)


@pytest.mark.parametrize("which", ["dev", "schnell"])
def test_one_branch_latents_and_images_match_diffusers(torch, request, which):
    """No negative prompt: the conditional branch alone (dev: distilled guidance 3.5 embedded)."""
    reference, _, ours = request.getfixturevalue(which)
    init = _packed_noise(torch)
    common = dict(prompt=PROMPTS, num_inference_steps=STEPS, height=HEIGHT, width=WIDTH, max_sequence_length=SEQ,
                  guidance_scale=3.5)
    with torch.no_grad():
        ref_latents = reference(**common, latents=init.clone(), output_type="latent").images
        ref_images = reference(**common, latents=init.clone(), output_type="np").images
    latents, images = ours(PROMPTS, zero_init_steps=0, num_steps=STEPS, height=HEIGHT, width=WIDTH,
                           latents=jnp.asarray(init.numpy()), max_sequence_length=SEQ)
    _close(latents, ref_latents)
    _close(images, ref_images)
    assert images.shape == (2, HEIGHT, WIDTH, 3)


def test_true_cfg_matches_diffusers(torch, dev):
    reference, _, ours = dev
    init = _packed_noise(torch)
    with torch.no_grad():
        ref_latents = reference(prompt=PROMPTS, negative_prompt=["", "blue sky"], true_cfg_scale=4.0,
                                guidance_scale=2.0, num_inference_steps=STEPS, height=HEIGHT, width=WIDTH,
                                max_sequence_length=SEQ, latents=init.clone(), output_type="latent").images
    latents, _ = ours(PROMPTS, negative_prompts=["", "blue sky"], guidance="cfg", scale=4.0, distilled_guidance=2.0,
                      num_steps=STEPS, height=HEIGHT, width=WIDTH, latents=jnp.asarray(init.numpy()),
                      max_sequence_length=SEQ)
    _close(latents, ref_latents)


def _diffusers_loop(torch, diffusers, reference, init, combine, negative=None, guidance=3.5):
    """diffusers' scheduler and transformer, stepped by hand; ``combine(i, v_c, v_u)`` guides."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(reference.scheduler.config)
    tokens = init.shape[1]
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=calculate_shift(tokens))
    cond, pooled, text_ids = reference.encode_prompt(PROMPTS[:1], None, device="cpu", max_sequence_length=SEQ)
    uncond, uncond_pooled, _ = reference.encode_prompt(negative or [""], None, device="cpu", max_sequence_length=SEQ)
    img_ids = reference._prepare_latent_image_ids(1, HEIGHT // 4, WIDTH // 4, "cpu", torch.float32)
    g = torch.full((1,), guidance)
    x = init.clone()
    for i, t in enumerate(scheduler.timesteps):
        run = lambda e, p: reference.transformer(  # noqa: E731
            hidden_states=x, timestep=t.expand(1) / 1000, guidance=g, pooled_projections=p, encoder_hidden_states=e,
            txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0]
        x = scheduler.step(combine(i, run(cond, pooled), run(uncond, uncond_pooled)), t, x, return_dict=False)[0]
    return x


def test_cfg_zero_star_matches_a_diffusers_guider_loop(torch, diffusers, dev):
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    reference, _, ours = dev
    init = _packed_noise(torch, batch=1)
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=1)

    def combine(i, v_c, v_u):
        guider.set_state(step=i, num_inference_steps=STEPS, timestep=None)
        return guider.forward(v_c, v_u).pred

    with torch.no_grad():
        x = _diffusers_loop(torch, diffusers, reference, init, combine)
    latents, _ = ours(PROMPTS[0], negative_prompts="", guidance="cfg-zero-star", scale=4.0, zero_init_steps=1,
                      num_steps=STEPS, height=HEIGHT, width=WIDTH, latents=jnp.asarray(init.numpy()),
                      max_sequence_length=SEQ)
    _close(latents, x)


def test_zero_init_one_branch_matches_the_paper_setting(torch, diffusers, dev):
    """The paper's Flux-dev setting (the ``flux-dev`` preset's K = 1): the first step's velocity is zero."""
    reference, _, ours = dev
    init = _packed_noise(torch, batch=1)
    with torch.no_grad():
        x = _diffusers_loop(torch, diffusers, reference, init, lambda i, v_c, v_u: v_c * 0 if i == 0 else v_c)
    latents, _ = ours(PROMPTS[0], num_steps=STEPS, height=HEIGHT, width=WIDTH, latents=jnp.asarray(init.numpy()),
                      max_sequence_length=SEQ)  # the defaults: conditional, K = 1, guidance 3.5
    _close(latents, x)
    result = ours.sample(ours.encode_prompt(PROMPTS[0], max_sequence_length=SEQ), jnp.asarray(init.numpy()),
                         num_steps=STEPS, height=HEIGHT, width=WIDTH, return_trajectory=True)
    np.testing.assert_array_equal(np.asarray(result.guided[0]), 0.0)
    np.testing.assert_array_equal(np.asarray(result.v_uncond), np.asarray(result.v_cond))


def test_bfloat16_end_to_end(torch, dev):
    """bf16 weights: latents stay bf16, and equal diffusers' bf16 pipeline to bf16 precision
    (measured 1.0e-2 of the scale), the distilled guidance rounded as diffusers rounds it."""
    reference, folder, ours = dev
    half = FluxPipeline.from_pretrained(folder, dtype=jnp.bfloat16, compilation_cache=False)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(nnx.state(half.transformer))} == {jnp.dtype(jnp.bfloat16)}
    init = _packed_noise(torch, batch=1)
    common = dict(num_steps=STEPS, height=HEIGHT, width=WIDTH, max_sequence_length=SEQ, zero_init_steps=0)
    latents16, images16 = half(PROMPTS[0], latents=jnp.asarray(init.numpy()), **common)
    latents32, _ = ours(PROMPTS[0], latents=jnp.asarray(init.numpy()), **common)
    assert latents16.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(images16)))
    scale = float(np.max(np.abs(np.asarray(latents32))))
    # bf16 embeds the guidance 3.5 as 3504 (and rounds the timesteps): on this tiny random model
    # that moves the result by ~20 % of its scale, in diffusers as in ours
    assert float(np.max(np.abs(np.asarray(latents16, np.float32) - np.asarray(latents32)))) > 0.1 * scale
    ref16 = copy.deepcopy(reference).to(dtype=torch.bfloat16)
    with torch.no_grad():
        theirs = ref16(prompt=PROMPTS[:1], latents=init.to(torch.bfloat16), num_inference_steps=STEPS, height=HEIGHT,
                       width=WIDTH, guidance_scale=3.5, max_sequence_length=SEQ, output_type="latent").images
    assert float(np.max(np.abs(np.asarray(latents16, np.float32) - theirs.float().numpy()))) <= 5e-2 * scale


def test_seeded_noise_and_bad_input(dev, schnell):
    _, _, ours = dev
    a = ours.initial_latents(2, HEIGHT, WIDTH, seed=5)
    assert a.shape == (2, 96, 64)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(ours.initial_latents(2, HEIGHT, WIDTH, seed=5)))
    small = dict(num_steps=1, height=HEIGHT, width=WIDTH, max_sequence_length=SEQ)
    with pytest.raises(ValueError, match="needs negative_prompts"):
        ours(PROMPTS[0], guidance="cfg-zero-star", **small)
    with pytest.raises(ValueError, match="scale is the true-CFG scale"):
        ours(PROMPTS[0], scale=3.0, **small)
    with pytest.raises(ValueError, match="leave negative_prompts out"):
        ours(PROMPTS[0], negative_prompts="", guidance="conditional", **small)
    with pytest.raises(ValueError, match="multiples of 4"):
        ours(PROMPTS[0], num_steps=1, height=30, width=WIDTH, max_sequence_length=SEQ)
    with pytest.raises(ValueError, match="max_sequence_length"):
        ours.encode_prompt(PROMPTS[0], max_sequence_length=513)
    with pytest.raises(ValueError, match="latents must be packed noise"):
        ours(PROMPTS[0], latents=jnp.zeros((1, 16, 64)), **small)
    with pytest.raises(ValueError, match="distilled_guidance needs a guidance-distilled model"):
        schnell[2](PROMPTS[0], distilled_guidance=3.5, **small)
