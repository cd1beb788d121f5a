"""Random diffusers Lumina-Next pipeline checkpoints for tests, demos and benchmarks.

:func:`build_random_pipeline` ``(folder, config="tiny", seed=0, torch_dtype=None)`` builds one of
the sizes of :data:`PIPELINE_SIZES` with diffusers and transformers (the ``[test]`` extra; a
hand-written Gemma tokenizer, nothing downloaded) and saves it to ``folder``:

* ``"tiny"`` — Lumina-Next's shape in miniature: grouped-query attention (4 query heads, 2
  key/value heads), a 2-layer Gemma with one key/value head, a 4-level (8×) VAE; trained size
  64² (``sample_size`` 8), so 64×96 images have a resolution scale ≠ 1;
* ``"mid"`` — a model big enough to time (8 layers of 2 × 8 heads of 64 at 512², 1,024
  image tokens);
* ``"next"`` — Lumina-Next-SFT's transformer (24 layers, 2304 wide, 32 query and 8 key/value
  heads of 72) and the SDXL VAE at 1024², with a two-layer Gemma of the real width (GPU
  benchmarks).

``image_size`` is the side each size's benchmark samples.  Every size has an
``AutoencoderKL`` with SDXL's scaling 0.13025 (4 channels, quant convs, no shift) and a
``FlowMatchEulerDiscreteScheduler`` with shift 1, as Lumina-Next's folders.
"""

from __future__ import annotations

import os

from cfgzero_theory.ports.tiny import finish_models, gemma_tokenizer, require_torch

__all__ = ["PIPELINE_SIZES", "build_random_pipeline"]

_SDXL_VAE_SCALING = 0.13025

#: Sizes of :func:`build_random_pipeline`; ``perturb`` moves every weight by ``perturb·N(0, 1)``.
PIPELINE_SIZES = {
    "tiny": dict(
        transformer=dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
                         num_attention_heads=4, num_kv_heads=2, multiple_of=16, norm_eps=1e-5, learn_sigma=True,
                         qk_norm=True, cross_attention_dim=24),
        gemma=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16),
        vae=dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64),
        perturb=0.1, image_size=64,
    ),
    "mid": dict(
        transformer=dict(sample_size=64, patch_size=2, in_channels=4, hidden_size=512, num_layers=8,
                         num_attention_heads=8, num_kv_heads=2, multiple_of=256, norm_eps=1e-5, learn_sigma=True,
                         qk_norm=True, cross_attention_dim=256),
        gemma=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=64),
        vae=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=32, sample_size=512),
        perturb=None, image_size=512,
    ),
    "next": dict(
        transformer=dict(sample_size=128, patch_size=2, in_channels=4, hidden_size=2304, num_layers=24,
                         num_attention_heads=32, num_kv_heads=8, multiple_of=256, norm_eps=1e-5, learn_sigma=True,
                         qk_norm=True, cross_attention_dim=2048),
        gemma=dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=1, head_dim=256),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024),
        perturb=None, image_size=1024,
    ),
}


def build_random_pipeline(folder, config: str = "tiny", seed: int = 0, torch_dtype=None):
    """Build a random ``diffusers.LuminaPipeline`` of size ``config`` (a key of
    :data:`PIPELINE_SIZES`), save it to ``folder`` (safetensors) and return it.  Weights are the
    default initialisation under ``torch.manual_seed(seed)``, moved by ``perturb·N(0, 1)`` where
    the size sets ``perturb``; ``torch_dtype`` casts every model before saving."""
    torch = require_torch()
    import transformers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, LuminaNextDiT2DModel, LuminaPipeline

    if config not in PIPELINE_SIZES:
        raise ValueError(f"config must be one of {tuple(PIPELINE_SIZES)}, got {config!r}")
    size = PIPELINE_SIZES[config]
    tokenizer = gemma_tokenizer()
    torch.manual_seed(seed)
    text_encoder = transformers.GemmaModel(transformers.GemmaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **size["gemma"]))
    transformer = LuminaNextDiT2DModel(**size["transformer"])
    blocks = len(size["vae"]["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=size["transformer"]["in_channels"],
        scaling_factor=_SDXL_VAE_SCALING, **size["vae"])
    finish_models((text_encoder, transformer, vae), size["perturb"], torch_dtype)
    pipe = LuminaPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                          text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.save_pretrained(os.fspath(folder), safe_serialization=True)
    return pipe
