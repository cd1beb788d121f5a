"""The shared attention (:mod:`cfgzero_theory.ports.attention`) against a float64 NumPy softmax."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

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


@pytest.mark.parametrize("implementation", ["head_major", "xla"])
@pytest.mark.parametrize("case", ["plain", "bias", "causal", "gqa", "scale"])
def test_attention_matches_a_float64_softmax(implementation, case):
    kv_heads = 2 if case == "gqa" else 4
    t = s = 7 if case == "causal" else None
    q, k, v, bias = _inputs(t=t or 7, s=s or 9, kv_heads=kv_heads)
    options = {"bias": bias} if case == "bias" else {"causal": True} if case == "causal" else {}
    if case == "scale":
        options["scale"] = 1.0
    out = attention(q, k, v, implementation=implementation, **options)
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, **options), rtol=1e-5, atol=1e-5)


def test_default_implementation_on_this_backend():
    q = jnp.zeros((1, 2, 1, 8))
    assert attention_implementation(q) == ("head_major" if jax.default_backend() == "cpu" else
                                           attention_implementation(q))


def test_bad_shapes_and_implementations_are_named():
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match=r"\(B, T, H, D\)"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="query heads are not a multiple"):
        attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="implementation must be one of"):
        attention(q, k, v, implementation="flash")
