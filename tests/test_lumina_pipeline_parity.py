"""Parity of the JAX Lumina-Next pipeline (``cfgzero_theory.lumina.pipeline``) with ``diffusers.LuminaPipeline``.

A tiny random pipeline (``cfgzero_theory.lumina.tiny``: Next-DiT with grouped-query attention,
a 2-layer Gemma with one key/value head and a hand-written tokenizer, a 4-level VAE with SDXL's
scaling, FlowMatchEuler with shift 1; trained size 64²) is built once per module with diffusers,
saved, and loaded with :func:`cfgzero_theory.pipelines.from_pretrained`.  Both sides start from
the same latents, at 64² (resolution scale 1) and 64×96 (scale √1.5: the time-aware RoPE's
linear and NTK halves and the proportional attention all act).  diffusers runs with
``clean_caption=False`` (our default: prompts lower-cased and stripped), and once with
``clean_caption=True`` against ours with the cleaner (the ``[captions]`` extra).

Tolerance (float32): ``max |ours − diffusers| ≤ 1e-4 · max(1, max |diffusers|)`` for prompt
embeddings, final latents and images.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from cfgzero_theory import pipelines
from cfgzero_theory.lumina.pipeline import LuminaPipeline

pytestmark = pytest.mark.parity

RTOL = 1e-4
STEPS = 3
PROMPTS = ["A Photo of a CAT ", "a red dog on the beach"]
NEGATIVE = "Blue"


def _close(ours, ref, rtol=RTOL):
    ref = ref.detach().float().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    ours = np.asarray(ours, np.float32)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = float(np.max(np.abs(ours - ref)))
    assert err <= rtol * max(1.0, float(np.max(np.abs(ref)))), err


@pytest.fixture(scope="module")
def lumina(torch, diffusers, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lumina")
    reference = pipelines.build_random("lumina", folder, "tiny")
    reference.set_progress_bar_config(disable=True)
    ours = pipelines.from_pretrained(folder, compilation_cache=False)
    assert isinstance(ours, LuminaPipeline)
    return reference, ours


def _noise(torch, batch, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 4, height // 8, width // 8), generator=generator)


def test_encode_prompt_matches_diffusers(torch, lumina):
    reference, ours = lumina
    with torch.no_grad():
        expected = reference.encode_prompt(PROMPTS, True, negative_prompt=NEGATIVE, clean_caption=False)
    embeds = ours.encode_prompt(PROMPTS, NEGATIVE)
    for got, want in zip(embeds, expected):
        if got.dtype == jnp.int32:
            np.testing.assert_array_equal(np.asarray(got), want.numpy())
        else:
            _close(got, want)
    assert embeds[0].shape[1] % 8 == 0 and embeds[2].shape == embeds[0].shape


def test_caption_cleaning_matches_diffusers(torch, lumina):
    """``clean_caption=True`` (diffusers' default, with BeautifulSoup and ftfy installed)."""
    reference, ours = lumina
    prompts = ["Visit https://shop.example.com <b>A</b> CAT &amp;amp; #123 dog", "  MORE   Text+here  "]
    with torch.no_grad():
        expected = reference.encode_prompt(prompts, True, negative_prompt=NEGATIVE, clean_caption=True)
    for got, want in zip(ours.encode_prompt(prompts, NEGATIVE, clean_caption=True), expected):
        _close(got, want)


@pytest.mark.parametrize("height, width, watershed", [(64, 64, 1.0), (64, 96, 1.0), (64, 96, 0.3)])
def test_images_match_lumina_pipeline(torch, lumina, height, width, watershed):
    reference, ours = lumina
    init = _noise(torch, 2, height, width)
    common = dict(negative_prompt=NEGATIVE, height=height, width=width, num_inference_steps=STEPS,
                  guidance_scale=4.0, clean_caption=False, scaling_watershed=watershed)
    with torch.no_grad():
        images = reference(PROMPTS, latents=init.clone(), output_type="np", **common).images
        latents_ref = reference(PROMPTS, latents=init.clone(), output_type="latent", **common).images
    latents, ours_images = ours(PROMPTS, negative_prompts=NEGATIVE, guidance="cfg", scale=4.0, num_steps=STEPS,
                                latents=jnp.asarray(init.numpy()), scaling_watershed=watershed)
    _close(latents, latents_ref)
    _close(ours_images, images)


def test_cfg_zero_star_matches_a_three_channel_guider_loop(torch, lumina):
    """The default rule (the ``lumina-next`` preset: CFG-Zero* at 4.0, K = 1) against diffusers'
    ``ClassifierFreeZeroStarGuidance`` applied where the pipeline applies CFG: channels 0–2, the
    fourth channel the conditional prediction."""
    from diffusers.guiders import ClassifierFreeZeroStarGuidance
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    reference, ours = lumina
    height, width = 64, 96
    init = _noise(torch, 1, height, width, seed=3)
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=1)
    scheduler = reference.scheduler.__class__.from_config(reference.scheduler.config)
    scheduler.set_timesteps(STEPS)
    transformer = reference.transformer
    scaling = (width * height) ** 0.5 / reference.default_image_size
    with torch.no_grad():
        cond, cond_mask, uncond, uncond_mask = reference.encode_prompt(PROMPTS[0], True, negative_prompt=NEGATIVE,
                                                                       clean_caption=False)
        x = init.clone()
        for i, t in enumerate(scheduler.timesteps):
            time = 1 - t[None].expand(2) / scheduler.config.num_train_timesteps
            linear, ntk = (scaling, 1.0) if time[0] < 1.0 else (1.0, scaling)
            rope = get_2d_rotary_pos_embed_lumina(transformer.head_dim, 384, 384, linear_factor=linear,
                                                  ntk_factor=ntk)
            out = transformer(hidden_states=torch.cat([x, x]), timestep=time, encoder_hidden_states=torch.cat(
                [cond, uncond]), encoder_mask=torch.cat([cond_mask, uncond_mask]), image_rotary_emb=rope,
                cross_attention_kwargs={"base_sequence_length": (reference.default_image_size // 16) ** 2},
                return_dict=False)[0].chunk(2, dim=1)[0]
            v_c, v_u = out.chunk(2)
            guider.set_state(step=i, num_inference_steps=STEPS, timestep=None)
            guided = torch.cat([guider.forward(v_c[:, :3], v_u[:, :3]).pred, v_c[:, 3:]], dim=1)
            x = scheduler.step(-guided, t, x, return_dict=False)[0]
    latents, _ = ours(PROMPTS[0], negative_prompts=NEGATIVE, num_steps=STEPS, latents=jnp.asarray(init.numpy()))
    _close(latents, x)


def test_bad_arguments_are_refused_by_name(lumina):
    _, ours = lumina
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(PROMPTS[0], height=40, width=64)
    with pytest.raises(ValueError, match="negative_prompts must hold one prompt or as many"):
        ours(PROMPTS, negative_prompts=["a", "b", "c"])
    with pytest.raises(ValueError, match="guidance"):
        ours(PROMPTS[0], guidance="nope", height=64, width=64)
