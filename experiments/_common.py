"""Plumbing shared by the experiments' ``main`` functions (no mathematics here)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


#: The guidance of the toy studies (crossover, crossover_map's default cell, crossover_highdim,
#: exact_guidance, lecture_demo), declared once: the scale ``w`` and the zero-init steps ``K``
#: (the paper's ``K = 1``).  Kept here, not in the library, so the command lines can print
#: their help and refuse bad arguments before JAX is imported.
TOY_SCALE = 4.0
TOY_ZERO_INIT_STEPS = 1

def strict_json(value):
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN or inf)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` as strict JSON atomically (a unique temporary file, then rename:
    :func:`cfgzero_theory.files.atomic_write_bytes`)."""
    from cfgzero_theory.files import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(strict_json(payload), indent=1, allow_nan=False).encode())


def retract_result(path: str) -> None:
    """Remove a study's previous JSON before its new outputs are written.

    The JSON is a study's completion marker: written last (atomically, like every figure), so
    an interrupted run leaves a folder *without* JSON — visibly incomplete — never new figures
    beside an old JSON that does not describe them.
    """
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def study_parser(study: str, presets: dict, doc: str) -> OneLineErrorParser:
    """The command line every training study opens with: ``prog`` ``python -m experiments.<study>``,
    the description from ``doc``'s first paragraph, ``--preset`` (one of ``presets``, default
    ``quick``) and ``--out`` (default ``runs/<study>/<preset>``, settled by :func:`settle_out`)."""
    p = OneLineErrorParser(prog=f"python -m experiments.{study}", description=doc.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(presets), default="quick", help="size of the study (default quick)")
    p.add_argument("--out", default=None, help=f"output folder (default runs/{study}/<preset>)")
    return p


def add_preset_overrides(parser, presets: dict, notes: dict | None = None) -> None:
    """One ``--<name>`` integer option per setting of the quick preset, overriding the chosen preset's
    value (``notes``: extra help text per setting); applied by :func:`preset_settings`."""
    for name in presets["quick"]:
        extra = (notes or {}).get(name, "")
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"override the preset's {name}{extra}")


def preset_settings(parser, args, presets: dict, minimums: dict | None = None) -> dict:
    """The chosen preset's settings with every given override applied, each at least its minimum
    (``minimums``, default 1); a batch may not exceed the dataset.  Overrides that were not
    declared (:func:`add_preset_overrides`) are simply absent from ``args``."""
    settings = dict(presets[args.preset])
    for name in settings:
        value = getattr(args, name, None)
        if value is not None:
            minimum = (minimums or {}).get(name, 1)
            if value < minimum:
                parser.error(f"--{name.replace('_', '-')} must be at least {minimum}")
            settings[name] = value
    if "batch_size" in settings and settings["batch_size"] > settings["dataset_size"]:
        parser.error(f"--batch-size ({settings['batch_size']}) must not exceed --dataset-size "
                     f"({settings['dataset_size']})")
    return settings


def settle_out(parser, args, study: str) -> None:
    """``args.out`` defaulted to ``runs/<study>/<preset>``, created and proved writable
    (:func:`prepare_output_dir`)."""
    if args.out is None:
        args.out = default_out(study, args.preset)
    prepare_output_dir(parser, args.out)


def start_study(parse_args, plan, argv):
    """The opening every study's ``main`` shares: parse and check ``argv`` (``parse_args``), print
    the plan line at once (``plan(args)``), select matplotlib's file backend.  Returns
    ``(start, args)``, ``start`` from ``time.perf_counter`` for the total runtime."""
    start = time.perf_counter()
    args = parse_args(argv)
    announce(plan(args))
    import matplotlib

    matplotlib.use("Agg")
    return start, args


def draw_figures(drawings: dict, out_dir: str, show_progress: bool) -> list[str]:
    """Draw each figure of ``drawings`` (name → ``draw(path_without_extension) -> written paths``)
    into ``out_dir`` in the project style, with a progress bar; returns every path written."""
    from cfgzero_theory import plotting

    figures = []
    with plotting.style():
        for name in progress(drawings, show_progress, "figures", unit="figure"):
            figures += drawings[name](os.path.join(out_dir, name))
    return figures


def publishable(payload: dict, figures: list[str], verdict, started: float) -> dict:
    """A study's payload ready for its JSON: private (``_``) keys dropped, the figure file
    names, ``verdict(payload)`` and the total runtime since ``started`` (``time.perf_counter``)."""
    payload = {k: v for k, v in payload.items() if not k.startswith("_")}
    payload["figures"] = [os.path.basename(f) for f in figures]
    payload["verdict"] = verdict(payload)
    payload["runtime_s"]["total"] = time.perf_counter() - started
    return payload


