"""``python -m experiments.sample_image``: help, argument checks before any build, plumbing.

Bad arguments are run in-process with the pipeline's builder and loader replaced by functions
that fail the test if called, so "rejected before the build" is checked directly.  The
plumbing tests load a stand-in pipeline that records what it is asked; one subprocess run on
the tiny random pipeline checks the console and the files end to end.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from cfgzero_theory import pipelines, presets
from cfgzero_theory.sampling import PerturbedGuidance
from cfgzero_theory.sd3.pipeline import SD3Pipeline
from experiments import sample_image

REPO = pathlib.Path(__file__).resolve().parents[1]
PROG = "python -m experiments.sample_image"


class Built(Exception):
    """Raised by the stand-in builder and loader: the program got past its argument checks."""


@pytest.fixture
def no_build(monkeypatch):
    """The tiny builder and ``SD3Pipeline.from_pretrained`` raise :class:`Built` if called."""
    def refuse(*args, **kwargs):
        raise Built

    monkeypatch.setattr(pipelines, "build_random", refuse)
    monkeypatch.setattr(SD3Pipeline, "from_pretrained", refuse)


@pytest.fixture
def checkpoint(tmp_path):
    """A folder that passes the CLI's checkpoint check (it holds a ``model_index.json``)."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return folder


def help_text(capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "250")  # no help line wrapped, so no word broken at a hyphen
    with pytest.raises(SystemExit) as exit_info:
        sample_image.main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def option_entries(text: str) -> dict:
    """Each option's entry of the help (invocation and help text on one line), by its first flag."""
    entries, current = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line.strip()
        elif current is not None and line.strip():
            entries[current] += " " + line.strip()
    return entries


def test_help_names_the_command_and_every_default(capsys, monkeypatch):
    text = help_text(capsys, monkeypatch)
    assert text.startswith(f"usage: {PROG} ")
    entries = option_entries(text)
    preset, flux, true_cfg = presets.get("sd3"), presets.get("flux-dev"), presets.get("flux-dev-true-cfg")
    lumina = presets.get("lumina-next")
    perturbed = {f.name: f.default for f in dataclasses.fields(PerturbedGuidance)}
    for option, value, flux_value, lumina_value in (
            ("--scale", preset.scale, f"{true_cfg.scale} with --negative-prompt", lumina.scale),
            ("--steps", preset.num_steps, flux.num_steps, lumina.num_steps),
            ("--zero-init-steps", preset.zero_init_steps, flux.zero_init_steps, lumina.zero_init_steps),
            ("--guidance", preset.guidance, f"{flux.guidance}, {true_cfg.guidance} with --negative-prompt",
             lumina.guidance)):
        assert entries[option].endswith(
            f"(default: the pipeline's, sd3 {value}, flux {flux_value}, lumina {lumina_value})"), entries[option]
    for name in ("scale", "start", "stop"):
        option = f"--skip-layer-guidance-{name}"
        assert entries[option].endswith(f"(default: the pipeline's, {perturbed[name]})"), entries[option]
    assert entries["--distilled-guidance"].endswith("(default: 3.5)")
    assert entries["--max-sequence-length"].endswith("(default: sd3 256, flux 512, lumina 256)")
    assert entries["--out"].endswith("(default: runs/sample_image, under the current folder)")
    assert len(entries) == 24, sorted(entries)
    for name, entry in entries.items():
        assert len(entry.split()) > 2, f"{name} has no help text"
        if name not in ("-h", "--tiny-random", "--compare", "--checkpoint"):  # flags, and the no-default choice
            assert "(default: " in entry, f"{name} shows no default"


def test_help_reads_the_defaults_from_the_library(capsys, monkeypatch):
    """Change the preset and the help changes: the numbers are read, not re-declared."""
    changed = dataclasses.replace(presets.get("sd3"), scale=5.5, num_steps=13, zero_init_steps=3)
    monkeypatch.setitem(presets.PRESETS, "sd3", changed)
    entries = option_entries(help_text(capsys, monkeypatch))
    for option, value in (("--scale", "5.5"), ("--steps", "13"), ("--zero-init-steps", "3")):
        assert f"(default: the pipeline's, sd3 {value}, flux " in entries[option], entries[option]


