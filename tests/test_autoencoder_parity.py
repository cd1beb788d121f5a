"""Parity of :mod:`cfgzero_theory.ports.autoencoder` with ``diffusers.AutoencoderKL`` (tiny random models, fp32).

Tolerance: max |ours − diffusers| ≤ 1e-4 · max(1, max |diffusers|) for the encoder mean and
logvar and the decoder output (observed ~2.6e-6 absolute on outputs of scale ~2–4).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cfgzero_theory.ports.autoencoder import AutoencoderKL, VAEConfig, load_vae, sample_latent

pytestmark = pytest.mark.parity

RTOL = 1e-4
TINY = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=16,
    sample_size=16,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def _save_reference(torch, diffusers, folder, **overrides):
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for param in model.parameters():  # move norms / biases off their 1 / 0 initialisation
            param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _close(ours, ref):
    ref = ref.detach().numpy()
    ours = np.asarray(ours)
    assert ours.shape == ref.shape
    err = np.max(np.abs(ours - ref))
    assert err <= RTOL * max(1.0, np.max(np.abs(ref))), err


@pytest.mark.parametrize("quant", [False, True])
def test_encode_decode_match_diffusers(torch, diffusers, tmp_path, quant):
    ref = _save_reference(torch, diffusers, tmp_path, use_quant_conv=quant, use_post_quant_conv=quant)
    ours = load_vae(tmp_path)
    assert isinstance(ours, AutoencoderKL)
    assert (ours.quant_conv is not None) == quant

    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    latent = rng.standard_normal((2, 16, 8, 8)).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(image)).latent_dist
        decoded = ref.decode(torch.from_numpy(latent)).sample
    mean, logvar = ours.encode(jnp.asarray(image))
    _close(mean, dist.mean)
    _close(logvar, dist.logvar)
    _close(ours.decode(jnp.asarray(latent)), decoded)

    draw = sample_latent(mean, logvar, jax.random.key(0))
    assert draw.shape == mean.shape and bool(jnp.all(jnp.isfinite(draw)))


def test_sd3_scaling_helpers(torch, diffusers):
    model = AutoencoderKL(VAEConfig(**TINY), rngs=nnx.Rngs(0))
    z = np.random.default_rng(1).standard_normal((1, 16, 4, 4)).astype(np.float32)
    s, t = TINY["scaling_factor"], TINY["shift_factor"]
    # pipeline_stable_diffusion_3.py: latents / scaling_factor + shift_factor before vae.decode
    np.testing.assert_allclose(model.latents_to_vae(jnp.asarray(z)), z / s + t, rtol=1e-6, atol=1e-6)
    # pipeline_stable_diffusion_3_img2img.py: (init_latents - shift_factor) * scaling_factor
    np.testing.assert_allclose(model.vae_to_latents(jnp.asarray(z)), (z - t) * s, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.vae_to_latents(model.latents_to_vae(jnp.asarray(z))), z, rtol=1e-5, atol=1e-5)


def test_config_rejects_bad_keys():
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig.from_diffusers_config({**TINY, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig.from_diffusers_config({**TINY, "down_block_types": ["AttnDownEncoderBlock2D"] * 2})
    with pytest.raises(ValueError, match="bogus"):
        VAEConfig.from_diffusers_config({**TINY, "bogus": 1})
    with pytest.raises(ValueError, match="norm_num_groups"):
        VAEConfig.from_diffusers_config({**TINY, "norm_num_groups": 3})
    for bad, name in (({"layers_per_block": True}, "layers_per_block"), ({"block_out_channels": (8, True)}, "block_out_channels"),
                      ({"scaling_factor": True}, "scaling_factor"), ({"shift_factor": float("inf")}, "shift_factor"),
                      ({"scaling_factor": 0.0}, "scaling_factor")):
        with pytest.raises(ValueError, match=name):
            VAEConfig(**{**TINY, **bad})
    config = VAEConfig(**{**TINY, "block_out_channels": (np.int64(8), 16), "scaling_factor": np.float32(1.5)})
    assert config.block_out_channels == (8, 16) and type(config.block_out_channels[0]) is int
    assert type(config.scaling_factor) is float


def test_loader_errors(torch, diffusers, tmp_path):
    from safetensors.numpy import load_file, save_file

    good = tmp_path / "vae"
    _save_reference(torch, diffusers, good)
    weights = load_file(good / "diffusion_pytorch_model.safetensors")
    config = json.loads((good / "config.json").read_text())

    def variant(name, tensors, cfg=config):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(cfg))
        save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
        return folder

    key = "encoder.conv_in.weight"
    with pytest.raises(ValueError, match=f"missing keys.*{key}"):
        load_vae(variant("missing", {k: v for k, v in weights.items() if k != key}))
    with pytest.raises(ValueError, match=r"expected shape \(8, 3, 3, 3\), found \(8, 3, 1, 1\)"):
        load_vae(variant("shape", {**weights, key: np.zeros((8, 3, 1, 1), np.float32)}))
    with pytest.raises(ValueError, match="unexpected keys.*quant_conv.weight"):
        load_vae(variant("extra", {**weights, "quant_conv.weight": np.zeros((32, 32, 1, 1), np.float32)}))
    with pytest.raises(ValueError, match="_class_name"):
        load_vae(variant("cls", weights, {**config, "_class_name": "AutoencoderTiny"}))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text(json.dumps(config))
    (corrupt / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_vae(corrupt)
    assert os.path.isdir(good)
    # repeated blocks are counted on the headers, before the model's structure is built
    with pytest.raises(ValueError, match=r"layers_per_block \+ 1 = 100001 in the config, but the weights hold blocks 0 … 1"):
        load_vae(variant("deep", weights, {**config, "layers_per_block": 100_000}))
    levels = {"block_out_channels": [8, 16, 16], "down_block_types": ["DownEncoderBlock2D"] * 3,
              "up_block_types": ["UpDecoderBlock2D"] * 3}
    with pytest.raises(ValueError, match=r"len\(block_out_channels\) = 3 in the config, but the weights hold blocks 0 … 1"):
        load_vae(variant("levels", weights, {**config, **levels}))
    with pytest.raises(ValueError, match=f"key '{key}' is stored as C64"):
        load_vae(variant("complex", {**weights, key: weights[key].astype(np.complex64)}))
