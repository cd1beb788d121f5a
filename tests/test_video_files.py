"""Video files (:func:`cfgzero_theory.ports.pipeline_parts.save_video`): MP4 and GIF, read back."""

import os

import numpy as np
import pytest

from cfgzero_theory.ports.pipeline_parts import save_video


def _video(frames=5, height=32, width=48):
    """Smooth moving colour gradients in [0, 1] (H.264 and GIF keep them close)."""
    t, y, x = np.meshgrid(np.arange(frames), np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    return np.stack([x, y, (0.2 * t) % 1.0 * np.ones_like(x)], axis=-1).astype(np.float32)


@pytest.mark.parametrize("suffix, tolerance", [(".mp4", 6 / 255), (".gif", 10 / 255)])
def test_written_video_reads_back(tmp_path, suffix, tolerance):
    imageio = pytest.importorskip("imageio.v2")
    video = _video()
    path = save_video(video, tmp_path / f"clip{suffix}", fps=8)
    frames = np.asarray(imageio.mimread(path, memtest=False), np.float32)[..., :3] / 255
    assert frames.shape == video.shape
    assert float(np.abs(frames - video).mean()) <= tolerance
    assert sorted(os.listdir(tmp_path)) == [f"clip{suffix}"]  # no temporary left behind


def test_a_batch_is_tiled_and_an_existing_file_replaced(tmp_path):
    imageio = pytest.importorskip("imageio.v2")
    path = tmp_path / "pair.gif"
    path.write_bytes(b"old")
    save_video(np.stack([_video(), 1 - _video()]), path)
    # height × the two widths; GIF writers may merge frames that quantise alike, so no frame count
    assert np.asarray(imageio.mimread(path)).shape[1:3] == (32, 96)


def test_bad_videos_and_paths_are_refused(tmp_path):
    with pytest.raises(ValueError, match="must end in one of"):
        save_video(_video(), tmp_path / "clip.avi")
    with pytest.raises(ValueError, match="even height and width"):
        save_video(_video(height=31), tmp_path / "clip.mp4")
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        save_video(np.zeros((4, 4, 3)), tmp_path / "clip.gif")
    with pytest.raises(ValueError, match="fps"):
        save_video(_video(), tmp_path / "clip.gif", fps=0)
    assert os.listdir(tmp_path) == []
