"""Parity of the JAX Lumina-Next transformer (``cfgzero_theory.lumina``) with ``diffusers.LuminaNextDiT2DModel``.

A tiny random diffusers model — grouped-query attention (4 query heads, 2 key/value heads of
size 8), 2 layers, a caption width (24) unlike the model width (32), an FFN multiplier and
``multiple_of`` rounding — is built on CPU with ``torch.manual_seed``, every parameter moved by
``0.2·N(0, 1)`` (so unit norm scales, zero gates and zero biases cannot hide a mapping mistake),
saved with ``save_pretrained`` and loaded with our loader.

* One forward on the same random inputs, per-sample times ``t``, a caption mask padding some
  tokens: at the training resolution (scaling factor 1, no proportional attention) and at a
  non-square one (scaling factor ``√(96·64)/64 ≈ 1.22``) with linear and with NTK RoPE tables
  and proportional attention (``base_sequence_length = 16``); the RoPE tables themselves
  against ``get_2d_rotary_pos_embed_lumina``.
* :func:`lumina_model_fn` against ``LuminaPipeline`` itself: the pipeline runs a few steps
  (``output_type="latent"``, no guidance) with ``scheduler.step`` recording the prediction it
  is handed (the first half of the channels, negated) and the latents and timestep; our
  ``model_fn`` gets the same latents and timestep — at both watersheds (0.3, where the steps
  straddle it, and diffusers' 1.0) and both resolutions; ``model_fn`` is jitted with the
  timestep traced, so the RoPE table is selected by the traced time as in ``sample_flow``'s scan.

Tolerance (float32): ``max |ours − diffusers| ≤ 1e-4 · max |diffusers|``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cfgzero_theory.lumina.transformer import LuminaConfig, rope_for
from cfgzero_theory.lumina.weights import load_lumina_transformer, lumina_model_fn

pytestmark = pytest.mark.parity

RTOL = 1e-4
CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_attention_heads=4,
              num_kv_heads=2, multiple_of=16, ffn_dim_multiplier=1.5, norm_eps=1e-5, learn_sigma=True, qk_norm=True,
              cross_attention_dim=24)
HEAD_DIM = 8
BASE = (8 * 8 // 16) ** 2  # the pipeline's base_sequence_length for sample_size 8
SCALE = math.sqrt(96 * 64) / 64  # the scaling factor of a 96×64 image (latents 12×8) for sample_size 8


@pytest.fixture(scope="module")
def models(torch, diffusers, tmp_path_factory):
    torch.manual_seed(0)
    reference = diffusers.LuminaNextDiT2DModel(**CONFIG).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.2 * torch.randn_like(param))
    folder = tmp_path_factory.mktemp("lumina") / "transformer"
    reference.save_pretrained(folder)
    return reference, load_lumina_transformer(folder), folder


def _inputs(torch, latent, batch=2, length=6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, CONFIG["in_channels"], *latent, generator=g)
    caption = torch.randn(batch, length, CONFIG["cross_attention_dim"], generator=g)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[0, 4:] = 0  # padded caption tokens: pooled and attended away
    mask[-1, 5:] = 0
    return x, caption, mask


def _rel_err(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float32), reference.float().numpy()
    assert ours.shape == reference.shape
    scale = np.abs(reference).max()
    assert scale > 0.1
    return float(np.abs(ours - reference).max() / scale)


def _jax(a):
    return jnp.asarray(a.numpy())


@nnx.jit(static_argnums=6)
def _forward(model, x, t, caption, mask, rope, base):
    return model(x, t, caption, mask, rope, base_sequence_length=base)


@pytest.mark.parametrize("latent, linear_factor, ntk_factor, base", [
    ((8, 8), 1.0, 1.0, None),  # the training resolution: scaling factor 1
    ((12, 8), SCALE, 1.0, BASE),  # t < watershed: linear interpolation, proportional attention
    ((12, 8), 1.0, SCALE, BASE),  # t ≥ watershed: NTK-scaled θ
])
def test_forward_matches_diffusers(torch, diffusers, models, latent, linear_factor, ntk_factor, base):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    reference, ours, _ = models
    assert ours.config == LuminaConfig(**CONFIG, scaling_factor=1.0)
    x, caption, mask = _inputs(torch, latent)
    t = torch.tensor([0.2, 0.7])
    table = get_2d_rotary_pos_embed_lumina(HEAD_DIM, 384, 384, linear_factor=linear_factor, ntk_factor=ntk_factor)
    with torch.no_grad():
        theirs = reference(hidden_states=x, timestep=t, encoder_hidden_states=caption, encoder_mask=mask,
                           image_rotary_emb=table, return_dict=False,
                           cross_attention_kwargs={} if base is None else {"base_sequence_length": base})[0]
    grid = (latent[0] // 2, latent[1] // 2)
    cos, sin = rope_for(ours.config, *grid, linear_factor=linear_factor, ntk_factor=ntk_factor)
    their_table = table[:grid[0], :grid[1]].reshape(-1, HEAD_DIM // 2)
    assert np.abs(cos - their_table.real.numpy()).max() < 2e-6
    assert np.abs(sin - their_table.imag.numpy()).max() < 2e-6
    out = _forward(ours, _jax(x), _jax(t), _jax(caption), _jax(mask), (jnp.asarray(cos), jnp.asarray(sin)), base)
    assert out.shape == (2, 8, *latent)
    assert _rel_err(out, theirs) <= RTOL


def _pipeline_steps(torch, diffusers, reference, height, width, steps, watershed):
    """Run ``LuminaPipeline`` (no guidance, latents out) and record what each ``scheduler.step`` is given."""
    pipe = diffusers.LuminaPipeline(transformer=reference, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                    vae=None, text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    records = []
    step = pipe.scheduler.step

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        records.append((model_output.clone(), timestep.clone(), sample.clone()))
        return step(model_output, timestep, sample, *args, **kwargs)

    pipe.scheduler.step = recording_step
    x, caption, mask = _inputs(torch, (height // 8, width // 8))
    pipe(prompt_embeds=caption, prompt_attention_mask=mask, height=height, width=width, latents=x,
         num_inference_steps=steps, guidance_scale=1.0, output_type="latent", scaling_watershed=watershed)
    return records, caption, mask


@pytest.mark.parametrize("height, width, steps, watershed", [(96, 64, 3, 0.3), (64, 96, 2, 1.0)])
def test_model_fn_matches_pipeline_steps(torch, diffusers, models, height, width, steps, watershed):
    reference, ours, _ = models
    records, caption, mask = _pipeline_steps(torch, diffusers, reference, height, width, steps, watershed)
    assert len(records) == steps
    model_fn = jax.jit(lumina_model_fn(ours, height, width, scaling_watershed=watershed))
    params = nnx.state(ours)
    times = []
    for v, timestep, sample in records:
        times.append(1 - float(timestep) / 1000)
        out = model_fn(params, _jax(sample), jnp.float32(float(timestep) / 1000), _jax(timestep),
                       (_jax(caption), _jax(mask)))
        assert out.shape == sample.shape  # the variance half dropped
        assert _rel_err(out, v) <= RTOL
    if watershed < 1:  # the steps straddle the watershed: linear, then NTK tables
        assert min(times) < watershed <= max(times)


def test_config_and_loader_errors(torch, diffusers, models, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    _, _, folder = models
    with pytest.raises(ValueError, match="hidden_size"):
        LuminaConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="multiple of 4"):
        LuminaConfig(hidden_size=24, num_attention_heads=4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        LuminaConfig(hidden_size=32, num_attention_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="learn_sigma"):
        LuminaConfig(learn_sigma=1)
    with pytest.raises(ValueError, match="'use_flash'"):
        LuminaConfig.from_diffusers_config({**CONFIG, "use_flash": True})

    def variant(name, edit_config=None, edit_weights=None):
        target = tmp_path / name
        shutil.copytree(folder, target)
        if edit_config:
            config = json.loads((target / "config.json").read_text())
            edit_config(config)
            (target / "config.json").write_text(json.dumps(config))
        if edit_weights:
            path = target / "diffusion_pytorch_model.safetensors"
            weights = load_file(path)
            edit_weights(weights)
            save_file(weights, path)
        return target

    with pytest.raises(ValueError, match="num_layers = 3 in the config"):
        load_lumina_transformer(variant("layers", lambda c: c.update(num_layers=3)))
    with pytest.raises(ValueError, match=r"missing keys \['layers.1.gate'\]"):
        load_lumina_transformer(variant("missing", edit_weights=lambda w: w.pop("layers.1.gate")))
    with pytest.raises(ValueError, match=r"unexpected keys \['layers.0.attn1.to_out.0.weight'\]"):
        load_lumina_transformer(variant("unexpected", edit_weights=lambda w: w.update(
            {"layers.0.attn1.to_out.0.weight": w["layers.0.attn2.to_out.0.weight"].clone()})))
    with pytest.raises(ValueError, match=r"'layers.0.attn2.to_k.weight': expected shape \(16, 24\)"):
        load_lumina_transformer(variant("shape", edit_weights=lambda w: w.update(
            {"layers.0.attn2.to_k.weight": w["layers.0.attn1.to_k.weight"].clone()})))
    with pytest.raises(ValueError, match="_class_name"):
        load_lumina_transformer(variant("class", lambda c: c.update(_class_name="LuminaNextDiT3DModel")))
    no_norm = load_lumina_transformer(variant("no_qk_norm", lambda c: c.update(qk_norm=False), lambda w: [
        w.pop(k) for k in list(w) if ".norm_q." in k or ".norm_k." in k]))
    assert no_norm.blocks[0].self_attn.q_norm is None


def test_bad_inputs_refused(models):
    _, ours, _ = models
    caption, mask = jnp.zeros((1, 6, 24)), jnp.ones((1, 6))
    t = jnp.asarray([0.5])
    with pytest.raises(ValueError, match="multiples of patch_size"):
        ours(jnp.zeros((1, 4, 7, 8)), t, caption, mask)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        ours(jnp.zeros((1, 3, 8, 8)), t, caption, mask)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        ours(jnp.zeros((1, 4, 8, 8)), t, jnp.zeros((1, 6, 32)), mask)
    with pytest.raises(ValueError, match="encoder_mask"):
        ours(jnp.zeros((1, 4, 8, 8)), t, caption, jnp.ones((1, 5)))
    with pytest.raises(ValueError, match="rope"):
        ours(jnp.zeros((1, 4, 8, 8)), t, caption, mask, rope_for(ours.config, 4, 2))
    with pytest.raises(ValueError, match="base_sequence_length"):
        ours(jnp.zeros((1, 4, 8, 8)), t, caption, mask, base_sequence_length=1)
    with pytest.raises(ValueError, match="exceeds"):
        rope_for(ours.config, 385, 4)
    with pytest.raises(ValueError, match="multiples of vae_scale_factor"):
        lumina_model_fn(ours, 72, 64)
    model_fn = lumina_model_fn(ours, 64, 64)
    with pytest.raises(ValueError, match="do not match"):
        model_fn(nnx.state(ours), jnp.zeros((1, 4, 12, 8)), 0.5, 500.0, (caption, mask))
