"""One softmax attention for every model port, with the program chosen per backend.

:func:`attention` ``(q, k, v, *, bias=None, causal=False, scale=None) -> out`` computes, for
queries ``q (B, T, H, D)``, keys ``k (B, S, H, D)`` and values ``v (B, S, H, Dv)``,

    out[b, t, h] = Σ_s softmax_s(scale · ⟨q[b, t, h], k[b, s, h]⟩ + bias[b, h, t, s]) · v[b, s, h],

with ``scale = D^-1/2`` unless given (T5 uses ``scale=1``), an optional additive ``bias``
broadcastable to ``(B, H, T, S)`` (T5's relative positions; ``-inf`` entries mask keys) and an
optional causal mask (CLIP).  Grouped-query attention (fewer key/value heads than query heads)
is accepted: each key/value head serves ``H / H_kv`` consecutive query heads.  Scores and the
softmax are float32 whatever the inputs' dtype; the weights are cast back to ``v``'s dtype
before the second product, as PyTorch's SDPA does.

:func:`attention_implementation` names the program :func:`attention` builds:

* ``"cudnn"`` — half-precision queries on a GPU with a head size cuDNN supports (a multiple of
  8, at most 128): cuDNN's fused flash attention, the score matrix never materialised;
* ``"blocked"`` — on a CPU: flash-style attention written in JAX (:func:`_blocked`): one
  ``(b, h)`` head per iteration of a :func:`jax.lax.map`, its keys in blocks of :data:`BLOCK`
  with an online float32 softmax, so only a ``(T, BLOCK)`` score block exists at a time;
* ``"head_major"`` — the two products as einsums in ``(B, H, T, D)`` layout with a float32
  softmax between them, the whole ``(B, H, T, S)`` score matrix materialised;
* ``"xla"`` — :func:`jax.nn.dot_product_attention`'s XLA program otherwise (float32 on a GPU),
  except where its float32 score matrix ``B·H·T·S`` would exceed :data:`XLA_SCORE_BYTES`
  (1 GiB): on a GPU without cuDNN's path (float32, head sizes cuDNN refuses) long sequences —
  a Wan video's tens of thousands of tokens — take ``"blocked"``, so that no full score matrix
  is ever built there either.

On the 2-core CPU (jax 0.10.2, medians of interleaved runs) for ``q, k, v`` of shape
``(2, 1357, 8, 64)`` float32 (SD3 "mid": 1024 image + 333 text tokens, CFG batch 2)
``"blocked"`` takes 44–57 ms, ``"head_major"`` 250–300 ms, ``"xla"`` 180–220 ms and PyTorch's
``scaled_dot_product_attention`` (2 threads) 31–46 ms.  ``"blocked"`` was also faster than
``"head_major"`` at every other size tried (CLIP's 77 causal tokens, T5's 256 with a bias, 512,
1024 and 4096 tokens, 1 to 64 heads; ``"xla"`` is as fast up to 256 tokens and slower above),
so it is the CPU default with no size threshold.  One SD3 "mid" transformer step
(``python -m experiments.bench_pipeline --config mid``, 8 such calls) went from 0.41–0.42× to
0.99–1.00× diffusers' speed with it (runs back to back on the same machine).

``implementation=`` forces one of them for one call, and :func:`forced_implementation` for
every call traced inside a ``with`` block (tests and benchmarks: e.g. XLA's cost analysis
counts the ``"blocked"`` loop's body once, the ``"head_major"`` program whole).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

__all__ = ["IMPLEMENTATIONS", "XLA_SCORE_BYTES", "attention", "attention_implementation", "forced_implementation"]

Array = jax.Array

IMPLEMENTATIONS = ("cudnn", "head_major", "blocked", "xla")
BLOCK = 512  # keys per block of the "blocked" program (256 to 1024 time alike on the CPU)
XLA_SCORE_BYTES = 2**30  # the largest float32 score matrix the "xla" program may build on a GPU
_FORCED = contextvars.ContextVar("forced_attention_implementation", default=None)


@contextlib.contextmanager
def forced_implementation(implementation: str):
    """Within the block, :func:`attention_implementation` returns ``implementation`` (read when
    a program is traced, so it applies to what is compiled inside the block)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    token = _FORCED.set(implementation)
    try:
        yield
    finally:
        _FORCED.reset(token)


def attention_implementation(q: Array, key_length: int | None = None) -> str:
    """Which program :func:`attention` builds for queries ``q`` and ``key_length`` keys (default:
    as many as queries) on this backend (module docstring), unless :func:`forced_implementation`
    says otherwise."""
    if _FORCED.get() is not None:
        return _FORCED.get()
    backend = jax.default_backend()
    if (backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128):
        return "cudnn"
    if backend == "cpu":
        return "blocked"
    batch, t, heads, _ = q.shape
    score_bytes = 4 * batch * heads * t * (t if key_length is None else key_length)
    return "blocked" if score_bytes > XLA_SCORE_BYTES else "xla"


def _check(q: Array, k: Array, v: Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k and v must be (B, T, H, D) arrays, got shapes {q.shape}, {k.shape}, {v.shape}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {q.shape}, k {k.shape} and v {v.shape} do not fit together "
                         "(batch, key length, heads and the q/k head size must agree)")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"the {q.shape[2]} query heads are not a multiple of the {k.shape[2]} key/value heads")


