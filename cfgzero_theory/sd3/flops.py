"""FLOPs of one SD3 / SD3.5 MMDiT transformer call, counted from the architecture.

The count is the work of the matrix products only, 2 FLOPs per multiply-add: every linear map
at the number of tokens (or samples) it is applied to, and attention's ``QKᵀ`` and ``AV``
(``2·N_q·N_kv·D`` each, ``4·N_q·N_kv·D`` together).  Norms, activations, softmax, biases,
modulation and residual additions are left out.  Unlike XLA's cost analysis it sees the
attention inside a fused kernel (cuDNN's on a GPU), so it is the number to divide by a
measured time.

Notation: ``D = num_attention_heads · attention_head_dim`` the width, ``p`` the patch size,
``C_in`` / ``C_out`` the latent channels in and out, ``J = joint_attention_dim``,
``P = pooled_projection_dim``, ``N_i`` image tokens (``(h/p)·(w/p)`` for ``h × w`` latents),
``N_t`` text tokens (``77 + max_sequence_length`` in the pipeline), ``N = N_i + N_t``.
One sample costs::

    embeddings  2·N_i·p²C_in·D  (patches)  + 2·N_t·J·D  (context)
                + 2·(256·D + D²)  (timestep MLP)  + 2·(P·D + D²)  (pooled MLP)
    blocks      Σ over the blocks of :func:`joint_block_flops`
    output      2·D·2D  (AdaLN-continuous modulation)  + 2·N_i·D·p²C_out  (projection)

and a call on ``B`` samples ``B`` times that (:func:`mmdit_step_flops`).
"""

from __future__ import annotations

from cfgzero_theory.sd3.transformer import MLP_RATIO, TIME_CHANNELS, SD3Config

__all__ = ["joint_block_flops", "mmdit_step_flops"]


def joint_block_flops(config: SD3Config, index: int, image_tokens: int, text_tokens: int) -> int:
    """FLOPs of joint block ``index`` on one sample (``N_i`` image, ``N_t`` text tokens).

    An ordinary block, summed over both streams::

        2·D·6D + 2·D·6D           AdaLN modulations from c (image, text)
        6·D²·(N_i + N_t)          q, k, v projections
        4·N·N·D                   joint attention (QKᵀ and AV over all N tokens)
        2·D²·(N_i + N_t)          output projections
        16·D²·(N_i + N_t)         MLPs D → 4D → D  (2·D·4D·2 per token)

    The last block is *context pre-only*: the text modulation has 2 chunks (``2·D·2D``),
    text tokens give keys and values only (``4·D²·N_t``), only the ``N_i`` image queries
    attend (``4·N_i·N·D``) and the text stream has no output projection or MLP.  A block of
    ``dual_attention_layers`` has 9 image modulation chunks (``2·D·9D``) and an extra
    image-only attention: q, k, v and out projections ``8·D²·N_i`` and ``4·N_i·N_i·D``.
    """
    d, n_img, n_txt = config.inner_dim, image_tokens, text_tokens
    n = n_img + n_txt
    pre_only = index == config.num_layers - 1
    dual = index in config.dual_attention_layers
    modulation = 2 * d * (9 if dual else 6) * d + 2 * d * (2 if pre_only else 6) * d
    qkv = 6 * d * d * n_img + (4 if pre_only else 6) * d * d * n_txt
    attention = 4 * (n_img if pre_only else n) * n * d
    out_tokens = n_img + (0 if pre_only else n_txt)
    out_and_mlp = 2 * d * d * out_tokens + 2 * 2 * MLP_RATIO * d * d * out_tokens
    extra = 8 * d * d * n_img + 4 * n_img * n_img * d if dual else 0
    return modulation + qkv + attention + out_and_mlp + extra


def mmdit_step_flops(config: SD3Config, image_tokens: int, text_tokens: int, batch: int) -> float:
    """FLOPs of one transformer call on ``batch`` samples (the module docstring's count).

    ``image_tokens = (h/p)·(w/p)`` for latents ``h × w``; ``text_tokens`` is the context
    length.  For classifier-free guidance the transformer sees the doubled batch ``2B``.
    """
    d, n_img, n_txt = config.inner_dim, image_tokens, text_tokens
    patch = config.patch_size ** 2
    embeddings = 2 * n_img * patch * config.in_channels * d + 2 * n_txt * config.joint_attention_dim * d
    conditioning = 2 * (TIME_CHANNELS * d + d * d) + 2 * (config.pooled_projection_dim * d + d * d)
    blocks = sum(joint_block_flops(config, i, n_img, n_txt) for i in range(config.num_layers))
    output = 2 * d * 2 * d + 2 * n_img * d * patch * config.out_channels
    return float(batch * (embeddings + conditioning + blocks + output))
