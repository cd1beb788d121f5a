"""``python -m experiments.figures``: the one command that rebuilds the gallery, and the gallery's captions;
and what every study's command line does before any work (output folder, arguments, working directory)."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ("experiments.crossover", "experiments.crossover_map", "experiments.crossover_highdim",
           "experiments.exact_guidance", "experiments.lecture_demo")
CLIS = (*STUDIES, "experiments.figures")


def test_figures_command_runs_studies_and_checks_their_files(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "experiments.figures", "--quick", "--only", "lecture_demo", "--out", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])["studies"]
    assert set(summary) == {"lecture_demo"}
    for study in summary.values():
        assert study["figures"] and all((Path(study["out"]) / f).exists() for f in study["figures"])
    assert "cfg_vs_cfg_zero_star.gif" in summary["lecture_demo"]["figures"]
    assert any(line.startswith("  lecture_demo: ") for line in lines)  # the study's own lines, shown as they come
    assert any(line.startswith(f"  wrote {tmp_path / 'demo'}/: ") for line in lines)


def test_figures_rejects_unknown_study():
    done = subprocess.run([sys.executable, "-m", "experiments.figures", "--only", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--only" in done.stderr and done.stderr.count("\n") == 1


def test_figures_writes_the_repository_gallery_from_any_directory(tmp_path, monkeypatch, capsys):
    from experiments import figures

    monkeypatch.chdir(tmp_path)
    assert figures.gallery_root() == str(ROOT / "figures")
    figures.main(["--list"])
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == len(figures.STUDIES)
    for line, (name, (_, _, folder, _, _)) in zip(listed, figures.STUDIES.items()):
        assert line.startswith(name) and f"--out {os.path.join('figures', folder)}" in line and f"(in {ROOT})" in line


def test_figures_without_a_gallery_folder_asks_for_out(tmp_path, monkeypatch, capsys):
    from experiments import figures

    monkeypatch.setattr(figures, "gallery_root", lambda: None)  # as in a non-editable install
    with pytest.raises(SystemExit) as exit_:
        figures.main(["--list"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "pass --out" in err
    figures.main(["--list", "--out", str(tmp_path)])  # an explicit root is enough
    assert f"--out {tmp_path}" in capsys.readouterr().out


def test_every_committed_figure_is_in_the_gallery():
    gallery = (ROOT / "figures" / "README.md").read_text()
    for png in (ROOT / "figures").rglob("*.png"):
        assert png.name in gallery, f"{png.relative_to(ROOT)} is not described in figures/README.md"
        assert png.with_suffix(".pdf").exists(), f"{png.relative_to(ROOT)} has no PDF for slides"
    for gif in (ROOT / "figures").rglob("*.gif"):
        assert gif.name in gallery, f"{gif.relative_to(ROOT)} is not described in figures/README.md"


# ----------------------------------------------------------------------------- every study's command line
@pytest.mark.parametrize("module", CLIS)
def test_help_works_from_any_directory(module, tmp_path):
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--out" in done.stdout and not list(tmp_path.iterdir())


@pytest.mark.parametrize("module, args, folder", [
    ("experiments.crossover", [], "runs/crossover/quick"),
    ("experiments.crossover", ["--preset", "smoke"], "runs/crossover/smoke"),
    ("experiments.crossover_map", ["--preset", "paper"], "runs/crossover_map/paper"),
    ("experiments.crossover_highdim", [], "runs/crossover_highdim/quick"),
    ("experiments.exact_guidance", [], "runs/exact_guidance"),
    ("experiments.lecture_demo", [], "runs/lecture_demo"),
])
def test_exploring_runs_write_under_runs_not_the_gallery(module, args, folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parsed = importlib.import_module(module).parse_args(args)
    assert Path(parsed.out) == Path(folder) and (tmp_path / folder).is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]


def _unusable_out(kind: str, tmp_path: Path) -> str:
    if kind == "virtual file system":
        return "/proc/x"
    if kind == "missing parent on a read-only file system":
        return "/proc/x/y"
    if kind == "existing file":
        path = tmp_path / "a_file"
        path.write_text("not a folder")
        return str(path)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["virtual file system", "missing parent on a read-only file system", "existing file"])
@pytest.mark.parametrize("module", CLIS)
def test_unusable_out_folder_fails_at_once_in_one_line(module, kind, tmp_path, capsys):
    out = _unusable_out(kind, tmp_path)
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(["--out", out])
    captured = capsys.readouterr()
    assert exit_.value.code == 2
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"python -m {module}: error: --out ")
    assert "is not a writable folder" in captured.err and captured.out == ""


@pytest.mark.parametrize("module, args, word", [
    ("experiments.crossover", ["--scale", "-1"], "--scale"),
    ("experiments.crossover_map", ["--label", "5"], "--label"),
    ("experiments.crossover_highdim", ["--dim", "1"], "--dim"),
    ("experiments.exact_guidance", ["--label", "9"], "--label"),
    ("experiments.exact_guidance", ["--zero-steps", "1"], "--zero-steps"),  # renamed --zero-init-steps
    ("experiments.lecture_demo", ["--label", "9"], "--label"),
    ("experiments.figures", ["--only", "nope"], "--only"),
])
def test_bad_arguments_fail_in_one_line_before_importing_jax(module, args, word, tmp_path):
    out = tmp_path / "out"
    code = (f"import sys\nimport {module} as m\ntry:\n    m.main({[*args, '--out', str(out)]!r})\n"
            f"except SystemExit as e:\n    print(e.code, 'jax' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"python -m {module}: error: ") and word in done.stderr
    assert not out.exists()
