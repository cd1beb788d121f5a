"""Parity of :mod:`cfgzero_theory.ports.gemma` with ``transformers.GemmaModel`` (Lumina-Next's
``text_encoder/``) and ``GemmaForCausalLM``.

Tiny random Gemmas — multi-query (1 key/value head, as Gemma-2B) and grouped-query (2 of 4, with
``attention_bias``), ``head_dim`` 12 / 6 ≠ ``hidden_size / heads`` = 8 — built with
``torch.manual_seed``, every parameter perturbed by ``0.2·N(0, 1)`` (the norms' ``w`` starts at 0,
i.e. a factor of exactly 1), saved with ``save_pretrained(safe_serialization=True)`` and loaded
with our loader.  Every hidden state (indices 0, 1, -2 = Lumina's, -1 = after the final norm) is
compared without a mask and with padding masks (right- and left-padded rows of 16, 7, 1 and 0
real tokens) against transformers' ``sdpa`` (its default) and ``eager`` attention.  Our calls are
compiled (``jax.jit``), all hidden states of one input in one program.

Tolerance (float32, CPU): ``max |ours − transformers| ≤ 1e-4 · max(1, max |transformers|)``;
observed ≤ 4.9e-6 absolute on hidden states of scale 3.5–10.5 (≤ 5e-7 relative), padded positions
included, and 2.3e-5 on Lumina's prompt embeddings at 256 tokens through diffusers'
``LuminaPipeline.encode_prompt`` (scale 10.5).  ``eager`` differs only at the queries that see
no real key (the row of 0 tokens and the leading padding of left-padded rows: the module
docstring of :mod:`cfgzero_theory.ports.gemma`), by 2.6–5.8 there.  bfloat16 (our cast of
float32 weights against transformers' ``from_pretrained(dtype=torch.bfloat16)``): observed
≤ 1.2e-2 of the scale against transformers' bf16 and ≤ 1.1e-2 against the float32 reference
(transformers' bf16 itself is 1.4e-2 from its float32); the bound is 3e-2.
"""

import dataclasses
import functools
import json
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from text_encoder_helpers import assert_close, perturbed, saved_tensors, write_folder

from cfgzero_theory.ports.gemma import GemmaConfig, GemmaEncoder, load_gemma_encoder
from cfgzero_theory.ports.tiny import gemma_tokenizer

pytestmark = pytest.mark.parity

VOCAB = 64  # the tiny tokenizer's 63 tokens fit
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            rms_norm_eps=1e-6)
VARIANTS = {
    "mqa": dict(num_key_value_heads=1, head_dim=12, rope_theta=500.0),
    "gqa": dict(num_key_value_heads=2, head_dim=6, rope_theta=10000.0, attention_bias=True),
}
LAYERS = (0, 1, -2, -1)  # every hidden state of a 3-layer model
T = 16
LENGTHS = (16, 7, 1, 0)


def _config(variant):
    return {**TINY, **VARIANTS[variant]}


def _reference(torch, variant="mqa", seed=0, causal_lm=False):
    import transformers

    torch.manual_seed(seed)
    config = transformers.GemmaConfig(**_config(variant))
    return perturbed(torch, (transformers.GemmaForCausalLM if causal_lm else transformers.GemmaModel)(config))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _compiled(graphdef, state, arrays, layers):
    encoder = nnx.merge(graphdef, state)
    return tuple(encoder(*arrays, hidden_layer=k) for k in layers)


def _ours(encoder, ids, mask=None, layers=LAYERS):
    arrays = (jnp.asarray(ids),) if mask is None else (jnp.asarray(ids), jnp.asarray(mask))
    graphdef, state = nnx.split(encoder)
    return [np.asarray(out, np.float32) for out in _compiled(graphdef, state, arrays, layers)]


def _theirs(torch, model, ids, mask=None, implementation="sdpa", layers=LAYERS):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(ids)),
                    attention_mask=None if mask is None else torch.from_numpy(np.asarray(mask)),
                    output_hidden_states=True)
    return [out.hidden_states[k].float().numpy() for k in layers]


