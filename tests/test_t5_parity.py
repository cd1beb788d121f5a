"""Parity of :mod:`cfgzero_theory.ports.t5` with ``transformers.T5EncoderModel`` and
``transformers.UMT5EncoderModel``.

Tiny random encoders — T5 v1.1-like (``gated-gelu``, as SD3's ``text_encoder_3/``), T5
v1.0-like (``relu``) and UMT5 (``gated-gelu``, a bias table per block, as Wan's
``text_encoder/``; the blocks' tables differ, each drawn on its own) — with few
relative-position buckets and a short ``max_distance`` so that the sequences reach the
logarithmic and the capped buckets, built with ``torch.manual_seed``, every parameter perturbed
by ``0.2·N(0, 1)`` (the RMS norms start at 1), saved with
``save_pretrained(safe_serialization=True)`` and loaded with our loader.  With a padding mask
(rows of 24, 10, 3 and 0 real tokens) the references are transformers' ``sdpa`` (its default)
and ``eager`` attention.

Tolerance (float32, CPU): ``max |ours − transformers| ≤ 1e-4 · max(1, max |transformers|)``
on the last hidden state, at every position (observed: ≤ 1e-5 absolute on outputs of scale
~3–4 without a mask, ≤ 2e-5 with one, padded positions included — ≤ 5e-6 relative).  The
bucket table equals transformers' exactly, up to 700 tokens for SD3's 32 buckets / distance 128.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from text_encoder_helpers import assert_close, perturbed, saved_tensors, write_folder

from cfgzero_theory.ports.t5 import (
    T5Config, T5Encoder, UMT5Config, load_t5_encoder, relative_position_buckets,
)

pytestmark = pytest.mark.parity

TINY = dict(
    vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=3, num_heads=4, relative_attention_num_buckets=8,
    relative_attention_max_distance=12, layer_norm_epsilon=1e-6,
)
VARIANTS = ["gated-gelu", "relu"]
UMT5_TINY = dict(
    vocab_size=64, d_model=32, d_kv=8, d_ff=40, num_layers=3, num_heads=4, relative_attention_num_buckets=8,
    relative_attention_max_distance=16, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
)
BIAS = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"


def _reference(torch, feed_forward_proj, seed=0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.T5Config(**TINY, feed_forward_proj=feed_forward_proj)
    return perturbed(torch, transformers.T5EncoderModel(config))


def _umt5_reference(torch, seed=0):
    import transformers

    torch.manual_seed(seed)
    return perturbed(torch, transformers.UMT5EncoderModel(transformers.UMT5Config(**UMT5_TINY)))


def _token_ids(batch=2, tokens=24, seed=1, vocab_size=TINY["vocab_size"]):
    """Random ids, an eos (1) and padding (0) after two thirds of the first row."""
    ids = np.random.default_rng(seed).integers(2, vocab_size, (batch, tokens))
    end = 2 * tokens // 3
    ids[0, end], ids[0, end + 1:] = 1, 0
    return ids


def _close(ours, ref):
    assert np.abs(ref.numpy()).max() > 0.5  # a non-degenerate output
    assert_close(ours, ref)


@pytest.mark.parametrize("feed_forward_proj", VARIANTS)
def test_last_hidden_state_matches_transformers(torch, diffusers, tmp_path, feed_forward_proj):
    model = _reference(torch, feed_forward_proj)
    model.save_pretrained(tmp_path / "text_encoder_3", safe_serialization=True)
    ours = load_t5_encoder(tmp_path / "text_encoder_3")
    assert isinstance(ours, T5Encoder)
    assert ours.config == T5Config(**TINY, feed_forward_proj=feed_forward_proj)
    for tokens in (24, 5):
        ids = _token_ids(tokens=tokens)
        with torch.no_grad():
            ref = model(torch.from_numpy(ids)).last_hidden_state
        _close(ours(jnp.asarray(ids)), ref)


def test_relative_position_buckets_match_transformers(torch, diffusers):
    from transformers.models.t5.modeling_t5 import T5Attention

    for buckets, distance, length in [(32, 128, 700), (8, 12, 40), (16, 20, 64)]:
        relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
        ref = T5Attention._relative_position_bucket(relative, bidirectional=True, num_buckets=buckets,
                                                    max_distance=distance)
        np.testing.assert_array_equal(relative_position_buckets(length, buckets, distance), ref.numpy())


def test_embed_tokens_key_and_bfloat16(torch, diffusers, tmp_path):
    """A checkpoint storing the embedding as encoder.embed_tokens.weight (or both names) loads the same."""
    model = _reference(torch, "gated-gelu")
    weights, config = saved_tensors(model, tmp_path / "good")
    ids = _token_ids()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).last_hidden_state
    embedding = weights["shared.weight"]
    for name, tensors in [
        ("renamed", {**{k: v for k, v in weights.items() if k != "shared.weight"}, "encoder.embed_tokens.weight": embedding}),
        ("both", {**weights, "encoder.embed_tokens.weight": embedding}),
    ]:
        _close(load_t5_encoder(write_folder(tmp_path / name, tensors, config))(jnp.asarray(ids)), ref)

    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    assert load_t5_encoder(tmp_path / "bf16").layers[0].attn.q.kernel[...].dtype == jnp.bfloat16
    upcast = load_t5_encoder(tmp_path / "bf16", dtype=jnp.float32)
    with torch.no_grad():
        ref = model.float()(torch.from_numpy(ids)).last_hidden_state
    _close(upcast(jnp.asarray(ids)), ref)


def test_config_rejects_bad_keys():
    base = {"architectures": ["T5EncoderModel"], "dropout_rate": 0.1, "is_gated_act": True, **TINY,
            "feed_forward_proj": "gated-gelu"}
    assert T5Config.from_transformers_config(base) == T5Config(**TINY, feed_forward_proj="gated-gelu")
    assert T5Config.from_transformers_config(base).activation == "gelu_new"
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config.from_transformers_config({**base, "feed_forward_proj": "gated-swish"})
    with pytest.raises(ValueError, match="bogus"):
        T5Config.from_transformers_config({**base, "bogus": 1})
    with pytest.raises(ValueError, match="architectures"):
        T5Config.from_transformers_config({**base, "architectures": ["T5ForConditionalGeneration"]})
    encoder = T5Encoder(T5Config(**TINY), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="integer array"):
        encoder(jnp.zeros((1, 4), jnp.float32))


def test_loader_errors(torch, diffusers, tmp_path):
    weights, config = saved_tensors(_reference(torch, "gated-gelu"), tmp_path / "good")

    def variant(name, tensors, cfg=config):
        return write_folder(tmp_path / name, tensors, cfg)

    key = "encoder.block.2.layer.1.DenseReluDense.wi_1.weight"
    with pytest.raises(ValueError, match=rf"missing keys \['{key}'\]"):
        load_t5_encoder(variant("missing", {k: v for k, v in weights.items() if k != key}))
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    with pytest.raises(ValueError, match=rf"key '{bias}': expected shape \(8, 4\), found \(32, 4\)"):
        load_t5_encoder(variant("shape", {**weights, bias: np.zeros((32, 4), np.float32)}))
    extra = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"  # only block 0 has one
    with pytest.raises(ValueError, match=f"unexpected keys.*{extra}"):
        load_t5_encoder(variant("extra", {**weights, extra: np.zeros((8, 4), np.float32)}))
    with pytest.raises(ValueError, match=r"missing keys.*DenseReluDense\.wi\.weight.*unexpected keys.*wi_0"):
        load_t5_encoder(variant("ungated", weights, {**config, "feed_forward_proj": "relu"}))
    with pytest.raises(ValueError, match=r"architectures is \['T5Model'\], expected \['T5EncoderModel'\]"):
        load_t5_encoder(variant("arch", weights, {**config, "architectures": ["T5Model"]}))


def test_loader_checks_layer_count_and_dtypes_on_the_headers(torch, diffusers, tmp_path):
    weights, config = saved_tensors(_reference(torch, "relu"), tmp_path / "good")
    absurd = write_folder(tmp_path / "absurd", weights, {**config, "num_layers": 200_000})
    with pytest.raises(ValueError, match="num_layers = 200000 in the config, but the weights hold blocks 0 … 2"):
        load_t5_encoder(absurd)
    key = "encoder.final_layer_norm.weight"
    as_bool = write_folder(tmp_path / "bool", {**weights, key: weights[key] > 0}, config)
    with pytest.raises(ValueError, match=f"key '{key}' is stored as BOOL"):
        load_t5_encoder(as_bool)


def test_numbers_follow_the_validation_rules():
    assert type(T5Config(**{**TINY, "d_model": np.int64(32)}).d_model) is int
    for bad in ({"num_layers": True}, {"relative_attention_num_buckets": 3}, {"layer_norm_epsilon": -1.0},
                {"layer_norm_epsilon": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            T5Config(**{**TINY, **bad})


# ----------------------------------------------------------------------------- UMT5 and the padding mask


def _padded(lengths, tokens=24, vocab_size=TINY["vocab_size"], seed=2):
    """A tokenizer-like batch: each row's real tokens end with eos (1), then padding (0); and its mask."""
    ids = np.random.default_rng(seed).integers(2, vocab_size, (len(lengths), tokens))
    mask = (np.arange(tokens)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    for row, length in enumerate(lengths):
        ids[row, length:] = 0
        if length:
            ids[row, length - 1] = 1
    return ids, mask


def test_umt5_last_hidden_state_matches_transformers(torch, diffusers, tmp_path):
    model = _umt5_reference(torch)
    model.save_pretrained(tmp_path / "text_encoder", safe_serialization=True)
    ours = load_t5_encoder(tmp_path / "text_encoder")
    assert type(ours.config) is UMT5Config and ours.config == UMT5Config(**UMT5_TINY)
    for tokens in (24, 5):
        ids = _token_ids(tokens=tokens, vocab_size=UMT5_TINY["vocab_size"])
        with torch.no_grad():
            ref = model(torch.from_numpy(ids)).last_hidden_state
        _close(ours(jnp.asarray(ids)), ref)


@pytest.mark.parametrize("kind", ["t5", "umt5"])
def test_padding_mask_matches_transformers(torch, diffusers, tmp_path, kind):
    """Rows of 24, 10, 3 and 0 real tokens: every position matches transformers' sdpa (its
    default) and eager attention (the padded positions are finite), and the real positions equal
    the encoding of the row without its padding."""
    model = _umt5_reference(torch) if kind == "umt5" else _reference(torch, "gated-gelu")
    model.save_pretrained(tmp_path / kind, safe_serialization=True)
    ours = load_t5_encoder(tmp_path / kind)
    lengths = (24, 10, 3, 0)
    ids, mask = _padded(lengths, vocab_size=ours.config.vocab_size)
    out = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.isfinite(out).all()
    for implementation in ("sdpa", "eager"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            _close(out, model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state)
    with torch.no_grad():
        unmasked = model(torch.from_numpy(ids)).last_hidden_state.numpy()
    row, length = 1, lengths[1]
    alone = np.asarray(ours(jnp.asarray(ids[row:row + 1, :length])))[0]
    assert_close(out[row, :length], alone)
    assert np.abs(unmasked[row, :length] - alone).max() > 1e-2  # attending to the padding would be visible
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        ours(jnp.asarray(ids), jnp.asarray(mask[:, :5]))


def test_umt5_layers_use_their_own_bias(torch, diffusers, tmp_path):
    """Each block's table is loaded into its own layer; using block 0's everywhere (T5's rule)
    would miss transformers by far more than the tolerance."""
    model = _umt5_reference(torch)
    weights, _ = saved_tensors(model, tmp_path / "umt5")
    tables = [weights[BIAS.format(i)] for i in range(UMT5_TINY["num_layers"])]
    assert min(np.abs(tables[0] - table).max() for table in tables[1:]) > 0.1
    ours = load_t5_encoder(tmp_path / "umt5")
    for layer, table in zip(ours.layers, tables):
        np.testing.assert_array_equal(np.asarray(layer.attn.relative_attention_bias.embedding[...]), table)
    ids = _token_ids(vocab_size=UMT5_TINY["vocab_size"])
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).last_hidden_state.numpy()
    for layer in ours.layers[1:]:
        layer.attn.relative_attention_bias.embedding[...] = jnp.asarray(tables[0])
    assert np.abs(np.asarray(ours(jnp.asarray(ids))) - ref).max() > 1e-2


def test_umt5_loader_errors(torch, diffusers, tmp_path):
    weights, config = saved_tensors(_umt5_reference(torch), tmp_path / "good")

    def variant(name, tensors=weights, **changes):
        return write_folder(tmp_path / name, tensors, {**config, **changes})

    with pytest.raises(ValueError, match=r"num_layers = 2 in the config, but the weights hold blocks 0 … 2"):
        load_t5_encoder(variant("fewer", num_layers=2))
    with pytest.raises(ValueError, match=r"num_layers = 4 in the config, but the weights hold blocks 0 … 2"):
        load_t5_encoder(variant("more", num_layers=4))
    with pytest.raises(ValueError, match=rf"missing keys \['{BIAS.format(2)}'\]"):
        load_t5_encoder(variant("no_bias", {k: v for k, v in weights.items() if k != BIAS.format(2)}))
    as_t5 = rf"unexpected keys \['{BIAS.format(1)}', '{BIAS.format(2)}'\]"  # T5 has block 0's table only
    with pytest.raises(ValueError, match=as_t5):
        load_t5_encoder(variant("as_t5", architectures=["T5EncoderModel"], model_type="t5"))
    expected = r"expected \['T5EncoderModel'\] or \['UMT5EncoderModel'\]"
    with pytest.raises(ValueError, match=rf"architectures is \['UMT5Model'\], {expected}"):
        load_t5_encoder(variant("arch", architectures=["UMT5Model"]))
    with pytest.raises(ValueError, match=rf"architectures is None, {expected}"):
        load_t5_encoder(variant("no_arch", architectures=None))
    t5_weights, t5_config = saved_tensors(_reference(torch, "gated-gelu"), tmp_path / "t5")
    as_umt5 = write_folder(tmp_path / "as_umt5", t5_weights, {**t5_config, "architectures": ["UMT5EncoderModel"]})
    with pytest.raises(ValueError, match=rf"missing keys \['{BIAS.format(1)}', '{BIAS.format(2)}'\]"):
        load_t5_encoder(as_umt5)


def test_config_defaults_and_keys_match_transformers(torch, diffusers):
    import transformers

    for ours, theirs in [(T5Config(), transformers.T5Config()), (UMT5Config(), transformers.UMT5Config())]:
        for field in dataclasses.fields(ours):
            assert getattr(ours, field.name) == getattr(theirs, field.name), field.name
    assert UMT5Config.from_transformers_config({"architectures": ["UMT5EncoderModel"]}) == UMT5Config()
    umt5 = {"architectures": ["UMT5EncoderModel"], "model_type": "umt5", **UMT5_TINY,
            "scalable_attention": True, "tokenizer_class": "T5Tokenizer"}  # as google/umt5-* and Wan's text_encoder/
    assert UMT5Config.from_transformers_config(umt5) == UMT5Config(**UMT5_TINY)
    assert UMT5Config(**UMT5_TINY) != T5Config(**UMT5_TINY)
    with pytest.raises(ValueError, match=r"architectures is \['UMT5EncoderModel'\], expected \['T5EncoderModel'\]"):
        T5Config.from_transformers_config(umt5)
