"""Parity of :mod:`cfgzero_theory.wan.vae` with ``diffusers.AutoencoderKLWan`` (a tiny random Wan2.1 VAE, fp32).

Tolerance: max |ours − diffusers| ≤ 1e-4 · max |diffusers| for the posterior mean and logvar
over 9 and 17 frames and for decoding 3 and 5 latent frames (9 and 17 video frames); observed
~1e-6 for the encoder and ~4e-6 for the decoder.  The tiny model keeps Wan2.1's layout (four
levels, ``temperal_downsample=(False, True, True)``: ×4 in time, ×8 in space) at width 8–16
on a non-square 16×24 video.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cfgzero_theory.wan.vae import WanVAE, WanVAEConfig, load_wan_vae

pytestmark = pytest.mark.parity

RTOL = 1e-4
FAST_COMPILE = {"xla_backend_optimization_level": 0}
HEIGHT, WIDTH = 16, 24
TINY = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    latents_mean=[0.3, -0.7, 1.2, -0.1],
    latents_std=[2.5, 0.6, 1.7, 0.9],
)


@pytest.fixture(scope="module")
def models(torch, diffusers, tmp_path_factory):
    """``(diffusers model, its folder, our float32 model, jitted encode, jitted decode)``."""
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKLWan(**TINY).eval()
    with torch.no_grad():
        for param in reference.parameters():  # gammas off 1, biases off 0
            param.add_(0.2 * torch.randn_like(param))
        reference.decoder.conv_out.weight.mul_(0.3)  # keep most of the video inside the [-1, 1] clip
    folder = tmp_path_factory.mktemp("wan_vae")
    reference.save_pretrained(folder, safe_serialization=True)
    ours = load_wan_vae(folder)
    return reference, folder, ours, _jitted(ours, "encode"), _jitted(ours, "decode")


def _jitted(model, method):
    """``model.<method>`` compiled for each call's input (each shape is run once here), the
    weights an argument rather than constants, with XLA's backend optimisation off: the same
    operations, compiled about twice as fast on the CPU."""
    graphdef, state = nnx.split(model)
    function = jax.jit(lambda state, x: getattr(nnx.merge(graphdef, state), method)(x))

    def run(x):
        x = jnp.asarray(x)
        return function.lower(state, x).compile(compiler_options=FAST_COMPILE)(state, x)

    return run


def _relative_error(ours, ref) -> float:
    ours = np.asarray(ours, np.float32)
    assert ours.shape == ref.shape
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _video(frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (2, 3, frames, HEIGHT, WIDTH)).astype(np.float32)


def _latent(frames: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 4, frames, HEIGHT // 8, WIDTH // 8)).astype(np.float32)


@pytest.mark.parametrize("frames", [9, 17])
def test_encode_matches_diffusers(torch, models, frames):
    reference, _, _, encode, _ = models
    video = _video(frames)
    with torch.no_grad():
        posterior = reference.encode(torch.from_numpy(video)).latent_dist
    mean, logvar = encode(video)
    assert mean.shape == (2, 4, 1 + (frames - 1) // 4, HEIGHT // 8, WIDTH // 8)
    assert _relative_error(mean, posterior.mean.numpy()) <= RTOL
    assert _relative_error(logvar, posterior.logvar.numpy()) <= RTOL


@pytest.mark.parametrize("frames", [3, 5])
def test_decode_matches_diffusers(torch, models, frames):
    reference, _, _, _, decode = models
    z = _latent(frames)
    with torch.no_grad():
        expected = reference.decode(torch.from_numpy(z)).sample.numpy()
    assert np.mean(np.abs(expected) >= 1.0) < 0.2  # the comparison is not mostly of clipped values
    video = decode(z)
    assert video.shape == (2, 3, 1 + 4 * (frames - 1), HEIGHT, WIDTH)
    assert _relative_error(video, expected) <= RTOL


def test_latent_normalisation_matches_the_pipelines(torch, models):
    _, _, ours, _, _ = models
    z = _latent(2)
    config = ours.config
    mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(config.latents_std).view(1, 4, 1, 1, 1)
    latents = torch.from_numpy(z)
    # pipeline_wan.py, before vae.decode: latents / latents_std + latents_mean (latents_std = 1 / std)
    np.testing.assert_allclose(ours.latents_to_vae(jnp.asarray(z)), (latents / inv_std + mean).numpy(), rtol=1e-6)
    # pipeline_wan_i2v.py, the encoded condition: (latent_condition - latents_mean) * latents_std
    np.testing.assert_allclose(ours.vae_to_latents(jnp.asarray(z)), ((latents - mean) * inv_std).numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.vae_to_latents(ours.latents_to_vae(jnp.asarray(z))), z, rtol=1e-5, atol=1e-5)


def test_bfloat16_weights_run_close(torch, models):
    reference, folder, _, _, _ = models
    half = load_wan_vae(folder, dtype=jnp.bfloat16)
    assert half.decoder.conv_in.kernel[...].dtype == jnp.bfloat16
    z = _latent(2)
    with torch.no_grad():
        expected = reference.decode(torch.from_numpy(z)).sample.numpy()
    video = _jitted(half, "decode")(jnp.asarray(z, jnp.bfloat16))
    assert video.dtype == jnp.bfloat16
    assert _relative_error(video, expected) <= 0.1


@pytest.mark.parametrize("method, short, long", [("decode", (1, 4, 2, 2, 3), (1, 4, 6, 2, 3)),
                                                 ("encode", (1, 3, 5, 16, 24), (1, 3, 21, 16, 24))])
def test_program_does_not_grow_with_frames(models, method, short, long):
    _, _, ours, _, _ = models
    graphdef, state = nnx.split(ours)
    function = jax.jit(lambda state, x: getattr(nnx.merge(graphdef, state), method)(x))

    def operations(shape):  # the lowered StableHLO's operations, one per line
        text = function.lower(state, jax.ShapeDtypeStruct(shape, jnp.float32)).as_text()
        return [line for line in text.splitlines() if " = " in line]

    few, many = operations(short), operations(long)
    assert len(few) == len(many)  # a scan over the chunks, not a loop unrolled in Python
    assert any("stablehlo.while" in line for line in many)


def test_bad_inputs_are_refused(models):
    _, _, ours, _, _ = models
    with pytest.raises(ValueError, match="video must have 1 \\+ 4k frames"):
        ours.encode(jnp.zeros((1, 3, 8, 16, 16)))
    with pytest.raises(ValueError, match="video height and width must be multiples of 8"):
        ours.encode(jnp.zeros((1, 3, 5, 16, 20)))
    with pytest.raises(ValueError, match=r"video must have shape \(B, 3, F, H, W\)"):
        ours.encode(jnp.zeros((1, 4, 5, 16, 16)))
    with pytest.raises(ValueError, match=r"video must have shape"):
        ours.encode(jnp.zeros((3, 5, 16, 16)))
    with pytest.raises(ValueError, match=r"z must have shape \(B, 4, f, h, w\)"):
        ours.decode(jnp.zeros((1, 16, 2, 2, 2)))
    with pytest.raises(ValueError, match=r"z must have shape"):
        ours.decode(jnp.zeros((4, 2, 2, 2)))
    with pytest.raises(ValueError, match=r"latents must have shape \(B, 4"):
        ours.latents_to_vae(jnp.zeros((1, 16, 1, 2, 2)))
    with pytest.raises(ValueError, match=r"mean must have shape \(B, 4"):
        ours.vae_to_latents(jnp.zeros((1, 4, 2, 2)))


def test_config():
    default = WanVAEConfig()
    assert (default.temporal_factor, default.spatial_factor, default.decoder_dim) == (4, 8, 96)
    config = WanVAEConfig.from_diffusers_config({"_class_name": "AutoencoderKLWan", **TINY})
    assert config.dim_mult == (1, 2, 2, 2) and config.temperal_downsample == (False, True, True)
    wan22 = {**TINY, "is_residual": True, "patch_size": 2, "in_channels": 12, "out_channels": 12}
    with pytest.raises(ValueError, match="is_residual=True is Wan2.2's VAE; only Wan2.1's VAE is ported"):
        WanVAEConfig.from_diffusers_config(wan22)
    with pytest.raises(ValueError, match="patch_size=2 is Wan2.2's VAE"):
        WanVAEConfig.from_diffusers_config({**TINY, "patch_size": 2})
    for bad, name in (({"bogus": 1}, "bogus"), ({"attn_scales": [0.5]}, "attn_scales"),
                      ({"temperal_downsample": [True, True]}, "temperal_downsample"),
                      ({"temperal_downsample": [True, True, True]}, "temperal_downsample"),
                      ({"latents_std": [1.0, 0.0, 1.0, 1.0]}, "latents_std"), ({"latents_mean": [0.0]}, "latents_mean"),
                      ({"z_dim": True}, "z_dim"), ({"dim_mult": []}, "dim_mult"), ({"_class_name": "AutoencoderKL"}, "_class_name")):
        with pytest.raises(ValueError, match=name):
            WanVAEConfig.from_diffusers_config({**TINY, **bad})
    with pytest.raises(ValueError, match="config must be a WanVAEConfig"):
        WanVAE(TINY, rngs=nnx.Rngs(0))
