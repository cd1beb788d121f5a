"""Parity of :mod:`cfgzero_theory.ports.clip` with ``transformers.CLIPTextModelWithProjection``.

Tiny random text towers in the two SD3 flavours — CLIP-L-like (``quick_gelu``, the legacy
``eos_token_id=2``: pooled at ``argmax(input_ids)``) and bigG-like (``gelu``, a real
``eos_token_id``: pooled at its first occurrence) — are built with ``torch.manual_seed``, every
parameter perturbed by ``0.2·N(0, 1)`` (LayerNorms start at 1 / 0, which would hide mapping
mistakes), saved with ``save_pretrained(safe_serialization=True)`` and loaded with our loader.

Tolerance (float32, CPU): ``max |ours − transformers| ≤ 1e-4 · max(1, max |transformers|)``
for every hidden state (the penultimate one being SD3's prompt embeddings) and for
``text_embeds``; observed ≤ 4.5e-6 absolute on outputs of scale 1–12 (≲ 5e-7 relative).

The vision tower (Wan2.1's ``image_encoder/``) is checked the same way against tiny random
``transformers.CLIPVisionModel`` and ``CLIPVisionModelWithProjection`` (``gelu`` and
``quick_gelu``; 32² images in 8² patches: 17 tokens) on random pixel values: every hidden state,
the default output ``hidden_states[-2]``, the ``pooler_output`` and ``image_embeds``, within the
same tolerance; observed ≤ 6.7e-6 absolute on hidden states of scale 4–11, ≤ 2.3e-6 on the
pooled outputs and ≤ 1.6e-6 on ``image_embeds`` (scale 2–3).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from text_encoder_helpers import assert_close as _close
from text_encoder_helpers import perturbed, saved_tensors, write_folder

from cfgzero_theory.ports.clip import (
    CLIPTextConfig, CLIPTextEncoder, CLIPVisionConfig, CLIPVisionEncoder, load_clip_text_encoder,
    load_clip_vision_encoder,
)

pytestmark = pytest.mark.parity

VOCAB = 99
TINY = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=37, projection_dim=24, num_hidden_layers=3,
    num_attention_heads=4, max_position_embeddings=16, layer_norm_eps=1e-5,
)
VARIANTS = {
    # SD3's text_encoder/ (CLIP ViT-L): quick_gelu and the legacy eos id 2 (pool at the largest id)
    "clip_l": dict(hidden_act="quick_gelu", eos_token_id=2, bos_token_id=VOCAB - 2, pad_token_id=VOCAB - 1),
    # SD3's text_encoder_2/ (OpenCLIP bigG): gelu, pool at the first eos token — here not the
    # largest id (the bos is larger), so the two pooling rules disagree
    "clip_g": dict(hidden_act="gelu", eos_token_id=VOCAB - 3, bos_token_id=VOCAB - 2, pad_token_id=0),
}
EOS = {"clip_l": VOCAB - 1, "clip_g": VOCAB - 3}  # the end-of-text id the "tokenizer" writes


def _reference(torch, variant, seed=0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(**TINY, **VARIANTS[variant])
    return perturbed(torch, transformers.CLIPTextModelWithProjection(config))


def _token_ids(variant, batch=3, tokens=12, seed=1):
    """Random ids below the special ones, a bos first and an eos at a different place in each
    row, then padding (CLIP-L's tokenizer pads with the eos id itself: a second eos)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB - 3, (batch, tokens))
    ids[:, 0] = VOCAB - 2
    pad = VARIANTS[variant]["pad_token_id"]
    for row, end in enumerate([5, tokens - 1, 3][:batch]):
        ids[row, end] = EOS[variant]
        ids[row, end + 1:] = pad
    return ids


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hidden_states_and_text_embeds_match_transformers(torch, diffusers, tmp_path, variant):
    model = _reference(torch, variant)
    model.save_pretrained(tmp_path / "text_encoder", safe_serialization=True)
    ours = load_clip_text_encoder(tmp_path / "text_encoder")
    assert isinstance(ours, CLIPTextEncoder)
    assert ours.config == CLIPTextConfig(
        **TINY, hidden_act=VARIANTS[variant]["hidden_act"], eos_token_id=VARIANTS[variant]["eos_token_id"],
    )

    ids = _token_ids(variant)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), output_hidden_states=True)
    assert len(ref.hidden_states) == TINY["num_hidden_layers"] + 1

    penultimate, text_embeds = ours(jnp.asarray(ids))
    _close(penultimate, ref.hidden_states[-2])  # SD3's prompt embeddings (clip_skip=None)
    _close(text_embeds, ref.text_embeds)  # SD3's pooled embeddings
    assert np.abs(ref.text_embeds.numpy()).max() > 0.5

    everything, text_embeds_again = ours(jnp.asarray(ids), output_hidden_states=True)
    assert len(everything) == len(ref.hidden_states)
    for mine, theirs in zip(everything, ref.hidden_states):
        _close(mine, theirs)
    np.testing.assert_array_equal(np.asarray(text_embeds_again), np.asarray(text_embeds))
    skipped, _ = ours(jnp.asarray(ids), clip_skip=1)
    _close(skipped, ref.hidden_states[-3])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_clip_text_model_without_projection_matches_pooler_output(torch, diffusers, tmp_path, variant):
    """Flux's ``text_encoder/``: a ``CLIPTextModel``, whose pooled embedding is ``pooler_output``."""
    import transformers

    torch.manual_seed(0)
    model = perturbed(torch, transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY, **VARIANTS[variant])))
    model.save_pretrained(tmp_path / "text_encoder", safe_serialization=True)
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        load_clip_text_encoder(tmp_path / "text_encoder")
    ours = load_clip_text_encoder(tmp_path / "text_encoder", architecture="CLIPTextModel")
    assert ours.config.with_projection is False and ours.text_projection is None
    ids = _token_ids(variant)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), output_hidden_states=True)
    penultimate, pooled = ours(jnp.asarray(ids))
    _close(pooled, ref.pooler_output)
    _close(penultimate, ref.hidden_states[-2])
    with pytest.raises(ValueError, match="architecture must be one of"):
        load_clip_text_encoder(tmp_path / "text_encoder", architecture="CLIPVisionModel")


