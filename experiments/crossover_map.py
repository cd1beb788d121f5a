"""Where "zero beats early CFG" holds: the first-step crossover over geometry and guidance scale.

Protocol (declared before any number).  The same networks, training and target as
``experiments.crossover`` (the true conditional velocity ``v*₀ = μ_c − x0`` at ``t = 0``, one
grey line ``E‖v*₀‖``; "early" means epochs ``≥ 1``), on every cell of a grid:

* geometry (:func:`~cfgzero_theory.mixtures.guided_class_2d`): the guided class's mean at
  ``distance ∈ {3.5, 7, 14, 28}`` from the noise mean, the data mean at
  ``data_offset = f·distance`` along the same axis, ``f ∈ {0, 0.5, 0.75}`` (``f = 0``: the
  data mean at the origin, the noise mean);
* guidance scale ``w ∈ {1.5, 2, 4, 6}`` (no retraining: the scale only enters the rule);
* 3 datasets (data seeds) × ``seeds`` networks per geometry.

For each cell and for CFG and CFG* it records the fraction of networks for which zero beats
the rule at some epoch ``≥ 1``, the crossover epoch of the network-mean curve (first epoch
``≥ 1`` from which it stays below the grey line) with its 90% bootstrap interval over
networks, and the last-epoch error next to the exact guidance bias it tends to, for CFG
``(w − 1)·‖μ_c − μ̄‖``.  A cell *reproduces* the crossover when zero beats the network mean
at some epoch ``≥ 1`` and the mean later stays below the grey line.  The exact theory predicts the map's shape: a crossover needs that
bias below ``E‖v*₀‖``, i.e. about ``(w − 1)(1 − f) < 1``; the learned models say whether
and when it happens.

The verdict rules (zero beats early, crossover, reproduced, allowed by exact theory) are
:mod:`cfgzero_theory.verdicts`.

Outputs under ``--out`` (default ``runs/crossover_map/<preset>`` in the current directory; the
committed gallery is written by ``python -m experiments.figures`` only): ``crossover_map.json``
and the heat-map figure ``crossover_map`` (PNG and PDF); ``checkpoints/`` (one folder per
geometry) lets a rerun skip training.

    python -m experiments.crossover_map                    # quick preset, ~3 min on 2 CPU cores (paper ~6 min)
    python -m experiments.crossover_map --preset paper     # 9 networks per geometry
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

from experiments._common import preset_settings, settle_out, start_study, study_parser

PRESETS = {
    "smoke": dict(seeds=1, data_seeds=3, epochs=3, dataset_size=512, batch_size=128, width=16,
                  distances=(7.0, 14.0), fractions=(0.0, 0.75), scales=(2.0, 4.0)),
    "quick": dict(seeds=1, data_seeds=3, epochs=120, dataset_size=4096, batch_size=256, width=64,
                  distances=(3.5, 7.0, 14.0, 28.0), fractions=(0.0, 0.5, 0.75), scales=(1.5, 2.0, 4.0, 6.0)),
    "paper": dict(seeds=3, data_seeds=3, epochs=120, dataset_size=4096, batch_size=256, width=64,
                  distances=(3.5, 7.0, 14.0, 28.0), fractions=(0.0, 0.5, 0.75), scales=(1.5, 2.0, 4.0, 6.0)),
}
#: The guidance kinds mapped (:data:`guidance.KINDS`; the JSON's per-rule keys).
RULES = ("cfg", "cfg-star")
LEVEL = 0.9


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and validate every argument, then create ``--out`` and prove it writable: a user error exits
    with status 2 and one line on stderr, before any import of JAX or any work."""
    p = study_parser("crossover_map", PRESETS, __doc__)
    p.add_argument("--label", type=int, default=1, help="guided class: 0, 1 or 2 (default 1)")
    p.add_argument("--seed", type=int, default=0, help="root seed of the networks and training noise")
    p.add_argument("--data-seed", type=int, default=0, help="first data seed (datasets use data-seed, data-seed + 1, ...)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    if not 0 <= args.label < 3:
        p.error("--label must be a class of the mixture: 0, 1 or 2")
    args.settings = preset_settings(p, args, PRESETS)
    settle_out(p, args, "crossover_map")
    return args


def run(args) -> dict:
    import jax
    import numpy as np

    import cfgzero_theory
    from cfgzero_theory import analysis, guidance, mixtures, verdicts
    from experiments._common import crossover_json, mixture_json, progress
    from experiments.crossover import NETWORK, TRAINING, evaluation_epochs, train_networks
    from cfgzero_theory.models import network_velocity

    s = args.settings
    epochs = evaluation_epochs(s["epochs"])
    key_first, key_boot = jax.random.split(jax.random.key(args.seed + 1000))
    x0 = jax.random.normal(key_first, (4096, 2))
    geometries = [(d, f) for d in s["distances"] for f in s["fractions"]]
    cells, train_s, steps_per_epoch, num_networks = [], 0.0, None, None
    bar = progress(geometries, not args.no_progress, "geometries (train + evaluate)", unit="geometry")
    for gi, (distance, fraction) in enumerate(bar):
        offset = fraction * distance
        mixture = mixtures.guided_class_2d(distance, offset, args.label)
        started = time.perf_counter()
        folder = os.path.join(args.out, "checkpoints", f"distance{distance:g}_offset{offset:g}")
        result, _, train_config = train_networks(mixture, s, args.seed, args.data_seed, epochs, folder,
                                                  progress=not args.no_progress)
        train_s += time.perf_counter() - started
        steps_per_epoch, num_networks = train_config.steps_per_epoch, train_config.num_networks
        rules = {f"{name}@{w:g}": guidance.make_rule(name, w) for name in RULES for w in s["scales"]}
        per_epoch = [analysis.first_step_errors(network_velocity, result.networks[e], mixture, args.label, rules, x0)
                     for e in epochs]
        for wi, w in enumerate(s["scales"]):
            cell = {"distance": distance, "data_offset": offset, "fraction": fraction, "scale": w,
                    "class_radius": distance - offset, "mixture": mixture_json(mixture) if wi == 0 else None}
            for ri, name in enumerate(RULES):
                err = np.stack([np.asarray(fs[f"{name}@{w:g}"].total_error) for fs in per_epoch], axis=1)  # (S, E)
                zero = float(per_epoch[0][f"{name}@{w:g}"].zero_error_cond)
                bias = float(per_epoch[0][f"{name}@{w:g}"].guidance_bias)
                c = verdicts.first_step_crossover(epochs, err, zero, level=LEVEL,
                                                  key=jax.random.fold_in(key_boot, 100 * gi + 10 * wi + ri))
                mean = err.mean(axis=0)
                v = verdicts.crossover_verdict(epochs, mean, zero, c.epoch)
                cell[name] = {
                    "err_zero": zero, "guidance_bias": bias, "bias_over_zero": bias / zero,
                    "err": mean.tolist(), "err_final": float(mean[-1]),
                    "frac_zero_beats_early": float(np.mean([bool(verdicts.epochs_above(epochs, row, zero)) for row in err])),
                    "frac_above_zero": (err > zero).mean(axis=0).tolist(),
                    "zero_beats_early": v["zero_beats_early"],
                    "crossover": crossover_json(c),
                    "reproduced": v["reproduced"],
                }
            cells.append(cell)
    payload = {
        "config": {
            "preset": args.preset, "preset_settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
            "label": args.label, "network": NETWORK, "training": TRAINING,
            "seeds": {"root": args.seed, "data": list(range(args.data_seed, args.data_seed + s["data_seeds"])),
                      "networks_per_dataset": s["seeds"], "num_networks_per_geometry": num_networks},
            "bootstrap_level": LEVEL, "cfgzero_theory_version": cfgzero_theory.__version__,
            "jax_version": jax.__version__, "python_version": platform.python_version(),
            "jax_backend": jax.default_backend(), "argv": sys.argv[1:],
        },
        "target": "true_velocity",
        "epochs": list(epochs),
        "steps_per_epoch": steps_per_epoch,
        "cells": cells,
        "runtime_s": {"training": train_s},
    }
    return payload


def summary(payload) -> dict:
    """Counts of the map: cells where the crossover is reproduced, where exact theory allows it, and the two agree."""
    from cfgzero_theory import verdicts

    out = {}
    for name in RULES:
        cells = [c[name] for c in payload["cells"]]
        allowed = [verdicts.exact_allows_crossover(c["guidance_bias"], c["err_zero"]) for c in cells]
        reproduced = [c["reproduced"] for c in cells]
        out[name] = {
            "cells": len(cells),
            "reproduced": sum(reproduced),
            "bias_below_zero_line": sum(allowed),
            "reproduced_where_bias_below": sum(r and a for r, a in zip(reproduced, allowed)),
            "zero_beats_early": sum(c["zero_beats_early"] for c in cells),
            "ends_below_zero_line": sum(c["err_final"] < c["err_zero"] for c in cells),
        }
    return out


def verdict(payload) -> str:
    from cfgzero_theory.guidance import KIND_LABELS

    sm = summary(payload)
    lines = []
    for name in RULES:
        m, title = sm[name], KIND_LABELS[name]
        lines.append(
            f"{title}: crossover reproduced in {m['reproduced']} of {m['cells']} cells; zero beats early {title} (mean, "
            f"epochs >= 1) in {m['zero_beats_early']}; the last-epoch error ends below the zero line in "
            f"{m['ends_below_zero_line']}; exact theory allows it (bias < E‖v*‖) in {m['bias_below_zero_line']}, and "
            f"{m['reproduced_where_bias_below']} of the reproduced cells are among those.")
    return "\n".join(lines)


def format_table(payload) -> str:
    head = (f"{'dist':>5} {'f':>5} {'w':>4} {'‖v*‖':>7} {'bias':>7} {'final':>7} {'beats':>6} {'cross':>12} "
            f"{'*bias':>7} {'*final':>7} {'*beats':>6} {'*cross':>12}")
    lines = ["CFG (left) and CFG* (right, *): first-step error against v*; beats = networks for which zero beats the "
             "rule at some epoch >= 1; cross = crossover epoch [90% interval]", head, "-" * len(head)]
    for c in payload["cells"]:
        parts = []
        for name in RULES:
            r = c[name]
            cr = r["crossover"]
            cross = (f"{cr['epoch']:g} [{_b(cr['low'])},{_b(cr['high'])}]" if r["reproduced"]
                     else ("never above" if not r["zero_beats_early"] else "stays above"))
            parts.append(f"{r['guidance_bias']:>7.2f} {r['err_final']:>7.2f} {r['frac_zero_beats_early']:>6.0%} {cross:>12}")
        lines.append(f"{c['distance']:>5g} {c['fraction']:>5g} {c['scale']:>4g} {c['cfg']['err_zero']:>7.2f} " + " ".join(parts))
    return "\n".join(lines)


def _b(v) -> str:
    return "∞" if v is None else f"{v:g}"


def plot_map(payload, path):
    """Heat maps over (geometry rows) × (scale columns): fraction of networks beaten early by zero, and
    the crossover epoch, for CFG and CFG*; each cell annotated, bias ≥ ‖v*‖ cells hatched."""
    import matplotlib.pyplot as plt
    import numpy as np

    from cfgzero_theory import plotting, verdicts
    from cfgzero_theory.guidance import KIND_LABELS

    s = payload["config"]["preset_settings"]
    geos = [(d, f) for d in s["distances"] for f in s["fractions"]]
    scales = s["scales"]
    index = {(c["distance"], c["fraction"], c["scale"]): c for c in payload["cells"]}
    fig, axes = plt.subplots(1, 4, figsize=(15, 0.42 * len(geos) + 2.2), sharey=True)
    last = payload["epochs"][-1]
    for col, name in enumerate(RULES):
        frac = np.array([[index[(d, f, w)][name]["frac_zero_beats_early"] for w in scales] for d, f in geos])
        cross = np.array([[index[(d, f, w)][name]["crossover"]["epoch"] if index[(d, f, w)][name]["reproduced"] else np.nan
                           for w in scales] for d, f in geos])
        allowed = np.array([[verdicts.exact_allows_crossover(index[(d, f, w)][name]["guidance_bias"],
                                                             index[(d, f, w)][name]["err_zero"]) for w in scales]
                            for d, f in geos])
        title = KIND_LABELS[name]
        for k, (values, cmap, label, vmax) in enumerate((
            (frac, "Reds", f"{title}: share of networks that zero\nbeats at some epoch ≥ 1", 1.0),
            (np.log2(1 + cross), "viridis_r", f"{title}: crossover epoch\n(above: never crosses below; below: never above)", math.log2(1 + last)),
        )):
            ax = axes[2 * col + k]
            ax.imshow(values, cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
            for i in range(len(geos)):
                for j in range(len(scales)):
                    if k == 0:
                        text = f"{frac[i, j]:.0%}"
                    elif np.isnan(cross[i, j]):  # not reproduced: zero better at every epoch >= 1, or at none
                        text = "above" if index[(geos[i][0], geos[i][1], scales[j])][name]["zero_beats_early"] else "below"
                    else:
                        text = f"{cross[i, j]:g}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=7,
                            color="black" if k == 0 and frac[i, j] < 0.6 else ("black" if k == 1 else "white"))
                    if not allowed[i, j]:
                        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="grey",
                                                   linewidth=0))
            ax.set_xticks(range(len(scales)))
            ax.set_xticklabels([f"w={w:g}" for w in scales])
            ax.set_title(label, fontsize=8.5)
    axes[0].set_yticks(range(len(geos)))
    axes[0].set_yticklabels([f"‖μ_c‖={d:g}, ‖μ̄‖={f * d:g}" for d, f in geos], fontsize=7.5)
    fig.suptitle("Where zero beats early guidance (target: true velocity v*₀; hatched: exact bias ≥ E‖v*₀‖, so the "
                 f"rule cannot end below the zero line); {payload['config']['seeds']['num_networks_per_geometry']} "
                 "networks per geometry", fontsize=9.5)
    fig.tight_layout()
    written = plotting.save(fig, path)
    plt.close(fig)
    return written


