"""LoRA on the Wan2.1 transformer through :func:`cfgzero_theory.wan.weights.original_layout`.

Tiny random T2V and I2V transformers are saved once per module.  Reference: diffusers'
``WanPipeline.lora_state_dict`` (its converters for the original / ComfyUI layout
``diffusion_model.blocks.N.self_attn.q.lora_A.weight`` with ``.alpha``, and musubi / kohya
``lora_unet_blocks_N_self_attn_q.lora_down.weight``), loaded into diffusers' transformer with
``load_lora_adapter`` and merged with ``fuse_lora``.  Every weight within ``1e-6 · max(1, max |W|)``.
Not yet supported and refused by name: ComfyUI's ``.diff`` / ``.diff_b`` keys.
"""

import os

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from cfgzero_theory.ports.lora import merge_lora
from cfgzero_theory.wan.weights import load_wan_transformer, original_layout, weight_map

pytestmark = pytest.mark.parity

RTOL = 1e-6
T2V = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=16, ffn_dim=40, num_layers=2, rope_max_seq_len=32)
I2V = dict(T2V, in_channels=9, image_dim=20, added_kv_proj_dim=24)
D, FFN = 24, 40


@pytest.fixture(scope="module")
def folders(torch, diffusers, tmp_path_factory):
    out = {}
    for name, config in (("t2v", T2V), ("i2v", I2V)):
        torch.manual_seed(0)
        model = diffusers.WanTransformer3DModel(**config)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.2 * torch.randn_like(param))
        out[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(out[name])
    return out


def _modules(image: bool) -> dict[str, tuple[int, int]]:
    """Every original block module musubi's converter expects, with its (out, in) shape."""
    shapes = {}
    for i in range(T2V["num_layers"]):
        for kind in ("self_attn", "cross_attn"):
            for o in ("q", "k", "v", "o") + (("k_img", "v_img") if image and kind == "cross_attn" else ()):
                shapes[f"blocks.{i}.{kind}.{o}"] = (D, D)
        shapes[f"blocks.{i}.ffn.0"], shapes[f"blocks.{i}.ffn.2"] = (FFN, D), (D, FFN)
    return shapes


def _file(tmp_path, form, image, seed=0):
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, (out, inp) in _modules(image).items():
        stem = f"lora_unet_{module.replace('.', '_')}" if form == "musubi" else f"diffusion_model.{module}"
        down_up = ("lora_down", "lora_up") if form == "musubi" else ("lora_A", "lora_B")
        tensors[f"{stem}.{down_up[0]}.weight"] = (0.3 * rng.standard_normal((4, inp))).astype(np.float32)
        tensors[f"{stem}.{down_up[1]}.weight"] = (0.3 * rng.standard_normal((out, 4))).astype(np.float32)
        tensors[f"{stem}.alpha"] = np.array(rng.choice([2.0, 4.0, 8.0]), np.float32)
    path = os.path.join(tmp_path, f"{form}.safetensors")
    save_file(tensors, path)
    return path


def _ours(folder, path, scale):
    model = load_wan_transformer(folder)
    merge_lora(model, weight_map, [(path, scale)], original=original_layout(model.config), what="Wan transformer")
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _theirs(diffusers, folder, path, scale):
    model = diffusers.WanTransformer3DModel.from_pretrained(folder)
    state = diffusers.WanPipeline.lora_state_dict(path)
    model.load_lora_adapter(state, prefix="transformer")
    model.fuse_lora(lora_scale=scale)
    model.unload_lora()
    out = {}
    for key, value in model.state_dict().items():
        found = weight_map.to_ours(key)
        if found is not None:
            out[found[0]] = found[1].apply(value.float().numpy())
    return out


@pytest.mark.parametrize("form", ["comfyui", "musubi"])
@pytest.mark.parametrize("name", ["t2v", "i2v"])
def test_original_and_musubi_keys_match_diffusers(peft, diffusers, folders, tmp_path, form, name):
    path = _file(tmp_path, form, image=name == "i2v")
    ours, theirs = _ours(folders[name], path, 0.8), _theirs(diffusers, folders[name], path, 0.8)
    changed = 0
    base = _ours(folders[name], _file(tmp_path, form, image=name == "i2v"), 0.0)
    for key, value in theirs.items():
        err = float(np.max(np.abs(ours[key] - value)))
        assert err <= RTOL * max(1.0, float(np.max(np.abs(value)))), (key, err)
        changed += not np.array_equal(ours[key], base[key])
    assert changed == len(_modules(name == "i2v"))


def test_t2v_lora_on_i2v_leaves_the_image_branch_and_i2v_lora_on_t2v_is_refused(folders, tmp_path):
    i2v_before = _ours(folders["i2v"], _file(tmp_path, "comfyui", image=False), 0.0)
    i2v_after = _ours(folders["i2v"], _file(tmp_path, "comfyui", image=False), 1.0)
    for key in i2v_before:
        if ".add_" in key or key.startswith("image_embedder"):
            np.testing.assert_array_equal(i2v_after[key], i2v_before[key])
    with pytest.raises(ValueError, match="k_img"):
        _ours(folders["t2v"], _file(tmp_path, "comfyui", image=True), 1.0)