BAD = [
    ([], "give exactly one of --checkpoint DIR and --tiny-random"),
    (["--tiny-random", "--checkpoint", "{checkpoint}"], "give exactly one of --checkpoint DIR and --tiny-random"),
    (["--checkpoint", "{tmp}/missing"], "is not a folder"),
    (["--checkpoint", "{tmp}"], "has no model_index.json"),
    (["--checkpoint", "{wan}"], "is a WanPipeline folder, a video model: sample it with python -m "
                                 "experiments.sample_video"),
    (["--checkpoint", "{other}"], "is a KandinskyPipeline folder, which is not ported; supported: "),
    (["--checkpoint", "{checkpoint}", "--model", "flux"], "is a StableDiffusion3Pipeline folder (sd3); leave --model"),
    (["--tiny-random", "--model", "flux", "--guidance", "cfg"], "--guidance cfg is true CFG: give Flux a --negative"),
    (["--tiny-random", "--model", "flux", "--scale", "3"], "--scale is Flux's true-CFG scale"),
    (["--tiny-random", "--model", "flux", "--negative-prompt", "", "--guidance", "conditional"],
     "--guidance conditional samples one branch"),
    (["--tiny-random", "--model", "flux", "--skip-guidance-layers", "1"], "skip-layer guidance"),
    (["--tiny-random", "--model", "lumina", "--skip-guidance-layers", "1"], "skip-layer guidance"),
    (["--tiny-random", "--model", "lumina", "--distilled-guidance", "3"], "--distilled-guidance is FLUX.1-dev's"),
    (["--tiny-random", "--model", "lumina", "--lora", "{tmp}/a_file"], "not for Lumina-Next"),
    (["--tiny-random", "--model", "lumina", "--max-sequence-length", "300"],
     "--max-sequence-length must be a positive integer <= 256"),
    (["--tiny-random", "--model", "flux", "--max-sequence-length", "513"], "a positive integer <= 512, got 513"),
    (["--tiny-random", "--distilled-guidance", "3"], "--distilled-guidance is FLUX.1-dev's"),
    (["--tiny-random", "--model", "flux", "--distilled-guidance", "inf"], "--distilled-guidance must be a finite"),
    (["--tiny-random", "--model", "sdxl"], "argument --model: invalid choice"),
    (["--tiny-random", "--lora", "{tmp}/missing.safetensors:0.5"], "missing.safetensors' is not a file"),
    (["--tiny-random", "--lora", "{tmp}/a_file:nan"], "the scale must be a finite number, got nan"),
    (["--tiny-random", "--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--tiny-random", "--height", "40"], "--height must be a positive multiple of 16"),
    (["--tiny-random", "--width", "-16"], "--width must be a positive multiple of 16"),
    (["--tiny-random", "--scale", "nan"], "--scale must be a finite number, got nan"),
    (["--tiny-random", "--scale", "inf"], "--scale must be a finite number, got inf"),
    (["--tiny-random", "--zero-init-steps", "-1"], "--zero-init-steps must be a non-negative integer, got -1"),
    (["--tiny-random", "--max-sequence-length", "0"], "--max-sequence-length must be a positive integer"),
    (["--tiny-random", "--skip-layer-guidance-scale", "3"], "--skip-layer-guidance-scale needs --skip-guidance-layers"),
    (["--tiny-random", "--skip-guidance-layers", "1", "--skip-layer-guidance-scale", "nan"],
     "--skip-layer-guidance-scale must be a finite number"),
    (["--tiny-random", "--skip-guidance-layers", "-1"], "--skip-guidance-layers must be block indices >= 0"),
    (["--tiny-random", "--skip-guidance-layers", "1", "--skip-layer-guidance-start", "0.5",
      "--skip-layer-guidance-stop", "0.1"], "0 <= start <= stop <= 1"),
    (["--tiny-random", "--guidance", "cfg", "--zero-init-steps", "2"], "--guidance cfg: "),
    (["--tiny-random", "--guidance", "cfg-zero"], "argument --guidance: invalid choice"),
    (["--tiny-random", "--steps", "two"], "argument --steps: invalid int value"),
    (["--tiny-random", "--out", "{tmp}/a_file"], "--out "),
    (["--tiny-random", "--out", "{tmp}/a_file/below"], "--out "),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(argv) or "no source" for argv, _ in BAD])
