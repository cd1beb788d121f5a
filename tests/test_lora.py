"""LoRA merging (:mod:`cfgzero_theory.ports.lora`, :meth:`SD3Pipeline.load_lora`) on a tiny random SD3 pipeline.

The pipeline (``cfgzero_theory.sd3.tiny.build_tiny_random_pipeline``) is saved once per
module; the LoRA files are random pairs for attention and MLP projections of both blocks and
the context embedder, written here in each key format.

Reference: diffusers' ``pipe.load_lora_weights(file)``, ``pipe.fuse_lora(lora_scale=s)`` and
``pipe.unload_lora_weights()`` (PEFT's merge, float32 on CPU; needs ``peft``).  Tolerance:
every transformer weight within ``1e-6 · max(1, max |W|)`` of diffusers' (observed: equal bit
for bit for one LoRA); the transformer output after :meth:`SD3Pipeline.load_lora` within
``1e-4 · max |output|`` (the transformer parity tests' bound).  Formats diffusers does not load
for SD3 (kohya ``lora_unet_*`` / ``lora_transformer_*``, and original-layout keys through a
test hook) must give exactly the weights of the same LoRA written as PEFT.  Full deltas
(ComfyUI's ``.diff`` / ``.diff_b``, which diffusers does not read for SD3) must give exactly
``P + s · Δ`` computed here in NumPy, rounded once with the pairs of the same parameter.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from cfgzero_theory.ports.lora import (
    OriginalLayout, linear_targets, lora_contents, lora_layers, merge_lora, param_targets,
)
from cfgzero_theory.sd3.pipeline import SD3Pipeline
from cfgzero_theory.sd3.weights import weight_map, load_sd3_transformer

WEIGHT_RTOL = 1e-6
OUTPUT_RTOL = 1e-4
WHAT = "SD3 transformer"
#: LoRA targets of the test files and their ranks (two ranks: PEFT's rank_pattern is exercised).
RANKS = {
    "transformer_blocks.0.attn.to_q": 4,
    "transformer_blocks.0.attn.add_v_proj": 4,
    "transformer_blocks.0.attn.to_out.0": 4,
    "transformer_blocks.1.ff.net.0.proj": 2,
    "transformer_blocks.0.ff_context.net.2": 4,
    "context_embedder": 4,
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(torch, diffusers, tmp_path_factory):
    """``(folder, {module: (out, in)})`` of a tiny random SD3 pipeline."""
    from cfgzero_theory.sd3.tiny import build_tiny_random_pipeline

    folder = tmp_path_factory.mktemp("sd3_lora")
    build_tiny_random_pipeline(folder, seed=0)
    targets = linear_targets(_transformer(folder), weight_map)
    return folder, {module: target.shape for module, target in targets.items()}


@pytest.fixture(scope="module")
def pipeline(tiny):
    """Our pipeline for the tests whose merges must fail (its weights never change)."""
    return SD3Pipeline.from_pretrained(tiny[0])


def _transformer(folder, dtype=None):
    return load_sd3_transformer(os.path.join(folder, "transformer"), dtype=dtype)


def _params(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, path)): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model))}


def _pairs(shapes, seed, ranks=RANKS, dtype=np.float32):
    """``{module: (A (r, in), B (out, r))}``, entries ``0.3·N(0, 1)``."""
    rng = np.random.default_rng(seed)
    pairs = {}
    for module, rank in ranks.items():
        out, inp = shapes[module]
        pairs[module] = tuple((0.3 * rng.standard_normal(shape)).astype(dtype) for shape in ((rank, inp), (out, rank)))
    return pairs


def _save(folder, name, tensors, metadata=None):
    path = os.path.join(folder, f"{name}.safetensors")
    save_file(tensors, path, metadata=metadata)
    return path


def _peft_metadata(pairs, alpha, alpha_pattern=None):
    """diffusers' ``lora_adapter_metadata``: PEFT's LoraConfig with the file's ranks."""
    ranks = {module: down.shape[0] for module, (down, _) in pairs.items()}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(pairs),
              "rank_pattern": {f"^{m}": r for m, r in ranks.items() if r != rank}, "alpha_pattern": alpha_pattern or {}}
    return {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}


