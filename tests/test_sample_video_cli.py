"""``python -m experiments.sample_video``: help, argument checks before any build, plumbing, files.

Bad arguments run in-process with the builder and loader replaced by functions that fail the
test if called.  The plumbing tests load a stand-in pipeline that records what it is asked; two
subprocess runs on the tiny random T2V and I2V pipelines check the console and the files end to end.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from cfgzero_theory import pipelines, presets
from experiments import sample_video

REPO = pathlib.Path(__file__).resolve().parents[1]
PROG = "python -m experiments.sample_video"


class Built(Exception):
    """Raised by the stand-in builder and loader: the program got past its argument checks."""


@pytest.fixture
def no_build(monkeypatch):
    def refuse(*args, **kwargs):
        raise Built

    monkeypatch.setattr(pipelines, "build_random", refuse)
    monkeypatch.setattr(pipelines, "from_pretrained", refuse)


def _folder(tmp_path, name, class_name):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return folder


def test_help_reads_the_defaults_from_the_presets(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit) as exit_info:
        sample_video.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    t2v, t2v_720, i2v = (presets.get(n) for n in ("wan2.1-t2v-480p", "wan2.1-t2v-720p", "wan2.1-i2v"))
    assert text.startswith(f"usage: {PROG}")
    assert f"default: T2V {t2v.num_steps}, I2V {i2v.num_steps}" in text
    assert f"default: T2V {t2v.shift:g} up to 480p, {t2v_720.shift:g} above; I2V {i2v.shift:g}" in text
    assert f"(default: {t2v.zero_init_steps})" in text and f"(default: {t2v.scale:g})" in text


BAD = [
    ([], "give exactly one of --checkpoint DIR and --tiny-random"),
    (["--tiny-random", "--checkpoint", "{t2v}"], "give exactly one of"),
    (["--checkpoint", "{tmp}/missing"], "--checkpoint: "),
    (["--checkpoint", "{sd3}"], "is a StableDiffusion3Pipeline folder; this program samples WanPipeline and "
                                "WanImageToVideoPipeline folders"),
    (["--checkpoint", "{i2v}"], "an image-to-video checkpoint needs --image PATH"),
    (["--checkpoint", "{t2v}", "--model", "wan-i2v"], "leave --model out"),
    (["--tiny-random", "--image", "{tmp}/a_file"], "--image is for image-to-video models"),
    (["--tiny-random", "--model", "wan-i2v", "--image", "{tmp}/missing.png"], "is not a file"),
    (["--tiny-random", "--frames", "8"], "--frames must be 4k + 1 (1, 5, 9, ..., 81), got 8"),
    (["--tiny-random", "--frames", "0"], "--frames must be 4k + 1"),
    (["--tiny-random", "--height", "40"], "--height must be a positive multiple of 16"),
    (["--tiny-random", "--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--tiny-random", "--zero-init-steps", "-1"], "--zero-init-steps must be a non-negative integer"),
    (["--tiny-random", "--scale", "nan"], "--scale must be a finite number, got nan"),
    (["--tiny-random", "--flow-shift", "0"], "--flow-shift must be positive, got 0.0"),
    (["--tiny-random", "--fps", "inf"], "--fps must be a finite number"),
    (["--tiny-random", "--guidance", "cfg", "--zero-init-steps", "2"], "--guidance cfg: "),
    (["--tiny-random", "--lora", "{tmp}/missing.safetensors:0.5"], "is not a file"),
    (["--tiny-random", "--out", "{tmp}/a_file"], "--out "),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(argv) or "no source" for argv, _ in BAD])
def test_bad_arguments_exit_2_with_one_line_before_any_build(argv, message, no_build, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    fill = {"tmp": tmp_path, "t2v": _folder(tmp_path, "t2v", "WanPipeline"),
            "i2v": _folder(tmp_path, "i2v", "WanImageToVideoPipeline"),
            "sd3": _folder(tmp_path, "sd3", "StableDiffusion3Pipeline")}
    argv = [arg.format(**fill) for arg in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        sample_video.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    [line] = captured.err.splitlines()
    assert line.startswith(f"{PROG}: error: ") and message in line, line
    assert captured.out == ""


class RecordingPipeline:
    """Stands in for a loaded ``WanPipeline``: records every call, returns grey 5-frame 32×48 videos."""

    image_to_video = False

    def __init__(self):
        self.calls = []

    def encode_prompt(self, prompt, negative_prompt):
        return ("embeddings", prompt, negative_prompt)

    def load_lora(self, path, scale):
        self.calls.append({"lora": (path, scale)})
        return 7

    def preset(self, height, width):
        return presets.get("wan2.1-t2v-480p")

    def __call__(self, **options):
        self.calls.append(options)
        return None, np.full((1, 5, 32, 48, 3), 0.5, np.float32)


@pytest.fixture
def recording(monkeypatch):
    pipe = RecordingPipeline()
    monkeypatch.setattr(pipelines, "from_pretrained", lambda folder, dtype=None: pipe)
    return pipe


def test_only_the_given_options_reach_the_pipeline_and_both_files_are_written(recording, tmp_path, capsys):
    out = tmp_path / "out"
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    sample_video.main(["--checkpoint", str(_folder(tmp_path, "t2v", "WanPipeline")), "--no-compilation-cache",
                       "--out", str(out), "--steps", "3", "--frames", "5", "--lora", f"{lora}:0.5", "--compare"])
    lines = capsys.readouterr().out.splitlines()
    assert recording.calls[0] == {"lora": (str(lora), 0.5)} and lines[0] == f"merged {lora} (scale 0.5) into 7 layers"
    samples = recording.calls[1:]
    assert [call["guidance"] for call in samples] == ["cfg-zero-star", "cfg"]  # the default is reused in the pair
    for call in samples:
        assert call["num_steps"] == 3 and call["num_frames"] == 5 and call["seed"] == 0 and call["image"] is None
        assert call["embeddings"] == ("embeddings", "a photo of a cat", "")
        assert not {"scale", "zero_init_steps", "flow_shift"} & set(call)
    assert sorted(os.listdir(out)) == ["cfg-zero-star.gif", "cfg-zero-star.mp4", "cfg_vs_cfg-zero-star.gif",
                                       "cfg_vs_cfg-zero-star.mp4"]
    assert lines[-1].startswith(f"wrote {out}/: cfg-zero-star, cfg_vs_cfg-zero-star (4 files, ")


def test_the_comparison_is_labelled_and_enlarged():
    grey = np.full((1, 5, 32, 48, 3), 0.5, np.float32)
    frames = sample_video.labelled_side_by_side({"cfg": grey, "cfg-zero-star": grey}, "a caption\nsecond line")
    assert frames.shape[0] == 5 and frames.shape[2] >= 2 * sample_video.MIN_PANEL_PIXELS
    first = frames[0]
    is_grey = np.all(np.abs(first - 0.5) < 1e-6, axis=-1)
    assert is_grey.sum() == 2 * (32 * 6) * (48 * 6)  # both panels, enlarged 6× to reach 256 px
    rows = np.flatnonzero(is_grey.any(axis=1))
    dark = np.all(first < 0.4, axis=-1)  # the labels above and the caption below
    assert dark[: rows[0]].any() and dark[rows[-1] + 1:].any()


def _run(argv, tmp_path):
    return subprocess.run(
        [sys.executable, "-m", "experiments.sample_video", "--tiny-random", "--steps", "1", "--no-compilation-cache",
         *argv], cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get(
             "PYTHONPATH"))))}, capture_output=True, text=True, timeout=400)


def test_tiny_random_text_to_video_end_to_end_with_a_clean_console(torch, diffusers, tmp_path):
    import imageio.v2 as imageio

    proc = _run([], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and "tiny Wan T2V pipeline" in lines[0] and "noise by design" in lines[0]
    out = tmp_path / "runs" / "sample_video"
    assert lines[1].startswith(f"wrote {out}/: cfg-zero-star, cfg_vs_cfg-zero-star (4 files, ")
    video = imageio.mimread(out / "cfg-zero-star.gif")
    assert len(video) == 9 and np.asarray(video[0]).shape[:2] == (32, 48)
    assert len(imageio.mimread(out / "cfg_vs_cfg-zero-star.mp4", format="FFMPEG")) == 9


def test_tiny_random_image_to_video_reads_the_given_first_frame(torch, diffusers, tmp_path):
    from PIL import Image

    picture = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(picture)
    out = tmp_path / "i2v"
    proc = _run(["--model", "wan-i2v", "--image", str(picture), "--guidance", "cfg", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert "tiny Wan I2V pipeline" in lines[0]
    assert lines[1].startswith(f"wrote {out}/: cfg, cfg_vs_cfg-zero-star (4 files, ")