def plan(args) -> str:
    """The first line of a run: what will be trained and evaluated, and where the outputs go."""
    s = args.settings
    geometries = len(s["distances"]) * len(s["fractions"])
    return (f"crossover_map ({args.preset}): {geometries} geometries × {s['data_seeds'] * s['seeds']} networks "
            f"({s['data_seeds']} datasets × {s['seeds']}), {s['epochs']} epochs each, {len(s['scales'])} guidance scales "
            f"× {len(RULES)} rules per geometry; writing {os.path.abspath(args.out)}/ (checkpoints/ lets a rerun skip training)")


def main(argv=None) -> dict:
    start, args = start_study(parse_args, plan, argv)
    from experiments._common import draw_figures, outputs_line, publishable, retract_result, run_or_exit, write_json

    payload = run_or_exit(run, args)
    path = os.path.join(args.out, "crossover_map.json")
    retract_result(path)
    figures = draw_figures({"crossover_map": lambda out: plot_map(payload, out)}, args.out, not args.no_progress)
    payload["summary"] = summary(payload)
    payload = publishable(payload, figures, verdict, start)
    write_json(path, payload)
    print(format_table(payload))
    print(payload["verdict"])
    print(outputs_line(args.out, [path, *figures]) + f"; {payload['runtime_s']['total']:.1f} s")
    return payload


if __name__ == "__main__":
    main()
