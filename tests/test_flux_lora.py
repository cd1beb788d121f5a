"""LoRA on the Flux transformer (:meth:`FluxPipeline.load_lora`): diffusers / PEFT, kohya and BFL keys.

A tiny random dev-like Flux pipeline (``cfgzero_theory.flux.tiny``) is saved once per module;
LoRA files are random pairs written here.  References:

* diffusers / PEFT keys and kohya keys (``lora_unet_double_blocks_0_img_attn_qkv`` …): diffusers'
  ``FluxPipeline.load_lora_weights`` + ``fuse_lora`` (its kohya converter is independent of
  ours: it splits fused projections itself).  Its converter hard-codes FLUX.1's widths for
  ``single_blocks.N.linear1``, and it drops the final layer's pairs without a word (it writes
  them without the ``transformer.`` prefix, which ``load_lora_weights`` then ignores), so
  those two are checked otherwise (below);
* Black Forest Labs / ComfyUI keys (``diffusion_model.…``) must merge to exactly the weights of
  the same pairs written as kohya keys;
* an original module that is several diffusers modules (``single_blocks.0.linear1``: q, k, v and
  the MLP input) or one in another order (``final_layer.adaLN_modulation.1``: (shift, scale)
  where diffusers' ``norm_out.linear`` is (scale, shift)): the merge must equal adding
  ``s·(α/r)·B A`` to the original weight — the diffusers weights stacked in the original
  order — and cutting it back into diffusers' modules.

Tolerance: every transformer weight within ``1e-6 · max(1, max |W|)`` of the reference.
"""

import os

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from cfgzero_theory import pipelines
from cfgzero_theory.flux.weights import load_flux_transformer, weight_map

pytestmark = pytest.mark.parity

RTOL = 1e-6
D = 32  # the tiny model's width (2 heads of 16)


@pytest.fixture(scope="module")
def folder(torch, diffusers, tmp_path_factory):
    from cfgzero_theory.flux.tiny import build_tiny_random_pipeline

    path = tmp_path_factory.mktemp("flux_lora")
    build_tiny_random_pipeline(path, seed=0)
    return path


