"""Random diffusers ``StableDiffusion3Pipeline`` checkpoints for tests, demos and benchmarks.

:func:`build_random_pipeline` ``(folder, config="tiny", seed=0, torch_dtype=None)`` builds one of
the sizes of :data:`PIPELINE_SIZES` with diffusers and transformers (the ``[test]`` extra;
hand-written tokenizers, nothing downloaded) and saves it to ``folder``;
:func:`build_tiny_random_pipeline` is the ``"tiny"`` size, the fixture of the SD3 parity tests
and of ``python -m experiments.sample_image --tiny-random``.
"""

from __future__ import annotations

import os

from cfgzero_theory.ports.tiny import CLIP_MAX_LENGTH, clip_tokenizer, finish_models, require_torch, t5_tokenizer

__all__ = ["PIPELINE_SIZES", "build_random_pipeline", "build_tiny_random_pipeline"]


#: Sizes of :func:`build_random_pipeline`.  ``perturb``: every weight moved by ``perturb·N(0, 1)``
#: after the default initialisation (``None``: default initialisation only — for the larger
#: sizes, where such a perturbation would blow activations up through many wide layers).
PIPELINE_SIZES = {
    "tiny": dict(
        clip_l=dict(hidden_size=8, projection_dim=8, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2),
        clip_g=dict(hidden_size=16, projection_dim=16, intermediate_size=24, num_hidden_layers=2,
                    num_attention_heads=2),
        t5=dict(d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                relative_attention_max_distance=16),
        transformer=dict(sample_size=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                         joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24,
                         pos_embed_max_size=16),
        vae=dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32),
        perturb=0.1,
    ),
    "mid": dict(
        clip_l=dict(hidden_size=64, projection_dim=64, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=2),
        clip_g=dict(hidden_size=128, projection_dim=128, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=2),
        t5=dict(d_model=256, d_kv=64, d_ff=512, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
                relative_attention_max_distance=128),
        transformer=dict(sample_size=64, num_layers=8, attention_head_dim=64, num_attention_heads=8,
                         joint_attention_dim=256, caption_projection_dim=512, pooled_projection_dim=64 + 128,
                         pos_embed_max_size=96),
        vae=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=32, sample_size=512),
        perturb=None,
    ),
    # SD3-medium's transformer and VAE; text encoders with SD3's widths but one layer each
    # (and a small T5 feed-forward), with the tiny hand-written tokenizers.
    "medium": dict(
        clip_l=dict(hidden_size=768, projection_dim=768, intermediate_size=3072, num_hidden_layers=1,
                    num_attention_heads=12),
        clip_g=dict(hidden_size=1280, projection_dim=1280, intermediate_size=5120, num_hidden_layers=1,
                    num_attention_heads=20),
        t5=dict(d_model=4096, d_kv=64, d_ff=1024, num_layers=1, num_heads=4, relative_attention_num_buckets=32,
                relative_attention_max_distance=128),
        transformer=dict(sample_size=128, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                         joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                         pos_embed_max_size=192),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024),
        perturb=None,
    ),
}


def build_random_pipeline(folder, config: str = "tiny", seed: int = 0, torch_dtype=None):
    """Build a random ``diffusers.StableDiffusion3Pipeline`` of size ``config``, save it to ``folder``; returns it.

    ``config`` is a key of :data:`PIPELINE_SIZES`.  All sizes share the hand-written tiny
    tokenizers, CLIP-L with quick_gelu and the legacy eos rule, CLIP-G with gelu, a gated-gelu
    T5, a transformer with patch 2 and 16 latent channels, a 16-channel VAE (scaling 1.5305,
    shift 0.0609, no quant convs) and ``FlowMatchEulerDiscreteScheduler(shift=3)``.  Weights
    are the default initialisation under ``torch.manual_seed(seed)``, moved by
    ``perturb·N(0, 1)`` where the size sets ``perturb``; ``torch_dtype`` (e.g.
    ``torch.bfloat16``) casts every model before saving (safetensors).
    """
    torch = require_torch()
    import transformers
    from diffusers import (
        AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline,
    )

    if config not in PIPELINE_SIZES:
        raise ValueError(f"config must be one of {tuple(PIPELINE_SIZES)}, got {config!r}")
    size = PIPELINE_SIZES[config]
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(pad_token="!"), t5_tokenizer()
    vocab = tokenizer.get_vocab()

    torch.manual_seed(seed)
    eot = vocab["<|endoftext|>"]
    clip = dict(vocab_size=len(vocab), max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=vocab["<|startoftext|>"])
    text_encoder = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        **clip, **size["clip_l"], hidden_act="quick_gelu", eos_token_id=2, pad_token_id=eot))
    text_encoder_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        **clip, **size["clip_g"], hidden_act="gelu", eos_token_id=eot, pad_token_id=0))
    text_encoder_3 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(tokenizer_3), **size["t5"], feed_forward_proj="gated-gelu"))
    transformer = SD3Transformer2DModel(patch_size=2, in_channels=16, out_channels=16, **size["transformer"])
    blocks = len(size["vae"]["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=16, scaling_factor=1.5305,
        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False, **size["vae"])
    finish_models((text_encoder, text_encoder_2, text_encoder_3, transformer, vae), size["perturb"], torch_dtype)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(os.fspath(folder), safe_serialization=True)
    return pipe


def build_tiny_random_pipeline(folder, seed: int = 0):
    """Build a tiny random ``diffusers.StableDiffusion3Pipeline``, save it to ``folder``; returns it.

    CLIP-L: width 8, quick_gelu, legacy eos rule; CLIP-G: width 16, gelu; T5: width 32 (the
    CLIP states are zero-padded from 24 features); transformer: 2 layers, 16 latent channels,
    sample size 16; VAE: factor 2 (32×32 images).  Every weight is moved by ``0.1·N(0, 1)``.
    ``build_random_pipeline(folder, "tiny", seed)``.
    """
    return build_random_pipeline(folder, "tiny", seed)
