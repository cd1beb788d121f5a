"""``python -m experiments.figures``: the one command that rebuilds the gallery, and the gallery's captions."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_figures_command_runs_studies_and_checks_their_files(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "experiments.figures", "--quick", "--only", "lecture_demo",
         "--out-root", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])["studies"]
    assert set(summary) == {"lecture_demo"}
    for study in summary.values():
        assert study["figures"] and all((Path(study["out"]) / f).exists() for f in study["figures"])
    assert "cfg_vs_cfg_zero_star.gif" in summary["lecture_demo"]["figures"]


def test_figures_rejects_unknown_study():
    done = subprocess.run([sys.executable, "-m", "experiments.figures", "--only", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--only" in done.stderr


def test_every_committed_figure_is_in_the_gallery():
    gallery = (ROOT / "figures" / "README.md").read_text()
    for png in (ROOT / "figures").rglob("*.png"):
        assert png.name in gallery, f"{png.relative_to(ROOT)} is not described in figures/README.md"
        assert png.with_suffix(".pdf").exists(), f"{png.relative_to(ROOT)} has no PDF for slides"
    for gif in (ROOT / "figures").rglob("*.gif"):
        assert gif.name in gallery, f"{gif.relative_to(ROOT)} is not described in figures/README.md"
