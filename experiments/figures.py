"""Regenerate every figure in ``figures/`` with one command.

    python -m experiments.figures                  # all studies, canonical settings (~20 min on 2 CPU cores)
    python -m experiments.figures --only crossover # one study (comma-separated names)
    python -m experiments.figures --list           # what would run, and where it writes
    python -m experiments.figures --quick --out-root /tmp/figs   # tiny settings, elsewhere (tests)

Each study is its own experiment (``python -m experiments.NAME``), run in a fresh Python
process so that none inherits another's JAX configuration (``exact_guidance`` runs in
float64); each writes PNG (screens) and PDF (slides and papers) in the project's one style
(:mod:`cfgzero_theory.plotting`) plus a JSON of its numbers and configuration.  After each
study the figures it reports in its JSON are checked to exist.  ``figures/README.md`` is the
gallery: every figure, what it shows, and the command that made it.  The last stdout line is
a JSON summary (per study: command, seconds, figures written).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# name: (module, canonical arguments, quick arguments, output folder under the root, JSON file)
STUDIES = {
    "exact_guidance": ("experiments.exact_guidance", [], ["--quick"], "exact_guidance", "exact_guidance.json"),
    "crossover": ("experiments.crossover", ["--no-progress"], ["--preset", "smoke", "--no-progress"],
                  os.path.join("crossover", "quick"), "crossover.json"),
    "crossover_map": ("experiments.crossover_map", ["--no-progress"], ["--preset", "smoke", "--no-progress"],
                      os.path.join("crossover_map", "quick"), "crossover_map.json"),
    "crossover_highdim": ("experiments.crossover_highdim", ["--no-progress"], ["--preset", "smoke", "--no-progress"],
                          os.path.join("crossover_highdim", "quick"), "crossover_highdim.json"),
    "lecture_demo": ("experiments.lecture_demo", [], ["--quick"], "demo", "lecture_demo.json"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.figures", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help=f"comma-separated studies to run (default all: {', '.join(STUDIES)})")
    p.add_argument("--out-root", default="figures", help="root folder of the figures (default figures/)")
    p.add_argument("--quick", action="store_true", help="each study's tiny settings (for tests; not the gallery)")
    p.add_argument("--list", action="store_true", help="print the commands and exit")
    args = p.parse_args(argv)
    names = list(STUDIES) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in STUDIES]
    if unknown or not names:
        p.error(f"--only must name studies among {', '.join(STUDIES)}; got {args.only!r}")
    args.names = names
    return args


def command(name: str, out_root: str, quick: bool) -> tuple[list[str], str]:
    """The command line of one study and the folder it writes."""
    module, canonical, tiny, folder, _ = STUDIES[name]
    out = os.path.join(out_root, folder)
    return [sys.executable, "-m", module, *(tiny if quick else canonical), "--out", out], out


def run_study(name: str, out_root: str, quick: bool) -> dict:
    cmd, out = command(name, out_root, quick)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-2000:] + done.stderr[-4000:])
        raise SystemExit(f"{name} failed (exit {done.returncode}): {' '.join(cmd)}")
    with open(os.path.join(out, STUDIES[name][4])) as f:
        figures = json.load(f).get("figures", [])
    missing = [fig for fig in figures if not os.path.exists(os.path.join(out, fig))]
    if not figures or missing:
        raise SystemExit(f"{name} reported figures {figures} but these are missing: {missing}")
    return {"command": " ".join(cmd[1:]), "seconds": round(seconds, 1), "out": out, "figures": figures}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.list:
        for name in args.names:
            cmd, out = command(name, args.out_root, args.quick)
            print(f"{name:18s} {' '.join(cmd[1:])}")
        return {}
    summary = {}
    for name in args.names:
        print(f"[figures] {name} ...", flush=True)
        summary[name] = run_study(name, args.out_root, args.quick)
        print(f"[figures] {name}: {len(summary[name]['figures'])} files in {summary[name]['seconds']} s", flush=True)
    print(json.dumps({"studies": summary, "quick": args.quick, "out_root": args.out_root}))
    return summary


if __name__ == "__main__":
    main()
