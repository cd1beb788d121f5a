"""Regenerate every figure of the committed gallery with one command.

    python -m experiments.figures                  # all studies into the repository's figures/ (~20 min on 2 CPU cores)
    python -m experiments.figures --only crossover # one study (comma-separated names)
    python -m experiments.figures --list           # what would run, and where it writes
    python -m experiments.figures --quick --out /tmp/figs   # tiny settings, elsewhere (tests)

This is the one command that writes the gallery: by default the repository's ``figures/``
folder, found from this package's location (a checkout, or an editable install), whatever the
current directory.  Where that folder does not exist (a non-editable install) ``--out`` must
name the root folder.  Each study alone writes to ``runs/<study>/`` instead, so exploring never
overwrites the gallery.

Each study is its own experiment (``python -m experiments.NAME``), run in a fresh Python
process so that none inherits another's JAX configuration (``exact_guidance`` runs in
float64); its output lines are shown as they come (indented) and its progress bars and errors
go straight to stderr.  Each writes PNG (screens) and PDF (slides and papers) in the
project's one style (:mod:`cfgzero_theory.plotting`) plus a JSON of its numbers and
configuration.  After each study the figures it reports in its JSON are checked to exist.
``figures/README.md`` is the gallery: every figure, what it shows, and the command that made
it.  The last stdout line is a JSON summary (per study: command, seconds, figures written).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from experiments._common import OneLineErrorParser, prepare_output_dir, usage_error

# name: (module, quick arguments, output folder under the root, JSON file, has progress bars)
STUDIES = {
    "exact_guidance": ("experiments.exact_guidance", ["--quick"], "exact_guidance", "exact_guidance.json", True),
    "crossover": ("experiments.crossover", ["--preset", "smoke"], os.path.join("crossover", "quick"), "crossover.json",
                  True),
    "crossover_map": ("experiments.crossover_map", ["--preset", "smoke"], os.path.join("crossover_map", "quick"),
                      "crossover_map.json", True),
    "crossover_highdim": ("experiments.crossover_highdim", ["--preset", "smoke"], os.path.join("crossover_highdim", "quick"),
                          "crossover_highdim.json", True),
    "lecture_demo": ("experiments.lecture_demo", ["--quick"], "demo", "lecture_demo.json", False),
}


def gallery_root() -> str | None:
    """The repository's ``figures/`` folder (the one holding the gallery's ``README.md``) next to this
    package, or ``None`` where there is none (a non-editable install)."""
    root = Path(__file__).resolve().parents[1] / "figures"
    return str(root) if (root / "README.md").is_file() else None


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the arguments; ``args.cwd`` and ``args.root`` say where the studies run and write.

    Without ``--out`` the studies run in the repository and write ``figures/…`` (relative
    paths, so the committed JSONs name no machine's folders); a missing gallery folder, an
    unknown study or an unusable ``--out`` (checked unless ``--list``) end the program with
    one line and status 2.
    """
    p = OneLineErrorParser(prog="python -m experiments.figures", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help=f"comma-separated studies to run (default all: {', '.join(STUDIES)})")
    p.add_argument("--out", default=None,
                   help="root folder of the figures (default: the repository's figures/, the committed gallery)")
    p.add_argument("--quick", action="store_true", help="each study's tiny settings (for tests; not the gallery)")
    p.add_argument("--list", action="store_true", help="print the commands and exit")
    p.add_argument("--no-progress", action="store_true", help="hide the studies' progress bars")
    args = p.parse_args(argv)
    names = list(STUDIES) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in STUDIES]
    if unknown or not names:
        p.error(f"--only must name studies among {', '.join(STUDIES)}; got {args.only!r}")
    args.names = names
    if args.out is None:
        gallery = gallery_root()
        if gallery is None:
            usage_error(p, "there is no figures/ folder next to the experiments package (not a checkout or an "
                           "editable install); pass --out to choose where the figures go")
        args.cwd, args.root = os.path.dirname(gallery), "figures"
    else:
        args.cwd, args.root = None, args.out
    if not args.list:
        prepare_output_dir(p, args.root if args.cwd is None else os.path.join(args.cwd, args.root))
    return args


def command(name: str, args) -> tuple[list[str], str]:
    """The command line of one study and the folder it writes (relative to ``args.cwd`` when that is set)."""
    module, tiny, folder, _, bars = STUDIES[name]
    out = os.path.join(args.root, folder)
    extra = (tiny if args.quick else []) + (["--no-progress"] if args.no_progress and bars else [])
    return [sys.executable, "-m", module, *extra, "--out", out], out


def run_study(name: str, args) -> dict:
    """Run one study, showing its output as it comes; check that the figures its JSON names exist."""
    cmd, out = command(name, args)
    start = time.perf_counter()
    with subprocess.Popen(cmd, cwd=args.cwd, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            print(f"  {line}", end="", flush=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}): {' '.join(cmd)}")
    folder = out if args.cwd is None else os.path.join(args.cwd, out)
    with open(os.path.join(folder, STUDIES[name][3])) as f:
        figures = json.load(f).get("figures", [])
    missing = [fig for fig in figures if not os.path.exists(os.path.join(folder, fig))]
    if not figures or missing:
        raise SystemExit(f"{name} reported figures {figures} but these are missing: {missing}")
    return {"command": " ".join(cmd[1:]), "seconds": round(seconds, 1), "out": folder, "figures": figures}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.list:
        for name in args.names:
            cmd, _ = command(name, args)
            print(f"{name:18s} {' '.join(cmd[1:])}" + (f"   (in {args.cwd})" if args.cwd else ""))
        return {}
    summary = {}
    for name in args.names:
        print(f"[figures] {name} ...", flush=True)
        summary[name] = run_study(name, args)
        print(f"[figures] {name}: {len(summary[name]['figures'])} files in {summary[name]['seconds']} s", flush=True)
    root = args.root if args.cwd is None else os.path.join(args.cwd, args.root)
    print(json.dumps({"studies": summary, "quick": args.quick, "out": root}))
    return summary


if __name__ == "__main__":
    main()