def _batch(side="right", seed=1):
    """Rows of :data:`LENGTHS` real tokens (``<bos>`` = 2 first, then random ids) padded with 0."""
    ids = np.zeros((len(LENGTHS), T), np.int64)
    mask = np.zeros((len(LENGTHS), T), np.int64)
    rng = np.random.default_rng(seed)
    for row, length in enumerate(LENGTHS):
        real = slice(0, length) if side == "right" else slice(T - length, T)
        ids[row, real] = np.concatenate([[2], rng.integers(5, VOCAB, length - 1)])[:length] if length else []
        mask[row, real] = 1
    return ids, mask


def _close(ours, ref):
    assert np.abs(ref).max() > 0.5  # a non-degenerate output
    assert_close(ours, ref)


def _sees_a_real_key(mask):
    """``(B, T)``: the queries with at least one real key at or before them."""
    return np.cumsum(mask, axis=1) > 0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hidden_states_match_transformers(torch, diffusers, tmp_path, variant):
    model = _reference(torch, variant)
    model.save_pretrained(tmp_path / "text_encoder", safe_serialization=True)
    ours = load_gemma_encoder(tmp_path / "text_encoder")
    assert isinstance(ours, GemmaEncoder) and ours.config == GemmaConfig(**_config(variant))
    ids = np.random.default_rng(3).integers(0, VOCAB, (len(LENGTHS), T))
    for mine, theirs in zip(_ours(ours, ids), _theirs(torch, model, ids)):
        _close(mine, theirs)

    for side in ("right", "left"):
        ids, mask = _batch(side)
        outs = _ours(ours, ids, mask)
        seen = _sees_a_real_key(mask)
        for k, mine, sdpa, eager in zip(LAYERS, outs, _theirs(torch, model, ids, mask),
                                        _theirs(torch, model, ids, mask, "eager")):
            assert np.isfinite(mine).all()
            _close(mine, sdpa)  # every position, padded ones included
            _close(mine[seen], eager[seen])
            if k != 0:  # the queries without a real key: sdpa's zero attention, eager's plain average
                assert np.abs(sdpa[~seen] - eager[~seen]).max() > 1e-2
        if side == "right":  # causal: the real positions never see the padding after them
            unpadded = _ours(ours, ids)
            for mine, alone in zip(outs, unpadded):
                assert_close(mine[1, :LENGTHS[1]], alone[1, :LENGTHS[1]])


def test_bfloat16_close_to_transformers(torch, diffusers, tmp_path):
    import transformers

    model = _reference(torch)
    model.save_pretrained(tmp_path / "f32", safe_serialization=True)
    ids, mask = _batch()
    reference32 = _theirs(torch, model, ids, mask)
    reference16 = transformers.GemmaModel.from_pretrained(tmp_path / "f32", dtype=torch.bfloat16).eval()
    theirs = _theirs(torch, reference16, ids, mask)
    ours = load_gemma_encoder(tmp_path / "f32", dtype=jnp.bfloat16)
    assert ours.layers[0].attn.q.kernel[...].dtype == ours.final_norm.weight[...].dtype == jnp.bfloat16
    graphdef, state = nnx.split(ours)
    outs = _compiled(graphdef, state, (jnp.asarray(ids), jnp.asarray(mask)), LAYERS)
    assert all(out.dtype == jnp.bfloat16 for out in outs)
    for out, ref16, ref32 in zip(outs, theirs, reference32):
        out = np.asarray(out, np.float32)
        assert_close(out, ref16, rtol=3e-2)
        assert_close(out, ref32, rtol=3e-2)

    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    stored = load_gemma_encoder(tmp_path / "bf16")  # dtype=None keeps the stored bf16
    assert stored.embed_tokens.embedding[...].dtype == jnp.bfloat16
    for out, mine in zip(_ours(stored, ids, mask), outs):
        np.testing.assert_array_equal(out, np.asarray(mine, np.float32))


