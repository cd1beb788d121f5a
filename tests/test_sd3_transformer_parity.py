"""Parity of the JAX SD3 MMDiT (``cfgzero_theory.sd3``) with ``diffusers.SD3Transformer2DModel``.

Tiny random diffusers models (SD3, SD3.5-large with RMS qk-norm, SD3.5-medium with dual
attention, and a LayerNorm-qk-norm variant) are built on CPU with ``torch.manual_seed``, every
parameter perturbed by ``0.2·N(0, 1)`` noise (diffusers initialises norm scales to one and
biases deterministically, which would hide mapping mistakes), saved with ``save_pretrained``
(safetensors), loaded with our loader and run on the same random inputs.

Tolerance (float32 on CPU): ``max |ours − diffusers| ≤ 1e-4 · max |diffusers|`` for the
transformer output (observed ≈ 1e-6–8e-6 relative; the residual comes mostly from float32
``exp``/``sin`` ulps of the timestep embedding at ``τ ≈ 1000``), and the same bound on the
latents after three guided Euler steps.  The fixed sin-cos table is compared with diffusers'
buffer at ``1e-6``.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from cfgzero_theory.guidance import CFGZeroStar
from cfgzero_theory.sampling import sample_flow
from cfgzero_theory.schedules import flow_match_euler_schedule
from cfgzero_theory.sd3 import SD3Config, load_sd3_transformer, sd3_model_fn
from cfgzero_theory.sd3.transformer import sincos_pos_embed

pytestmark = pytest.mark.parity

RTOL = 1e-4  # relative to max |reference output|

TINY = dict(
    sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
    pos_embed_max_size=16,
)
VARIANTS = {
    "sd3": {},
    "sd35_large": {"qk_norm": "rms_norm"},
    "sd35_medium": {"qk_norm": "rms_norm", "dual_attention_layers": (0,)},
    "layer_norm_qk_dual_last": {"qk_norm": "layer_norm", "dual_attention_layers": (0, 1)},
}


def _tiny_model(torch, diffusers, extra, seed=0, perturb_pos_embed=False):
    torch.manual_seed(seed)
    model = diffusers.SD3Transformer2DModel(**TINY, **extra).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
        if perturb_pos_embed:  # the loader must use the stored buffer, not recompute it
            model.pos_embed.pos_embed.add_(0.1 * torch.randn_like(model.pos_embed.pos_embed))
    return model


def _inputs(torch, height, width, batch=2, tokens=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY["in_channels"], height, width, generator=g)
    context = torch.randn(batch, tokens, TINY["joint_attention_dim"], generator=g)
    pooled = torch.randn(batch, TINY["pooled_projection_dim"], generator=g)
    timestep = torch.tensor([999.0, 312.5])[:batch]
    return x, context, pooled, timestep


def _assert_close(ours, reference):
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape
    scale = np.abs(reference).max()
    assert scale > 0.5  # a non-degenerate output
    err = np.abs(ours - reference).max()
    assert err <= RTOL * scale, f"max abs diff {err:.3g} > {RTOL:g} × output scale {scale:.3g}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_matches_diffusers(torch, diffusers, tmp_path, name):
    """Outputs agree on square and non-square latents (centre-cropped pos-embed), with and without skipped layers."""
    model = _tiny_model(torch, diffusers, VARIANTS[name], perturb_pos_embed=name == "sd35_large")
    model.save_pretrained(tmp_path / "transformer")
    ours = load_sd3_transformer(tmp_path / "transformer")
    assert ours.config == SD3Config(**TINY, **VARIANTS[name])
    for height, width in [(8, 8), (8, 12), (4, 16)]:
        x, context, pooled, timestep = _inputs(torch, height, width)
        for skip in [(), (0,)]:
            with torch.no_grad():
                reference = model(x, context, pooled, timestep, skip_layers=list(skip) or None).sample.numpy()
            out = ours(jnp.asarray(x.numpy()), jnp.asarray(context.numpy()), jnp.asarray(pooled.numpy()),
                       jnp.asarray(timestep.numpy()), skip_layers=skip)
            _assert_close(out, reference)


def test_fixed_pos_embed_table_and_missing_buffer(torch, diffusers, tmp_path):
    """Our sin-cos table equals diffusers' buffer; a checkpoint without it loads with the computed table."""
    model = _tiny_model(torch, diffusers, {})
    table = sincos_pos_embed(SD3Config(**TINY))
    np.testing.assert_allclose(table, model.pos_embed.pos_embed.numpy(), atol=1e-6, rtol=0)

    model.save_pretrained(tmp_path / "full")
    folder = tmp_path / "no_buffer"
    folder.mkdir()
    shutil.copy(tmp_path / "full" / "config.json", folder / "config.json")
    tensors = load_file(tmp_path / "full" / "diffusion_pytorch_model.safetensors")
    del tensors["pos_embed.pos_embed"]
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    ours = load_sd3_transformer(folder)
    np.testing.assert_array_equal(np.asarray(ours.pos_embed[...]), table)
    x, context, pooled, timestep = _inputs(torch, 8, 8)
    with torch.no_grad():
        reference = model(x, context, pooled, timestep).sample.numpy()
    _assert_close(ours(x.numpy(), context.numpy(), pooled.numpy(), timestep.numpy()), reference)


