"""Parity of the JAX Wan2.1 pipeline (``cfgzero_theory.wan.pipeline``) with diffusers' ``WanPipeline``
and ``WanImageToVideoPipeline``.

Tiny random pipelines (``cfgzero_theory.wan.tiny``: ``"tiny"`` T2V and ``"tiny-i2v"``; UMT5, the
causal VAE with random latent statistics, a CLIP vision tower and image processor for I2V, a
hand-written tokenizer, flow-mode UniPC) are built once per module with diffusers, saved, and
loaded with :func:`cfgzero_theory.pipelines.from_pretrained`.  Both sides start from the same
latents of a 9-frame 32×48 video (3 latent frames of 4×6).

Tolerance (float32): ``max |ours − diffusers| ≤ 1e-4 · max(1, max |diffusers|)`` for prompt
embeddings, final latents and videos.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfgzero_theory import pipelines
from cfgzero_theory.wan.pipeline import WanPipeline, prompt_clean

pytestmark = pytest.mark.parity

RTOL = 1e-4
STEPS = 4
FRAMES, HEIGHT, WIDTH = 9, 32, 48
PROMPTS = ["a photo of a cat", "a  red dog &amp;amp; on\n the beach "]
NEGATIVE = "blue"


def _close(ours, ref, rtol=RTOL):
    ref = ref.detach().float().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    ours = np.asarray(ours, np.float32)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = float(np.max(np.abs(ours - ref)))
    assert err <= rtol * max(1.0, float(np.max(np.abs(ref)))), err


def _load(torch, tmp_path_factory, size):
    folder = tmp_path_factory.mktemp(size)
    reference = pipelines.build_random("wan", folder, size)
    reference.set_progress_bar_config(disable=True)
    ours = pipelines.from_pretrained(folder, compilation_cache=False)
    assert isinstance(ours, WanPipeline)
    return reference, folder, ours


@pytest.fixture(scope="module")
def t2v(torch, diffusers, tmp_path_factory):
    return _load(torch, tmp_path_factory, "tiny")


@pytest.fixture(scope="module")
def i2v(torch, diffusers, tmp_path_factory):
    return _load(torch, tmp_path_factory, "tiny-i2v")


def _noise(torch, batch, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 16, 3, HEIGHT // 8, WIDTH // 8), generator=generator)


def _picture():
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_prompt_cleaning_matches_diffusers():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean as reference

    for text in PROMPTS + ["caf\u00c3\u00a9 &lt;b&gt;  x\t\ty ", ""]:
        assert prompt_clean(text) == reference(text)


def test_encode_prompt_matches_diffusers(torch, t2v):
    reference, _, ours = t2v
    with torch.no_grad():
        expected, expected_negative = reference.encode_prompt(PROMPTS, NEGATIVE, max_sequence_length=512)
    embeds, negative = ours.encode_prompt(PROMPTS, NEGATIVE)
    assert embeds.shape == (2, 512, 24)
    _close(embeds, expected)
    _close(negative, expected_negative)
    assert float(jnp.max(jnp.abs(embeds[:, 20:]))) == 0.0  # trimmed to the real length, zero-padded


def test_text_to_video_matches_wan_pipeline(torch, t2v):
    reference, _, ours = t2v
    init = _noise(torch, 2)
    with torch.no_grad():
        video = reference(PROMPTS, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                          num_inference_steps=STEPS, guidance_scale=5.0, latents=init.clone(),
                          output_type="np").frames
    with torch.no_grad():
        latents_ref = reference(PROMPTS, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                                num_inference_steps=STEPS, guidance_scale=5.0, latents=init.clone(),
                                output_type="latent").frames
    latents, videos = ours(PROMPTS, negative_prompts=NEGATIVE, guidance="cfg", scale=5.0, num_steps=STEPS,
                           flow_shift=3.0, latents=jnp.asarray(init.numpy()))
    assert latents.dtype == jnp.float32 and videos.shape == (2, FRAMES, HEIGHT, WIDTH, 3)
    _close(latents, latents_ref)
    _close(videos, video)


def test_image_to_video_matches_wan_i2v_pipeline(torch, i2v):
    reference, _, ours = i2v
    init = _noise(torch, 1, seed=1)
    common = dict(image=_picture(), prompt=PROMPTS[0], negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH,
                  num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=5.0)
    with torch.no_grad():
        video = reference(**common, latents=init.clone(), output_type="np").frames
        latents_ref = reference(**common, latents=init.clone(), output_type="latent").frames
    latents, videos = ours(PROMPTS[0], _picture(), negative_prompts=NEGATIVE, guidance="cfg", scale=5.0,
                           num_steps=STEPS, flow_shift=3.0, latents=jnp.asarray(init.numpy()))
    _close(latents, latents_ref)
    _close(videos, video)


def test_image_conditioning_matches_the_i2v_pipeline_pieces(torch, i2v):
    reference, _, ours = i2v
    picture = _picture()
    with torch.no_grad():
        embeds = reference.encode_image(picture, torch.device("cpu"))
        image = reference.video_processor.preprocess(picture, height=HEIGHT, width=WIDTH).float()
        _, condition = reference.prepare_latents(image, 2, 16, HEIGHT, WIDTH, FRAMES, torch.float32,
                                                 torch.device("cpu"), None, _noise(torch, 2))
    conditioning = ours.encode_image(picture, 2, FRAMES, HEIGHT, WIDTH)
    _close(conditioning.image_embeds, embeds.repeat(2, 1, 1))
    _close(conditioning.condition, condition)


def _diffusers_loop(torch, reference, init, combine, prompt, negative, flow_shift=3.0):
    """Wan's denoising loop with UniPC and a pluggable guidance combination."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler.from_config(reference.scheduler.config, flow_shift=flow_shift)
    scheduler.set_timesteps(STEPS)
    scheduler.set_begin_index(0)
    cond, uncond = reference.encode_prompt(prompt, negative, max_sequence_length=512)
    x = init.clone()
    for i, t in enumerate(scheduler.timesteps):
        timestep = t.expand(x.shape[0])
        v_c = reference.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=cond,
                                    return_dict=False)[0]
        v_u = reference.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=uncond,
                                    return_dict=False)[0]
        x = scheduler.step(combine(i, v_c, v_u), t, x, return_dict=False)[0]
    return x


