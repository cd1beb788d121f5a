"""The lecture animation: CFG against CFG-Zero* moving through the exact density.

Samples of the exact 2-D mixture (``class_conditional_2d``, class 1) integrated from the same
noise under CFG and CFG-Zero* at ``w = 4`` (Euler, 25 steps, so ``K = 1`` zeroes 4% of the
steps as the paper recommends), drawn over the exact noised class density ``p_t(x | c)``
(:func:`cfgzero_theory.animation.animate_trajectories`).  Writes
``DIR/cfg_vs_cfg_zero_star.gif`` (always), ``.mp4`` where ffmpeg exists, and
``DIR/lecture_demo.json`` (configuration and the files written); ``DIR`` is ``--out``,
by default ``runs/lecture_demo`` in the current directory (the committed gallery's copy is
written by ``python -m experiments.figures`` only).

    python -m experiments.lecture_demo            # runs/lecture_demo/, ~20 s on 2 CPU cores
    python -m experiments.lecture_demo --quick    # tiny settings (tests)
"""

from __future__ import annotations

import argparse
import math
import os
import time

from experiments._common import (TOY_SCALE, TOY_ZERO_INIT_STEPS, OneLineErrorParser, announce, default_out,
                                 prepare_output_dir)

SETTINGS = dict(num_points=400, num_steps=25)
QUICK = dict(num_points=40, num_steps=4, res=24, dpi=40)
#: The mixture: ``mixtures.class_conditional_2d(**MIXTURE)`` (its classes are ``0 .. num_classes − 1``).
MIXTURE = {"num_classes": 3}


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and validate every argument, then create ``--out`` and prove it writable: a user error exits
    with status 2 and one line on stderr, before any import of JAX or any work."""
    p = OneLineErrorParser(prog="python -m experiments.lecture_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=default_out("lecture_demo"), help="output folder (default runs/lecture_demo)")
    p.add_argument("--scale", type=float, default=TOY_SCALE, help=f"guidance scale w (default {TOY_SCALE:g})")
    p.add_argument("--label", type=int, default=1, help=f"guided class, 0..{MIXTURE['num_classes'] - 1} (default 1)")
    p.add_argument("--zero-init-steps", type=int, default=TOY_ZERO_INIT_STEPS,
                   help=f"zero-init steps K of CFG-Zero* (default {TOY_ZERO_INIT_STEPS})")
    p.add_argument("--quick", action="store_true", help=f"tiny settings for tests: {QUICK}")
    args = p.parse_args(argv)
    if not math.isfinite(args.scale):
        p.error("--scale must be finite")
    if not 0 <= args.label < MIXTURE["num_classes"]:
        p.error(f"--label must be a class of the mixture, 0..{MIXTURE['num_classes'] - 1}; got {args.label}")
    if args.zero_init_steps < 0:
        p.error("--zero-init-steps must be non-negative")
    prepare_output_dir(p, args.out)
    return args


def main(argv=None) -> dict:
    start = time.perf_counter()
    args = parse_args(argv)
    settings = QUICK if args.quick else SETTINGS
    announce(f"lecture_demo: CFG vs CFG-Zero* animation, class {args.label}, w = {args.scale:g}, "
             f"K = {args.zero_init_steps}, {settings['num_points']} points, {settings['num_steps']} steps; "
             f"writing {os.path.abspath(args.out)}/")
    import jax

    import cfgzero_theory
    from cfgzero_theory import mixtures
    from cfgzero_theory.animation import animate_trajectories
    from experiments._common import make_rules, outputs_line, retract_result, run_or_exit, write_json

    def run(args):
        rules = list(make_rules(("cfg", "cfg-zero-star"), args.scale, args.zero_init_steps).values())
        return animate_trajectories(mixtures.class_conditional_2d(**MIXTURE), args.label, rules,
                                    os.path.join(args.out, "cfg_vs_cfg_zero_star"), **settings)

    path = os.path.join(args.out, "lecture_demo.json")
    retract_result(path)
    written = run_or_exit(run, args)
    payload = {
        "config": {**vars(args), "settings": settings,
                   "mixture": f"mixtures.class_conditional_2d(num_classes={MIXTURE['num_classes']})",
                   "cfgzero_theory_version": cfgzero_theory.__version__, "jax_version": jax.__version__},
        "figures": [os.path.basename(path) for path in written],
        "runtime_s": time.perf_counter() - start,
    }
    write_json(path, payload)
    print(outputs_line(args.out, [path, *written]) + f"; {payload['runtime_s']:.1f} s")
    return payload


if __name__ == "__main__":
    main()