def test_sharded_checkpoint_loads_identically(torch, diffusers, tmp_path):
    model = _tiny_model(torch, diffusers, VARIANTS["sd35_medium"])
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = [f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]
    assert len(shards) > 1 and (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    single = nnx.to_flat_state(nnx.state(load_sd3_transformer(tmp_path / "single")))
    sharded = nnx.to_flat_state(nnx.state(load_sd3_transformer(tmp_path / "sharded")))
    assert [path for path, _ in single] == [path for path, _ in sharded]
    for (path, a), (_, b) in zip(single, sharded):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


def test_bfloat16_checkpoint_keeps_or_casts_dtype(torch, diffusers, tmp_path):
    model = _tiny_model(torch, diffusers, VARIANTS["sd35_large"]).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    stored = load_sd3_transformer(tmp_path / "bf16")
    assert stored.blocks[0].attn.img_q.kernel[...].dtype == jnp.bfloat16
    upcast = load_sd3_transformer(tmp_path / "bf16", dtype=jnp.float32)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(nnx.state(upcast))} == {jnp.dtype(jnp.float32)}
    model = model.float()  # diffusers' own upcast of the same bf16 values
    x, context, pooled, timestep = _inputs(torch, 8, 8)
    with torch.no_grad():
        reference = model(x, context, pooled, timestep).sample.numpy()
    _assert_close(upcast(x.numpy(), context.numpy(), pooled.numpy(), timestep.numpy()), reference)


# ----------------------------------------------------------------------------- loader errors


@pytest.fixture
def saved(torch, diffusers, tmp_path):
    """A saved tiny SD3.5-large-style model: (folder, its tensors, its config dict)."""
    _tiny_model(torch, diffusers, VARIANTS["sd35_large"]).save_pretrained(tmp_path / "good")
    tensors = load_file(tmp_path / "good" / "diffusion_pytorch_model.safetensors")
    config = json.loads((tmp_path / "good" / "config.json").read_text())
    return tmp_path, tensors, config


def _write(folder, tensors=None, config=None):
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    return folder


def test_missing_key_is_named(saved):
    root, tensors, config = saved
    del tensors["transformer_blocks.0.attn.to_q.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['transformer_blocks\.0\.attn\.to_q\.weight'\]"):
        load_sd3_transformer(_write(root / "bad", tensors, config))


def test_unexpected_keys_are_named(saved):
    root, tensors, config = saved
    tensors["transformer_blocks.0.attn.bogus.weight"] = np.zeros((2, 2), np.float32)
    # a real SD3 key that this configuration does not have (block 0 is not a dual-attention block)
    tensors["transformer_blocks.0.attn2.to_q.weight"] = np.zeros((16, 16), np.float32)
    with pytest.raises(ValueError, match="unexpected keys") as err:
        load_sd3_transformer(_write(root / "bad", tensors, config))
    assert "transformer_blocks.0.attn.bogus.weight" in str(err.value)
    assert "transformer_blocks.0.attn2.to_q.weight" in str(err.value)