def _head_major(q: Array, k: Array, v: Array, bias, causal: bool, scale: float) -> Array:
    batch, t, heads, _ = q.shape
    groups = heads // k.shape[2]
    q = q.reshape(batch, t, k.shape[2], groups, q.shape[-1])
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        bias = jnp.asarray(bias, jnp.float32)
        bias = jnp.broadcast_to(bias, (*bias.shape[:-3], heads, *bias.shape[-2:]))
        scores = scores + bias.reshape(*bias.shape[:-3], k.shape[2], groups, *bias.shape[-2:])
    if causal:
        keep = jnp.arange(k.shape[1])[None, :] <= jnp.arange(t)[:, None]
        scores = jnp.where(keep, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, v)
    return out.reshape(batch, t, heads, v.shape[-1])


def _blocked(q: Array, k: Array, v: Array, bias, causal: bool, scale: float) -> Array:
    """Flash-style attention: one ``(b, h)`` head at a time, its keys in blocks of :data:`BLOCK`.

    For each head, with scaled queries ``q`` ``(T, D)`` and the key block ``K_j, V_j``, keep per
    query row a running max ``m``, sum ``l`` and output ``o`` (float32, from ``m = -inf``,
    ``l = 0``, ``o = 0``) and update them with the block's scores ``s = q K_jᵀ + bias_j``:

        m_new = max(m, rowmax(s))
        l_new = e^{m - m_new} · l + Σ_s e^{s - m_new}
        o_new = e^{m - m_new} · o + e^{s - m_new} V_j

    then ``out = o / l``: the same softmax, rescaled block by block (exact up to float32
    rounding), with only one ``(T, BLOCK)`` score block alive at a time.  The shift ``m_new``
    is replaced by 0 on rows whose keys so far are all masked (``-inf``), so those rows add
    nothing instead of ``nan``; a row with no unmasked key at all ends as ``0 / 0 = nan``, as
    in the other programs.  The last block is shorter when ``BLOCK`` does not divide the key
    length.  Queries are scaled in their own dtype (exact in float32, and in any dtype for
    power-of-two scales such as ``64^-1/2``); ``e^{s - m_new}`` is cast to ``v``'s dtype before
    the second product, as in ``"head_major"``.

    Slower alternatives measured at the SD3 "mid" shapes (module docstring): all ``B·H`` heads
    at once per key block, by :func:`jax.lax.scan` or unrolled (1.6–2×: a ``(B·H, T, BLOCK)``
    block is out of cache); query blocks as well as key blocks (more, smaller products); a
    padded, masked :func:`jax.lax.scan` over the key blocks instead of the unrolled loop (~15%);
    dividing by ``l`` inside the map (~5%).  ``BLOCK`` from 256 to 1024 measured alike, and
    float32 products ignore the dot precision on the CPU.
    """
    batch, t, heads, _ = q.shape
    length, groups = k.shape[1], heads // k.shape[2]
    q = (jnp.asarray(q, jnp.float32) * scale).astype(q.dtype)
    q = jnp.swapaxes(q, 1, 2).reshape(batch * heads, t, q.shape[-1])
    k, v = jnp.asarray(k), jnp.asarray(v)  # indexed by traced head numbers below
    if bias is not None:
        bias = jnp.asarray(bias, jnp.float32)
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)

    def head(index_and_queries):
        index, qh = index_and_queries
        b, h = index // heads, index % heads
        kh, vh = k[b, :, h // groups], v[b, :, h // groups]
        bh = None if bias is None else bias[b if bias.shape[0] > 1 else 0, h if bias.shape[1] > 1 else 0]
        m = jnp.full((t, 1), -jnp.inf, jnp.float32)
        l = jnp.zeros((t, 1), jnp.float32)
        o = jnp.zeros((t, vh.shape[-1]), jnp.float32)
        for start in range(0, length, BLOCK):
            keys = slice(start, start + BLOCK)
            # Tie the block to the running state, else XLA hoists every q·Kᵀ product to the front
            # and all score blocks are alive at once.
            (m, l, o), kj = jax.lax.optimization_barrier(((m, l, o), kh[keys]))
            s = jnp.einsum("td,sd->ts", qh, kj, preferred_element_type=jnp.float32)
            if bh is not None:
                s = s + (bh if bh.shape[-1] == 1 else bh[:, keys])
            if causal:
                s = jnp.where(jnp.arange(length)[keys] <= jnp.arange(t)[:, None], s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1, keepdims=True))
            shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p, decay = jnp.exp(s - shift), jnp.exp(m - shift)
            l = decay * l + p.sum(-1, keepdims=True)
            o = decay * o + jnp.einsum("ts,sd->td", p.astype(vh.dtype), vh[keys], preferred_element_type=jnp.float32)
            m = m_new
        return o, l

    o, l = jax.lax.map(head, (jnp.arange(batch * heads), q))  # (B·H, T, Dv), (B·H, T, 1)
    return jnp.swapaxes((o / l).reshape(batch, heads, t, -1), 1, 2).astype(v.dtype)


def attention(q: Array, k: Array, v: Array, *, bias: Array | None = None, causal: bool = False,
              scale: float | None = None, implementation: str | None = None) -> Array:
    """Softmax attention ``(B, T, H, D) × (B, S, H_kv, D) × (B, S, H_kv, Dv) -> (B, T, H, Dv)``
    (module docstring); ``implementation`` defaults to :func:`attention_implementation` ``(q, S)``."""
    _check(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    implementation = attention_implementation(q, k.shape[1]) if implementation is None else implementation
    if implementation == "head_major":
        return _head_major(q, k, v, bias, causal, scale)
    if implementation == "blocked":
        return _blocked(q, k, v, bias, causal, scale)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if bias is not None:
        bias = jnp.asarray(bias).astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, is_causal=causal,
                                        implementation=implementation)
