"""The shared attention (:mod:`cfgzero_theory.ports.attention`) against a float64 NumPy softmax.

``"blocked"`` runs with ``BLOCK = 4`` keys per block here (monkeypatched), so the 9 keys of
:func:`_inputs` make blocks of 4, 4 and 1: several blocks and a short last one."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from cfgzero_theory.ports import attention as attention_module
from cfgzero_theory.ports.attention import attention, attention_implementation


def reference(q, k, v, bias=None, causal=False, scale=None):
    """Softmax attention in float64 NumPy, grouped-query heads repeated explicitly."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = np.einsum("bthd,bshd->bhts", q, k) * scale
    if bias is not None:
        scores = scores + np.asarray(bias, np.float64)
    if causal:
        scores = np.where(np.tril(np.ones(scores.shape[-2:], bool)), scores, -np.inf)
    with np.errstate(invalid="ignore"):  # a row with every key masked is nan
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", weights, v)


def _inputs(t=7, s=9, heads=4, kv_heads=4, dim=8, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (2, t, heads, dim))
    k = jax.random.normal(keys[1], (2, s, kv_heads, dim))
    v = jax.random.normal(keys[2], (2, s, kv_heads, dim))
    bias = jax.random.normal(keys[3], (1, heads, t, s))
    return q, k, v, bias


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(attention_module, "BLOCK", 4)


@pytest.mark.parametrize("implementation", ["head_major", "blocked", "xla"])
@pytest.mark.parametrize("case", ["plain", "bias", "causal", "gqa", "scale"])
def test_attention_matches_a_float64_softmax(implementation, case, small_blocks):
    kv_heads = 2 if case == "gqa" else 4
    t = s = 7 if case == "causal" else None
    q, k, v, bias = _inputs(t=t or 7, s=s or 9, kv_heads=kv_heads)
    options = {"bias": bias} if case == "bias" else {"causal": True} if case == "causal" else {}
    if case == "scale":
        options["scale"] = 1.0
    out = attention(q, k, v, implementation=implementation, **options)
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, **options), rtol=1e-5, atol=1e-5)


def test_blocked_with_its_default_block_size():
    rng = np.random.default_rng(0)  # NumPy draws: a jax.random draw compiles anew for each shape
    q = rng.standard_normal((2, 5, 2, 8), np.float32)
    k, v = rng.standard_normal((2, 2, attention_module.BLOCK + 3, 1, 8), np.float32)
    out = attention(q, k, v, implementation="blocked")
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["head_major", "blocked"])
def test_masked_keys(implementation, small_blocks):
    """A ``-inf`` bias masks keys: query 0 of batch 0 sees none (``nan``, as in every program),
    query 1 only keys 5.. (its whole first block is masked), the others a random subset."""
    q, k, v, _ = _inputs()
    keep = np.random.default_rng(0).random((2, 1, 7, 9)) < 0.6
    keep[..., 0] = keep[..., 8] = True
    keep[0, 0, 0], keep[:, 0, 1, :5] = False, False
    bias = np.where(keep, 0.0, -np.inf).astype(np.float32)
    out = np.asarray(attention(q, k, v, bias=bias, implementation=implementation))
    assert np.isnan(out[0, 0]).all() and np.isfinite(np.delete(out[0], 0, axis=0)).all() and np.isfinite(out[1]).all()
    expected = reference(q, k, v, bias=bias)
    np.testing.assert_allclose(out[0, 1:], expected[0, 1:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["head_major", "blocked"])
def test_bfloat16_inputs(implementation, small_blocks):
    """bfloat16 keeps 8 significant bits: the softmax weights (cast to ``v``'s dtype before the
    second product) and the output are each rounded to a relative 2^-9, hence 1e-2 on these
    outputs of size up to 2 (6e-3 seen), against the float64 softmax of the same bfloat16 inputs."""
    q, k, v, bias = (a.astype(jnp.bfloat16) for a in _inputs(kv_heads=2))
    out = attention(q, k, v, bias=bias, implementation=implementation)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), reference(q, k, v, bias=bias), rtol=1e-2, atol=1e-2)


def test_default_implementation_on_this_backend():
    q = jnp.zeros((1, 2, 1, 8))
    assert attention_implementation(q) == ("blocked" if jax.default_backend() == "cpu" else
                                           attention_implementation(q))


def test_a_gpu_never_builds_a_score_matrix_over_the_limit(monkeypatch):
    """The choice on a GPU (the backend name patched: the rule is a function of shapes and dtypes):
    cuDNN for half precision; float32 takes XLA's program up to XLA_SCORE_BYTES of float32 scores
    and the blocked one beyond, e.g. a 480p 81-frame Wan video's 32,760 tokens."""
    from cfgzero_theory.ports.attention import XLA_SCORE_BYTES

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    video = jax.ShapeDtypeStruct((1, 32760, 12, 128), jnp.float32)
    assert attention_implementation(jax.ShapeDtypeStruct(video.shape, jnp.bfloat16)) == "cudnn"
    assert attention_implementation(video) == "blocked"
    assert attention_implementation(video, key_length=512) == "xla"  # cross-attention to 512 text tokens
    side = int((XLA_SCORE_BYTES // 4) ** 0.5)
    assert attention_implementation(jax.ShapeDtypeStruct((1, side, 1, 64), jnp.float32)) == "xla"
    assert attention_implementation(jax.ShapeDtypeStruct((1, side + 1, 1, 64), jnp.float32)) == "blocked"


def test_bad_shapes_and_implementations_are_named():
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match=r"\(B, T, H, D\)"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="query heads are not a multiple"):
        attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="implementation must be one of"):
        attention(q, k, v, implementation="flash")


def test_forced_implementation_applies_inside_the_block_only():
    from cfgzero_theory.ports.attention import forced_implementation

    q = jnp.zeros((1, 2, 1, 8))
    default = attention_implementation(q)
    with forced_implementation("xla"):
        assert attention_implementation(q) == "xla"
    assert attention_implementation(q) == default
    with pytest.raises(ValueError, match="implementation must be one of"):
        with forced_implementation("flash"):
            pass