def test_bad_arguments_exit_2_with_one_line_before_any_build(argv, message, no_build, checkpoint, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    wan = tmp_path / "wan"
    wan.mkdir()
    (wan / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    fill = {"tmp": tmp_path, "checkpoint": checkpoint, "wan": wan, "other": other}
    argv = [arg.format(**fill) for arg in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        sample_image.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    [line] = captured.err.splitlines()
    assert line.startswith(f"{PROG}: error: ") and message in line, line
    assert captured.out == ""


@pytest.mark.parametrize("source", ["tiny", "checkpoint"])
def test_good_arguments_reach_the_build(source, no_build, checkpoint, tmp_path, request):
    """The stand-ins above are where the program goes next: good arguments get there."""
    if source == "tiny":
        request.getfixturevalue("diffusers")  # the tiny build silences diffusers' logging first
    argv = ["--tiny-random"] if source == "tiny" else ["--checkpoint", str(checkpoint)]
    with pytest.raises(Built):
        sample_image.main(argv + ["--no-compilation-cache", "--out", str(tmp_path / "out")])


class RecordingPipeline:
    """Stands in for a loaded ``SD3Pipeline``: records every call, returns grey 32×32 images."""

    def __init__(self):
        self.calls = []

    def encode_prompt(self, prompt, negative_prompt, max_sequence_length):
        return ("embeddings", prompt, negative_prompt, max_sequence_length)

    def load_lora(self, path, scale):
        self.calls.append({"lora": (path, scale)})
        return 3

    def __call__(self, **options):
        self.calls.append(options)
        return None, np.full((1, 32, 32, 3), 0.5, np.float32)


@pytest.fixture
def recording(monkeypatch):
    pipe = RecordingPipeline()
    monkeypatch.setattr(SD3Pipeline, "from_pretrained", lambda folder, dtype=None, sharding=None: pipe)
    return pipe


def run_main(argv, checkpoint, out, capsys):
    sample_image.main(["--checkpoint", str(checkpoint), "--no-compilation-cache", "--out", str(out), *argv])
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("flag, enabled", [([], True), (["--no-compilation-cache"], False)])
def test_compilation_cache_is_on_unless_asked(flag, enabled, recording, checkpoint, tmp_path, monkeypatch):
    import cfgzero_theory.compilation

    calls = []
    monkeypatch.setattr(cfgzero_theory.compilation, "enable_compilation_cache", lambda: calls.append("on"))
    sample_image.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), *flag])
    assert calls == (["on"] if enabled else []) and len(recording.calls) == 1


def test_only_the_given_options_reach_the_pipeline(recording, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    lines = run_main(["--steps", "3", "--compare"], checkpoint, out, capsys)
    # the default rule is sampled once and reused on the right of the comparison
    assert [call["guidance"] for call in recording.calls] == ["cfg-zero-star", "cfg"]
    for call in recording.calls:
        assert call["num_steps"] == 3 and call["seed"] == 0
        assert call["embeddings"] == ("embeddings", "a photo of a cat", "", 256)
        assert not {"scale", "zero_init_steps", "skip_guidance_layers", "skip_layer_guidance_scale"} & set(call)
    assert sorted(os.listdir(out)) == ["cfg-zero-star.png", "cfg_vs_cfg-zero-star.png"]
    total = sum((out / name).stat().st_size for name in os.listdir(out))
    assert lines[-1] == f"wrote {out}/: cfg-zero-star, cfg_vs_cfg-zero-star (2 files, {total / 1e6:.1f} MB)"


def test_each_rule_gets_the_options_it_takes(recording, checkpoint, tmp_path, capsys):
    run_main(["--guidance", "zero-init", "--scale", "5", "--zero-init-steps", "2", "--skip-guidance-layers", "1",
              "--skip-layer-guidance-stop", "0.5", "--compare"], checkpoint, tmp_path / "out", capsys)
    by_kind = {call["guidance"]: call for call in recording.calls}
    assert list(by_kind) == ["zero-init", "cfg", "cfg-zero-star"]
    assert by_kind["zero-init"]["scale"] == by_kind["cfg-zero-star"]["scale"] == by_kind["cfg"]["scale"] == 5.0
    assert by_kind["zero-init"]["zero_init_steps"] == by_kind["cfg-zero-star"]["zero_init_steps"] == 2
    assert "zero_init_steps" not in by_kind["cfg"]  # CFG has no zero-init steps
    for call in recording.calls:
        assert call["skip_guidance_layers"] == [1] and call["skip_layer_guidance_stop"] == 0.5
        assert "skip_layer_guidance_start" not in call and "num_steps" not in call


def test_comparison_is_captioned(recording, checkpoint, tmp_path, capsys):
    """The side-by-side image is more than the two 32×32 images: enlarged panels and captions."""
    from PIL import Image

    out = tmp_path / "out"
    run_main(["--compare"], checkpoint, out, capsys)
    pixels = np.asarray(Image.open(out / "cfg_vs_cfg-zero-star.png").convert("RGB"))
    assert pixels.shape[1] >= 2 * sample_image.MIN_PANEL_PIXELS
    grey = np.all(np.abs(pixels.astype(int) - 127.5) <= 1, axis=-1)  # the images: 0.5 · 255
    assert grey.sum() >= 2 * sample_image.MIN_PANEL_PIXELS ** 2 * 0.95
    rows = np.flatnonzero(grey.any(axis=1))
    dark = np.all(pixels < 100, axis=-1)  # text, above and below the panels
    assert dark[: rows[0]].any() and dark[rows[-1] + 1:].any()


def test_quiet_hugging_face_silences_and_restores(diffusers):
    from huggingface_hub import utils as hub
    from transformers.utils import logging as transformers_logging

    from diffusers.utils import logging as diffusers_logging

    modules = (transformers_logging, diffusers_logging)
    before = [(m.get_verbosity(), m.is_progress_bar_enabled()) for m in modules]
    hub_before = (hub.logging.get_verbosity(), hub.are_progress_bars_disabled())
    with sample_image.quiet_hugging_face():
        for m in modules:
            assert m.get_verbosity() == m.ERROR and not m.is_progress_bar_enabled()
        assert hub.logging.get_verbosity() == hub.logging.ERROR and hub.are_progress_bars_disabled()
    assert [(m.get_verbosity(), m.is_progress_bar_enabled()) for m in modules] == before
    assert (hub.logging.get_verbosity(), hub.are_progress_bars_disabled()) == hub_before


def test_tiny_random_end_to_end_with_a_clean_console(torch, diffusers, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.sample_image", "--tiny-random", "--steps", "2",
         "--max-sequence-length", "8", "--no-compilation-cache"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get(
            "PYTHONPATH"))))}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""  # no warnings, no progress bars
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and "random weights" in lines[0] and "noise by design" in lines[0]
    out = tmp_path / "runs" / "sample_image"  # the default --out, under the current folder
    assert lines[1].startswith(f"wrote {out}/: cfg-zero-star, cfg_vs_cfg-zero-star (2 files, ")
    from PIL import Image

    assert np.asarray(Image.open(out / "cfg-zero-star.png")).shape == (32, 32, 3)
    assert np.asarray(Image.open(out / "cfg_vs_cfg-zero-star.png")).shape[1] > 2 * 32