def default_out(study: str, preset: str | None = None) -> str:
    """A study's default output folder, ``runs/<study>[/<preset>]`` under the current directory.

    Exploring runs never touch the committed gallery: only ``python -m experiments.figures``
    writes into the repository's ``figures/``.
    """
    return os.path.join("runs", study, *([preset] if preset else []))


def announce(line: str) -> None:
    """Print ``line`` at once (flushed): what will run and where it writes, before the slow imports."""
    print(line, flush=True)


def prepare_output_dir(parser, path: str, option: str = "--out") -> str:
    """Create the output folder ``path`` and prove it writable, before any work is done.

    An unusable folder (an existing file, a parent that cannot be created, a read-only or
    virtual file system such as ``/proc``) ends the program through ``parser.error``: one
    line on stderr (:func:`usage_error`) and exit status 2, naming ``option``.  Returns the
    absolute path.
    """
    import tempfile

    path = os.path.abspath(os.path.expanduser(path))
    try:
        if os.path.exists(path) and not os.path.isdir(path):
            raise OSError("it exists and is not a folder")
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        usage_error(parser, f"{option} {path!r} is not a writable folder: {reason}")
    return path


class OneLineErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose own errors (a bad choice, a value that is not a number, ``parser.error``)
    are one line ``PROG: error: ...`` with exit status 2 (:func:`usage_error`), not the usage text first."""

    def error(self, message):
        usage_error(self, message)


def usage_error(parser, message: str):
    """End the program for a user error: ``PROG: error: message`` on one line, exit status 2."""
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_or_exit(run, args):
    """``run(args)``, turning a ``ValueError`` (bad input) into a message and exit status 2."""
    try:
        return run(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def make_rules(kinds, scale: float, zero_init_steps: int) -> dict:
    """``{kind: guidance.make_rule(kind, w, K)}`` for guidance kinds of :data:`guidance.KINDS`: ``K`` goes to the
    zero-init kinds only, and ``conditional`` is ``w = 1`` whatever ``scale`` (with ``K = 0``)."""
    from cfgzero_theory import guidance

    return {kind: guidance.make_rule(kind, None if kind == "conditional" else scale,
                                     zero_init_steps if kind in guidance.ZERO_INIT_KINDS else None)
            for kind in kinds}


def mixture_json(mixture) -> dict:
    """The mixture as numbers: weights, means, covariances and labels."""
    import numpy as np

    return {"weights": np.asarray(mixture.weights).tolist(), "means": np.asarray(mixture.means).tolist(),
            "covs": np.asarray(mixture.covs).tolist(), "labels": np.asarray(mixture.labels).tolist()}


def progress(items, enabled: bool, desc: str, unit: str = "epoch"):
    """``items`` wrapped in a tqdm bar (``desc``, ``unit``) when ``enabled``, else unchanged."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=False)


def _number(value):
    """``value`` as a float, or ``None`` when missing or not finite."""
    return None if value is None or not math.isfinite(value) else float(value)


def crossover_json(c) -> dict:
    """An :class:`analysis.Crossover` as JSON: epoch and interval (``None`` where not finite), ``found``."""
    return {"epoch": _number(c.epoch), "low": _number(c.low), "high": _number(c.high), "fraction": c.fraction,
            "found": _number(c.epoch) is not None}


def interval_text(c) -> str:
    """``"[low, high]"`` of a :func:`crossover_json` dict, ``never`` for a missing bound."""
    low = "never" if c["low"] is None else f"{c['low']:g}"
    high = "never" if c["high"] is None else f"{c['high']:g}"
    return f"[{low}, {high}]"


def outputs_line(out_dir: str, files: list[str]) -> str:
    """One line naming a run's outputs and their size, and ``out_dir/checkpoints/`` with its size where it exists."""
    def size(path):
        if os.path.isdir(path):
            return sum(size(os.path.join(path, f)) for f in os.listdir(path))
        return os.path.getsize(path) if os.path.exists(path) else 0

    total = sum(size(f) for f in files)
    names = ", ".join(sorted({os.path.splitext(os.path.basename(f))[0] for f in files}))
    line = f"wrote {out_dir}/: {names} ({len(files)} files, {total / 1e6:.1f} MB)"
    checkpoints = os.path.join(out_dir, "checkpoints")
    if os.path.isdir(checkpoints):
        line += f" and checkpoints/ ({size(checkpoints) / 1e6:.1f} MB)"
    return line