def test_causal_lm_folder(torch, diffusers, tmp_path):
    """A ``GemmaForCausalLM`` folder (keys under ``model.``, the tied head not stored) loads the
    same model; its forward's hidden states are the base model's."""
    model = _reference(torch, causal_lm=True)
    weights, config = saved_tensors(model, tmp_path / "lm")
    assert config["architectures"] == ["GemmaForCausalLM"] and "model.norm.weight" in weights
    assert not any(key.startswith("lm_head") for key in weights)
    ours = load_gemma_encoder(tmp_path / "lm")
    ids, mask = _batch()
    for mine, theirs in zip(_ours(ours, ids, mask), _theirs(torch, model, ids, mask)):
        _close(mine, theirs)
    key = "model.layers.1.mlp.up_proj.weight"
    with pytest.raises(ValueError, match=rf"missing keys \['{key}'\]"):  # named in the folder's layout
        load_gemma_encoder(write_folder(tmp_path / "missing", {k: v for k, v in weights.items() if k != key}, config))
    untied = {**weights, "lm_head.weight": weights["model.embed_tokens.weight"]}
    with pytest.raises(ValueError, match=r"unexpected keys \['lm_head.weight'\]"):
        load_gemma_encoder(write_folder(tmp_path / "untied", untied, config))


def test_lumina_pipeline_tokenisation_and_prompt_embeds(torch, diffusers, tmp_path):
    """diffusers' ``LuminaPipeline.encode_prompt`` (its Gemma tokenisation: ``padding=True``,
    ``pad_to_multiple_of=8``, ``max_length=256``, truncation; negatives padded to the prompts'
    length) with the tiny tokenizer and encoder, one prompt truncated to the full 256 tokens;
    ours on the same ids and mask gives its ``prompt_embeds`` (``hidden_states[-2]``)."""
    from diffusers import LuminaPipeline

    model = _reference(torch)
    model.save_pretrained(tmp_path / "text_encoder", safe_serialization=True)
    tokenizer = gemma_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    pipe = types.SimpleNamespace(tokenizer=tokenizer, text_encoder=model, transformer=None, max_sequence_length=256)
    for name in ("encode_prompt", "_get_gemma_prompt_embeds", "_text_preprocessing"):
        setattr(pipe, name, types.MethodType(getattr(LuminaPipeline, name), pipe))
    prompts = ["A photo of a cat on the beach, a red dog", "the blue dog", "", "a cat " * 200]
    with torch.no_grad():
        embeds, mask, negative, negative_mask = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=True, negative_prompt=["", "dog", "", "blue"],
            device=torch.device("cpu"))
    assert embeds.shape == (4, 256, TINY["hidden_size"]) and negative.shape == embeds.shape
    assert mask.sum(1).tolist() == [13, 4, 1, 256] and negative_mask.sum(1).tolist() == [1, 2, 1, 2]

    ours = load_gemma_encoder(tmp_path / "text_encoder")
    for texts, expected, expected_mask in [(prompts, embeds, mask), (["", "dog", "", "blue"], negative, negative_mask)]:
        batch = tokenizer([t.lower().strip() for t in texts], padding="max_length", max_length=256, truncation=True,
                          return_attention_mask=True, return_tensors="np")
        np.testing.assert_array_equal(batch.attention_mask, expected_mask.numpy())
        _close(_ours(ours, batch.input_ids, batch.attention_mask)[LAYERS.index(-2)], expected.numpy())


def test_tiny_tokenizer_round_trips(diffusers, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = gemma_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert type(loaded).__name__ == "GemmaTokenizer" and loaded.padding_side == tokenizer.padding_side == "right"
    assert len(loaded) == len(tokenizer) == 63 <= VOCAB
    specials = (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id, loaded.unk_token_id)
    assert specials == (0, 1, 2, 3)
    text = "a photo of a cat on the beach"
    ids = loaded(text).input_ids
    assert ids == tokenizer(text).input_ids and ids[0] == 2 and len(ids) == 9  # <bos> and one token per word
    assert loaded.convert_ids_to_tokens(ids[1:3]) == ["a", "\u2581photo"]
    assert loaded.decode(ids, skip_special_tokens=True) == text
    batch = loaded([text, "", "z" * 300], padding=True, pad_to_multiple_of=8, max_length=256, truncation=True,
                   return_attention_mask=True)
    assert [len(row) for row in batch.input_ids] == [256] * 3
    assert [sum(row) for row in batch.attention_mask] == [9, 1, 256]
    assert batch.input_ids[1][:2] == [2, 0] and all(row[0] == 2 for row in batch.input_ids)
    assert json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())["padding_side"] == "right"


