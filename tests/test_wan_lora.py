"""LoRA on the Wan2.1 transformer through :func:`cfgzero_theory.wan.weights.original_layout`.

Tiny random T2V and I2V transformers are saved once per module.  Reference: diffusers'
``WanPipeline.lora_state_dict`` (its converters for the original / ComfyUI layout
``diffusion_model.blocks.N.self_attn.q.lora_A.weight`` with ``.alpha``, ``.diff`` and
``.diff_b``, musubi / kohya ``lora_unet_blocks_N_self_attn_q.lora_down.weight``, and diffusers /
PEFT ``transformer.blocks.N.attn1.to_q.lora_A.weight`` with ``lora_B.bias``), loaded into
diffusers' transformer with ``load_lora_adapter`` and merged with ``fuse_lora``.  Every weight
within ``1e-6 · max(1, max |W|)``.

ComfyUI's full deltas (``.diff`` / ``.diff_b``): where diffusers applies them (``.diff_b`` of
linear layers, ``head.head.diff``) the weights must match diffusers'; where it drops them
(norms, other linear weights, ``patch_embedding``, ``modulation``, image-embedder norms, a time
projection bias without pair) they must equal ``P + s · Δ`` computed here in NumPy, bit for bit
(one float32 rounding), and diffusers' weights must be unchanged there.  The original names of
the parameters are turned into diffusers names by diffusers' own checkpoint converter
(``convert_wan_transformer_to_diffusers``), not by our hook.
"""

import os

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from cfgzero_theory.ports.loading import LINEAR
from cfgzero_theory.ports.lora import merge_lora
from cfgzero_theory.wan.weights import load_wan_transformer, original_layout, weight_map

pytestmark = pytest.mark.parity

RTOL = 1e-6
T2V = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=16, ffn_dim=40, num_layers=2, rope_max_seq_len=32)
I2V = dict(T2V, in_channels=9, image_dim=20, added_kv_proj_dim=24)
D, FFN = 24, 40
WHAT = "Wan transformer"


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


#: Wan's original module names → diffusers', written out by hand for the diffusers / PEFT files.
_DIFFUSERS_NAMES = {"self_attn": "attn1", "cross_attn": "attn2", "q": "to_q", "k": "to_k", "v": "to_v",
                    "o": "to_out.0", "k_img": "add_k_proj", "v_img": "add_v_proj", "ffn.0": "ffn.net.0.proj",
                    "ffn.2": "ffn.net.2"}


def _diffusers_module(module: str) -> str:
    """``blocks.0.self_attn.q`` → ``blocks.0.attn1.to_q``, ``blocks.0.ffn.0`` → ``blocks.0.ffn.net.0.proj``."""
    block, rest = module.split(".", 2)[1], module.split(".", 2)[2]
    if rest in _DIFFUSERS_NAMES:
        return f"blocks.{block}.{_DIFFUSERS_NAMES[rest]}"
    kind, name = rest.split(".")
    return f"blocks.{block}.{_DIFFUSERS_NAMES[kind]}.{_DIFFUSERS_NAMES[name]}"