def test_tiny_random_flux_one_branch_compares_zero_init(torch, diffusers, tmp_path):
    """``--model flux`` without a negative prompt: the conditional branch, compared without and with zero-init."""
    out = tmp_path / "flux"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.sample_image", "--tiny-random", "--model", "flux", "--steps", "2",
         "--max-sequence-length", "8", "--height", "32", "--width", "48", "--no-compilation-cache", "--out", str(out)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get(
            "PYTHONPATH"))))}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert "tiny Flux pipeline" in lines[0]
    assert lines[1].startswith(f"wrote {out}/: conditional, guidance_vs_zero-init (2 files, ")
    from PIL import Image

    assert np.asarray(Image.open(out / "conditional.png")).shape == (32, 48, 3)


def test_loras_are_merged_in_order_with_their_scales(recording, checkpoint, tmp_path, capsys):
    first, second = tmp_path / "style.safetensors", tmp_path / "detail:v2.safetensors"
    first.write_bytes(b"")
    second.write_bytes(b"")
    lines = run_main(["--lora", f"{first}:0.75", "--lora", str(second)], checkpoint, tmp_path / "out", capsys)
    assert recording.calls[:2] == [{"lora": (str(first), 0.75)}, {"lora": (str(second), 1.0)}]
    assert lines[0] == f"merged {first} (scale 0.75) into 3 layers"
    assert sample_image.parse_lora("a.safetensors:-1.5") == ("a.safetensors", -1.5)
    assert sample_image.parse_lora("C:/x.safetensors") == ("C:/x.safetensors", 1.0)


def test_tiny_random_lumina_compares_cfg_and_cfg_zero_star(torch, diffusers, tmp_path):
    """``--model lumina``: the default rule (CFG-Zero* on three channels) and the comparison."""
    out = tmp_path / "lumina"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.sample_image", "--tiny-random", "--model", "lumina", "--steps", "2",
         "--no-compilation-cache", "--out", str(out)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get(
            "PYTHONPATH"))))}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert "tiny Lumina-Next pipeline" in lines[0]
    assert lines[1].startswith(f"wrote {out}/: cfg-zero-star, cfg_vs_cfg-zero-star (2 files, ")
    from PIL import Image

    assert np.asarray(Image.open(out / "cfg-zero-star.png")).shape == (64, 64, 3)