def _params(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _ours(folder, path, scale):
    pipe = pipelines.from_pretrained(folder, compilation_cache=False)
    assert pipe.load_lora(path, scale) > 0
    return _params(pipe.transformer)


def _theirs(torch, diffusers, folder, path, scale):
    """diffusers' merged transformer weights, mapped to our state paths and layout."""
    pipe = diffusers.FluxPipeline.from_pretrained(folder)
    pipe.load_lora_weights(path)
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    out = {}
    for key, value in pipe.transformer.state_dict().items():
        found = weight_map.to_ours(key)
        if found is not None:
            ours, transform = found
            out[ours] = transform.apply(value.float().numpy())
    return out


def _assert_same(ours, reference):
    assert set(reference) <= set(ours)
    for key, value in reference.items():
        err = float(np.max(np.abs(ours[key] - value)))
        assert err <= RTOL * max(1.0, float(np.max(np.abs(value)))), (key, err)


def _pair(rng, out, inp, rank=4):
    return (0.3 * rng.standard_normal((rank, inp))).astype(np.float32), \
        (0.3 * rng.standard_normal((out, rank))).astype(np.float32)


def _save(tmp_path, name, tensors):
    path = os.path.join(tmp_path, f"{name}.safetensors")
    save_file(tensors, path)
    return path


#: Original-layout modules of the kohya / BFL files and their (out, in) shapes; alpha per module
#: (``None``: no alpha tensor).
ORIGINAL = {
    "double_blocks.0.img_attn.qkv": ((3 * D, D), 2.0),
    "double_blocks.1.txt_attn.qkv": ((3 * D, D), 8.0),
    "double_blocks.0.img_attn.proj": ((D, D), 4.0),
    "double_blocks.1.txt_mlp.0": ((4 * D, D), None),
    "double_blocks.0.img_mod.lin": ((6 * D, D), 1.0),
    "single_blocks.1.linear2": ((D, 5 * D), 3.0),
    "single_blocks.0.modulation.lin": ((3 * D, D), 2.0),
}
FINAL = {"final_layer.adaLN_modulation.1": ((2 * D, D), 2.0), "final_layer.linear": ((64, D), None)}


def _original_pairs(seed=0, modules=ORIGINAL):
    rng = np.random.default_rng(seed)
    return {module: (*_pair(rng, *shape), alpha) for module, (shape, alpha) in modules.items()}


def _original_file(tmp_path, name, pairs, form):
    tensors = {}
    for module, (down, up, alpha) in pairs.items():
        stem = f"lora_unet_{module.replace('.', '_')}" if form == "kohya" else f"diffusion_model.{module}"
        names = ("lora_down", "lora_up") if form == "kohya" else ("lora_A", "lora_B")
        tensors[f"{stem}.{names[0]}.weight"], tensors[f"{stem}.{names[1]}.weight"] = down, up
        if alpha is not None:
            tensors[f"{stem}.alpha"] = np.array(alpha, np.float32)
    return _save(tmp_path, name, tensors)


def test_peft_file_matches_diffusers(torch, diffusers, folder, tmp_path):
    rng = np.random.default_rng(1)
    modules = {"transformer_blocks.0.attn.to_q": (D, D), "transformer_blocks.1.attn.add_v_proj": (D, D),
               "single_transformer_blocks.0.proj_mlp": (4 * D, D), "single_transformer_blocks.1.attn.to_k": (D, D),
               "norm_out.linear": (2 * D, D), "time_text_embed.guidance_embedder.linear_1": (D, 256)}
    tensors = {}
    for module, (out, inp) in modules.items():
        tensors[f"transformer.{module}.lora_A.weight"], tensors[f"transformer.{module}.lora_B.weight"] = \
            _pair(rng, out, inp)
    path = _save(tmp_path, "peft", tensors)
    _assert_same(_ours(folder, path, 0.8), _theirs(torch, diffusers, folder, path, 0.8))


def test_kohya_file_matches_diffusers(torch, diffusers, folder, tmp_path):
    """Fused qkv projections split, the final modulation's (shift, scale) swapped, alpha/r applied."""
    path = _original_file(tmp_path, "kohya", _original_pairs(), "kohya")
    _assert_same(_ours(folder, path, 1.3), _theirs(torch, diffusers, folder, path, 1.3))


def test_bfl_keys_equal_kohya_keys(folder, tmp_path):
    pairs = _original_pairs(seed=2, modules={**ORIGINAL, **FINAL})
    bfl = _ours(folder, _original_file(tmp_path, "bfl", pairs, "bfl"), 0.6)
    kohya = _ours(folder, _original_file(tmp_path, "kohya", pairs, "kohya"), 0.6)
    assert bfl.keys() == kohya.keys()
    for key in bfl:
        np.testing.assert_array_equal(bfl[key], kohya[key])


#: original module -> [(our kernel, its rows in the original weight)], in the original's row order
STACKED = {
    "single_blocks.0.linear1": [("single_blocks.0.qkv.q.kernel", D), ("single_blocks.0.qkv.k.kernel", D),
                                ("single_blocks.0.qkv.v.kernel", D), ("single_blocks.0.proj_mlp.kernel", 4 * D)],
    "final_layer.adaLN_modulation.1": [("out_mod.kernel", (D, 2 * D)), ("out_mod.kernel", (0, D))],  # shift, scale
}


def _rows(torch_layout, span):
    """All rows of a weight (``span`` a row count) or the rows ``span = (start, stop)``."""
    return torch_layout if isinstance(span, int) else torch_layout[span[0]:span[1]]


@pytest.mark.parametrize("module", list(STACKED))
def test_an_original_module_merges_like_its_original_weight(folder, tmp_path, module):
    """Build the original weight from ours (stacked in the original order), add the LoRA there,
    cut it back: the merge through the layout hook must give the same diffusers weights."""
    before = _params(load_flux_transformer(os.path.join(folder, "transformer")))
    original = np.concatenate([_rows(before[kernel].T, span) for kernel, span in STACKED[module]])  # (out, in)
    down, up = _pair(np.random.default_rng(3), original.shape[0], original.shape[1], rank=3)
    alpha, scale = 6.0, 0.9
    path = _save(tmp_path, "original", {f"diffusion_model.{module}.lora_down.weight": down,
                                        f"diffusion_model.{module}.lora_up.weight": up,
                                        f"diffusion_model.{module}.alpha": np.array(alpha, np.float32)})
    merged = original + scale * (alpha / 3) * (up.astype(np.float64) @ down)
    after = _ours(folder, path, scale)
    start = 0
    for kernel, span in STACKED[module]:
        size = span if isinstance(span, int) else span[1] - span[0]
        np.testing.assert_allclose(_rows(after[kernel].T, span), merged[start:start + size], rtol=0, atol=1e-6)
        start += size
    changed = {k for k in after if not np.array_equal(after[k], before[k])}
    assert changed == {kernel for kernel, _ in STACKED[module]}



def test_unknown_and_unmatched_keys_are_refused_whole(folder, tmp_path):
    pipe = pipelines.from_pretrained(folder, compilation_cache=False)
    before = _params(pipe.transformer)
    rng = np.random.default_rng(4)
    down, up = _pair(rng, 3 * D, D)
    bad = {
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": down,  # fine
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": up,
        "diffusion_model.double_blocks.7.img_attn.qkv.lora_A.weight": down,  # no block 7
        "diffusion_model.double_blocks.7.img_attn.qkv.lora_B.weight": up,
        "some.unknown.key": down,
    }
    with pytest.raises(ValueError, match="double_blocks.7.img_attn.qkv") as err:
        pipe.load_lora(_save(tmp_path, "bad", bad))
    assert "some.unknown.key" in str(err.value)
    after = _params(pipe.transformer)
    assert all(np.array_equal(after[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="scale"):
        pipe.load_lora(_save(tmp_path, "good", {k: v for k, v in list(bad.items())[:2]}), float("nan"))


def test_lora_merged_pipeline_matches_diffusers(torch, diffusers, folder, tmp_path):
    """The whole pipeline after merging: final latents equal diffusers' fused pipeline's (1e-4)."""
    import jax.numpy as jnp

    path = _original_file(tmp_path, "kohya", _original_pairs(seed=5), "kohya")
    ours = pipelines.from_pretrained(folder, compilation_cache=False)
    ours.load_lora(path, 0.7)
    reference = diffusers.FluxPipeline.from_pretrained(folder)
    reference.load_lora_weights(path)
    reference.fuse_lora(lora_scale=0.7)
    noise = torch.randn((1, 24, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = reference(prompt="a photo of a cat", latents=noise.clone(), num_inference_steps=2, height=16, width=24,
                           max_sequence_length=8, guidance_scale=3.5, output_type="latent").images.numpy()
    latents, _ = ours("a photo of a cat", latents=jnp.asarray(noise.numpy()), num_steps=2, height=16, width=24,
                      max_sequence_length=8, zero_init_steps=0)
    err = float(np.max(np.abs(np.asarray(latents) - theirs)))
    assert err <= 1e-4 * max(1.0, float(np.max(np.abs(theirs)))), err