def test_wrong_shape_names_key_and_shapes(saved):
    root, tensors, config = saved
    tensors["pos_embed.proj.weight"] = np.zeros((16, 4, 3, 3), np.float32)
    tensors["proj_out.weight"] = np.zeros((15, 16), np.float32)
    with pytest.raises(ValueError) as err:
        load_sd3_transformer(_write(root / "bad", tensors, config))
    message = str(err.value)
    assert "key 'pos_embed.proj.weight': expected shape (16, 4, 2, 2), found (16, 4, 3, 3)" in message
    assert "key 'proj_out.weight': expected shape (16, 16), found (15, 16)" in message


def test_truncated_safetensors_is_refused(saved):
    root, _, _ = saved
    folder = root / "bad"
    shutil.copytree(root / "good", folder)
    path = folder / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        load_sd3_transformer(folder)


def test_wrong_class_name_and_missing_config_are_refused(saved):
    root, tensors, config = saved
    with pytest.raises(ValueError, match="_class_name is 'FluxTransformer2DModel'"):
        load_sd3_transformer(_write(root / "flux", tensors, {**config, "_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(ValueError, match="no config.json"):
        load_sd3_transformer(_write(root / "noconfig", tensors, None))
    with pytest.raises(ValueError, match="unsupported SD3Transformer2DModel config key.*'use_rope'"):
        load_sd3_transformer(_write(root / "unknown", tensors, {**config, "use_rope": True}))
    with pytest.raises(ValueError, match="qk_norm"):
        load_sd3_transformer(_write(root / "l2", tensors, {**config, "qk_norm": "l2"}))
    folder = _write(root / "pickled", None, config)
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickled weights are never loaded"):
        load_sd3_transformer(folder)


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_, np.complex64])
def test_non_float_tensors_are_refused_naming_key_and_dtype(saved, dtype):
    root, tensors, config = saved
    key = "transformer_blocks.0.attn.to_q.weight"
    tensors[key] = tensors[key].astype(dtype)
    tensors["proj_out.bias"] = tensors["proj_out.bias"].astype(np.int32)
    stored = {np.int32: "I32", np.uint8: "U8", np.bool_: "BOOL", np.complex64: "C64"}[dtype]
    with pytest.raises(ValueError, match="parameters must be stored as float16, bfloat16, float32 or float64: key") as err:
        load_sd3_transformer(_write(root / "bad", tensors, config))
    assert f"key '{key}' is stored as {stored}" in str(err.value)
    assert "key 'proj_out.bias' is stored as I32" in str(err.value)


def test_half_precision_tensors_are_floats(saved):
    root, tensors, config = saved
    tensors = {k: v.astype(np.float16) for k, v in tensors.items()}
    model = load_sd3_transformer(_write(root / "fp16", tensors, config))
    assert model.out_proj.kernel[...].dtype == jnp.float16


def test_num_layers_must_match_the_blocks_in_the_file_before_anything_is_built(saved):
    """A config asking for 200 000 layers used to build the abstract model first (quadratic in
    num_layers: it never finished); the header check now refuses it at once."""
    root, tensors, config = saved
    with pytest.raises(ValueError, match=r"num_layers = 200000 in the config, but the weights hold blocks 0 … 1 \(e\.g\. "
                                         r"'transformer_blocks\.1\."):
        load_sd3_transformer(_write(root / "absurd", tensors, {**config, "num_layers": 200_000}))
    with pytest.raises(ValueError, match=r"num_layers = 3 in the config, but the weights hold blocks 0 … 1"):
        load_sd3_transformer(_write(root / "three", tensors, {**config, "num_layers": 3}))
    with pytest.raises(ValueError, match=r"num_layers = 1 in the config, .*unexpected keys \['transformer_blocks\.1\."):
        load_sd3_transformer(_write(root / "one", tensors, {**config, "num_layers": 1}))
    no_blocks = {k: v for k, v in tensors.items() if not k.startswith("transformer_blocks.")}
    with pytest.raises(ValueError, match=r"num_layers = 2 in the config, but the weights hold no such block"):
        load_sd3_transformer(_write(root / "none", no_blocks, config))


def test_abstract_build_matches_an_initialised_module():
    """The loader's shape-only build (no nnx.Rngs counter) has the structure of a real one."""
    from cfgzero_theory.ports.loading import abstract_module
    from cfgzero_theory.sd3.transformer import SD3Transformer

    config = SD3Config(**TINY, qk_norm="rms_norm", dual_attention_layers=(0,))
    real = nnx.state(SD3Transformer(config, rngs=nnx.Rngs(0)))
    abstract = nnx.state(abstract_module(SD3Transformer, config))
    shapes = lambda state: {path: (v.shape, v.dtype) for path, v in nnx.to_flat_state(state)}  # noqa: E731
    assert shapes(abstract) == shapes(real)


def test_config_and_call_numbers_follow_the_validation_rules():
    config = SD3Config(**{**TINY, "num_layers": np.int64(2)}, dual_attention_layers=[np.int32(1)])
    assert config.num_layers == 2 and type(config.num_layers) is int and config.dual_attention_layers == (1,)
    for bad in ({"num_layers": True}, {"num_layers": 2.0}, {"patch_size": np.bool_(True)},
                {"dual_attention_layers": (True,)}, {"dual_attention_layers": (2,)}):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name):
            SD3Config(**{**TINY, **bad})
    from cfgzero_theory.sd3.transformer import SD3Transformer

    model = SD3Transformer(SD3Config(**TINY), rngs=nnx.Rngs(0))
    args = (jnp.zeros((1, 4, 8, 8)), jnp.zeros((1, 3, 16)), jnp.zeros((1, 8)), jnp.zeros((1,)))
    assert model(*args, skip_layers=(np.int64(0),)).shape == (1, 4, 8, 8)
    for bad in ((True,), (2,), (0.0,)):
        with pytest.raises(ValueError, match="skip_layers"):
            model(*args, skip_layers=bad)