def _peft_file(folder, name, pairs, *, alpha=None, alpha_pattern=None, biases=None, suffixes=("lora_A", "lora_B")):
    tensors = {}
    for module, (down, up) in pairs.items():
        tensors[f"transformer.{module}.{suffixes[0]}.weight"] = down
        tensors[f"transformer.{module}.{suffixes[1]}.weight"] = up
        if biases is not None:
            tensors[f"transformer.{module}.lora_B.bias"] = biases[module]
    metadata = None if alpha is None else _peft_metadata(pairs, alpha, alpha_pattern)
    return _save(folder, name, tensors, metadata)


def _kohya_file(folder, name, pairs, alpha, prefix="lora_unet_"):
    tensors = {}
    for module, (down, up) in pairs.items():
        stem = prefix + module.replace(".", "_")
        tensors.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                        f"{stem}.alpha": np.asarray(alpha, np.float32)})
    return _save(folder, name, tensors)


def _diffusers_merged(folder, loras) -> dict[str, np.ndarray]:
    """diffusers' transformer weights after loading and fusing ``loras`` (``[(path, scale)]``)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    names = [f"lora{k}" for k in range(len(loras))]
    for (path, _), name in zip(loras, names):
        pipe.load_lora_weights(path, adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    pipe.fuse_lora(components=["transformer"])
    pipe.unload_lora_weights()
    return {key: value.detach().numpy() for key, value in pipe.transformer.state_dict().items()}


def _assert_matches_diffusers(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray]):
    assert len(reference) == len(ours)
    for key, value in reference.items():
        path, transform = weight_map.to_ours(key)
        expected = transform.apply(value)
        err = float(np.max(np.abs(ours[path] - expected)))
        assert err <= WEIGHT_RTOL * max(1.0, float(np.max(np.abs(expected)))), (key, err)


def _changed(before, after) -> set[str]:
    return {path for path in before if not np.array_equal(before[path], after[path])}


def _kernel_paths(modules):
    return {weight_map.to_ours(f"{module}.weight")[0] for module in modules}


# ----------------------------------------------------------------------------- parity with diffusers


@pytest.mark.parity
@pytest.mark.parametrize("case, scale", [("no_alpha", 1.0), ("alpha_metadata", 0.7), ("up_bias", -1.5),
                                         ("old_diffusers_keys", 0.5)])
def test_peft_file_matches_diffusers(peft, tiny, tmp_path, case, scale):
    folder, shapes = tiny
    pairs, rng = _pairs(shapes, seed=1), np.random.default_rng(2)
    options = {
        "no_alpha": {},
        "alpha_metadata": dict(alpha=8, alpha_pattern={"to_out.0": 3}),
        "up_bias": dict(biases={m: (0.2 * rng.standard_normal(shapes[m][0])).astype(np.float32) for m in pairs}),
        "old_diffusers_keys": dict(suffixes=("lora.down", "lora.up")),
    }[case]
    path = _peft_file(tmp_path, case, pairs, **options)
    model = _transformer(folder)
    before = _params(model)
    assert merge_lora(model, weight_map, [(path, scale)], what=WHAT) == len(RANKS)
    after = _params(model)
    _assert_matches_diffusers(after, _diffusers_merged(folder, [(path, scale)]))
    biases = {weight_map.to_ours(f"{m}.bias")[0] for m in RANKS} if case == "up_bias" else set()
    changed = _kernel_paths(RANKS) | biases
    assert _changed(before, after) == changed


@pytest.mark.parity
def test_two_loras_with_separate_scales_match_diffusers(peft, tiny, tmp_path):
    folder, shapes = tiny
    first = _peft_file(tmp_path, "first", _pairs(shapes, seed=3), alpha=2)
    second_ranks = {"transformer_blocks.0.attn.to_q": 3, "transformer_blocks.1.attn.to_k": 3}
    second = _peft_file(tmp_path, "second", _pairs(shapes, seed=4, ranks=second_ranks))
    loras = [(first, 0.6), (second, -1.2)]
    reference = _diffusers_merged(folder, loras)

    together = _transformer(folder)
    assert merge_lora(together, weight_map, loras, what=WHAT) == len(RANKS) + 1  # to_q is in both
    _assert_matches_diffusers(_params(together), reference)

    pipe = SD3Pipeline.from_pretrained(folder)
    assert [pipe.load_lora(path, scale=scale) for path, scale in loras] == [len(RANKS), 2]
    _assert_matches_diffusers(_params(pipe.transformer), reference)  # one rounding per call: still within 1e-6


@pytest.mark.parity
def test_load_lora_output_matches_diffusers_without_recompiling(peft, torch, tiny, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    folder, shapes = tiny
    path = _peft_file(tmp_path, "lora", _pairs(shapes, seed=5), alpha=8)
    g = torch.Generator().manual_seed(0)
    x, context, pooled = (torch.randn(shape, generator=g) for shape in ((2, 16, 8, 8), (2, 7, 32), (2, 24)))
    timestep = torch.tensor([999.0, 312.5])
    reference = StableDiffusion3Pipeline.from_pretrained(folder)
    reference.load_lora_weights(path)
    reference.fuse_lora(lora_scale=0.8)
    with torch.no_grad():
        expected = reference.transformer(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                                         timestep=timestep).sample.numpy()

    pipe = SD3Pipeline.from_pretrained(folder)
    model_fn = jax.jit(pipe.model_fn)  # as the sampling loop calls it: the weights are an input

    def output():
        args = (jnp.asarray(x.numpy()), None, jnp.asarray(timestep.numpy()), (jnp.asarray(context.numpy()),
                                                                                jnp.asarray(pooled.numpy())))
        return np.asarray(model_fn(nnx.state(pipe.transformer), *args))

    before = output()
    assert pipe.load_lora(path, scale=0.8) == len(RANKS)
    after = output()
    assert model_fn._cache_size() == 1  # same shapes, dtypes and placement: no recompilation
    scale = float(np.max(np.abs(expected)))
    assert float(np.max(np.abs(after - expected))) <= OUTPUT_RTOL * scale
    assert float(np.max(np.abs(before - expected))) > 100 * OUTPUT_RTOL * scale  # the LoRA changed the output


# ----------------------------------------------------------------------------- formats diffusers cannot load for SD3


def _merged(folder, path, scale, original=None):
    model = _transformer(folder)
    merge_lora(model, weight_map, [(path, scale)], original=original, what=WHAT)
    return _params(model)


@pytest.mark.parametrize("prefix", ["lora_unet_", "lora_transformer_"])
def test_kohya_file_equals_peft_file(tiny, tmp_path, prefix):
    """Underscored names resolve to the right modules (``to_out_0`` → ``to_out.0``,
    ``ff_context_net_2`` → ``ff_context.net.2``); ``.alpha`` is the metadata's ``lora_alpha``."""
    folder, shapes = tiny
    pairs = _pairs(shapes, seed=6)
    kohya = _merged(folder, _kohya_file(tmp_path, "kohya", pairs, alpha=2.0, prefix=prefix), 0.9)
    peft_format = _merged(folder, _peft_file(tmp_path, "peft", pairs, alpha=2), 0.9)
    assert _changed(peft_format, kohya) == set()
    assert _changed(_params(_transformer(folder)), kohya) == _kernel_paths(RANKS)


