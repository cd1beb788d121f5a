"""Parity of the JAX Flux transformer (``cfgzero_theory.flux``) with ``diffusers.FluxTransformer2DModel``.

Tiny random diffusers models — dev-like (guidance embedding) and schnell-like (none), with
different widths, RoPE axis splits and block counts — are built on CPU with
``torch.manual_seed``, every parameter moved by ``0.2·N(0, 1)`` (so unit norm scales and zero
biases cannot hide a mapping mistake), saved with ``save_pretrained`` and loaded with our
loader; both run on the same random inputs on non-square packed grids.

Tolerance (float32): ``max |ours − diffusers| ≤ 1e-4 · max |diffusers|``.  bfloat16 weights:
``≤ 5e-2 · max |diffusers|`` against diffusers' own bf16 run (bf16 has 8 mantissa bits; the two
implementations round at different places).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfgzero_theory.flux import FluxConfig, load_flux_transformer
from cfgzero_theory.flux.transformer import image_ids
from cfgzero_theory.ports.layers import round_to

pytestmark = pytest.mark.parity

RTOL = 1e-4
CONFIGS = {
    "dev": dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
    "schnell": dict(in_channels=8, out_channels=12, num_layers=1, num_single_layers=3, attention_head_dim=8,
                    num_attention_heads=3, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=False,
                    axes_dims_rope=(2, 2, 4)),
}


def _model(torch, diffusers, name, seed=0):
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(**CONFIGS[name]).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model


def _inputs(torch, name, grid=(3, 5), batch=2, tokens=7, seed=1):
    config = CONFIGS[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, grid[0] * grid[1], config["in_channels"], generator=g)
    context = torch.randn(batch, tokens, config["joint_attention_dim"], generator=g)
    pooled = torch.randn(batch, config["pooled_projection_dim"], generator=g)
    t = torch.tensor([1.0, 0.3125])[:batch]
    guidance = torch.full((batch,), 3.5) if config["guidance_embeds"] else None
    return x, context, pooled, t, guidance


def _reference(torch, model, x, context, pooled, t, guidance, grid):
    img_ids = torch.from_numpy(image_ids(*grid)).to(x.dtype)
    txt_ids = torch.zeros(context.shape[1], 3, dtype=x.dtype)
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                     img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]


def _ours(model, x, context, pooled, t, guidance, grid, dtype=jnp.float32):
    as_jax = lambda a: jnp.asarray(a.float().numpy(), dtype)  # noqa: E731
    return model(as_jax(x), as_jax(context), as_jax(pooled), jnp.asarray(t.numpy()),
                 None if guidance is None else jnp.asarray(guidance.numpy()), grid=grid)


def _assert_close(ours, reference, rtol=RTOL):
    ours, reference = np.asarray(ours, np.float32), reference.float().numpy()
    assert ours.shape == reference.shape
    scale = np.abs(reference).max()
    assert scale > 0.5
    err = np.abs(ours - reference).max()
    assert err <= rtol * scale, f"max abs diff {err:.3g} > {rtol:g} × output scale {scale:.3g}"


@pytest.mark.parametrize("name, grid", [("dev", (3, 5)), ("dev", (4, 2)), ("schnell", (2, 3))])
def test_forward_matches_diffusers(torch, diffusers, tmp_path, name, grid):
    reference = _model(torch, diffusers, name)
    reference.save_pretrained(tmp_path / name)
    ours = load_flux_transformer(tmp_path / name)
    assert ours.config == FluxConfig(**CONFIGS[name])
    inputs = _inputs(torch, name, grid=grid)
    _assert_close(_ours(ours, *inputs, grid), _reference(torch, reference, *inputs, grid))


def test_bfloat16_rounds_timestep_and_guidance_like_diffusers(torch, diffusers, tmp_path):
    """bf16 weights: the guidance 3.5 is embedded as bf16(3.5)·1000 → 3504, as diffusers does."""
    reference = _model(torch, diffusers, "dev").to(torch.bfloat16)
    reference.save_pretrained(tmp_path / "bf16")
    ours = load_flux_transformer(tmp_path / "bf16")
    assert ours.x_embedder.kernel[...].dtype == jnp.bfloat16
    x, context, pooled, t, guidance = _inputs(torch, "dev")
    grid = (3, 5)
    theirs = _reference(torch, reference, x.bfloat16(), context.bfloat16(), pooled.bfloat16(), t, guidance, grid)
    mine = _ours(ours, x, context, pooled, t, guidance, grid, dtype=jnp.bfloat16)
    assert mine.dtype == jnp.bfloat16
    _assert_close(mine, theirs, rtol=5e-2)

    @jax.jit
    def embedded(guidance):  # inside a compiled program, where XLA may skip a plain astype round trip
        return round_to(round_to(guidance, jnp.bfloat16) * 1000, jnp.bfloat16)

    assert float(embedded(jnp.float32(3.5))) == 3504.0
    assert float(jax.jit(lambda g: round_to(g * 1000, jnp.float32))(jnp.float32(3.5))) == 3500.0


def test_config_and_input_errors(tmp_path, torch, diffusers):
    with pytest.raises(ValueError, match="patch_size must be 1"):
        FluxConfig(patch_size=2)
    with pytest.raises(ValueError, match="must sum to attention_head_dim"):
        FluxConfig(attention_head_dim=16, axes_dims_rope=(4, 4, 4))
    reference = _model(torch, diffusers, "schnell")
    reference.save_pretrained(tmp_path / "m")
    ours = load_flux_transformer(tmp_path / "m")
    x, context, pooled, t, _ = _inputs(torch, "schnell", grid=(2, 3))
    with pytest.raises(ValueError, match="does not hold the 6 image tokens"):
        _ours(ours, x, context, pooled, t, None, (2, 2))
    with pytest.raises(ValueError, match="guidance must be given exactly when"):
        _ours(ours, x, context, pooled, t, torch.ones(2), (2, 3))