def test_config_from_transformers(torch, diffusers):
    import transformers

    ours, theirs = GemmaConfig(), transformers.GemmaConfig()
    for field in dataclasses.fields(ours):
        expected = theirs.rope_parameters["rope_theta"] if field.name == "rope_theta" else getattr(theirs, field.name)
        assert getattr(ours, field.name) == expected, field.name
    # Gemma-2B as transformers 4.4x wrote it (Lumina-Next's text_encoder/ layout)
    lumina = {
        "_name_or_path": "google/gemma-2b", "architectures": ["GemmaModel"], "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 2, "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu",
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 16384, "max_position_embeddings": 8192, "model_type": "gemma", "num_attention_heads": 8,
        "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 10000.0, "torch_dtype": "bfloat16", "transformers_version": "4.42.0",
        "use_cache": True, "vocab_size": 256000,
    }
    gemma_2b = GemmaConfig(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                           num_attention_heads=8, num_key_value_heads=1, head_dim=256)
    assert GemmaConfig.from_transformers_config(lumina) == gemma_2b
    assert transformers.GemmaConfig(**{k: v for k, v in lumina.items() if not k.startswith("_")}).hidden_act == \
        gemma_2b.hidden_act
    new = {**lumina, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}, "architectures": ["GemmaForCausalLM"]}
    assert GemmaConfig.from_transformers_config(new).rope_theta == 500.0
    for bad, match in [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
        ({"rope_parameters": {"rope_theta": 1.0, "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
        ({"hidden_activation": "gelu"}, "hidden_activation 'gelu' disagrees"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({"query_pre_attn_scalar": 256}, r"unsupported GemmaModel config key\(s\) \['query_pre_attn_scalar'\]"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"head_dim": 7}, "head_dim must be even"),
        ({"architectures": ["Gemma2Model"]}, r"architectures is \['Gemma2Model'\], expected \['GemmaModel'\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            GemmaConfig.from_transformers_config({**lumina, **bad})


def test_loader_errors(torch, diffusers, tmp_path):
    weights, config = saved_tensors(_reference(torch), tmp_path / "good")

    def variant(name, tensors=weights, **changes):
        return write_folder(tmp_path / name, tensors, {**config, **changes})

    key = "layers.2.self_attn.k_proj.weight"
    with pytest.raises(ValueError, match=rf"missing keys \['{key}'\]"):
        load_gemma_encoder(variant("missing", {k: v for k, v in weights.items() if k != key}))
    with pytest.raises(ValueError, match=r"unexpected keys \['layers.0.self_attn.q_proj.bias'\]"):
        load_gemma_encoder(variant("bias", {**weights, "layers.0.self_attn.q_proj.bias": np.zeros(48, np.float32)}))
    with pytest.raises(ValueError, match=r"key 'layers.0.self_attn.q_proj.weight': expected shape \(64, 32\), found "
                                         r"\(48, 32\)"):
        load_gemma_encoder(variant("head_dim", head_dim=16))
    with pytest.raises(ValueError, match="num_hidden_layers = 4 in the config, but the weights hold blocks 0 … 2"):
        load_gemma_encoder(variant("layers", num_hidden_layers=4))
    expected = "expected ['GemmaModel'] or ['GemmaForCausalLM']"
    for name, architectures in [("gemma2", ["Gemma2Model"]), ("llama", ["LlamaModel"]), ("none", None)]:
        with pytest.raises(ValueError, match=re.escape(f"architectures is {architectures!r}, {expected}")):
            load_gemma_encoder(variant(name, architectures=architectures))


def test_input_errors(torch, diffusers, tmp_path):
    _reference(torch).save_pretrained(tmp_path / "text_encoder", safe_serialization=True)
    encoder = load_gemma_encoder(tmp_path / "text_encoder")  # (much faster than a random nnx initialisation)
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="integer array"):
        encoder(jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        encoder(ids, jnp.ones((1, 5)))
    for bad in (4, -5, 1.0):
        with pytest.raises(ValueError, match="hidden_layer"):
            encoder(ids, hidden_layer=bad)
    assert encoder(ids, hidden_layer=-4).shape == (1, 4, 32)  # the embedding: no layer runs
