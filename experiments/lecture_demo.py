"""The lecture animation: CFG against CFG-Zero* moving through the exact density.

Samples of the exact 2-D mixture (``class_conditional_2d``, class 1) integrated from the same
noise under CFG and CFG-Zero* at ``w = 4`` (Euler, 25 steps, so ``K = 1`` zeroes 4% of the
steps as the paper recommends), drawn over the exact noised class density ``p_t(x | c)``
(:func:`cfgzero_theory.animation.animate_trajectories`).  Writes
``DIR/cfg_vs_cfg_zero_star.gif`` (always), ``.mp4`` where ffmpeg exists, and
``DIR/lecture_demo.json`` (configuration and the files written).

    python -m experiments.lecture_demo            # figures/demo/, ~20 s on 2 CPU cores
    python -m experiments.lecture_demo --quick    # tiny settings (tests)
"""

from __future__ import annotations

import argparse
import os
import time

SETTINGS = dict(num_points=400, num_steps=25)
QUICK = dict(num_points=40, num_steps=4, res=24, dpi=40)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.lecture_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("figures", "demo"), help="output folder (default figures/demo)")
    p.add_argument("--scale", type=float, default=4.0, help="guidance scale w (default 4)")
    p.add_argument("--label", type=int, default=1, help="guided class (default 1)")
    p.add_argument("--zero-init-steps", type=int, default=1, help="zero-init steps K of CFG-Zero* (default 1)")
    p.add_argument("--quick", action="store_true", help=f"tiny settings for tests: {QUICK}")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax

    import cfgzero_theory
    from cfgzero_theory import CFG, CFGZeroStar, mixtures
    from cfgzero_theory.animation import animate_trajectories
    from experiments._common import run_or_exit, write_json

    start = time.perf_counter()
    settings = QUICK if args.quick else SETTINGS
    os.makedirs(args.out, exist_ok=True)

    def run(args):
        rules = [CFG(args.scale), CFGZeroStar(args.scale, args.zero_init_steps)]
        return animate_trajectories(mixtures.class_conditional_2d(), args.label, rules,
                                    os.path.join(args.out, "cfg_vs_cfg_zero_star"), **settings)

    written = run_or_exit(run, args)
    payload = {
        "config": {**vars(args), "settings": settings, "mixture": "mixtures.class_conditional_2d()",
                   "cfgzero_theory_version": cfgzero_theory.__version__, "jax_version": jax.__version__},
        "figures": [os.path.basename(path) for path in written],
        "runtime_s": time.perf_counter() - start,
    }
    write_json(os.path.join(args.out, "lecture_demo.json"), payload)
    print(f"wrote {', '.join(written)} in {payload['runtime_s']:.1f} s")
    return payload


if __name__ == "__main__":
    main()
