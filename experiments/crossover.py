""""Zero beats early CFG": the crossover of the first-step error in 2-D (the paper's Fig. 3).

Small class-conditional flow-matching networks are trained for many epochs, several seeds at
once, on a finite dataset drawn from an exact 2-D mixture: ``class_conditional_2d`` with its
data mean ``μ̄`` moved ``--distance`` away from the noise mean along the guided class's axis
(``mixtures.class_axis``), so that the guided class lies between the two.  There the exact
first-step CFG target ``μ̄ + w(μ_c − μ̄) − x0`` is much shorter than ``w‖μ_c − μ̄‖``, the
error of a model that has learned the unconditional field but not yet the class.  At every evaluated
epoch, for the guided class ``c`` and scale ``w``:

* first-step error ``E_{x0} ‖ṽ_0^θ(x0) − ṽ_0^*(x0)‖`` for CFG and CFG* (target: the exact
  guided field of the same rule), against the zero velocity's error ``E‖ṽ_0^*‖``;
* per-step errors along the sampler's own trajectories, and final-sample quality (JSD on a
  grid, NLL, Fréchet, MMD, mode coverage, precision) for CFG, CFG*, CFG + zero-init and
  CFG-Zero*;
* the crossover epoch (first epoch from which the seed-mean error stays below the zero
  baseline) with a bootstrap interval over seeds.

Everything is composed from library calls (``training``, ``analysis``, ``sampling``);
outputs under ``--out``: ``crossover.json`` (configuration, seeds, library version, every
number) and figures ``first_step_error``, ``jsd``, ``trajectories``, ``training_loss``
(PNG and PDF).

    python -m experiments.crossover                    # quick preset (default), ~1 min on 2 CPU cores
    python -m experiments.crossover --preset paper     # more seeds and epochs
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import time

PRESETS = {
    # seeds, epochs, evaluated epochs, and the sampler used for the per-epoch sample metrics
    "smoke": dict(seeds=2, epochs=3, eval_every=1, dataset_size=512, batch_size=128, n_eval=256, steps=8, width=32),
    "quick": dict(seeds=4, epochs=30, eval_every=1, dataset_size=2048, batch_size=64, n_eval=1024, steps=16, width=64),
    "paper": dict(seeds=16, epochs=60, eval_every=1, dataset_size=2048, batch_size=64, n_eval=4096, steps=32, width=64),
}
DISTANCE = 12.0  # distance of the data mean from the noise mean, along the guided class's axis
RULE_NAMES = ("cfg", "cfg_star", "cfg_zero_init", "cfg_zero_star")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.crossover", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="size of the study (default quick)")
    p.add_argument("--out", default=None, help="output folder (default figures/crossover/<preset>)")
    p.add_argument("--scale", type=float, default=4.0, help="guidance scale w (default 4)")
    p.add_argument("--label", type=int, default=1, help="guided class (default 1)")
    p.add_argument("--distance", type=float, default=DISTANCE,
                   help=f"distance of the data mean from the origin along the guided class's axis (default {DISTANCE:g})")
    p.add_argument("--zero-init-steps", type=int, default=1, help="zero-init steps K (default 1)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="root seed of the networks and training noise")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the finite dataset")
    for name in ("seeds", "epochs", "eval_every", "dataset_size", "batch_size", "n_eval", "steps", "width"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"override the preset's {name}")
    p.add_argument("--no-progress", action="store_true", help="hide the training progress bar")
    args = p.parse_args(argv)
    args.settings = dict(PRESETS[args.preset])
    for name in args.settings:
        if getattr(args, name) is not None:
            if getattr(args, name) < 1:
                p.error(f"--{name.replace('_', '-')} must be at least 1")
            args.settings[name] = getattr(args, name)
    if not (math.isfinite(args.scale) and args.scale > 0):
        p.error("--scale must be positive")
    if not (math.isfinite(args.distance) and args.distance >= 0):
        p.error("--distance must be a finite non-negative number")
    if not 0 <= args.label < 3:
        p.error("--label must be a class of the mixture: 0, 1 or 2")
    if args.zero_init_steps < 1:
        p.error("--zero-init-steps must be at least 1")
    if args.out is None:
        args.out = os.path.join("figures", "crossover", args.preset)
    return args


def build_rules(scale: float, zero_init_steps: int) -> dict:
    from cfgzero_theory import CFG, CFGStar, CFGZeroStar, ZeroInit

    return {
        "cfg": CFG(scale),
        "cfg_star": CFGStar(scale),
        "cfg_zero_init": ZeroInit(CFG(scale), zero_init_steps),
        "cfg_zero_star": CFGZeroStar(scale, zero_init_steps),
    }


def run(args) -> dict:
    """Train, evaluate every checkpoint epoch, and return the JSON-ready result (plus ``_raw``)."""
    import jax
    import numpy as np

    import cfgzero_theory
    from cfgzero_theory import analysis, guidance, mixtures, sampling
    from cfgzero_theory.models import NetworkConfig, network_velocity, select
    from cfgzero_theory.training import TrainConfig, train

    preset = args.settings
    center = tuple((-args.distance * mixtures.class_axis(args.label)).tolist())
    mixture = mixtures.class_conditional_2d(center=center)
    label = args.label
    eval_epochs = tuple(range(0, preset["epochs"] + 1, preset["eval_every"]))
    net_config = NetworkConfig(dim=2, num_classes=len(mixture.classes), width=preset["width"], depth=3)
    train_config = TrainConfig(
        epochs=preset["epochs"], dataset_size=preset["dataset_size"], batch_size=preset["batch_size"],
        learning_rate=args.learning_rate, num_seeds=preset["seeds"], seed=args.seed, data_seed=args.data_seed,
        checkpoint_epochs=eval_epochs,
    )
    started = time.perf_counter()
    result = train(mixture, net_config, train_config, out_dir=os.path.join(args.out, "checkpoints"),
                   progress=not args.no_progress)
    train_s = time.perf_counter() - started

    rules = build_rules(args.scale, args.zero_init_steps)
    key_first, key_eval, key_quality = jax.random.split(jax.random.key(args.seed + 1000), 3)
    x0_first = jax.random.normal(key_first, (4096, 2))
    x0_eval = jax.random.normal(key_eval, (preset["n_eval"], 2))
    times = sampling.time_grid(preset["steps"])
    first = {name: {"err": [], "total": []} for name in ("cfg", "cfg_star")}
    zero_baseline, guidance_bias = {}, {}
    quality = {name: [] for name in RULE_NAMES}
    per_step = {name: [] for name in RULE_NAMES}
    for epoch in eval_epochs:
        networks = result.networks[epoch]
        errors = analysis.first_step_errors(
            network_velocity, networks, mixture, label, {"cfg": rules["cfg"], "cfg_star": rules["cfg_star"]}, x0_first
        )
        for name, e in errors.items():
            first[name]["err"].append(np.asarray(e.learning_error))
            first[name]["total"].append(np.asarray(e.total_error))
            zero_baseline[name], guidance_bias[name] = float(e.zero_error), float(e.guidance_bias)
            zero_cond = float(e.zero_error_cond)
        for name in RULE_NAMES:
            steps = analysis.per_step_errors(network_velocity, networks, mixture, label, rules[name], x0_eval, times)
            per_step[name].append(np.asarray(steps.learning_error).mean(axis=0))
            q = analysis.sample_quality(mixture, steps.samples, label, key_quality)
            quality[name].append({k: np.asarray(v) for k, v in q.items()})

    num_seeds = preset["seeds"]
    out = {}
    for name in ("cfg", "cfg_star"):
        per_seed = np.stack(first[name]["err"], axis=1)  # (S, E)
        zero = np.full_like(per_seed, zero_baseline[name])
        cross = analysis.crossover_epoch(np.asarray(eval_epochs), per_seed, zero, key=jax.random.key(args.seed + 7))
        out[name] = {"per_seed": per_seed, "cross": cross, "total": np.stack(first[name]["total"], axis=1)}

    def per_epoch(metric, name):
        return np.stack([q[metric] for q in quality[name]], axis=1)  # (S, E)

    jsd = {name: per_epoch("jsd", name) for name in RULE_NAMES}
    config = {
        **{k: v for k, v in vars(args).items() if k not in ("out", "settings") and k not in preset},
        "preset_settings": preset, "mixture": f"mixtures.class_conditional_2d(center={center})",
        "network": dataclasses.asdict(net_config), "training": dataclasses.asdict(train_config),
        "rules": {k: guidance.describe(r) for k, r in rules.items()},
        "seeds": {"root": args.seed, "data": args.data_seed, "num_seeds": num_seeds, "evaluation": args.seed + 1000},
        "cfgzero_theory_version": cfgzero_theory.__version__, "jax_version": jax.__version__,
        "python_version": platform.python_version(), "jax_devices": len(jax.devices()), "argv": sys.argv[1:],
    }
    cross_json = lambda c: {"epoch": _num(c.epoch), "low": _num(c.low), "high": _num(c.high), "fraction": c.fraction}  # noqa: E731
    payload = {
        "config": config,
        "epochs": list(eval_epochs),
        "err_zero": zero_baseline["cfg"],
        "err_zero_cfg_star": zero_baseline["cfg_star"],
        "guidance_bias": guidance_bias,
        "err_cfg": out["cfg"]["per_seed"].mean(axis=0).tolist(),
        "err_cfg_star": out["cfg_star"]["per_seed"].mean(axis=0).tolist(),
        "err_cfg_per_seed": out["cfg"]["per_seed"].tolist(),
        "err_cfg_star_per_seed": out["cfg_star"]["per_seed"].tolist(),
        "err_zero_cond": zero_cond,
        "total_err_cfg": out["cfg"]["total"].mean(axis=0).tolist(),
        "total_err_cfg_star": out["cfg_star"]["total"].mean(axis=0).tolist(),
        "crossover_epoch_cfg": _num(out["cfg"]["cross"].epoch),
        "crossover_epoch_cfg_star": _num(out["cfg_star"]["cross"].epoch),
        "crossover_cfg": cross_json(out["cfg"]["cross"]),
        "crossover_cfg_star": cross_json(out["cfg_star"]["cross"]),
        "jsd": {name: jsd[name].mean(axis=0).tolist() for name in RULE_NAMES},
        "jsd_per_seed": {name: jsd[name].tolist() for name in RULE_NAMES},
        "sample_quality": {
            name: {m: per_epoch(m, name).mean(axis=0).tolist() for m in quality[name][0]} for name in RULE_NAMES
        },
        "per_step_learning_error": {name: np.stack(per_step[name]).tolist() for name in RULE_NAMES},
        "times": np.asarray(times).tolist(),
        "training_loss": result.losses.tolist(),
        "loss_floor": result.loss_floor,
        "runtime_s": {"training": train_s},
    }
    payload["_raw"] = {"mixture": mixture, "result": result, "rules": rules, "label": label, "x0": x0_eval,
                       "times": times, "select": select, "velocity": network_velocity}
    return payload


def _num(value):
    return None if value is None or not math.isfinite(value) else float(value)


def verdict(payload) -> str:
    """A sentence saying whether the crossover was reproduced (early above the baseline, late below)."""
    lines = []
    for name, title in (("cfg", "CFG"), ("cfg_star", "CFG*")):
        err = payload[f"err_{name}"]
        zero = payload["err_zero" if name == "cfg" else "err_zero_cfg_star"]
        early_above = any(e > zero for e in err[: max(1, len(err) // 4)])
        late_below = err[-1] < zero
        cross = payload[f"crossover_{name}"]
        above = [epoch for epoch, e in zip(payload["epochs"], err) if e > zero]
        when = "only at initialisation (epoch 0)" if above == [payload["epochs"][0]] else f"at epochs {above}"
        if early_above and late_below and cross["epoch"] is not None:
            interval = f"[{cross['low']}, {cross['high']}]" if cross["high"] is not None else f"[{cross['low']}, never]"
            lines.append(
                f"{title}: crossover REPRODUCED — the zero velocity beats {title} at the first step {when} "
                f"(worst {max(err[: max(1, len(err) // 4)]):.3f} > {zero:.3f}); from epoch {cross['epoch']:g} on "
                f"(90% bootstrap interval over seeds {interval}) {title} stays below the zero baseline "
                f"(final {err[-1]:.3f})."
            )
        elif not early_above:
            lines.append(
                f"{title}: crossover NOT reproduced — {title} was never worse than the zero velocity at the first step "
                f"in the first quarter of training (max error {max(err[: max(1, len(err) // 4)]):.3f} <= {zero:.3f}), "
                f"so there is no 'zero beats {title}' phase to cross out of."
            )
        else:
            lines.append(
                f"{title}: crossover NOT reproduced — zero beats {title} early, but the error is still above the zero "
                f"baseline at the last epoch ({err[-1]:.3f} >= {zero:.3f})."
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures
def plot_jsd(payload, path):
    import matplotlib.pyplot as plt
    import numpy as np

    from cfgzero_theory import plotting

    rules = payload["_raw"]["rules"]
    epochs = np.asarray(payload["epochs"])
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name in RULE_NAMES:
        per_seed = np.asarray(payload["jsd_per_seed"][name])
        style = plotting.rule_style(rules[name])
        ax.plot(epochs, per_seed.mean(axis=0), label=payload["config"]["rules"][name], **style)
    ax.set_xlabel("training epoch")
    ax.set_ylabel("JSD(samples ‖ true class density), nats")
    ax.set_yscale("log")
    ax.set_title("Final-sample quality per epoch (mean over seeds)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written = plotting.save(fig, path)
    plt.close(fig)
    return written


def plot_trajectories(payload, path):
    import jax
    import matplotlib.pyplot as plt
    import numpy as np

    from cfgzero_theory import plotting, sampling

    raw = payload["_raw"]
    mixture, rules, label = raw["mixture"], raw["rules"], raw["label"]
    epochs = payload["epochs"]
    early, late = epochs[min(2, len(epochs) - 1)], epochs[-1]
    x0 = raw["x0"][:128]
    lo, hi = np.array([-4.0, -9.0]), np.array([16.0, 9.0])
    fig, axes = plt.subplots(2, 2, figsize=(9, 8), sharex=True, sharey=True)
    for row, epoch in enumerate((early, late)):
        network = raw["select"](raw["result"].networks[epoch], 0)
        for col, name in enumerate(("cfg", "cfg_zero_star")):
            ax = axes[row, col]
            plotting.density_image(ax, lambda x: mixture.log_prob(x, label), lo, hi, 120)
            out = sampling.sample(raw["velocity"], network, x0, raw["times"], label, rules[name], return_trajectory=True)
            traj = np.asarray(jax.device_get(out.trajectory))
            color = plotting.rule_color(rules[name])
            ax.plot(traj[:, :, 0], traj[:, :, 1], color=color, alpha=0.25, linewidth=0.6)
            ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=5, color=color, zorder=3)
            ax.scatter(traj[0, :, 0], traj[0, :, 1], s=3, color="grey", zorder=2)
            ax.set_title(f"{payload['config']['rules'][name]}, epoch {epoch} (seed 0)", fontsize=9)
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(lo[1], hi[1])
    for ax in axes[-1]:
        ax.set_xlabel("x₁")
    for ax in axes[:, 0]:
        ax.set_ylabel("x₂")
    fig.suptitle(f"Sampler trajectories from noise (grey) over the true density of class {label}", fontsize=10)
    fig.tight_layout()
    written = plotting.save(fig, path)
    plt.close(fig)
    return written


def format_table(payload) -> str:
    head = f"{'epoch':>5} {'err CFG':>9} {'err CFG*':>9} {'zero':>7} {'zero*':>7} " + " ".join(f"{'JSD ' + n:>17}" for n in RULE_NAMES)
    lines = [head, "-" * len(head)]
    for i, epoch in enumerate(payload["epochs"]):
        jsd = " ".join(f"{payload['jsd'][n][i]:>17.4f}" for n in RULE_NAMES)
        lines.append(
            f"{epoch:>5} {payload['err_cfg'][i]:>9.3f} {payload['err_cfg_star'][i]:>9.3f} {payload['err_zero']:>7.3f} "
            f"{payload['err_zero_cfg_star']:>7.3f} {jsd}"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    start = time.perf_counter()
    args = parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    from cfgzero_theory import plotting
    from experiments._common import publishable, run_or_exit, write_json
    from experiments._figures import plot_first_step_errors, plot_training_loss

    payload = run_or_exit(run, args)
    figures = []
    with plotting.style():
        cfg = payload["config"]
        figures += plot_first_step_errors(
            payload["epochs"],
            {name: payload[f"err_{name}_per_seed"] for name in ("cfg", "cfg_star")},
            {"cfg": payload["err_zero"], "cfg_star": payload["err_zero_cfg_star"]},
            {name: payload[f"crossover_{name}"]["epoch"] for name in ("cfg", "cfg_star")},
            payload["_raw"]["rules"], cfg["rules"],
            f"Zero beats early CFG: class {cfg['label']}, w={cfg['scale']:g}, {cfg['preset_settings']['seeds']} seeds "
            "(band: min–max)",
            os.path.join(args.out, "first_step_error"),
        )
        figures += plot_jsd(payload, os.path.join(args.out, "jsd"))
        figures += plot_trajectories(payload, os.path.join(args.out, "trajectories"))
        figures += plot_training_loss(payload["training_loss"], payload["loss_floor"], os.path.join(args.out, "training_loss"))
    payload = publishable(payload, figures, verdict, start)
    path = os.path.join(args.out, "crossover.json")
    write_json(path, payload)
    print(format_table(payload))
    print(payload["verdict"])
    print(f"wrote {path} and {len(figures)} figure files; {payload['runtime_s']['total']:.1f} s")
    return payload


if __name__ == "__main__":
    main()
