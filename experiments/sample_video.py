"""Sample a video with a diffusers Wan2.1 folder (text- or image-to-video), the sampler in JAX.

    python -m experiments.sample_video --checkpoint DIR --prompt "a cat surfing" --compare
    python -m experiments.sample_video --checkpoint I2V_DIR --image first_frame.png --frames 33
    python -m experiments.sample_video --tiny-random [--model wan-i2v]

Writes ``OUT/<guidance>.mp4`` and ``OUT/<guidance>.gif`` (``OUT`` is ``--out``, default
``runs/sample_video`` under the current folder) and, with ``--compare`` (always with
``--tiny-random``), ``OUT/cfg_vs_cfg-zero-star.mp4`` / ``.gif``: CFG (left) and CFG-Zero*
(right) from the same initial noise, each panel labelled with its rule, the settings in a
caption strip underneath.  The sampler's numbers that are not given (``--scale``, ``--steps``,
``--zero-init-steps``, ``--flow-shift``) are the pipeline's defaults, from the Wan presets of
:mod:`cfgzero_theory.presets` (``--help`` shows them).  ``--lora PATH[:SCALE]`` (repeatable)
merges LoRA files into the transformer first.  MP4 files are H.264 through imageio-ffmpeg's own
binary (``pip install -e ".[video]"``; no system ffmpeg needed).

Every argument is checked before the pipeline is built or loaded; a bad one ends the program
with one line ``PROG: error: ...`` and exit status 2.

``--tiny-random`` builds a tiny randomly initialised Wan pipeline with diffusers and
transformers classes (nothing downloaded) in a temporary folder and runs the whole path on it —
for I2V with a generated first frame unless ``--image`` is given: the videos are noise by
design, the point is the plumbing, not the picture.
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np

from experiments._common import (OneLineErrorParser, announce, default_out, outputs_line, prepare_output_dir,
                                 run_or_exit, usage_error)
from experiments.sample_image import check_loras, load_pipeline

PROG = "python -m experiments.sample_video"
DEFAULT_OUT = default_out("sample_video")
SIDE_MULTIPLE = 16
FRAME_STEP = 4
#: ``--model`` → the random size :func:`cfgzero_theory.pipelines.build_random` builds for it.
TINY_SIZES = {"wan-t2v": "tiny", "wan-i2v": "tiny-i2v"}
CHECKPOINT_CLASSES = ("WanPipeline", "WanImageToVideoPipeline")
COMPARED = {"cfg": ("CFG", ("scale",)), "cfg-zero-star": ("CFG-Zero*", ("scale", "zero_init_steps"))}
COMPARISON_STEM = "cfg_vs_cfg-zero-star"
VIDEO_SUFFIXES = (".mp4", ".gif")
MIN_PANEL_PIXELS = 256
TINY_NOTE = ("--tiny-random: a tiny {model} pipeline with random weights, so the videos are noise by design; "
             "this run checks the plumbing (prompt -> UMT5 -> sampling loop -> causal VAE -> MP4/GIF), not the "
             "picture")


def library_defaults() -> dict:
    """The Wan presets' sampler numbers, by name (for the help texts)."""
    from cfgzero_theory import presets

    return {name: presets.get(name) for name in ("wan2.1-t2v-480p", "wan2.1-t2v-720p", "wan2.1-i2v")}


