"""``cfgzero_theory.sd3.flops``: the MMDiT FLOP count against two independent counts.

* a hand count for one tiny configuration, written out term by term below (numbers, not the
  module's expressions);
* XLA's cost analysis of the compiled transformer (on a CPU XLA's attention is plain
  matmuls, so it sees all the work; it also counts the element-wise work the analytic count
  leaves out, hence the 10% band below it).
"""

import pytest

from cfgzero_theory.sd3.flops import joint_block_flops, mmdit_step_flops
from cfgzero_theory.sd3.transformer import SD3Config

# D = 2 heads × 4 = 8, patch 2, 4 latent channels in and out, J = 6, P = 5, two blocks (the
# second context pre-only).  Latents 4 × 4 → N_i = 2·2 = 4 image tokens; N_t = 3; N = 7.
TINY = dict(sample_size=4, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=4,
            num_attention_heads=2, joint_attention_dim=6, caption_projection_dim=8, pooled_projection_dim=5,
            pos_embed_max_size=4)

BLOCK_0 = {  # an ordinary joint block
    "modulation, image (D → 6D)": 2 * 8 * 48,
    "modulation, text (D → 6D)": 2 * 8 * 48,
    "q, k, v on 7 tokens": 3 * 2 * 8 * 8 * 7,
    "joint attention QKᵀ + AV, 7 × 7": 2 * 7 * 7 * 8 + 2 * 7 * 7 * 8,
    "output projections on 7 tokens": 2 * 8 * 8 * 7,
    "MLPs D → 32 → D on 7 tokens": (2 * 8 * 32 + 2 * 32 * 8) * 7,
}
BLOCK_1 = {  # the last block: text is context pre-only
    "modulation, image (D → 6D)": 2 * 8 * 48,
    "modulation, text (D → 2D)": 2 * 8 * 16,
    "q, k, v on 4 image tokens": 3 * 2 * 8 * 8 * 4,
    "k, v on 3 text tokens": 2 * 2 * 8 * 8 * 3,
    "attention of 4 image queries over 7 keys": 2 * 4 * 7 * 8 + 2 * 4 * 7 * 8,
    "output projection on 4 image tokens": 2 * 8 * 8 * 4,
    "MLP on 4 image tokens": (2 * 8 * 32 + 2 * 32 * 8) * 4,
}
OUTSIDE_BLOCKS = {
    "patch embedding (4 tokens, 2·2·4 → 8)": 2 * 4 * 16 * 8,
    "context embedding (3 tokens, 6 → 8)": 2 * 3 * 6 * 8,
    "timestep MLP 256 → 8 → 8": 2 * 256 * 8 + 2 * 8 * 8,
    "pooled MLP 5 → 8 → 8": 2 * 5 * 8 + 2 * 8 * 8,
    "output modulation D → 2D": 2 * 8 * 16,
    "output projection (4 tokens, 8 → 2·2·4)": 2 * 4 * 8 * 16,
}
DUAL_EXTRA = {  # block 0 with dual attention, on top of BLOCK_0
    "image modulation D → 9D instead of 6D": 2 * 8 * 72 - 2 * 8 * 48,
    "image-only q, k, v and out on 4 tokens": 4 * 2 * 8 * 8 * 4,
    "image-only attention 4 × 4": 2 * 4 * 4 * 8 + 2 * 4 * 4 * 8,
}


def test_hand_count_of_a_tiny_configuration():
    config = SD3Config(**TINY)
    assert sum(BLOCK_0.values()) == 13856 and sum(BLOCK_1.values()) == 8832
    assert joint_block_flops(config, 0, image_tokens=4, text_tokens=3) == 13856
    assert joint_block_flops(config, 1, image_tokens=4, text_tokens=3) == 8832
    total = sum(BLOCK_0.values()) + sum(BLOCK_1.values()) + sum(OUTSIDE_BLOCKS.values())
    assert total == 29712
    assert mmdit_step_flops(config, image_tokens=4, text_tokens=3, batch=1) == 29712
    assert mmdit_step_flops(config, image_tokens=4, text_tokens=3, batch=2) == 2 * 29712


def test_hand_count_with_dual_attention():
    config = SD3Config(**TINY, dual_attention_layers=(0,))
    assert sum(DUAL_EXTRA.values()) == 384 + 2048 + 512
    assert joint_block_flops(config, 0, image_tokens=4, text_tokens=3) == 13856 + 2944
    assert mmdit_step_flops(config, image_tokens=4, text_tokens=3, batch=1) == 29712 + 2944


@pytest.mark.parametrize("dual", [(), (0,)])
def test_agrees_with_xla_cost_analysis(dual):
    """The count against XLA's own count of the compiled transformer, which also includes the
    element-wise work the analytic count leaves out (so it is a little larger)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cfgzero_theory.ports.attention import forced_implementation
    from cfgzero_theory.sd3.transformer import SD3Transformer
    from cfgzero_theory.sd3.weights import sd3_model_fn
    from experiments.bench_common import xla_flops

    config = SD3Config(sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=32,
                       num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=128,
                       pooled_projection_dim=64, out_channels=16, pos_embed_max_size=16, dual_attention_layers=dual)
    model = SD3Transformer(config, rngs=nnx.Rngs(0))
    context = (jnp.zeros((2, 40, 96)), jnp.zeros((2, 64)))
    with forced_implementation("head_major"):  # the whole attention, not the blocked loop's body once
        compiled = jax.jit(sd3_model_fn(model)).lower(nnx.state(model), jnp.zeros((2, 16, 16, 16)), 1.0, 1000.0,
                                                      context).compile()
    xla = xla_flops(compiled)
    if xla is None:
        pytest.skip("this XLA backend reports no cost analysis")
    analytic = mmdit_step_flops(config, image_tokens=64, text_tokens=40, batch=2)
    assert 0.9 * xla <= analytic <= xla, (analytic, xla)
