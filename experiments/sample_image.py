"""Sample an image with a diffusers SD3 / SD3.5, FLUX.1 or Lumina-Next folder, the sampler in JAX.

    python -m experiments.sample_image --checkpoint DIR --prompt "a photo of a cat" \\
        --guidance cfg-zero-star --scale 4 --zero-init-steps 1 --compare
    python -m experiments.sample_image --tiny-random [--model flux|lumina]

Writes ``OUT/<guidance>.png`` (``OUT`` is ``--out``, default ``runs/sample_image`` under the
current folder) and, with ``--compare`` (always with ``--tiny-random``),
``OUT/cfg_vs_cfg-zero-star.png``: CFG (left) and CFG-Zero* (right) from the same initial
noise, captioned with the rule and the settings.  The sampler's numbers that are not given
(``--scale``, ``--steps``, ``--zero-init-steps``, the skip-layer options) are the pipeline's
own defaults, which come from the library: the model's presets in
:mod:`cfgzero_theory.presets` and :class:`cfgzero_theory.sampling.PerturbedGuidance`
(``--help`` shows their values).

Flux samples one branch unless ``--negative-prompt`` is given: the guidance-distilled model
embeds ``--distilled-guidance`` and the rule is ``conditional`` with zero-init of the first
``--zero-init-steps`` (the paper's Flux setting); its comparison is then
``guidance_vs_zero-init.png`` (no zero-init on the left, zero-init on the right).  With a
negative prompt Flux runs true CFG with any rule, as SD3 does.  ``--lora PATH[:SCALE]``
(repeatable) merges LoRA files into the transformer first.

Every argument is checked before the pipeline is built or
loaded; a bad one ends the program with one line ``PROG: error: ...`` and exit status 2.  (What
needs the weights stays the pipeline's to check: skip-layer block indices against the
transformer's depth, image sizes against its positional table.)

``--tiny-random`` builds a tiny randomly initialised pipeline with diffusers and
transformers classes (hand-written tokenizer vocabularies, nothing downloaded), saves it to a
temporary folder and runs the whole path on it: the images are noise by design, the point is
the plumbing, not the picture.  The builder is the library's
(:func:`cfgzero_theory.pipelines.build_random`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import os
import tempfile

import numpy as np

from experiments._common import (OneLineErrorParser, announce, default_out, outputs_line, prepare_output_dir,
                                 run_or_exit, usage_error)

PROG = "python -m experiments.sample_image"
DEFAULT_OUT = default_out("sample_image")
#: Image sides must be multiples of the VAE's downsampling factor times 2 (the transformer's
#: patch size, Flux's 2×2 packing): 8 × 2 for every SD3 / SD3.5 and FLUX.1 checkpoint.
SIDE_MULTIPLE = 16
#: The models (``--model``; a checkpoint's comes from its ``model_index.json``) and their T5 lengths.
MODELS = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "LuminaPipeline": "lumina",
          "LuminaText2ImgPipeline": "lumina"}
SEQUENCE_LENGTHS = {"sd3": 256, "flux": 512, "lumina": 256}
#: The longest prompt each model's text encoder takes (SD3's T5 has no such limit in the pipeline).
SEQUENCE_LIMITS = {"flux": 512, "lumina": 256}
MODEL_NAMES = {"sd3": "SD3", "flux": "Flux", "lumina": "Lumina-Next"}
#: The two rules of the side-by-side comparison: caption, and the options each takes (CFG has
#: no zero-init steps).
COMPARED = {"cfg": ("CFG", ("scale",)), "cfg-zero-star": ("CFG-Zero*", ("scale", "zero_init_steps"))}
COMPARISON_FILE = "cfg_vs_cfg-zero-star.png"
#: Flux's one-branch comparison: the conditional branch without, then with zero-init.
ONE_BRANCH_COMPARED = ("distilled guidance only", "+ zero-init")
ONE_BRANCH_COMPARISON_FILE = "guidance_vs_zero-init.png"
#: Sampler options handed to the pipeline only when given (``None``: the pipeline's default),
#: besides ``scale`` and ``zero_init_steps``, which depend on the rule.
SKIP_LAYER_NUMBERS = ("skip_layer_guidance_scale", "skip_layer_guidance_start", "skip_layer_guidance_stop")
LOOP_OPTIONS = ("num_steps", "distilled_guidance", "skip_guidance_layers", *SKIP_LAYER_NUMBERS)
TINY_NOTE = ("--tiny-random: a tiny {model} pipeline with random weights, so the images are noise by design; "
             "this run checks the plumbing (prompt -> text encoders -> sampling loop -> VAE -> PNG), not the picture")
MIN_PANEL_PIXELS = 256
DPI = 100

# ----------------------------------------------------------------------------- defaults and arguments
def library_defaults(model: str = "sd3", two_branches: bool = True) -> dict:
    """A pipeline's sampler defaults, read where the pipeline reads them, by its keyword names.

    SD3: ``guidance``, ``scale``, ``num_steps`` and ``zero_init_steps`` from the ``"sd3"``
    preset (:func:`cfgzero_theory.presets.get`), ``skip_layer_guidance_scale`` / ``_start`` /
    ``_stop`` from the field defaults of :class:`cfgzero_theory.sampling.PerturbedGuidance`.
    Flux (dev): steps and the one-branch ``K`` from ``"flux-dev"``; with ``two_branches`` (a
    negative prompt) the rule's kind, scale and ``K`` from ``"flux-dev-true-cfg"``; the
    distilled guidance from :mod:`cfgzero_theory.flux.pipeline`.  Lumina-Next: the
    ``"lumina-next"`` preset's.
    """
    from cfgzero_theory import presets
    from cfgzero_theory.sampling import PerturbedGuidance

    if model == "flux":
        from cfgzero_theory.flux.pipeline import DISTILLED_GUIDANCE

        one, two = presets.get("flux-dev"), presets.get("flux-dev-true-cfg")
        rule = two if two_branches else one
        return {"guidance": rule.guidance, "scale": two.scale, "num_steps": one.num_steps,
                "zero_init_steps": rule.zero_init_steps, "distilled_guidance": DISTILLED_GUIDANCE}
    if model == "lumina":
        preset = presets.get("lumina-next")
        return {"guidance": preset.guidance, "scale": preset.scale, "num_steps": preset.num_steps,
                "zero_init_steps": preset.zero_init_steps}
    preset = presets.get("sd3")
    perturbed = {field.name: field.default for field in dataclasses.fields(PerturbedGuidance)}
    return {"guidance": preset.guidance, "scale": preset.scale, "num_steps": preset.num_steps,
            "zero_init_steps": preset.zero_init_steps,
            **{f"skip_layer_guidance_{name}": perturbed[name] for name in ("scale", "start", "stop")}}


def build_parser(defaults: dict, flux: dict, lumina: dict) -> argparse.ArgumentParser:
    """The command line; ``defaults``, ``flux`` and ``lumina`` (:func:`library_defaults` of SD3, of
    Flux's two paths and of Lumina-Next) fill the help texts, the guidance kinds are
    :data:`cfgzero_theory.guidance.KINDS`, the compilation cache's folder that of
    :mod:`cfgzero_theory.compilation`."""
    from cfgzero_theory.compilation import ENV_VAR, default_cache_dir
    from cfgzero_theory.guidance import KINDS

    def pipeline_default(name, flux_text=None):
        flux_text = flux_text or f"flux {flux[name]}"
        return f"default: the pipeline's, sd3 {defaults[name]}, {flux_text}, lumina {lumina[name]}"

    p = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", metavar="DIR",
                   help="a diffusers StableDiffusion3Pipeline, FluxPipeline or LuminaPipeline folder (with "
                   "model_index.json); exactly one of --checkpoint and --tiny-random")
    p.add_argument("--tiny-random", action="store_true",
                   help="build a tiny pipeline with random weights and run the whole path on it (nothing "
                   "downloaded; the images are noise by design)")
    p.add_argument("--model", choices=tuple(SEQUENCE_LENGTHS),
                   help="the model of --tiny-random (default: sd3; a --checkpoint's is read from its folder)")
    p.add_argument("--prompt", default="a photo of a cat", help="the prompt (default: %(default)r)")
    p.add_argument("--negative-prompt",
                   help="the negative prompt (default: sd3 and lumina '', flux none: one branch; give one, even "
                   "'', for Flux's true CFG)")
    p.add_argument("--guidance", choices=KINDS,
                   help="guidance rule (" + pipeline_default(
                       "guidance", f"flux {flux['one_branch_guidance']}, {flux['guidance']} with --negative-prompt")
                   + ")")
    p.add_argument("--scale", type=float, metavar="W",
                   help="guidance scale w (" + pipeline_default("scale", f"flux {flux['scale']} with --negative-prompt")
                   + ")")
    p.add_argument("--steps", dest="num_steps", type=int, metavar="N",
                   help=f"denoising steps ({pipeline_default('num_steps')})")
    p.add_argument("--zero-init-steps", type=int, metavar="K",
                   help="steps whose velocity is zeroed, for zero-init, cfg-zero-star and conditional "
                   f"({pipeline_default('zero_init_steps')})")
    p.add_argument("--distilled-guidance", type=float, metavar="G",
                   help=f"FLUX.1-dev's embedded guidance, in every branch (default: {flux['distilled_guidance']})")
    for side in ("height", "width"):
        p.add_argument(f"--{side}", type=int, metavar="PIXELS",
                       help=f"image {side}, a positive multiple of {SIDE_MULTIPLE} (default: the checkpoint's, "
                       "sample_size x the VAE factor)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise and of the tiny pipeline's "
                   "weights (default: %(default)s)")
    p.add_argument("--max-sequence-length", type=int, metavar="TOKENS",
                   help="T5 (Lumina: Gemma, at most) prompt tokens (default: "
                   + ", ".join(f"{m} {n}" for m, n in SEQUENCE_LENGTHS.items()) + ")")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="cast every weight (default: the stored dtypes)")
    p.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="merge a LoRA safetensors file into the transformer with this strength (diffusers/PEFT, "
                   "kohya or BFL/ComfyUI keys; SD3 and Flux); repeat for several (default: none; SCALE 1)")
    p.add_argument("--skip-guidance-layers", type=int, nargs="+", metavar="I",
                   help="SD3 skip-layer guidance on these transformer blocks, e.g. 7 8 9 for SD3.5-medium "
                   "(default: none)")
    for name, what in (("scale", "its scale"), ("start", "applied after this fraction of the steps"),
                       ("stop", "applied before this fraction of the steps")):
        p.add_argument(f"--skip-layer-guidance-{name}", type=float, metavar="X",
                       help=f"skip-layer guidance: {what}; needs --skip-guidance-layers "
                       f"(default: the pipeline's, {defaults[f'skip_layer_guidance_{name}']})")
    p.add_argument("--compare", action="store_true",
                   help="also write CFG and CFG-Zero* side by side, captioned (Flux without a negative prompt: "
                   "no zero-init and zero-init; always on with --tiny-random)")
    p.add_argument("--no-compilation-cache", action="store_true",
                   help="do not keep compiled programs on disk for later runs (default: kept, in "
                   f"${ENV_VAR} or {default_cache_dir()}; cfgzero_theory.compilation)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help="output folder, created if missing (default: %(default)s, under the current folder)")
    return p


def check_source(parser, args) -> None:
    """Exactly one of ``--checkpoint`` and ``--tiny-random``; a checkpoint must be a folder whose
    ``model_index.json`` names a ported pipeline (:data:`cfgzero_theory.pipelines.PIPELINES`).
    ``args.checkpoint`` becomes the expanded path and ``args.model`` the checkpoint's model
    (a different ``--model`` is an error) or ``--model`` (default ``sd3``)."""
    if (args.checkpoint is None) == (not args.tiny_random):
        usage_error(parser, "give exactly one of --checkpoint DIR and --tiny-random")
    if args.checkpoint is None:
        args.model = args.model or "sd3"
        return
    from cfgzero_theory.pipelines import PIPELINES, pipeline_class_name

    try:
        name = pipeline_class_name(args.checkpoint)
    except ValueError as err:
        usage_error(parser, f"--checkpoint: {err}")
    if name in PIPELINES and name not in MODELS:
        usage_error(parser, f"--checkpoint {args.checkpoint!r} is a {name} folder, a video model: sample it with "
                    "python -m experiments.sample_video")
    if name not in PIPELINES:
        usage_error(parser, f"--checkpoint {args.checkpoint!r} is a {name} folder, which is not ported; supported: "
                    f"{sorted(MODELS)}")
    if args.model is not None and args.model != MODELS[name]:
        usage_error(parser, f"--model {args.model}: --checkpoint {args.checkpoint!r} is a {name} folder "
                    f"({MODELS[name]}); leave --model out")
    args.model = MODELS[name]
    args.checkpoint = os.path.expanduser(args.checkpoint)


def check_sizes(parser, args) -> None:
    """Positive step and token counts, ``K ≥ 0``, image sides positive multiples of :data:`SIDE_MULTIPLE`."""
    if args.num_steps is not None and args.num_steps < 1:
        usage_error(parser, f"--steps must be a positive integer, got {args.num_steps}")
    if args.max_sequence_length is None:
        args.max_sequence_length = SEQUENCE_LENGTHS[args.model]
    limit = SEQUENCE_LIMITS.get(args.model)
    if args.max_sequence_length < 1 or (limit and args.max_sequence_length > limit):
        usage_error(parser, f"--max-sequence-length must be a positive integer{f' <= {limit}' if limit else ''}, "
                    f"got {args.max_sequence_length}")
    if args.zero_init_steps is not None and args.zero_init_steps < 0:
        usage_error(parser, f"--zero-init-steps must be a non-negative integer, got {args.zero_init_steps}")
    for side in ("height", "width"):
        value = getattr(args, side)
        if value is not None and (value < 1 or value % SIDE_MULTIPLE):
            usage_error(parser, f"--{side} must be a positive multiple of {SIDE_MULTIPLE} (the VAE's factor 8 x the "
                        f"transformer's patch size 2), got {value}")


def check_guidance(parser, args) -> None:
    """A finite ``--scale`` and ``--distilled-guidance``, and a rule the pipeline can build from
    ``--guidance``, ``--scale`` and ``--zero-init-steps`` (SD3 and Flux's true CFG build it with
    a preset's ``rule``, which refuses e.g. zero-init steps for ``cfg``; Flux without a negative
    prompt takes ``conditional`` only, and no ``--scale``; Lumina-Next's preset applies the rule to
    three channels).  ``args.guidance`` becomes the kind sampled; SD3's and Lumina's negative
    prompt defaults to ``''``.  Options of another model (``--distilled-guidance``, skip-layer
    guidance, ``--lora`` for Lumina) are refused by name."""
    from cfgzero_theory import presets

    for name in ("scale", "distilled_guidance"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            usage_error(parser, f"--{name.replace('_', '-')} must be a finite number, got {value}")
    one_branch = args.model == "flux" and args.negative_prompt is None
    if args.model != "flux":
        args.negative_prompt = args.negative_prompt or ""
        if args.distilled_guidance is not None:
            usage_error(parser, "--distilled-guidance is FLUX.1-dev's (--model flux)")
    if args.model != "sd3" and args.skip_guidance_layers is not None:
        usage_error(parser, "skip-layer guidance (--skip-guidance-layers) is SD3's (--model sd3)")
    if args.model == "lumina" and args.lora:
        usage_error(parser, "--lora: LoRA merging is ported for SD3, Flux and Wan, not for Lumina-Next")
    if one_branch:
        if args.guidance not in (None, "conditional"):
            usage_error(parser, f"--guidance {args.guidance} is true CFG: give Flux a --negative-prompt (even '') "
                        "or leave --guidance out (the conditional branch, with zero-init)")
        if args.scale is not None:
            usage_error(parser, "--scale is Flux's true-CFG scale: give a --negative-prompt (even ''); the one-branch "
                        "path uses --distilled-guidance")
    elif args.model == "flux" and args.guidance == "conditional":
        usage_error(parser, "--guidance conditional samples one branch: leave --negative-prompt out")
    defaults = library_defaults(args.model, not one_branch)
    args.guidance = args.guidance or defaults["guidance"]
    preset = presets.get("flux-dev" if one_branch else {"flux": "flux-dev-true-cfg", "lumina": "lumina-next"}.get(
        args.model, "sd3"))
    try:
        preset.rule(args.guidance, scale=args.scale, zero_init_steps=args.zero_init_steps)
    except ValueError as err:
        usage_error(parser, f"--guidance {args.guidance}: {err}")


def parse_lora(value: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` → ``(path, scale)``: a trailing ``:number`` is the scale (default 1.0)."""
    path, sep, tail = value.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return value, 1.0


def check_loras(parser, args) -> None:
    """Every ``--lora`` names an existing file and a finite scale; ``args.lora`` becomes ``[(path, scale)]``."""
    loras = []
    for value in args.lora or ():
        path, scale = parse_lora(value)
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            usage_error(parser, f"--lora {value!r}: {path!r} is not a file")
        if not math.isfinite(scale):
            usage_error(parser, f"--lora {value!r}: the scale must be a finite number, got {scale}")
        loras.append((path, scale))
    args.lora = loras


def check_skip_layers(parser, args, defaults: dict) -> None:
    """Block indices ``≥ 0``; the skip-layer numbers finite, given only with
    ``--skip-guidance-layers``, and ``0 ≤ start ≤ stop ≤ 1`` (``defaults`` for those not given)."""
    if args.skip_guidance_layers is not None and min(args.skip_guidance_layers) < 0:
        usage_error(parser, f"--skip-guidance-layers must be block indices >= 0, got {args.skip_guidance_layers}")
    for name in SKIP_LAYER_NUMBERS:
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            usage_error(parser, f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if value is not None and args.skip_guidance_layers is None:
            usage_error(parser, f"--{name.replace('_', '-')} needs --skip-guidance-layers")
    start, stop = (defaults[name] if getattr(args, name) is None else getattr(args, name)
                   for name in ("skip_layer_guidance_start", "skip_layer_guidance_stop"))
    if not 0 <= start <= stop <= 1:
        usage_error(parser, f"skip-layer guidance needs 0 <= start <= stop <= 1, got start {start}, stop {stop}")


def parse_args(argv=None):
    """Parse and check every argument, and create ``--out``, before anything is built or loaded."""
    defaults = library_defaults()
    flux = {**library_defaults("flux"), "one_branch_guidance": library_defaults("flux", False)["guidance"]}
    parser = build_parser(defaults, flux, library_defaults("lumina"))
    args = parser.parse_args(argv)
    check_source(parser, args)
    check_sizes(parser, args)
    check_guidance(parser, args)
    check_skip_layers(parser, args, defaults)
    check_loras(parser, args)
    args.out = prepare_output_dir(parser, args.out)
    return args


def sampler_options(args, names) -> dict:
    """The pipeline's keyword arguments among ``names`` that the user gave (the rest: its defaults)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


# ----------------------------------------------------------------------------- running
@contextlib.contextmanager
def quiet_hugging_face():
    """transformers', diffusers' and huggingface_hub's loggers at ``ERROR`` and their progress
    bars off inside the block (the tiny build's advisory warnings and "Writing model shards"
    bars), restored after.  transformers is silenced before diffusers is imported: importing
    diffusers' pipelines makes transformers warn."""
    from huggingface_hub import utils as hub
    from transformers.utils import logging as transformers_logging

    with contextlib.ExitStack() as stack:
        stack.callback(hub.logging.set_verbosity, hub.logging.get_verbosity())
        stack.callback(hub.disable_progress_bars if hub.are_progress_bars_disabled() else hub.enable_progress_bars)
        hub.logging.set_verbosity_error()
        hub.disable_progress_bars()
        silence_library_logging(stack, transformers_logging)
        from diffusers.utils import logging as diffusers_logging

        silence_library_logging(stack, diffusers_logging)
        yield


def silence_library_logging(stack: contextlib.ExitStack, logging_module) -> None:
    """``logging_module`` (transformers' or diffusers' ``utils.logging``) at ``ERROR`` with its
    progress bars off until ``stack`` closes, which restores both."""
    stack.callback(logging_module.set_verbosity, logging_module.get_verbosity())
    enabled = logging_module.is_progress_bar_enabled()
    stack.callback(logging_module.enable_progress_bar if enabled else logging_module.disable_progress_bar)
    logging_module.set_verbosity_error()
    logging_module.disable_progress_bar()


def load_pipeline(args, model: str, size: str = "tiny"):
    """``--checkpoint`` loaded with ``--dtype``, or (``--tiny-random``) the random pipeline of
    ``model`` and ``size`` (:func:`cfgzero_theory.pipelines.build_random`) built quietly into a
    temporary folder and loaded."""
    import jax.numpy as jnp

    from cfgzero_theory import pipelines

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, None: None}[args.dtype]
    if not args.tiny_random:
        return pipelines.from_pretrained(args.checkpoint, dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        with quiet_hugging_face():
            pipelines.build_random(model, tmp, size, seed=args.seed)
            return pipelines.from_pretrained(tmp, dtype=dtype)


def settings_caption(args, defaults: dict) -> str:
    """The settings under the comparison: prompt, seed, steps, scale (Flux's one branch: the
    distilled guidance) and the zero-init ``K`` (the pipeline's defaults where not given)."""
    value = {name: defaults[name] if getattr(args, name) is None else getattr(args, name)
             for name in ("num_steps", "scale", "zero_init_steps", "distilled_guidance") if name in defaults}
    if args.model == "flux" and args.negative_prompt is None:
        text = (f"prompt {args.prompt!r}, no negative prompt, seed {args.seed}\n{value['num_steps']} steps, "
                f"distilled guidance {value['distilled_guidance']:g}, zero-init steps {value['zero_init_steps']}")
    else:
        text = (f"prompt {args.prompt!r}, negative {args.negative_prompt!r}, seed {args.seed}\n"
                f"{value['num_steps']} steps, scale {value['scale']:g}, "
                f"CFG-Zero* zero-init steps {value['zero_init_steps']}")
    if args.skip_guidance_layers is not None:
        text += f", skip-layer guidance on blocks {' '.join(map(str, args.skip_guidance_layers))}"
    for path, scale in args.lora:
        text += f", LoRA {os.path.basename(path)} x{scale:g}"
    return text + (", random weights (noise by design)" if args.tiny_random else "")


def save_comparison(images: dict, caption: str, path: str) -> str:
    """The images of each rule side by side (``images``: kind → ``(B, H, W, 3)`` in ``[0, 1]``,
    a batch tiled left to right), each panel titled with its rule, ``caption`` underneath;
    panels at least :data:`MIN_PANEL_PIXELS` wide (small images enlarged, nearest neighbour)."""
    from matplotlib.figure import Figure

    from cfgzero_theory.files import atomic_write_bytes

    tiles = {kind: np.concatenate(list(np.asarray(batch, np.float32)), axis=1) for kind, batch in images.items()}
    height, width = next(iter(tiles.values())).shape[:2]
    panel_w = max(width, MIN_PANEL_PIXELS) / DPI
    panel_h = panel_w * height / width
    gap, top, bottom = 0.1, 0.35, 0.55  # inches
    fig_w, fig_h = len(tiles) * (panel_w + gap) + gap, panel_h + top + bottom
    fig = Figure(figsize=(fig_w, fig_h), dpi=DPI)
    for i, (kind, tile) in enumerate(tiles.items()):
        ax = fig.add_axes(((gap + i * (panel_w + gap)) / fig_w, bottom / fig_h, panel_w / fig_w, panel_h / fig_h))
        ax.imshow(np.clip(tile, 0.0, 1.0), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(COMPARED[kind][0] if kind in COMPARED else kind, fontsize=12)
    fig.text(0.5, bottom / 2 / fig_h, caption, ha="center", va="center", fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return atomic_write_bytes(path, buffer.getvalue())


def run(args) -> list[str]:
    """Load or build the pipeline, sample ``--guidance`` (and the comparison), write the PNGs."""
    from cfgzero_theory.ports.pipeline_parts import save_png

    if args.tiny_random:
        announce(TINY_NOTE.format(model=MODEL_NAMES[args.model]))
    pipe = load_pipeline(args, args.model)
    for path, scale in args.lora:
        changed = pipe.load_lora(path, scale)
        announce(f"merged {path} (scale {scale:g}) into {changed} layers")
    embeddings = pipe.encode_prompt(args.prompt, args.negative_prompt, args.max_sequence_length)
    common = dict(embeddings=embeddings, height=args.height, width=args.width, seed=args.seed,
                  **sampler_options(args, LOOP_OPTIONS))
    _, images = pipe(guidance=args.guidance, **common, **sampler_options(args, ("scale", "zero_init_steps")))
    written = [save_png(images, os.path.join(args.out, f"{args.guidance}.png"))]
    if args.compare or args.tiny_random:
        one_branch = args.model == "flux" and args.negative_prompt is None
        defaults = library_defaults(args.model, not one_branch)
        if one_branch:  # the conditional branch without and with zero-init
            k = args.zero_init_steps or defaults["zero_init_steps"] or 1
            pair = {label: pipe(guidance="conditional", zero_init_steps=steps, **common)[1]
                    for label, steps in zip(ONE_BRANCH_COMPARED, (0, k))}
            name = ONE_BRANCH_COMPARISON_FILE
        else:  # the rule already sampled is not sampled again
            pair = {kind: images if kind == args.guidance else pipe(guidance=kind, **common,
                                                                    **sampler_options(args, options))[1]
                    for kind, (_, options) in COMPARED.items()}
            name = COMPARISON_FILE
        written.append(save_comparison(pair, settings_caption(args, defaults), os.path.join(args.out, name)))
    print(outputs_line(args.out, written), flush=True)
    return written


def main(argv=None):
    """``python -m experiments.sample_image``: check every argument, turn the persistent
    compilation cache on (unless ``--no-compilation-cache``), then :func:`run`.

    The loop of a real checkpoint compiles once per shape and rule kind (about 40 s on an H100);
    with the cache later runs load it in seconds.
    """
    from cfgzero_theory.compilation import enable_compilation_cache

    args = parse_args(argv)
    if not args.no_compilation_cache:
        enable_compilation_cache()
    return run_or_exit(run, args)


if __name__ == "__main__":
    main()
