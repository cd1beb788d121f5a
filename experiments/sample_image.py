"""Sample an image with a diffusers SD3 / SD3.5 folder, the sampler in JAX.

    python -m experiments.sample_image --checkpoint DIR --prompt "a photo of a cat" \\
        --guidance cfg-zero-star --scale 4 --zero-init-steps 1 --out figures/sample_image
    python -m experiments.sample_image --tiny-random --out /tmp/sample_image

Writes ``OUT/<guidance>.png`` and, with ``--compare`` (always with ``--tiny-random``),
``OUT/cfg_vs_cfg-zero-star.png``: CFG (left) and CFG-Zero* (right) from the same initial
noise.  ``--tiny-random`` builds a tiny randomly initialised pipeline with diffusers and
transformers classes (hand-written tokenizer vocabularies, nothing downloaded), saves it to a
temporary folder and runs the whole path on it (the images are noise-like: the point is the
plumbing, not the picture).  :func:`build_tiny_random_pipeline` is also the fixture of
``tests/test_sd3_pipeline_parity.py``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from experiments._common import run_or_exit

TINY_WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "on", "the", "beach")
CLIP_MAX_LENGTH = 77


def _clip_vocab():
    """A tiny byte-level BPE vocabulary (letters, whole words as merges) and its merges."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["!", "!</w>", *letters, *(c + "</w>" for c in letters)]
    merges = []
    for word in TINY_WORDS:
        if len(word) < 2:
            continue
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right into the whole word
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # the end-of-text id is the largest, as in CLIP
    return {token: i for i, token in enumerate(dict.fromkeys(vocab))}, list(dict.fromkeys(merges))


def _t5_vocab():
    """A tiny Unigram vocabulary: T5's specials, whole words, single letters."""
    words = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    words += [("\u2581" + w, -3.0) for w in TINY_WORDS]
    words += [(chr(c), -6.0) for c in range(ord("a"), ord("z") + 1)]
    return words


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
    import torch
    import transformers
    from diffusers import (
        AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline,
    )

    if config not in PIPELINE_SIZES:
        raise ValueError(f"config must be one of {tuple(PIPELINE_SIZES)}, got {config!r}")
    size = PIPELINE_SIZES[config]
    vocab, merges = _clip_vocab()
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)
    tokenizer_2 = transformers.CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!",
                                             model_max_length=CLIP_MAX_LENGTH)
    t5_vocab = _t5_vocab()
    tokenizer_3 = transformers.T5Tokenizer(vocab=t5_vocab, extra_ids=0)

    torch.manual_seed(seed)
    eot = vocab["<|endoftext|>"]
    clip = dict(vocab_size=len(vocab), max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=vocab["<|startoftext|>"])
    text_encoder = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        **clip, **size["clip_l"], hidden_act="quick_gelu", eos_token_id=2, pad_token_id=eot))
    text_encoder_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        **clip, **size["clip_g"], hidden_act="gelu", eos_token_id=eot, pad_token_id=0))
    text_encoder_3 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(t5_vocab), **size["t5"], feed_forward_proj="gated-gelu"))
    transformer = SD3Transformer2DModel(patch_size=2, in_channels=16, out_channels=16, **size["transformer"])
    blocks = len(size["vae"]["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=16, scaling_factor=1.5305,
        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False, **size["vae"])
    with torch.no_grad():
        for model in (text_encoder, text_encoder_2, text_encoder_3, transformer, vae):
            model.eval()
            if size["perturb"] is not None:
                for param in model.parameters():
                    param.add_(size["perturb"] * torch.randn_like(param))
            if torch_dtype is not None and next(model.parameters()).dtype != torch_dtype:
                model.to(torch_dtype)
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


def run(args):
    import jax
    import jax.numpy as jnp

    from cfgzero_theory.sd3.pipeline import SD3Pipeline, save_png

    if (args.checkpoint is None) == (not args.tiny_random):
        raise ValueError("give exactly one of --checkpoint DIR and --tiny-random")
    if args.compilation_cache:
        # compiled programs persist across runs: the loop of a real checkpoint compiles once per
        # shape and rule kind (about 40 s on an H100), later runs load it in seconds
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(args.compilation_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, None: None}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny_random:
            build_tiny_random_pipeline(tmp, seed=args.seed)
        pipe = SD3Pipeline.from_pretrained(tmp if args.tiny_random else args.checkpoint, dtype=dtype)
    steps = args.steps if args.steps is not None else (4 if args.tiny_random else 28)
    embeddings = pipe.encode_prompt(args.prompt, args.negative_prompt, args.max_sequence_length)
    options = dict(embeddings=embeddings, scale=args.scale, zero_init_steps=args.zero_init_steps,
                   skip_guidance_layers=args.skip_guidance_layers or None, num_steps=steps, height=args.height,
                   width=args.width, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    _, images = pipe(guidance=args.guidance, **options)
    written = [save_png(images, os.path.join(args.out, f"{args.guidance}.png"))]
    if args.compare or args.tiny_random:
        pair = [images if args.guidance == kind else pipe(guidance=kind, **options)[1]
                for kind in ("cfg", "cfg-zero-star")]
        written.append(save_png(np.concatenate([pair[0], pair[1]], axis=2),
                                os.path.join(args.out, "cfg_vs_cfg-zero-star.png")))
    for path in written:
        print(f"wrote {path}")
    return written


def main(argv=None):
    from cfgzero_theory.sd3.pipeline import GUIDANCE_KINDS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a diffusers StableDiffusion3Pipeline folder")
    parser.add_argument("--tiny-random", action="store_true", help="build and use a tiny random pipeline")
    parser.add_argument("--prompt", default="a photo of a cat")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--guidance", choices=GUIDANCE_KINDS, default="cfg-zero-star")
    parser.add_argument("--scale", type=float, default=4.0)
    parser.add_argument("--zero-init-steps", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="default 28 (4 with --tiny-random)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-sequence-length", type=int, default=256)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: stored dtypes")
    parser.add_argument("--skip-guidance-layers", type=int, nargs="+", default=None, metavar="I",
                        help="skip-layer guidance on these blocks (SD3.5-medium: 7 8 9), diffusers' defaults otherwise")
    parser.add_argument("--compare", action="store_true", help="also write CFG vs CFG-Zero* side by side")
    parser.add_argument("--compilation-cache", default="~/.cache/cfgzero_theory/jax", metavar="DIR",
                        help="keep compiled programs here for later runs ('' to disable)")
    parser.add_argument("--out", default="figures/sample_image")
    return run_or_exit(run, parser.parse_args(argv))


if __name__ == "__main__":
    main()
