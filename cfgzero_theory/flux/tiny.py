"""Random diffusers ``FluxPipeline`` checkpoints for tests, demos and benchmarks.

:func:`build_random_pipeline` ``(folder, config="tiny", seed=0, torch_dtype=None)`` builds one of
the sizes of :data:`PIPELINE_SIZES` with diffusers and transformers (the ``[test]`` extra;
hand-written tokenizers, nothing downloaded) and saves it to ``folder``:

* ``"tiny"`` — FLUX.1-dev's shape in miniature: guidance embedding, dynamic shift;
* ``"tiny-schnell"`` — FLUX.1-schnell's: no guidance embedding, static shift 1;
* ``"mid"`` — a dev-like model big enough to time (4 double and 8 single blocks, 8 heads of 64,
  512² images: 1024 image tokens);
* ``"dev"`` — FLUX.1-dev's transformer (19 double and 38 single blocks, 3072 wide) and VAE at
  1024², with text encoders of the real widths but one layer each (for GPU benchmarks).

``image_size`` is the side each size's benchmark samples.

Every size has a ``CLIPTextModel`` (Flux's CLIP-L, pooled output only), a gated-gelu T5 whose
width is the transformer's ``joint_attention_dim``, and a 16-channel ``AutoencoderKL`` with
Flux's scaling 0.3611 and shift 0.1159.
"""

from __future__ import annotations

import os

from cfgzero_theory.ports.tiny import CLIP_MAX_LENGTH, clip_tokenizer, finish_models, require_torch, t5_tokenizer

__all__ = ["PIPELINE_SIZES", "build_random_pipeline", "build_tiny_random_pipeline"]

_TINY_TEXT = dict(
    clip=dict(hidden_size=12, intermediate_size=24, projection_dim=12, num_hidden_layers=2, num_attention_heads=2),
    t5=dict(d_model=24, d_kv=8, d_ff=40, num_layers=2, num_heads=3, relative_attention_num_buckets=8,
            relative_attention_max_distance=16),
)
_TINY_TRANSFORMER = dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                         joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 6, 6))
_TINY_VAE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32)
_DYNAMIC_SHIFT = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096, shift=3.0)

#: Sizes of :func:`build_random_pipeline`; ``perturb`` moves every weight by ``perturb·N(0, 1)``.
PIPELINE_SIZES = {
    "tiny": dict(**_TINY_TEXT, transformer=dict(**_TINY_TRANSFORMER, guidance_embeds=True), vae=_TINY_VAE,
                 scheduler=_DYNAMIC_SHIFT, perturb=0.1, image_size=32),
    "tiny-schnell": dict(**_TINY_TEXT, transformer=dict(**_TINY_TRANSFORMER, guidance_embeds=False), vae=_TINY_VAE,
                         scheduler=dict(use_dynamic_shifting=False, shift=1.0), perturb=0.1, image_size=32),
    "mid": dict(
        clip=dict(hidden_size=64, intermediate_size=256, projection_dim=64, num_hidden_layers=2,
                  num_attention_heads=2),
        t5=dict(d_model=256, d_kv=64, d_ff=512, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
                relative_attention_max_distance=128),
        transformer=dict(num_layers=4, num_single_layers=8, attention_head_dim=64, num_attention_heads=8,
                         joint_attention_dim=256, pooled_projection_dim=64, axes_dims_rope=(8, 28, 28),
                         guidance_embeds=True),
        vae=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=32, sample_size=512),
        scheduler=_DYNAMIC_SHIFT, perturb=None, image_size=512,
    ),
    "dev": dict(
        clip=dict(hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=1,
                  num_attention_heads=12),
        t5=dict(d_model=4096, d_kv=64, d_ff=1024, num_layers=1, num_heads=4, relative_attention_num_buckets=32,
                relative_attention_max_distance=128),
        transformer=dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                         joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56),
                         guidance_embeds=True),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024),
        scheduler=_DYNAMIC_SHIFT, perturb=None, image_size=1024,
    ),
}


def build_random_pipeline(folder, config: str = "tiny", seed: int = 0, torch_dtype=None):
    """Build a random ``diffusers.FluxPipeline`` of size ``config`` (a key of
    :data:`PIPELINE_SIZES`), save it to ``folder`` (safetensors) and return it.  Weights are the
    default initialisation under ``torch.manual_seed(seed)``, moved by ``perturb·N(0, 1)`` where
    the size sets ``perturb``; ``torch_dtype`` casts every model before saving."""
    torch = require_torch()
    import transformers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    if config not in PIPELINE_SIZES:
        raise ValueError(f"config must be one of {tuple(PIPELINE_SIZES)}, got {config!r}")
    size = PIPELINE_SIZES[config]
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=2, pad_token_id=vocab["<|endoftext|>"], hidden_act="quick_gelu", **size["clip"]))
    text_encoder_2 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(tokenizer_2), feed_forward_proj="gated-gelu", **size["t5"]))
    latent_channels = 16
    transformer = FluxTransformer2DModel(in_channels=4 * latent_channels, **size["transformer"])
    blocks = len(size["vae"]["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=latent_channels, scaling_factor=0.3611,
        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, **size["vae"])
    finish_models((text_encoder, text_encoder_2, transformer, vae), size["perturb"], torch_dtype)
    pipe = FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**size["scheduler"]), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    pipe.save_pretrained(os.fspath(folder), safe_serialization=True)
    return pipe


def build_tiny_random_pipeline(folder, seed: int = 0, schnell: bool = False):
    """The ``"tiny"`` (dev-like) or, with ``schnell=True``, ``"tiny-schnell"`` pipeline of
    :func:`build_random_pipeline`, saved to ``folder``; returns the diffusers pipeline."""
    return build_random_pipeline(folder, "tiny-schnell" if schnell else "tiny", seed)