def _file(tmp_path, form, image, seed=0):
    """A LoRA of rank 4 on every block module: ComfyUI / musubi keys with ``.alpha``, or diffusers /
    PEFT keys (``transformer.blocks.0.attn1.to_q.lora_A.weight``) with an up bias and no alpha."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, (out, inp) in _modules(image).items():
        stem = {"musubi": f"lora_unet_{module.replace('.', '_')}", "comfyui": f"diffusion_model.{module}",
                "diffusers": f"transformer.{_diffusers_module(module)}"}[form]
        down_up = ("lora_down", "lora_up") if form == "musubi" else ("lora_A", "lora_B")
        tensors[f"{stem}.{down_up[0]}.weight"] = (0.3 * rng.standard_normal((4, inp))).astype(np.float32)
        tensors[f"{stem}.{down_up[1]}.weight"] = (0.3 * rng.standard_normal((out, 4))).astype(np.float32)
        if form == "diffusers":
            tensors[f"{stem}.lora_B.bias"] = (0.3 * rng.standard_normal(out)).astype(np.float32)
        else:
            tensors[f"{stem}.alpha"] = np.array(rng.choice([2.0, 4.0, 8.0]), np.float32)
    return _save(tmp_path, form, tensors)


def _save(tmp_path, name, tensors):
    path = os.path.join(tmp_path, f"{name}.safetensors")
    save_file(tensors, path)
    return path


def _params(model):
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _ours(folder, path, scale):
    model = load_wan_transformer(folder)
    merge_lora(model, weight_map, [(path, scale)], original=original_layout(model.config), what=WHAT)
    return _params(model)


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


@pytest.mark.parametrize("form", ["comfyui", "musubi", "diffusers"])
@pytest.mark.parametrize("name", ["t2v", "i2v"])
def test_every_key_format_matches_diffusers(peft, diffusers, folders, tmp_path, form, name):
    path = _file(tmp_path, form, image=name == "i2v")
    ours, theirs = _ours(folders[name], path, 0.8), _theirs(diffusers, folders[name], path, 0.8)
    changed = 0
    base = _ours(folders[name], _file(tmp_path, form, image=name == "i2v"), 0.0)
    for key, value in theirs.items():
        err = float(np.max(np.abs(ours[key] - value)))
        assert err <= RTOL * max(1.0, float(np.max(np.abs(value)))), (key, err)
        changed += not np.array_equal(ours[key], base[key])
    per_module = 2 if form == "diffusers" else 1  # the diffusers file has up biases too
    assert changed == per_module * len(_modules(name == "i2v"))


def test_t2v_lora_on_i2v_leaves_the_image_branch_and_i2v_lora_on_t2v_is_refused(folders, tmp_path):
    i2v_before = _ours(folders["i2v"], _file(tmp_path, "comfyui", image=False), 0.0)
    i2v_after = _ours(folders["i2v"], _file(tmp_path, "comfyui", image=False), 1.0)
    for key in i2v_before:
        if ".add_" in key or key.startswith("image_embedder"):
            np.testing.assert_array_equal(i2v_after[key], i2v_before[key])
    with pytest.raises(ValueError, match="k_img"):
        _ours(folders["t2v"], _file(tmp_path, "comfyui", image=True), 1.0)


# ----------------------------------------------------------------------------- full deltas (.diff / .diff_b)


#: Original linear modules outside the blocks (diffusers reads their pairs without alpha).
EMBEDDERS = ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1")
#: Block linears given a weight delta instead of a pair (diffusers: applies the .diff_b, drops the .diff).
DIFF_ONLY = ("blocks.1.self_attn.o", "blocks.0.ffn.2", "blocks.1.cross_attn.k")


def _original_keys(image: bool) -> dict[str, bool]:
    """``{original parameter key: is a linear layer's}``: every parameter of Wan's original
    checkpoint for the tiny config (its modules as in Wan's own model definition)."""
    linears = [*_modules(image), *EMBEDDERS, "head.head", *(("img_emb.proj.1", "img_emb.proj.3") if image else ())]
    norms = [f"blocks.{i}.norm3" for i in range(T2V["num_layers"])] + (["img_emb.proj.0", "img_emb.proj.4"] if image
                                                                       else [])
    keys = {f"{m}.{p}": True for m in linears for p in ("weight", "bias")}
    keys |= {f"{m}.{p}": False for m in ("patch_embedding", *norms) for p in ("weight", "bias")}
    keys |= {"head.modulation": False} | {f"blocks.{i}.modulation": False for i in range(T2V["num_layers"])}
    for i in range(T2V["num_layers"]):
        rms = [f"{a}.norm_{x}" for a in ("self_attn", "cross_attn") for x in "qk"] + (["cross_attn.norm_k_img"] if image
                                                                                      else [])
        keys |= {f"blocks.{i}.{n}.weight": False for n in rms}
    return keys


def _diffusers_names(diffusers, keys) -> dict[str, str]:
    """``{original key: diffusers key}`` by diffusers' own checkpoint converter."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return {original: key for key, original in convert_wan_transformer_to_diffusers({k: k for k in keys}).items()}


def _reference_state(diffusers, folder) -> dict[str, np.ndarray]:
    model = diffusers.WanTransformer3DModel.from_pretrained(folder)
    return {key: value.float().numpy() for key, value in model.state_dict().items()}


def _delta_name(original: str) -> tuple[str, str]:
    """``(stem, suffix)`` of a parameter's full delta: ``<m>.weight`` → ``<m>.diff``,
    ``<m>.bias`` → ``<m>.diff_b``, a bare parameter ``<p>`` → ``<p>.diff``."""
    if original.endswith(".bias"):
        return original[: -len(".bias")], ".diff_b"
    return original.removesuffix(".weight"), ".diff"


def _comfyui_file(tmp_path, diffusers, folder, image, seed=1):
    """A ComfyUI file with every key kind: pairs (``.alpha`` in the blocks), a ``.diff_b`` for
    every linear layer, ``.diff`` for ``head.head`` and the :data:`DIFF_ONLY` linears (which
    have no pair), and ``.diff`` / ``.diff_b`` for every other parameter.  Returns ``(path,
    {diffusers key: Δ})`` for the full deltas."""
    rng = np.random.default_rng(seed)
    keys = _original_keys(image)
    names, state = _diffusers_names(diffusers, keys), _reference_state(diffusers, folder)
    assert set(names.values()) == set(state)  # the key list covers the model
    tensors, deltas = {}, {}
    blocks, paired = _modules(image), set(_modules(image)) | set(EMBEDDERS) | {"img_emb.proj.1", "img_emb.proj.3"}
    for original, linear in keys.items():
        stem, suffix = _delta_name(original)
        if linear and suffix == ".diff" and stem in paired - set(DIFF_ONLY):
            out, inp = state[names[original]].shape
            tensors[f"diffusion_model.{stem}.lora_A.weight"] = (0.3 * rng.standard_normal((4, inp))).astype(np.float32)
            tensors[f"diffusion_model.{stem}.lora_B.weight"] = (0.3 * rng.standard_normal((out, 4))).astype(np.float32)
            if stem in blocks:
                tensors[f"diffusion_model.{stem}.alpha"] = np.array(rng.choice([2.0, 8.0]), np.float32)
            continue
        delta = (0.3 * rng.standard_normal(state[names[original]].shape)).astype(np.float32)
        tensors[f"diffusion_model.{stem}{suffix}"] = deltas[names[original]] = delta
    return _save(tmp_path, "comfyui_full", tensors), deltas


def _dropped_by_diffusers(key: str) -> bool:
    """Full deltas diffusers drops: all but linear layers' biases and ``head.head``'s (``proj_out``) weight."""
    module = key.rsplit(".", 1)[0]
    found = weight_map.to_ours(f"{module}.weight")
    linear = found is not None and found[1] is LINEAR
    return not (linear and (key.endswith(".bias") or module == "proj_out"))


@pytest.mark.parametrize("name", ["t2v", "i2v"])
def test_comfyui_full_deltas_match_diffusers_where_it_applies_them(peft, diffusers, folders, tmp_path, name):
    """Pairs with ``.alpha`` plus ``.diff_b`` and ``.diff`` everywhere: every parameter changes;
    those diffusers changes match its fused weights, the rest (which it drops) are ``P + s·Δ``."""
    scale = 0.7
    file, deltas = _comfyui_file(tmp_path, diffusers, folders[name], image=name == "i2v")
    reference = _reference_state(diffusers, folders[name])
    model = load_wan_transformer(folders[name])
    before = _params(model)
    changed = merge_lora(model, weight_map, [(file, scale)], original=original_layout(model.config), what=WHAT)
    ours, theirs = _params(model), _theirs(diffusers, folders[name], file, scale)
    assert changed == len({key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key for key in reference})
    assert all(not np.array_equal(ours[path], before[path]) for path in theirs)  # nothing skipped
    dropped = {key for key in deltas if _dropped_by_diffusers(key)}
    assert len(dropped) > 10 and "blocks.1.attn1.to_out.0.weight" in dropped and "blocks.0.norm2.bias" in dropped
    for key, value in reference.items():
        path, transform = weight_map.to_ours(key)
        if key in dropped:
            np.testing.assert_array_equal(theirs[path], transform.apply(value))  # diffusers drops it
            expected = transform.apply(value + np.float32(scale) * deltas[key])
            np.testing.assert_array_equal(ours[path], expected, err_msg=key)  # P + s·Δ, rounded once
        else:
            err = float(np.max(np.abs(ours[path] - theirs[path])))
            assert err <= RTOL * max(1.0, float(np.max(np.abs(theirs[path])))), (key, err)


def _delta_file(tmp_path, diffusers, folder, image, form, seed=2):
    """Full deltas only, for every parameter, named in ``form``: ``comfyui``
    (``diffusion_model.<original>``), ``kohya`` (``lora_unet_<original with underscores>``) or
    ``diffusers`` (``transformer.<diffusers name>``).  Returns ``(path, {diffusers key: Δ})``."""
    rng = np.random.default_rng(seed)
    keys = _original_keys(image)
    names, state = _diffusers_names(diffusers, keys), _reference_state(diffusers, folder)
    tensors, deltas = {}, {}
    for original in keys:
        stem, suffix = _delta_name(names[original] if form == "diffusers" else original)
        prefix = {"comfyui": "diffusion_model.", "kohya": "lora_unet_", "diffusers": "transformer."}[form]
        stem = stem.replace(".", "_") if form == "kohya" else stem
        delta = (0.3 * rng.standard_normal(state[names[original]].shape)).astype(np.float32)
        tensors[f"{prefix}{stem}{suffix}"] = deltas[names[original]] = delta
    return _save(tmp_path, f"{form}_deltas", tensors), deltas


@pytest.mark.parametrize("name", ["t2v", "i2v"])
def test_full_deltas_alone_are_p_plus_s_delta_in_every_key_format(diffusers, folders, tmp_path, name):
    """``.diff`` / ``.diff_b`` alone — e.g. the text embedder's bias, on which diffusers fails,
    and the time projection's and image embedder's, which it drops — give ``P + s·Δ`` for
    every parameter, the same for ComfyUI, kohya and diffusers names."""
    scale = -1.3
    reference = _reference_state(diffusers, folders[name])
    merged = {}
    for form in ("comfyui", "kohya", "diffusers"):
        path, deltas = _delta_file(tmp_path, diffusers, folders[name], name == "i2v", form)
        merged[form] = _ours(folders[name], path, scale)
    assert set(deltas) == set(reference)
    for key, value in reference.items():
        path, transform = weight_map.to_ours(key)
        expected = transform.apply(value + np.float32(scale) * deltas[key])
        for form in merged:
            np.testing.assert_array_equal(merged[form][path], expected, err_msg=f"{form}: {key}")


def _refused(case):
    rng = np.random.default_rng(3)
    q = "diffusion_model.blocks.0.self_attn.q"
    pair = {f"{q}.lora_A.weight": rng.standard_normal((4, D)).astype(np.float32),
            f"{q}.lora_B.weight": rng.standard_normal((D, 4)).astype(np.float32)}
    good = {"diffusion_model.blocks.1.norm3.diff": np.ones(D, np.float32)}
    return good | {
        "norm delta of a wrong shape": {"diffusion_model.blocks.0.norm3.diff": np.ones(D + 1, np.float32)},
        "linear delta of a wrong shape": {f"{q}.diff": np.ones((D, D + 1), np.float32)},
        "linear bias delta of a wrong shape": {f"{q}.diff_b": np.ones((D, 1), np.float32)},
        "unknown module": {"diffusion_model.blocks.7.norm3.diff": np.ones(D, np.float32)},
        "unknown kohya module": {"lora_unet_blocks_0_norm9.diff_b": np.ones(D, np.float32)},
        "bias of a norm without bias": {"diffusion_model.blocks.0.self_attn.norm_q.diff_b": np.ones(D, np.float32)},
        "image key on a T2V model": {"diffusion_model.img_emb.proj.0.diff": np.ones(20, np.float32)},
        "not floating": {"diffusion_model.blocks.0.norm3.diff_b": np.ones(D, np.int32)},
        "pair and weight delta": pair | {f"{q}.diff": np.ones((D, D), np.float32)},
        "one parameter twice": {"diffusion_model.blocks.0.norm3.diff": np.ones(D, np.float32),
                                "transformer.blocks.0.norm2.diff": np.ones(D, np.float32)},
        "alpha with deltas only": {f"{q}.diff_b": np.ones(D, np.float32), f"{q}.alpha": np.array(4.0, np.float32)},
    }[case]


REFUSALS = {
    "norm delta of a wrong shape":
        "'diffusion_model.blocks.0.norm3.diff': the delta has shape (25,), but blocks.0.norm2.weight is (24,)",
    "linear delta of a wrong shape":
        "'diffusion_model.blocks.0.self_attn.q.diff': the delta has shape (24, 25), but blocks.0.attn1.to_q.weight is "
        "(24, 24)",
    "linear bias delta of a wrong shape":
        "'diffusion_model.blocks.0.self_attn.q.diff_b': shape (24, 1), expected (out,)",
    "unknown module": "full deltas naming no parameter of the Wan transformer ['diffusion_model.blocks.7.norm3.diff']",
    "unknown kohya module": "naming no parameter of the Wan transformer ['lora_unet_blocks_0_norm9.diff_b']",
    "bias of a norm without bias": "naming no parameter of the Wan transformer "
                                   "['diffusion_model.blocks.0.self_attn.norm_q.diff_b']",
    "image key on a T2V model": "naming no parameter of the Wan transformer ['diffusion_model.img_emb.proj.0.diff']",
    "not floating": "not float16, bfloat16, float32 or float64 (an alpha may be an integer) "
                    "['diffusion_model.blocks.0.norm3.diff_b' (int32)]",
    "pair and weight delta": "parameters given both a LoRA pair and a full delta in the file (ComfyUI would drop the "
                             "pair) ['blocks.0.attn1.to_q.weight' ('diffusion_model.blocks.0.self_attn.q.diff' and the "
                             "pair 'diffusion_model.blocks.0.self_attn.q')]",
    "one parameter twice": "parameters with more than one full delta in the file ['blocks.0.norm2.weight'",
    "alpha with deltas only": "incomplete pairs ['diffusion_model.blocks.0.self_attn.q': alpha without A and B]",
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_bad_full_delta_is_refused_by_name(folders, tmp_path, case):
    model = load_wan_transformer(folders["t2v"])
    before = _params(model)
    with pytest.raises(ValueError) as info:
        merge_lora(model, weight_map, [(_save(tmp_path, "bad", _refused(case)), 1.0)],
                   original=original_layout(model.config), what=WHAT)
    assert str(info.value).startswith("no LoRA merged into the Wan transformer, nothing changed:\n")
    assert REFUSALS[case] in str(info.value)
    after = _params(model)
    assert all(np.array_equal(after[key], before[key]) for key in before)
