"""Random diffusers Wan2.1 pipeline checkpoints for tests, demos and benchmarks.

:func:`build_random_pipeline` ``(folder, config="tiny", seed=0, torch_dtype=None)`` builds one of
the sizes of :data:`PIPELINE_SIZES` with diffusers and transformers (the ``[test]`` extra; a
hand-written tokenizer, nothing downloaded) and saves it to ``folder``:

* ``"tiny"`` — a ``WanPipeline`` (text-to-video) in miniature;
* ``"tiny-i2v"`` — a ``WanImageToVideoPipeline``: 36 input channels, a CLIP vision tower and its
  image processor, the image key/value branch;
* ``"mid"`` — a T2V model big enough to time (8 layers of 8 heads of 64, 17 frames at 256²:
  1,280 video tokens) with a small VAE;
* ``"1.3b"`` — Wan2.1 T2V 1.3B's transformer (30 layers, 1536 wide) and Wan2.1's VAE, with a
  one-layer UMT5 of the real width (for GPU benchmarks at 480p).

``video_size`` is the ``(frames, height, width)`` each size's benchmark samples.  Every size
has a UMT5 text encoder whose width is the transformer's ``text_dim``, an ``AutoencoderKLWan``
with random ``latents_mean`` / ``latents_std``, and Wan's flow-mode ``UniPCMultistepScheduler``
(``flow_shift`` 3.0).
"""

from __future__ import annotations

import os

from cfgzero_theory.ports.tiny import finish_models, require_torch, t5_tokenizer

__all__ = ["PIPELINE_SIZES", "build_random_pipeline"]

_TINY_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                         out_channels=16, text_dim=24, freq_dim=16, ffn_dim=40, num_layers=2, rope_max_seq_len=32)
_TINY_UMT5 = dict(d_model=24, d_kv=8, d_ff=40, num_layers=2, num_heads=3, relative_attention_num_buckets=8,
                  relative_attention_max_distance=16)
_TINY_VAE = dict(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
_TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                  patch_size=7)

#: Sizes of :func:`build_random_pipeline`; ``perturb`` moves every weight by ``perturb·N(0, 1)``.
PIPELINE_SIZES = {
    "tiny": dict(transformer=_TINY_TRANSFORMER, umt5=_TINY_UMT5, vae=_TINY_VAE, clip=None, perturb=0.1,
                 video_size=(9, 32, 48)),
    "tiny-i2v": dict(transformer=dict(_TINY_TRANSFORMER, in_channels=36, image_dim=16, added_kv_proj_dim=24),
                     umt5=_TINY_UMT5, vae=_TINY_VAE, clip=_TINY_CLIP, perturb=0.1, video_size=(9, 32, 48)),
    "mid": dict(
        transformer=dict(patch_size=(1, 2, 2), num_attention_heads=8, attention_head_dim=64, in_channels=16,
                         out_channels=16, text_dim=256, freq_dim=256, ffn_dim=2048, num_layers=8),
        umt5=dict(d_model=256, d_kv=64, d_ff=512, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
                  relative_attention_max_distance=128),
        vae=dict(base_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True]),
        clip=None, perturb=None, video_size=(17, 256, 256),
    ),
    "1.3b": dict(
        transformer=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                         out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30),
        umt5=dict(d_model=4096, d_kv=64, d_ff=1024, num_layers=1, num_heads=4, relative_attention_num_buckets=32,
                  relative_attention_max_distance=128),
        vae=dict(base_dim=96, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]),
        clip=None, perturb=None, video_size=(81, 480, 832),
    ),
}


def build_random_pipeline(folder, config: str = "tiny", seed: int = 0, torch_dtype=None):
    """Build a random ``diffusers.WanPipeline`` (or, for ``"tiny-i2v"``, ``WanImageToVideoPipeline``)
    of size ``config`` (a key of :data:`PIPELINE_SIZES`), save it to ``folder`` (safetensors) and
    return it.  Weights are the default initialisation under ``torch.manual_seed(seed)``, moved by
    ``perturb·N(0, 1)`` where the size sets ``perturb``; ``torch_dtype`` casts the transformer and
    the encoders (the VAE stays float32, as Wan's examples run it)."""
    torch = require_torch()
    import transformers
    from diffusers import (
        AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel,
    )

    if config not in PIPELINE_SIZES:
        raise ValueError(f"config must be one of {tuple(PIPELINE_SIZES)}, got {config!r}")
    size = PIPELINE_SIZES[config]
    tokenizer = t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=len(tokenizer), feed_forward_proj="gated-gelu", **size["umt5"]))
    transformer = WanTransformer3DModel(**size["transformer"])
    z_dim = size["transformer"]["out_channels"]
    statistics = torch.Generator().manual_seed(seed + 1)
    vae = AutoencoderKLWan(
        z_dim=z_dim, **size["vae"],
        latents_mean=(0.5 * torch.randn(z_dim, generator=statistics)).tolist(),
        latents_std=(0.5 + torch.rand(z_dim, generator=statistics)).tolist())
    models = [text_encoder, transformer]
    components = {}
    if size["clip"] is not None:
        image_encoder = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**size["clip"]))
        models.append(image_encoder)
        side = size["clip"]["image_size"]
        components = dict(image_encoder=image_encoder, image_processor=transformers.CLIPImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}))
    finish_models(models, size["perturb"], torch_dtype)
    finish_models((vae,), size["perturb"])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    pipeline_class = WanImageToVideoPipeline if components else WanPipeline
    pipe = pipeline_class(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                          transformer=transformer, **components)
    pipe.save_pretrained(os.fspath(folder), safe_serialization=True)
    return pipe