def test_pool_position_follows_eos_rule(torch, diffusers):
    """Legacy eos id 2: the (first) largest id; otherwise the first eos, not a later one used as padding."""
    legacy = CLIPTextEncoder(CLIPTextConfig(**TINY, eos_token_id=2), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(legacy.pool_index(jnp.asarray(_token_ids("clip_l")))), [5, 11, 3])
    np.testing.assert_array_equal(np.asarray(legacy.pool_index(jnp.asarray(_token_ids("clip_g")))), [0, 0, 0])
    first = CLIPTextEncoder(CLIPTextConfig(**TINY, eos_token_id=VOCAB - 1), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(first.pool_index(jnp.asarray(_token_ids("clip_l")))), [5, 11, 3])
    first = CLIPTextEncoder(CLIPTextConfig(**TINY, eos_token_id=VOCAB - 3), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(first.pool_index(jnp.asarray(_token_ids("clip_g")))), [5, 11, 3])


def test_sharded_and_bfloat16_checkpoints(torch, diffusers, tmp_path):
    model = _reference(torch, "clip_g")
    model.save_pretrained(tmp_path / "single", safe_serialization=True)
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    single = nnx.to_flat_state(nnx.state(load_clip_text_encoder(tmp_path / "single")))
    sharded = nnx.to_flat_state(nnx.state(load_clip_text_encoder(tmp_path / "sharded")))
    assert [path for path, _ in single] == [path for path, _ in sharded]
    for (path, a), (_, b) in zip(single, sharded):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))

    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    stored = load_clip_text_encoder(tmp_path / "bf16")
    assert stored.text_projection.kernel[...].dtype == jnp.bfloat16
    upcast = load_clip_text_encoder(tmp_path / "bf16", dtype=jnp.float32)
    ids = _token_ids("clip_g")
    with torch.no_grad():
        ref = model.float()(torch.from_numpy(ids), output_hidden_states=True)
    hidden, text_embeds = upcast(jnp.asarray(ids))
    _close(hidden, ref.hidden_states[-2])
    _close(text_embeds, ref.text_embeds)


