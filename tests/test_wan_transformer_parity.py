"""Parity of the JAX Wan2.1 transformer (``cfgzero_theory.wan``) with ``diffusers.WanTransformer3DModel``.

Tiny random diffusers models — text-to-video, and image-to-video (image tokens, the added
key/value projections, text padded to exactly 512 tokens) — are built on CPU with
``torch.manual_seed``, every parameter moved by ``0.2·N(0, 1)`` (so unit norm scales and zero
biases cannot hide a mapping mistake), saved with ``save_pretrained`` and loaded with our
loader; both run on the same random inputs (non-square latent grids, several frames, integer
timesteps as Wan's UniPC gives them).

Tolerance (float32): ``max |ours − diffusers| ≤ 1e-4 · max |diffusers|``.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from cfgzero_theory.wan import WanConfig, load_wan_transformer

pytestmark = pytest.mark.parity

RTOL = 1e-4
T2V = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=16, ffn_dim=40, num_layers=2, rope_max_seq_len=32)
I2V = dict(T2V, in_channels=9, image_dim=20, added_kv_proj_dim=24, num_layers=1)


def _model(torch, diffusers, config, seed=0):
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(**config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model


def _close(ours, reference):
    ours, reference = np.asarray(ours, np.float32), reference.float().numpy()
    assert ours.shape == reference.shape
    scale = np.abs(reference).max()
    assert scale > 0.5
    err = np.abs(ours - reference).max()
    assert err <= RTOL * scale, f"max abs diff {err:.3g} > {RTOL:g} × output scale {scale:.3g}"


@pytest.mark.parametrize("name, shape, text_length", [("t2v", (2, 4, 3, 6, 4), 7), ("t2v", (1, 4, 2, 4, 8), 5),
                                                       ("i2v", (2, 9, 2, 4, 6), 512)])
def test_forward_matches_diffusers(torch, diffusers, tmp_path, name, shape, text_length):
    config = T2V if name == "t2v" else I2V
    reference = _model(torch, diffusers, config)
    reference.save_pretrained(tmp_path / name)
    ours = load_wan_transformer(tmp_path / name)
    assert ours.config == WanConfig(**config)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g)
    text = torch.randn(shape[0], text_length, config["text_dim"], generator=g)
    image = torch.randn(shape[0], 5, config["image_dim"], generator=g) if name == "i2v" else None
    t = torch.tensor([999, 437])[:shape[0]]
    with torch.no_grad():
        theirs = reference(hidden_states=x, timestep=t, encoder_hidden_states=text, encoder_hidden_states_image=image,
                           return_dict=False)[0]
    as_jax = lambda a: None if a is None else jnp.asarray(a.numpy())  # noqa: E731
    _close(ours(as_jax(x), as_jax(t), as_jax(text), as_jax(image)), theirs)


def test_rope_split_and_input_errors(torch, diffusers, tmp_path):
    assert WanConfig(attention_head_dim=128).rope_axes == (44, 42, 42)
    with pytest.raises(ValueError, match="image_dim and added_kv_proj_dim"):
        WanConfig(image_dim=8)
    reference = _model(torch, diffusers, I2V)
    reference.save_pretrained(tmp_path / "i2v")
    ours = load_wan_transformer(tmp_path / "i2v")
    x = jnp.zeros((1, 9, 1, 4, 4))
    with pytest.raises(ValueError, match="exactly 512 tokens"):
        ours(x, jnp.asarray([10]), jnp.zeros((1, 100, 16)), jnp.zeros((1, 5, 20)))
    with pytest.raises(ValueError, match="needs encoder_hidden_states_image"):
        ours(x, jnp.asarray([10]), jnp.zeros((1, 512, 16)))
    with pytest.raises(ValueError, match="multiples of patch_size"):
        ours(jnp.zeros((1, 9, 1, 3, 4)), jnp.asarray([10]), jnp.zeros((1, 512, 16)), jnp.zeros((1, 5, 20)))


def test_bfloat16_keeps_diffusers_float32_modules(torch, diffusers, tmp_path):
    """``dtype=bfloat16`` leaves the time embedder, the scale-shift tables and the affine norms in
    float32 — diffusers' ``_keep_in_fp32_modules`` — and the I2V forward then agrees with diffusers'
    own bf16 model (``from_pretrained(torch_dtype=torch.bfloat16)``) to bf16 rounding."""
    from flax import nnx

    reference = _model(torch, diffusers, I2V)
    reference.save_pretrained(tmp_path / "i2v")
    half = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "i2v", torch_dtype=torch.bfloat16).eval()
    ours = load_wan_transformer(tmp_path / "i2v", dtype=jnp.bfloat16)
    ours_dtypes = {".".join(map(str, path)): v[...].dtype for path, v in nnx.to_flat_state(nnx.state(ours))}
    kept = {name for name, dtype in ours_dtypes.items() if dtype == jnp.float32}
    assert kept == {name for name in ours_dtypes if name.startswith(("time_mlp.", "image_embedder.norm", "out_table"))
                    or ".table" in name or ".cross_norm." in name}, sorted(kept)
    theirs_kept = {name for name, p in half.named_parameters() if p.dtype == torch.float32}
    assert len(kept) == len(theirs_kept)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 9, 2, 4, 6, generator=g)
    text = torch.randn(1, 512, 16, generator=g)
    image = torch.randn(1, 5, 20, generator=g)
    t = torch.tensor([437])
    with torch.no_grad():
        theirs = half(hidden_states=x.bfloat16(), timestep=t, encoder_hidden_states=text.bfloat16(),
                      encoder_hidden_states_image=image.bfloat16(), return_dict=False)[0]
    as_jax = lambda a: jnp.asarray(a.numpy()).astype(jnp.bfloat16)  # noqa: E731
    out = ours(as_jax(x), jnp.asarray(t.numpy()), as_jax(text), as_jax(image))
    assert out.dtype == jnp.bfloat16
    ref = theirs.float().numpy()
    err = float(np.abs(np.asarray(out, np.float32) - ref).max())
    assert err <= 2e-2 * np.abs(ref).max(), err