def build_parser() -> argparse.ArgumentParser:
    """The command line (help texts filled from :func:`library_defaults`)."""
    from cfgzero_theory.compilation import ENV_VAR, default_cache_dir
    from cfgzero_theory.guidance import KINDS

    p480, p720, i2v = library_defaults().values()
    p = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", metavar="DIR",
                   help="a diffusers WanPipeline or WanImageToVideoPipeline folder (with model_index.json); exactly "
                   "one of --checkpoint and --tiny-random")
    p.add_argument("--tiny-random", action="store_true",
                   help="build a tiny Wan pipeline with random weights and run the whole path on it (nothing "
                   "downloaded; the videos are noise by design)")
    p.add_argument("--model", choices=tuple(TINY_SIZES),
                   help="the model of --tiny-random (default: wan-t2v; a --checkpoint's is read from its folder)")
    p.add_argument("--prompt", default="a photo of a cat", help="the prompt (default: %(default)r)")
    p.add_argument("--negative-prompt", default="", help="the negative prompt (default: %(default)r)")
    p.add_argument("--image", metavar="PATH",
                   help="the first frame of an image-to-video model (required with an I2V checkpoint; "
                   "--tiny-random --model wan-i2v generates one when it is left out)")
    p.add_argument("--frames", dest="num_frames", type=int, metavar="F",
                   help=f"frames, {FRAME_STEP}k + 1 (default: 81; --tiny-random: 9)")
    for side, default in (("height", 480), ("width", 832)):
        p.add_argument(f"--{side}", type=int, metavar="PIXELS",
                       help=f"video {side}, a positive multiple of {SIDE_MULTIPLE} (default: {default}; "
                       "--tiny-random: 32 x 48)")
    p.add_argument("--guidance", choices=KINDS, help=f"guidance rule (default: {p480.guidance})")
    p.add_argument("--scale", type=float, metavar="W", help=f"guidance scale w (default: {p480.scale:g})")
    p.add_argument("--steps", dest="num_steps", type=int, metavar="N",
                   help=f"denoising steps (default: T2V {p480.num_steps}, I2V {i2v.num_steps})")
    p.add_argument("--zero-init-steps", type=int, metavar="K",
                   help=f"steps whose velocity is zeroed (default: {p480.zero_init_steps})")
    p.add_argument("--flow-shift", type=float, metavar="F",
                   help=f"UniPC's flow shift (default: T2V {p480.shift:g} up to 480p, {p720.shift:g} above; "
                   f"I2V {i2v.shift:g})")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial noise and of the tiny pipeline's weights (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="cast the transformer and text/image encoders (default: the stored dtypes; the VAE keeps "
                   "its own)")
    p.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="merge a LoRA safetensors file into the transformer with this strength (diffusers/PEFT, "
                   "ComfyUI or musubi/kohya keys); repeat for several (default: none; SCALE 1)")
    p.add_argument("--compare", action="store_true",
                   help="also write CFG and CFG-Zero* side by side, labelled (always on with --tiny-random)")
    p.add_argument("--fps", type=float, default=16.0, help="frames per second of the files (default: %(default)g)")
    p.add_argument("--no-compilation-cache", action="store_true",
                   help="do not keep compiled programs on disk for later runs (default: kept, in "
                   f"${ENV_VAR} or {default_cache_dir()}; cfgzero_theory.compilation)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help="output folder, created if missing (default: %(default)s, under the current folder)")
    return p


def check_source(parser, args) -> None:
    """Exactly one of ``--checkpoint`` and ``--tiny-random``; a checkpoint must be a Wan pipeline
    folder.  ``args.model`` becomes ``wan-t2v`` or ``wan-i2v``; an I2V checkpoint needs ``--image``
    and a T2V model refuses one; the tiny run's sizes fill in what is not given."""
    from cfgzero_theory.wan.tiny import PIPELINE_SIZES

    if (args.checkpoint is None) == (not args.tiny_random):
        usage_error(parser, "give exactly one of --checkpoint DIR and --tiny-random")
    if args.checkpoint is not None:
        from cfgzero_theory.pipelines import pipeline_class_name

        try:
            name = pipeline_class_name(args.checkpoint)
        except ValueError as err:
            usage_error(parser, f"--checkpoint: {err}")
        if name not in CHECKPOINT_CLASSES:
            usage_error(parser, f"--checkpoint {args.checkpoint!r} is a {name} folder; this program samples "
                        f"{' and '.join(CHECKPOINT_CLASSES)} folders (images: python -m experiments.sample_image)")
        model = "wan-i2v" if name == "WanImageToVideoPipeline" else "wan-t2v"
        if args.model is not None and args.model != model:
            usage_error(parser, f"--model {args.model}: --checkpoint {args.checkpoint!r} is a {name} folder; "
                        "leave --model out")
        args.model = model
        args.checkpoint = os.path.expanduser(args.checkpoint)
        if model == "wan-i2v" and args.image is None:
            usage_error(parser, "an image-to-video checkpoint needs --image PATH (the first frame)")
    else:
        args.model = args.model or "wan-t2v"
        frames, height, width = PIPELINE_SIZES[TINY_SIZES[args.model]]["video_size"]
        for name, value in (("num_frames", frames), ("height", height), ("width", width)):
            if getattr(args, name) is None:
                setattr(args, name, value)
    if args.image is not None:
        if args.model == "wan-t2v":
            usage_error(parser, "--image is for image-to-video models (an I2V checkpoint or --model wan-i2v)")
        args.image = os.path.expanduser(args.image)
        if not os.path.isfile(args.image):
            usage_error(parser, f"--image {args.image!r} is not a file")


def check_numbers(parser, args) -> None:
    """Frame counts ``4k + 1``, sides multiples of 16, positive steps and fps, ``K ≥ 0``, finite
    scale and flow shift, and a rule the presets can build."""
    from cfgzero_theory import presets

    if args.num_frames is not None and (args.num_frames < 1 or (args.num_frames - 1) % FRAME_STEP):
        usage_error(parser, f"--frames must be {FRAME_STEP}k + 1 (1, 5, 9, ..., 81), got {args.num_frames}")
    for side in ("height", "width"):
        value = getattr(args, side)
        if value is not None and (value < 1 or value % SIDE_MULTIPLE):
            usage_error(parser, f"--{side} must be a positive multiple of {SIDE_MULTIPLE} (the VAE's factor 8 x the "
                        f"transformer's patch size 2), got {value}")
    if args.num_steps is not None and args.num_steps < 1:
        usage_error(parser, f"--steps must be a positive integer, got {args.num_steps}")
    if args.zero_init_steps is not None and args.zero_init_steps < 0:
        usage_error(parser, f"--zero-init-steps must be a non-negative integer, got {args.zero_init_steps}")
    for name in ("scale", "flow_shift", "fps"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            usage_error(parser, f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name in ("flow_shift", "fps"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            usage_error(parser, f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    preset = presets.get("wan2.1-i2v" if args.model == "wan-i2v" else "wan2.1-t2v-480p")
    args.guidance = args.guidance or preset.guidance
    try:
        preset.rule(args.guidance, scale=args.scale, zero_init_steps=args.zero_init_steps)
    except ValueError as err:
        usage_error(parser, f"--guidance {args.guidance}: {err}")


def parse_args(argv=None):
    """Parse and check every argument, and create ``--out``, before anything is built or loaded."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_source(parser, args)
    check_numbers(parser, args)
    check_loras(parser, args)
    args.out = prepare_output_dir(parser, args.out)
    return args


# ----------------------------------------------------------------------------- running


def generated_first_frame(height: int, width: int) -> np.ndarray:
    """A smooth colour ramp ``(H, W, 3)`` in ``[0, 1]``: the tiny I2V run's first frame."""
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    return np.stack([x, y, 1 - (x + y) / 2], axis=-1)


def settings_caption(args, pipe) -> str:
    """Prompt, seed, frames and the sampler numbers (the pipeline's defaults where not given)."""
    height, width = args.height or 480, args.width or 832
    preset = pipe.preset(height, width)
    steps = args.num_steps or preset.num_steps
    scale = preset.scale if args.scale is None else args.scale
    k = preset.zero_init_steps if args.zero_init_steps is None else args.zero_init_steps
    shift = preset.shift if args.flow_shift is None else args.flow_shift
    text = (f"prompt {args.prompt!r}, negative {args.negative_prompt!r}, seed {args.seed}, "
            f"{args.num_frames or 81} frames {height}x{width}\n{steps} UniPC steps, flow shift {shift:g}, "
            f"scale {scale:g}, CFG-Zero* zero-init steps {k}")
    for path, lora_scale in args.lora:
        text += f", LoRA {os.path.basename(path)} x{lora_scale:g}"
    return text + (", random weights (noise by design)" if args.tiny_random else "")


def labelled_side_by_side(videos: dict, caption: str) -> np.ndarray:
    """The videos of each rule side by side, ``(F, H', W', 3)`` in ``[0, 1]``: each panel (a batch
    tiled left to right, enlarged by an integer factor to at least :data:`MIN_PANEL_PIXELS`
    wide) under a strip with its rule's name, ``caption`` in a strip underneath."""
    from PIL import Image, ImageDraw

    tiles = [np.concatenate(list(np.asarray(v, np.float32)), axis=2) for v in videos.values()]
    frames, height, width = tiles[0].shape[:3]
    zoom = max(1, math.ceil(MIN_PANEL_PIXELS / width))
    panel_h, panel_w, label_h, gap = height * zoom, width * zoom, 20, 6
    lines = caption.split("\n")
    caption_h = 14 * len(lines) + 8
    canvas_w = len(tiles) * (panel_w + gap) + gap
    canvas_h = label_h + panel_h + caption_h
    background = Image.new("RGB", (canvas_w, canvas_h), "white")
    draw = ImageDraw.Draw(background)
    for i, kind in enumerate(videos):
        draw.text((gap + i * (panel_w + gap) + 4, 4), COMPARED.get(kind, (kind,))[0], fill="black")
    for j, line in enumerate(lines):
        draw.text((gap, label_h + panel_h + 4 + 14 * j), line, fill="black")
    base = np.asarray(background, np.float32) / 255.0
    out = np.repeat(base[None], frames, axis=0)
    for i, tile in enumerate(tiles):
        big = np.repeat(np.repeat(tile, zoom, axis=1), zoom, axis=2)
        left = gap + i * (panel_w + gap)
        out[:, label_h:label_h + panel_h, left:left + panel_w] = np.clip(big, 0.0, 1.0)
    return out


def save_both(videos, stem: str, fps: float) -> list[str]:
    """``videos`` written as ``stem.mp4`` and ``stem.gif`` (MP4 sides rounded down to even)."""
    from cfgzero_theory.ports.pipeline_parts import save_video

    array = np.asarray(videos)
    height, width = array.shape[-3] // 2 * 2, array.shape[-2] // 2 * 2
    return [save_video(array[..., :height, :width, :], stem + ".mp4", fps), save_video(array, stem + ".gif", fps)]


def run(args) -> list[str]:
    """Load or build the pipeline, sample ``--guidance`` (and the comparison), write the videos."""
    if args.tiny_random:
        announce(TINY_NOTE.format(model={"wan-t2v": "Wan T2V", "wan-i2v": "Wan I2V"}[args.model]))
    pipe = load_pipeline(args, "wan", TINY_SIZES[args.model])
    for path, scale in args.lora:
        changed = pipe.load_lora(path, scale)
        announce(f"merged {path} (scale {scale:g}) into {changed} layers")
    image = args.image
    if image is None and pipe.image_to_video:
        image = generated_first_frame(args.height, args.width)
    embeddings = pipe.encode_prompt(args.prompt, args.negative_prompt)
    options = {name: getattr(args, name) for name in ("num_steps", "flow_shift") if getattr(args, name) is not None}
    common = dict(embeddings=embeddings, image=image, num_frames=args.num_frames, height=args.height,
                  width=args.width, seed=args.seed, **options)

    def sample(kind, names):
        rule = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
        return np.asarray(pipe(guidance=kind, **common, **rule)[1])

    videos = sample(args.guidance, ("scale", "zero_init_steps"))
    written = save_both(videos, os.path.join(args.out, args.guidance), args.fps)
    if args.compare or args.tiny_random:
        pair = {kind: videos if kind == args.guidance else sample(kind, names)
                for kind, (_, names) in COMPARED.items()}
        written += save_both(labelled_side_by_side(pair, settings_caption(args, pipe)),
                             os.path.join(args.out, COMPARISON_STEM), args.fps)
    print(outputs_line(args.out, written), flush=True)
    return written


def main(argv=None):
    """``python -m experiments.sample_video``: check every argument, turn the persistent
    compilation cache on (unless ``--no-compilation-cache``), then :func:`run`."""
    from cfgzero_theory.compilation import enable_compilation_cache

    args = parse_args(argv)
    if not args.no_compilation_cache:
        enable_compilation_cache()
    return run_or_exit(run, args)


if __name__ == "__main__":
    main()