def _sai_qkv_layout(num_layers):
    """A test hook: SD3's original (SAI) fused ``joint_blocks.{i}.x_block.attn.qkv`` split into
    diffusers' ``to_q`` / ``to_k`` / ``to_v`` (``B`` and ``β`` in three row blocks, ``A`` shared)."""
    modules = frozenset(f"joint_blocks.{i}.x_block.attn.qkv" for i in range(num_layers))

    def to_diffusers(layer):
        block = layer.module.split(".")[1]
        width = layer.up.shape[0] // 3
        rows = [slice(k * width, (k + 1) * width) for k in range(3)]
        return [layer._replace(module=f"transformer_blocks.{block}.attn.to_{x}", up=layer.up[rows[k]],
                               up_bias=None if layer.up_bias is None else layer.up_bias[rows[k]])
                for k, x in enumerate("qkv")]

    return OriginalLayout(modules, to_diffusers)


@pytest.mark.parametrize("form", ["bfl", "kohya"])
def test_original_layout_hook_splits_a_fused_projection(tiny, tmp_path, form):
    folder, shapes = tiny
    rng = np.random.default_rng(7)
    down = (0.3 * rng.standard_normal((4, 16))).astype(np.float32)
    up = (0.3 * rng.standard_normal((48, 4))).astype(np.float32)
    stem = {"bfl": "diffusion_model.joint_blocks.1.x_block.attn.qkv",
            "kohya": "lora_unet_joint_blocks_1_x_block_attn_qkv"}[form]
    suffixes = ("lora_A", "lora_B") if form == "bfl" else ("lora_down", "lora_up")
    fused = _save(tmp_path, "fused", {f"{stem}.{suffixes[0]}.weight": down, f"{stem}.{suffixes[1]}.weight": up,
                                      f"{stem}.alpha": np.asarray(3.0, np.float32)})
    split = {f"transformer_blocks.1.attn.to_{x}": (down, up[16 * k:16 * (k + 1)]) for k, x in enumerate("qkv")}
    layout = _sai_qkv_layout(2)
    assert _changed(_merged(folder, _peft_file(tmp_path, "split", split, alpha=3), 1.1),
                    _merged(folder, fused, 1.1, original=layout)) == set()
    assert [layer.module for layer in lora_layers(fused, linear_targets(_transformer(folder), weight_map),
                                                  original=layout)] == list(split)