def test_cfg_zero_star_matches_a_diffusers_guider_loop(torch, t2v):
    """The paper's T2V rule (scale 5.0, the first 2 steps zeroed) against diffusers' guider."""
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    reference, _, ours = t2v
    init = _noise(torch, 1, seed=2)
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=2)

    def combine(i, v_c, v_u):
        guider.set_state(step=i, num_inference_steps=STEPS, timestep=None)
        return guider.forward(v_c, v_u).pred

    with torch.no_grad():
        x = _diffusers_loop(torch, reference, init, combine, PROMPTS[0], NEGATIVE)
    latents, _ = ours(PROMPTS[0], negative_prompts=NEGATIVE, num_steps=STEPS, flow_shift=3.0,
                      latents=jnp.asarray(init.numpy()))  # the defaults: CFG-Zero*, 5.0, K = 2
    _close(latents, x)


def test_defaults_come_from_the_presets(t2v, i2v):
    _, _, text = t2v
    _, _, image = i2v
    assert (text.preset(480, 832).name, text.preset(720, 1280).name, image.preset(480, 832).name) == (
        "wan2.1-t2v-480p", "wan2.1-t2v-720p", "wan2.1-i2v")
    assert (text.preset(480, 832).shift, text.preset(720, 1280).shift, image.preset(480, 832).num_steps) == (
        3.0, 5.0, 40)
    result = text.sample(text.encode_prompt(PROMPTS[0]), text.initial_latents(1, FRAMES, HEIGHT, WIDTH),
                         num_steps=3, return_trajectory=True)
    np.testing.assert_array_equal(np.asarray(result.guided[:2]), 0.0)  # K = 2
    assert float(jnp.max(jnp.abs(result.guided[2]))) > 0


@pytest.mark.parametrize("options, message", [
    (dict(num_frames=8), "num_frames must be 4k \\+ 1"),
    (dict(height=40), "multiples of 16"),
    (dict(num_steps=0), "num_steps"),
    (dict(flow_shift=-1.0), "flow_shift"),
    (dict(guidance="nope"), "guidance"),
    (dict(image=np.zeros((8, 8, 3), np.uint8)), "image-to-video"),
])
def test_bad_arguments_are_refused_by_name(t2v, options, message):
    _, _, ours = t2v
    call = dict(num_frames=FRAMES, height=HEIGHT, width=WIDTH) | options
    with pytest.raises(ValueError, match=message):
        ours(PROMPTS[0], **call)


def test_latents_set_the_video_size(t2v):
    _, _, ours = t2v
    init = ours.initial_latents(1, FRAMES, HEIGHT, WIDTH)
    with pytest.raises(ValueError, match="num_frames=5 disagrees with latents"):
        ours(PROMPTS[0], latents=init, num_frames=5, num_steps=1)


def test_image_to_video_needs_an_image_and_a_512_token_text(i2v):
    _, _, ours = i2v
    with pytest.raises(ValueError, match="pass image="):
        ours(PROMPTS[0], num_frames=FRAMES, height=HEIGHT, width=WIDTH)
    with pytest.raises(ValueError, match="512"):
        ours(PROMPTS[0], _picture(), num_frames=FRAMES, height=HEIGHT, width=WIDTH, max_sequence_length=64)
    with pytest.raises(ValueError, match="image array"):
        ours(PROMPTS[0], np.full((8, 8, 3), 2.0), num_frames=FRAMES, height=HEIGHT, width=WIDTH)


def test_batch_sharding_places_the_guidance_batch(t2v):
    """On the one CPU device the sharding is trivial; the four-device check is in test_wan_sharding."""
    _, _, ours = t2v
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    embeddings = ours.encode_prompt(PROMPTS)
    init = ours.initial_latents(2, FRAMES, HEIGHT, WIDTH, seed=3)
    plain = ours.sample(embeddings, init, num_steps=2).samples
    placed = ours.sample(embeddings, init, num_steps=2, batch_sharding=sharding).samples
    np.testing.assert_allclose(np.asarray(placed), np.asarray(plain), rtol=0, atol=1e-6)