def test_config_rejects_bad_keys():
    base = {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", "dropout": 0.0, **TINY}
    assert CLIPTextConfig.from_transformers_config(base) == CLIPTextConfig(**TINY)
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig.from_transformers_config({**base, "hidden_act": "gelu_10"})
    with pytest.raises(ValueError, match="bogus"):
        CLIPTextConfig.from_transformers_config({**base, "bogus": 1})
    with pytest.raises(ValueError, match="architectures"):
        CLIPTextConfig.from_transformers_config({**base, "architectures": ["CLIPVisionModel"]})
    plain = CLIPTextConfig.from_transformers_config({**base, "architectures": ["CLIPTextModel"]})
    assert plain == CLIPTextConfig(**TINY, with_projection=False)
    with pytest.raises(ValueError, match="num_attention_heads"):
        CLIPTextConfig.from_transformers_config({**base, "num_attention_heads": 5})


def test_call_rejects_bad_inputs():
    encoder = CLIPTextEncoder(CLIPTextConfig(**TINY), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        encoder(jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="clip_skip"):
        encoder(jnp.zeros((1, 4), jnp.int32), clip_skip=3)
    with pytest.raises(ValueError, match="integer array"):
        encoder(jnp.zeros((1, 4), jnp.float32))


def test_loader_errors(torch, diffusers, tmp_path):
    weights, config = saved_tensors(_reference(torch, "clip_l"), tmp_path / "good")

    def variant(name, tensors, cfg=config):
        return write_folder(tmp_path / name, tensors, cfg)

    key = "text_model.encoder.layers.1.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match=rf"missing keys \['{key}'\]"):
        load_clip_text_encoder(variant("missing", {k: v for k, v in weights.items() if k != key}))
    with pytest.raises(ValueError, match=r"key 'text_projection.weight': expected shape \(24, 32\), found \(32, 32\)"):
        load_clip_text_encoder(variant("shape", {**weights, "text_projection.weight": np.zeros((32, 32), np.float32)}))
    extra = "text_model.encoder.layers.3.mlp.fc1.bias"  # a layer this config does not have
    with pytest.raises(ValueError, match=f"unexpected keys.*{extra}"):
        load_clip_text_encoder(variant("extra", {**weights, extra: np.zeros((37,), np.float32)}))
    with pytest.raises(ValueError, match=r"architectures is \['CLIPTextModel'\], expected \['CLIPTextModelWithProjection'\]"):
        load_clip_text_encoder(variant("arch", weights, {**config, "architectures": ["CLIPTextModel"]}))
    with pytest.raises(ValueError, match=r"architectures is None, expected \['CLIPTextModelWithProjection'\]"):
        load_clip_text_encoder(variant("noarch", weights, {k: v for k, v in config.items() if k != "architectures"}))
    with pytest.raises(ValueError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_clip_text_encoder(variant("noweights", None))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json: expected a transformers CLIP text_encoder/ folder"):
        load_clip_text_encoder(tmp_path / "empty")


def test_loader_checks_layer_count_and_dtypes_on_the_headers(torch, diffusers, tmp_path):
    weights, config = saved_tensors(_reference(torch, "clip_l"), tmp_path / "good")
    absurd = write_folder(tmp_path / "absurd", weights, {**config, "num_hidden_layers": 100_000})
    with pytest.raises(ValueError, match="num_hidden_layers = 100000 in the config, but the weights hold blocks 0 … 2"):
        load_clip_text_encoder(absurd)
    key = "text_model.embeddings.token_embedding.weight"
    as_ints = write_folder(tmp_path / "ints", {**weights, key: weights[key].astype(np.uint8)}, config)
    with pytest.raises(ValueError, match=f"key '{key}' is stored as U8"):
        load_clip_text_encoder(as_ints)


def test_numbers_follow_the_validation_rules():
    config = CLIPTextConfig(**{**TINY, "num_hidden_layers": np.int64(3), "layer_norm_eps": np.float32(1e-5)})
    assert type(config.num_hidden_layers) is int and type(config.layer_norm_eps) is float
    for bad in ({"num_hidden_layers": True}, {"layer_norm_eps": 0.0}, {"layer_norm_eps": float("nan")},
                {"eos_token_id": True}, {"eos_token_id": 2.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CLIPTextConfig(**{**TINY, **bad})
    encoder = CLIPTextEncoder(CLIPTextConfig(**TINY), rngs=nnx.Rngs(0))
    assert encoder(jnp.zeros((1, 4), jnp.int32), clip_skip=np.int64(1))[0].shape == (1, 4, 32)
    with pytest.raises(ValueError, match="clip_skip"):
        encoder(jnp.zeros((1, 4), jnp.int32), clip_skip=True)


# ----------------------------------------------------------------------------- vision tower

TINY_VISION = dict(
    image_size=32, patch_size=8, hidden_size=32, num_attention_heads=4, num_hidden_layers=3, intermediate_size=37,
    projection_dim=24, layer_norm_eps=1e-5,
)
VISION_CLASSES = ("CLIPVisionModel", "CLIPVisionModelWithProjection")


def _vision_reference(torch, class_name, hidden_act="gelu", seed=0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(**TINY_VISION, hidden_act=hidden_act)
    return perturbed(torch, getattr(transformers, class_name)(config))


def _pixels(batch=2, seed=1):
    return np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def _vision_outputs(torch, model, pixels):
    """``(hidden_states, pooler_output, image_embeds or None)`` of a transformers vision model."""
    with torch.no_grad():
        tower = getattr(model, "vision_model", model)
        out = tower(torch.from_numpy(pixels), output_hidden_states=True)
        image_embeds = model(torch.from_numpy(pixels)).image_embeds if tower is not model else None
    return out.hidden_states, out.pooler_output, image_embeds


@pytest.mark.parametrize("hidden_act", ["gelu", "quick_gelu"])
@pytest.mark.parametrize("class_name", VISION_CLASSES)
def test_vision_hidden_states_pooled_and_image_embeds_match_transformers(torch, diffusers, tmp_path, class_name,
                                                                         hidden_act):
    model = _vision_reference(torch, class_name, hidden_act)
    model.save_pretrained(tmp_path / "image_encoder", safe_serialization=True)
    ours = load_clip_vision_encoder(tmp_path / "image_encoder")
    assert isinstance(ours, CLIPVisionEncoder)
    projected = class_name == "CLIPVisionModelWithProjection"
    assert ours.config == CLIPVisionConfig(**TINY_VISION, hidden_act=hidden_act, with_projection=projected)

    pixels = _pixels()
    hidden_states, pooled, image_embeds = _vision_outputs(torch, model, pixels)
    assert len(hidden_states) == TINY_VISION["num_hidden_layers"] + 1
    assert hidden_states[0].shape == (2, 1 + 4 * 4, 32)

    penultimate, pooled_ours, image_embeds_ours = ours(jnp.asarray(pixels))
    _close(penultimate, hidden_states[-2])  # Wan2.1's image embeddings
    _close(pooled_ours, pooled)
    assert np.abs(pooled.numpy()).max() > 0.5
    if projected:
        _close(image_embeds_ours, image_embeds)
    else:
        assert image_embeds_ours is None and ours.visual_projection is None

    everything = ours(jnp.asarray(pixels), output_hidden_states=True)
    assert len(everything.hidden) == len(hidden_states)
    for mine, theirs in zip(everything.hidden, hidden_states):
        _close(mine, theirs)
    np.testing.assert_array_equal(np.asarray(everything.pooled), np.asarray(pooled_ours))


def test_vision_model_saved_with_or_without_the_vision_model_prefix(torch, diffusers, tmp_path):
    """transformers 5 saves a ``CLIPVisionModel`` bare; older versions (Wan2.1's folder) under ``vision_model.``."""
    weights, config = saved_tensors(_vision_reference(torch, "CLIPVisionModel"), tmp_path / "bare")
    assert "embeddings.patch_embedding.weight" in weights and "pre_layrnorm.weight" in weights
    prefixed = write_folder(tmp_path / "prefixed", {f"vision_model.{k}": v for k, v in weights.items()}, config)
    bare = nnx.to_flat_state(nnx.state(load_clip_vision_encoder(tmp_path / "bare")))
    old = nnx.to_flat_state(nnx.state(load_clip_vision_encoder(prefixed)))
    assert [path for path, _ in bare] == [path for path, _ in old]
    for (path, a), (_, b) in zip(bare, old):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


def test_vision_bfloat16_checkpoint(torch, diffusers, tmp_path):
    model = _vision_reference(torch, "CLIPVisionModelWithProjection")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    stored = load_clip_vision_encoder(tmp_path / "bf16")
    assert stored.patch_embedding.kernel[...].dtype == jnp.bfloat16
    assert all(out.dtype == jnp.bfloat16 for out in stored(jnp.asarray(_pixels())))  # pixels cast to the weights
    upcast = load_clip_vision_encoder(tmp_path / "bf16", dtype=jnp.float32)
    hidden_states, pooled, image_embeds = _vision_outputs(torch, model.float(), _pixels())
    hidden, pooled_ours, image_embeds_ours = upcast(jnp.asarray(_pixels()))
    _close(hidden, hidden_states[-2])
    _close(pooled_ours, pooled)
    _close(image_embeds_ours, image_embeds)


def test_vision_config_follows_transformers(diffusers):
    import transformers

    defaults = transformers.CLIPVisionConfig()
    ours = CLIPVisionConfig()
    for field in dataclasses.fields(CLIPVisionConfig):
        if field.name != "with_projection":
            assert getattr(ours, field.name) == getattr(defaults, field.name), field.name
    base = {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "dropout": 0.0,
            "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0, "torch_dtype": "float16",
            "transformers_version": "4.48.0", "_name_or_path": "image_encoder", **TINY_VISION}
    assert CLIPVisionConfig.from_transformers_config(base) == CLIPVisionConfig(**TINY_VISION)
    projected = CLIPVisionConfig.from_transformers_config({**base, "architectures": ["CLIPVisionModelWithProjection"]})
    assert projected == CLIPVisionConfig(**TINY_VISION, with_projection=True)
    unnamed = {k: v for k, v in base.items() if k != "architectures"}
    assert CLIPVisionConfig.from_transformers_config(unnamed) == CLIPVisionConfig(**TINY_VISION)
    assert CLIPVisionConfig(**TINY_VISION).num_positions == 17


def test_vision_config_rejects_bad_keys():
    base = {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", **TINY_VISION}
    for bad, match in [
        ({"bogus": 1}, "bogus"),
        ({"vocab_size": 99}, "vocab_size"),
        ({"architectures": ["CLIPTextModel"]}, "architectures"),
        ({"hidden_act": "gelu_10"}, "hidden_act"),
        ({"num_attention_heads": 5}, "num_attention_heads"),
        ({"image_size": 36}, r"patch_size \(8\) must divide image_size \(36\)"),
        ({"image_size": [32, 32]}, "image_size"),
        ({"patch_size": 0}, "patch_size"),
        ({"num_channels": True}, "num_channels"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
    ]:
        with pytest.raises(ValueError, match=match):
            CLIPVisionConfig.from_transformers_config({**base, **bad})


def test_vision_call_rejects_bad_inputs():
    encoder = CLIPVisionEncoder(CLIPVisionConfig(**TINY_VISION), rngs=nnx.Rngs(0))
    assert encoder(jnp.zeros((1, 3, 32, 32))).hidden.shape == (1, 17, 32)
    with pytest.raises(ValueError, match=r"\(1, 3, 24, 32\) do not match .* 32x32 \(image_size\)"):
        encoder(jnp.zeros((1, 3, 24, 32)))
    with pytest.raises(ValueError, match="3 channels"):
        encoder(jnp.zeros((1, 4, 32, 32)))
    with pytest.raises(ValueError, match="floating array"):
        encoder(jnp.zeros((1, 3, 32, 32), jnp.uint8))
    with pytest.raises(ValueError, match="floating array"):
        encoder(jnp.zeros((3, 32, 32)))


def test_vision_loader_errors(torch, diffusers, tmp_path):
    weights, config = saved_tensors(_vision_reference(torch, "CLIPVisionModel"), tmp_path / "good")

    def variant(name, tensors, cfg=config):
        return write_folder(tmp_path / name, tensors, cfg)

    key = "encoder.layers.1.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match=rf"missing keys \['vision_model.{key}'\]"):
        load_clip_vision_encoder(variant("missing", {k: v for k, v in weights.items() if k != key}))
    with pytest.raises(ValueError, match="unexpected keys.*visual_projection.weight"):  # the config has no projection
        load_clip_vision_encoder(variant("proj", {**weights, "visual_projection.weight": np.zeros((24, 32), np.float32)}))
    patch = "embeddings.patch_embedding.weight"
    with pytest.raises(ValueError, match=rf"key '{patch}': expected shape \(32, 3, 8, 8\), found \(32, 3, 7, 7\)"):
        load_clip_vision_encoder(variant("patch", {**weights, patch: np.zeros((32, 3, 7, 7), np.float32)}))
    with pytest.raises(ValueError, match=r"key 'embeddings.position_embedding.weight': expected shape \(26, 32\)"):
        load_clip_vision_encoder(variant("size", weights, {**config, "image_size": 40}))
    with pytest.raises(ValueError, match="num_hidden_layers = 5 in the config, but the weights hold blocks 0 … 2"):
        load_clip_vision_encoder(variant("layers", weights, {**config, "num_hidden_layers": 5}))
    with pytest.raises(ValueError, match=r"architectures is \['CLIPTextModel'\], expected \['CLIPVisionModel'\]"):
        load_clip_vision_encoder(variant("arch", weights, {**config, "architectures": ["CLIPTextModel"]}))
    with pytest.raises(ValueError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_clip_vision_encoder(variant("noweights", None))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json: expected a transformers CLIP image_encoder/ folder"):
        load_clip_vision_encoder(tmp_path / "empty")
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="not a readable JSON config"):
        load_clip_vision_encoder(tmp_path / "garbled")


def test_projection_folder_needs_its_projection(torch, diffusers, tmp_path):
    weights, config = saved_tensors(_vision_reference(torch, "CLIPVisionModelWithProjection"), tmp_path / "good")
    assert "vision_model.pre_layrnorm.weight" in weights and "visual_projection.weight" in weights
    without = write_folder(tmp_path / "without", {k: v for k, v in weights.items() if k != "visual_projection.weight"},
                           config)
    with pytest.raises(ValueError, match=r"missing keys \['visual_projection.weight'\]"):
        load_clip_vision_encoder(without)