#: Full deltas of the test files: diffusers key -> the suffix-less name it is written with.
DELTAS = {
    "transformer_blocks.0.attn.to_q.weight": "transformer_blocks.0.attn.to_q",  # a linear weight
    "transformer_blocks.0.attn.to_q.bias": "transformer_blocks.0.attn.to_q",
    "norm_out.linear.bias": "norm_out.linear",
    "pos_embed.proj.weight": "pos_embed.proj",  # a patch convolution (another transform)
    "pos_embed.proj.bias": "pos_embed.proj",
    "pos_embed.pos_embed": "pos_embed.pos_embed",  # a bare parameter
}


def _deltas(shapes, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {key: (0.3 * rng.standard_normal(shapes[key])).astype(dtype) for key in DELTAS}


def _delta_file(folder, name, deltas, form, extra=None):
    """``deltas`` as ``.diff`` / ``.diff_b`` keys: ``peft`` (``transformer.<name>``) or ``kohya``
    (``lora_unet_<name with underscores>``)."""
    tensors = dict(extra or {})
    for key, delta in deltas.items():
        stem = f"transformer.{DELTAS[key]}" if form == "peft" else "lora_unet_" + DELTAS[key].replace(".", "_")
        tensors[f"{stem}.diff_b" if key.endswith(".bias") else f"{stem}.diff"] = delta
    return _save(folder, name, tensors)


def _stored(folder) -> dict[str, np.ndarray]:
    """The transformer's weights as stored (diffusers keys and layout)."""
    from safetensors.numpy import load_file

    return load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("form", ["peft", "kohya"])
def test_full_deltas_add_s_delta_to_any_parameter(tiny, tmp_path, form):
    """``P' = P + s·Δ`` for linear weights and biases, a convolution and a bare parameter, next
    to a pair in the same file (Δ scaled by neither the file's α nor a rank)."""
    folder, shapes = tiny
    stored = _stored(folder)
    deltas = _deltas({key: stored[key].shape for key in DELTAS}, seed=13)
    a, b = _pairs(shapes, seed=14)["transformer_blocks.1.ff.net.0.proj"]
    stem = "transformer.transformer_blocks.1.ff.net.0.proj"
    pair = {f"{stem}.lora_A.weight": a, f"{stem}.lora_B.weight": b, f"{stem}.alpha": np.asarray(1.0, np.float32)}
    path = _delta_file(tmp_path, form, deltas, form, extra=pair)
    model = _transformer(folder)
    before = _params(model)
    assert merge_lora(model, weight_map, [(path, 0.6)], what=WHAT) == 5  # to_q, norm_out, pos_embed(.proj), ff
    after = _params(model)
    assert _changed(before, after) == {weight_map.to_ours(key)[0] for key in DELTAS} | \
        _kernel_paths(["transformer_blocks.1.ff.net.0.proj"])
    for key, delta in deltas.items():
        ours, transform = weight_map.to_ours(key)
        np.testing.assert_array_equal(after[ours], transform.apply(stored[key] + np.float32(0.6) * delta), err_msg=key)
    layers, found = lora_contents(path, linear_targets(model, weight_map), param_targets(model, weight_map), what=WHAT)
    assert [layer.module for layer in layers] == ["transformer_blocks.1.ff.net.0.proj"]
    assert {delta.key for delta in found} == set(DELTAS)


def test_full_deltas_of_an_original_module_go_through_the_hook(tiny, tmp_path):
    """A fused original projection's ``.diff`` / ``.diff_b`` are cut like its pair's ``B`` / ``β``
    (``B = Δ``, ``A = I``): the same weights as the three diffusers modules' deltas."""
    folder, _ = tiny
    rng = np.random.default_rng(15)
    diff, diff_b = (0.3 * rng.standard_normal((48, 16))).astype(np.float32), rng.standard_normal(48).astype(np.float32)
    fused = {"diffusion_model.joint_blocks.1.x_block.attn.qkv.diff": diff,
             "lora_unet_joint_blocks_1_x_block_attn_qkv.diff_b": diff_b}  # ComfyUI and kohya names alike
    split = {}
    for k, x in enumerate("qkv"):
        split[f"transformer_blocks.1.attn.to_{x}.diff"] = diff[16 * k:16 * (k + 1)]
        split[f"transformer_blocks.1.attn.to_{x}.diff_b"] = diff_b[16 * k:16 * (k + 1)]
    layout = _sai_qkv_layout(2)
    ours = _merged(folder, _save(tmp_path, "fused", fused), -0.4, original=layout)
    assert _changed(_merged(folder, _save(tmp_path, "split", split), -0.4), ours) == set()
    assert len(_changed(_params(_transformer(folder)), ours)) == 6

    changes_a = OriginalLayout(layout.modules, lambda layer: [piece._replace(down=piece.down[:, :8])
                                                               for piece in layout.to_diffusers(layer)])
    with pytest.raises(ValueError, match=r"full deltas that the SD3 transformer's original-layout conversion cannot "
                                         r"carry \(it changes A or drops the bias\) "
                                         r"\['diffusion_model.joint_blocks.1.x_block.attn.qkv'"):
        _merged(folder, _save(tmp_path, "fused", fused), 1.0, original=changes_a)


def test_bf16_pairs_and_full_deltas_of_one_parameter_round_once(tiny, tmp_path):
    """Two files in one call — a pair and a ``.diff`` for ``to_q``, an up bias and a ``.diff_b``
    for its bias — give ``bf16(f32(P) + f32(s₁·f·B A) + f32(s₂·Δ))``."""
    folder, shapes = tiny
    module = "transformer_blocks.0.attn.to_q"
    down, up = _pairs(shapes, seed=16, ranks={module: 4}, dtype=ml_dtypes.bfloat16)[module]
    rng = np.random.default_rng(17)
    beta, diff, diff_b = (rng.standard_normal(shape).astype(ml_dtypes.bfloat16) for shape in ((16,), (16, 16), (16,)))
    first = _save(tmp_path, "pair", {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up,
                                     f"{module}.lora_B.bias": beta, f"{module}.alpha": np.asarray(2.0, np.float32)})
    second = _save(tmp_path, "deltas", {f"transformer.{module}.diff": diff, f"{module}.diff_b": diff_b})
    model = _transformer(folder, dtype=jnp.bfloat16)
    before = _params(model)
    assert merge_lora(model, weight_map, [(first, 0.3), (second, -0.7)], what=WHAT) == 1
    after = _params(model)
    f32 = np.float32
    for key, terms in ((f"{module}.weight", [f32(0.3 * 2 / 4) * (up.astype(f32) @ down.astype(f32)),
                                             f32(-0.7) * diff.astype(f32)]),
                       (f"{module}.bias", [f32(0.3 * 2 / 4) * beta.astype(f32), f32(-0.7) * diff_b.astype(f32)])):
        ours, transform = weight_map.to_ours(key)
        expected = (before[ours].astype(f32) + transform.apply(terms[0] + terms[1])).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(after[ours], expected, err_msg=key)
        twice = (before[ours].astype(f32) + transform.apply(terms[0]).astype(ml_dtypes.bfloat16).astype(f32))
        twice = (twice.astype(ml_dtypes.bfloat16).astype(f32) + transform.apply(terms[1])).astype(ml_dtypes.bfloat16)
        assert np.any(twice != expected)  # the test tells one rounding from one per file


#: Run with four fake CPU devices: merge into a transformer split over them and into an unsplit one.
SHARDED = textwrap.dedent("""
    import sys
    import numpy as np
    from flax import nnx
    from cfgzero_theory.ports.lora import merge_lora
    from cfgzero_theory.ports.sharding import mesh_sharding
    from cfgzero_theory.sd3.weights import weight_map, load_sd3_transformer

    folder, lora = sys.argv[1:]
    plain, split = load_sd3_transformer(folder), load_sd3_transformer(folder, sharding=mesh_sharding(min_size=1))
    layout = {path: var.get_value().sharding for path, var in nnx.to_flat_state(nnx.state(split))}
    assert sum(not sharding.is_fully_replicated for sharding in layout.values()) > 20
    assert merge_lora(plain, weight_map, [(lora, 0.7)]) == merge_lora(split, weight_map, [(lora, 0.7)]) == 6
    merged = dict(nnx.to_flat_state(nnx.state(split)))
    for path, var in nnx.to_flat_state(nnx.state(plain)):
        assert merged[path].get_value().sharding == layout[path], path
        np.testing.assert_array_equal(np.asarray(merged[path].get_value()), np.asarray(var.get_value()))
    print("OK")
""")


def test_sharded_weights_keep_their_layout(tiny, tmp_path):
    folder, shapes = tiny
    path = _peft_file(tmp_path, "lora", _pairs(shapes, seed=11), alpha=8)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", SHARDED, os.path.join(folder, "transformer"), path], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split()[-1:] == ["OK"], done.stderr[-4000:]


# ----------------------------------------------------------------------------- refusals


def _good(shapes):
    return {f"transformer.{m}.{s}.weight": t for m, (a, b) in _pairs(shapes, seed=8).items()
            for s, t in (("lora_A", a), ("lora_B", b))}


def _bad_tensors(case, shapes):
    """``(extra tensors, metadata)`` that spoil an otherwise good file, for each refusal."""
    a, b = _pairs(shapes, seed=9, ranks={"transformer_blocks.1.attn.to_k": 4})["transformer_blocks.1.attn.to_k"]
    q, sai = "transformer.transformer_blocks.1.attn.to_q", "diffusion_model.joint_blocks.0.x_block.attn.qkv"
    return {
        "unknown key": ({f"{q}.lora_magnitude_vector": a[0]}, None),
        "missing module": ({"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": a,
                            "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": b}, None),
        "A without B": ({f"{q}.lora_A.weight": a}, None),
        "wrong shape": ({f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": np.zeros((17, 4), np.float32)}, None),
        "rank mismatch": ({f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": b[:, :3]}, None),
        "alpha not a number": ({f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": b, f"{q}.alpha": a}, None),
        "not floating": ({f"{q}.lora_A.weight": a.astype(np.int32), f"{q}.lora_B.weight": b}, None),
        "given twice": ({f"{q}.lora_A.weight": a, f"{q}.lora_down.weight": a, f"{q}.lora_B.weight": b}, None),
        "two pairs for a layer": ({f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": b,
                                   "transformer_blocks.1.attn.to_q.lora_A.weight": a,
                                   "transformer_blocks.1.attn.to_q.lora_B.weight": b}, None),
        "kohya name of a norm": ({"lora_unet_transformer_blocks_0_attn_norm_q.lora_down.weight": a[:, :8],
                                  "lora_unet_transformer_blocks_0_attn_norm_q.lora_up.weight": b[:8]}, None),
        "original layout": ({f"{sai}.lora_A.weight": a, f"{sai}.lora_B.weight": np.tile(b, (3, 1))}, None),
        "delta naming no parameter": ({"transformer.transformer_blocks.0.attn.norm_q.diff": a[0]}, None),
        "delta of a wrong shape": ({"transformer.pos_embed.proj.diff": np.zeros((16, 16, 3, 3), np.float32)}, None),
        "delta without a hook": ({f"{sai}.diff_b": np.zeros(48, np.float32)}, None),
        "pair and bias delta": ({f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": b, f"{q}.lora_B.bias": b[:, 0],
                                 f"{q}.diff_b": b[:, 0]}, None),
        "delta not floating": ({"transformer.pos_embed.pos_embed.diff": np.zeros((1, 256, 16), np.int64)}, None),
        "metadata rank": ({}, {"lora_adapter_metadata": json.dumps({"transformer.r": 8, "transformer.lora_alpha": 8})}),
        "DoRA": ({}, {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.use_dora": True})}),
    }[case]


MESSAGES = {
    "unknown key": ".lora_B.bias, .alpha) ['transformer.transformer_blocks.1.attn.to_q.lora_magnitude_vector']",
    "missing module": "no linear layer of the SD3 transformer ['transformer.transformer_blocks.7.attn.to_q']",
    "A without B": "incomplete pairs ['transformer.transformer_blocks.1.attn.to_q': A without B]",
    "wrong shape": "B A is (17, 16), but transformer_blocks.1.attn.to_q.weight is (16, 16)",
    "rank mismatch": "A (4, 16) and B (16, 3) are not (r, in) and (out, r)",
    "alpha not a number": "alpha must be one finite number, got shape (4, 16)",
    "not floating": "tensors that are not float16, bfloat16, float32 or float64",
    "given twice": "pairs given twice ['transformer.transformer_blocks.1.attn.to_q' (A)]",
    "two pairs for a layer": "layers with more than one pair in the file ['transformer_blocks.1.attn.to_q']",
    "kohya name of a norm": "no linear layer of the SD3 transformer ['lora_unet_transformer_blocks_0_attn_norm_q']",
    "original layout": "original-layout pairs (diffusion_model.*), which the SD3 transformer has no conversion for",
    "delta naming no parameter": "full deltas naming no parameter of the SD3 transformer "
                                 "['transformer.transformer_blocks.0.attn.norm_q.diff']",
    "delta of a wrong shape": "'transformer.pos_embed.proj.diff': the delta has shape (16, 16, 3, 3), but "
                              "pos_embed.proj.weight is (16, 16, 2, 2)",
    "delta without a hook": "original-layout full deltas (diffusion_model.*), which the SD3 transformer has no "
                            "conversion for ['diffusion_model.joint_blocks.0.x_block.attn.qkv.diff_b']",
    "pair and bias delta": "['transformer_blocks.1.attn.to_q.bias' "
                           "('transformer.transformer_blocks.1.attn.to_q.diff_b' and the pair "
                           "'transformer.transformer_blocks.1.attn.to_q')]",
    "delta not floating": "(an alpha may be an integer) ['transformer.pos_embed.pos_embed.diff' (int64)]",
    "metadata rank": "the metadata gives rank 8, A has 4 rows",
    "DoRA": "use_dora (DoRA is not supported)",
}


@pytest.mark.parametrize("case", list(MESSAGES))
def test_a_file_that_does_not_fit_is_refused_whole(tiny, pipeline, tmp_path, case):
    folder, shapes = tiny
    extra, metadata = _bad_tensors(case, shapes)
    path = _save(tmp_path, "bad", {**_good(shapes), **extra}, metadata)
    before = _params(pipeline.transformer)
    with pytest.raises(ValueError) as info:
        pipeline.load_lora(path)
    message = str(info.value)
    assert message.startswith(f"no LoRA merged into the SD3 transformer, nothing changed:\n{path}: ")
    assert MESSAGES[case] in message
    assert _changed(before, _params(pipeline.transformer)) == set()


def test_a_bad_file_stops_every_file_of_the_call(tiny, pipeline, tmp_path):
    folder, shapes = tiny
    good = _save(tmp_path, "good", _good(shapes))
    extra, _ = _bad_tensors("A without B", shapes)
    bad = _save(tmp_path, "bad", extra)
    before = _params(pipeline.transformer)
    with pytest.raises(ValueError, match="A without B") as info:
        merge_lora(pipeline.transformer, weight_map, [(good, 1.0), (bad, 0.5)], what=WHAT)
    assert good not in str(info.value)  # only the bad file is named
    assert _changed(before, _params(pipeline.transformer)) == set()


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), True, "1", None, 1j])
def test_scale_must_be_a_finite_real_number(tiny, pipeline, tmp_path, scale):
    path = _save(tmp_path, "good", _good(tiny[1]))
    with pytest.raises(ValueError, match="^scale must be a finite number"):
        pipeline.load_lora(path, scale=scale)


def test_an_ambiguous_kohya_name_is_refused(tiny, tmp_path):
    folder, shapes = tiny
    # an original module whose underscored name is also that of transformer_blocks.0.attn.to_q
    layout = OriginalLayout(frozenset({"transformer_blocks.0.attn_to.q"}), lambda layer: [layer])
    path = _kohya_file(tmp_path, "kohya", _pairs(shapes, seed=12, ranks={"transformer_blocks.0.attn.to_q": 4}), 4.0)
    with pytest.raises(ValueError, match=r"kohya names that several module names of the SD3 transformer write alike "
                                         r"\['lora_unet_transformer_blocks_0_attn_to_q'\]"):
        merge_lora(_transformer(folder), weight_map, [(path, 1.0)], original=layout, what=WHAT)


def test_loras_must_be_path_scale_pairs(tiny, pipeline, tmp_path):
    path = _save(tmp_path, "good", _good(tiny[1]))
    for loras in (path, [path], [(path, 1.0, 2.0)]):
        with pytest.raises(ValueError, match="loras must be a sequence of \\(path, scale\\) pairs"):
            merge_lora(pipeline.transformer, weight_map, loras)


def test_unreadable_and_missing_files(pipeline, tmp_path):
    pickled = tmp_path / "lora.bin"
    pickled.write_bytes(b"\x80\x04\x95not safetensors")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        pipeline.load_lora(pickled)
    with pytest.raises(FileNotFoundError, match="no such LoRA file"):
        pipeline.load_lora(tmp_path / "absent.safetensors")


# ----------------------------------------------------------------------------- bf16


def test_bf16_weights_merge_in_float32_and_round_once(tiny, tmp_path):
    """``W' = bf16(f32(W) + f32(s · α/r · B A))``: one rounding, not bf16(W + bf16(ΔW)) as a
    merge in the weights' dtype would give; the LoRA itself is stored in bf16 here."""
    folder, shapes = tiny
    pairs = _pairs(shapes, seed=10, dtype=ml_dtypes.bfloat16)
    scale, alpha = 0.37, 3
    model = _transformer(folder, dtype=jnp.bfloat16)
    before = _params(model)
    merge_lora(model, weight_map, [(_kohya_file(tmp_path, "kohya", pairs, alpha), scale)], what=WHAT)
    after = _params(model)
    assert {value.dtype for value in after.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert _changed(before, after) == _kernel_paths(RANKS)
    rounded_twice = 0
    for module, (down, up) in pairs.items():
        path = weight_map.to_ours(f"{module}.weight")[0]
        factor = np.float32(scale * (alpha / down.shape[0]))
        delta = (factor * (up.astype(np.float32) @ down.astype(np.float32))).T
        weight = before[path].astype(np.float32)
        expected = (weight + delta).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(after[path], expected)
        rounded_twice += int(np.sum((weight + delta.astype(ml_dtypes.bfloat16).astype(np.float32))
                                    .astype(ml_dtypes.bfloat16) != expected))
    assert rounded_twice > 0  # the test tells one rounding from two