# ----------------------------------------------------------------------------- sampling


def test_sample_flow_cfg_zero_star_matches_diffusers_loop(torch, diffusers, tmp_path):
    """3 Euler steps of CFG-Zero* through ``sd3_model_fn`` = diffusers' scheduler + guider around the torch model."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    model = _tiny_model(torch, diffusers, VARIANTS["sd35_medium"])
    model.save_pretrained(tmp_path / "transformer")
    ours = load_sd3_transformer(tmp_path / "transformer")
    x0, context, pooled, _ = _inputs(torch, 8, 12)
    _, neg_context, neg_pooled, _ = _inputs(torch, 8, 12, seed=2)
    steps, scale = 3, 3.5

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=scale, zero_init_steps=1)
    latents = x0.clone()
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            pred = model(torch.cat([latents, latents]), torch.cat([context, neg_context]),
                         torch.cat([pooled, neg_pooled]), t.expand(2 * latents.shape[0])).sample
            pred_cond, pred_uncond = pred.chunk(2)
            guider.set_state(step=i, num_inference_steps=steps, timestep=t)
            latents = scheduler.step(guider.forward(pred_cond, pred_uncond).pred, t, latents).prev_sample
    reference = latents.numpy()

    result = sample_flow(
        sd3_model_fn(ours), nnx.state(ours), jnp.asarray(x0.numpy()), flow_match_euler_schedule(steps, shift=3.0),
        (jnp.asarray(context.numpy()), jnp.asarray(pooled.numpy())),
        (jnp.asarray(neg_context.numpy()), jnp.asarray(neg_pooled.numpy())),
        CFGZeroStar(scale, 1),
    )
    samples = np.asarray(result.samples)
    assert samples.shape == x0.shape and np.isfinite(samples).all()
    assert np.abs(reference - x0.numpy()).max() > 0.1  # the loop moved the latents
    _assert_close(samples, reference)
