""""Zero beats early CFG": the first-step crossover in 2-D (the paper's Fig. 3), by a fixed protocol.

Protocol (declared before any number; the README repeats it):

* **Data.** :func:`~cfgzero_theory.mixtures.guided_class_2d`: three classes of four elongated
  Gaussians; the guided class ``c = 1`` has its mean ``distance = 14`` from the noise mean
  (the paper's grey line ``‖v*₀‖ ≈ 14.18``) and the data mean lies ``data_offset = 10.5``
  along the same axis (class radius 3.5).  This is the geometry in which exact theory lets
  CFG end below the zero velocity at ``w = 4``: its converged first-step error is the
  guidance bias ``(w − 1)·3.5 = 10.5 < ‖v*₀‖ ≈ 14.07``.  It was chosen from that exact
  inequality, not from trained results; ``python -m experiments.crossover_map`` measures
  every other placement, including the data mean at the origin where the inequality fails.
* **Target.** The paper's: the true velocity of the conditioned data,
  ``v*₀(x0) = u_c(x0) = μ_c − x0``.  The primary number is the first-step error
  ``E_{x0}‖ṽ₀^θ(x0) − v*₀(x0)‖`` of CFG and of CFG* (optimized scale), both against the same
  target and the same grey line, the zero velocity's error ``E‖v*₀‖``.  Secondary (keys
  ending in ``_guided_target``): the error against the exact field of the same rule, which
  isolates the learning error from the guidance bias.
* **Networks.** ``data_seeds`` datasets × ``seeds`` networks each (quick 3 × 2, paper
  4 × 4 = 16), all trained at once
  (residual MLP, AdamW, cosine decay, EMA; see ``NETWORK`` and ``TRAINING``); 16 optimizer
  steps per epoch, evaluated on every epoch up to 8, then on 2 epochs per doubling.
* **Verdict.** "Early" means epochs ``≥ 1``; epoch 0 (the untrained network) is reported and
  never decides.  *Zero beats early X* if at some epoch ``≥ 1`` the network-mean error
  exceeds the grey line; the *crossover* is the first epoch ``≥ 1`` from which the mean
  stays below it (:func:`analysis.crossover_epoch`, 90% bootstrap interval over networks).
  Reproduced = both.  The fraction of networks above the line is reported per epoch.
* **Convergence** (the models the figure is judged against), at the last epoch: training
  loss within 5% of the loss floor, every rule's JSD within 0.05 of the same rule on the
  exact fields (same noise, sampler and steps), CFG-Zero*'s NLL within 0.5 nats of the
  exact field's.
* **Sample level.** JSD and NLL of CFG and CFG + zero-init per epoch; the zero-init benefit
  ``CFG − (CFG + zero-init)`` per epoch with a 90% bootstrap interval over networks.

The verdict rules are :mod:`cfgzero_theory.verdicts` (definitions and unit tests there).

Outputs under ``--out`` (default ``runs/crossover/<preset>`` in the current directory; the
committed gallery is written by ``python -m experiments.figures`` only): ``crossover.json``
(every number, the mixture as numbers) and figures ``first_step_error``, ``sample_quality``,
``trajectories``, ``training_loss`` (PNG and PDF); ``checkpoints/`` lets a rerun of the same
configuration skip training.

    python -m experiments.crossover                    # quick preset (default), ~5.5 min on 2 quiet CPU cores
    python -m experiments.crossover --preset paper     # 16 networks, ~12.5 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import time

from experiments._common import (TOY_SCALE, TOY_ZERO_INIT_STEPS, add_preset_overrides, interval_text, preset_settings,
                                 settle_out, start_study, study_parser)

PRESETS = {
    "smoke": dict(seeds=1, data_seeds=3, epochs=4, dataset_size=512, batch_size=128, n_eval=256, steps=8, width=32),
    "quick": dict(seeds=2, data_seeds=3, epochs=480, dataset_size=4096, batch_size=256, n_eval=2048, steps=16, width=128),
    "paper": dict(seeds=4, data_seeds=4, epochs=480, dataset_size=4096, batch_size=256, n_eval=1024, steps=16, width=128),
}
#: Default geometry (see the protocol): class mean 14 from the noise mean, data mean 10.5 along its axis.
GEOMETRY = dict(distance=14.0, data_offset=10.5, label=1)
#: Network and training settings shared by the crossover studies.
NETWORK = dict(architecture="resmlp", depth=3, input_scale=0.5)
TRAINING = dict(learning_rate=3e-3, schedule="cosine", ema_decay=0.998, label_dropout=0.25)
#: The guidance kinds sampled (:data:`guidance.KINDS`; every JSON key naming a rule is one of them) ...
RULE_NAMES = ("cfg", "cfg-star", "zero-init", "cfg-zero-star")
#: ... and those whose first step is compared with the zero velocity.
FIRST_RULES = ("cfg", "cfg-star")
#: Convergence criteria at the last epoch: loss gap (relative), JSD gap (nats), CFG-Zero* NLL gap (nats).
CONVERGENCE = dict(loss=0.05, jsd=0.05, nll=0.5)
LEVEL = 0.9


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and validate every argument, then create ``--out`` and prove it writable: a user error exits
    with status 2 and one line on stderr, before any import of JAX or any work."""
    p = study_parser("crossover", PRESETS, __doc__)
    p.add_argument("--scale", type=float, default=TOY_SCALE, help=f"guidance scale w (default {TOY_SCALE:g})")
    p.add_argument("--distance", type=float, default=GEOMETRY["distance"],
                   help=f"distance of the guided class's mean from the noise mean (default {GEOMETRY['distance']:g})")
    p.add_argument("--data-offset", type=float, default=GEOMETRY["data_offset"],
                   help=f"distance of the data mean from the noise mean, along the class's axis (default {GEOMETRY['data_offset']:g})")
    p.add_argument("--label", type=int, default=GEOMETRY["label"], help="guided class: 0, 1 or 2 (default 1)")
    p.add_argument("--zero-init-steps", type=int, default=TOY_ZERO_INIT_STEPS,
                   help=f"zero-init steps K (default {TOY_ZERO_INIT_STEPS})")
    p.add_argument("--seed", type=int, default=0, help="root seed of the networks and training noise")
    p.add_argument("--data-seed", type=int, default=0, help="first data seed (datasets use data-seed, data-seed + 1, ...)")
    add_preset_overrides(p, PRESETS)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    s = args.settings = preset_settings(p, args, PRESETS)
    if not (math.isfinite(args.scale) and args.scale > 0):
        p.error("--scale must be positive")
    if not (math.isfinite(args.distance) and math.isfinite(args.data_offset) and 0 <= args.data_offset < args.distance):
        p.error("--data-offset and --distance must satisfy 0 <= data-offset < distance")
    if not 0 <= args.label < 3:
        p.error("--label must be a class of the mixture: 0, 1 or 2")
    if not 1 <= args.zero_init_steps < s["steps"]:
        p.error(f"--zero-init-steps must be at least 1 and below the number of sampler steps ({s['steps']})")
    settle_out(p, args, "crossover")
    return args


def evaluation_epochs(epochs: int) -> tuple[int, ...]:
    """Every epoch up to 8, then 2 per doubling (``8·2^(k/2)`` rounded), and always the last."""
    grid = set(range(min(epochs, 8) + 1))
    k = 1
    while (e := round(8 * 2 ** (k / 2))) < epochs:
        grid.add(e)
        k += 1
    return tuple(sorted(grid | {epochs}))


def train_networks(mixture, settings: dict, seed: int, data_seed: int, checkpoint_epochs, out_dir, progress: bool):
    """Train ``data_seeds × seeds`` networks on ``mixture`` with the shared ``NETWORK``/``TRAINING`` settings."""
    from cfgzero_theory.models import NetworkConfig
    from cfgzero_theory.training import TrainConfig, train

    net_config = NetworkConfig(dim=mixture.dim, num_classes=len(mixture.classes), width=settings["width"], **NETWORK)
    train_config = TrainConfig(
        epochs=settings["epochs"], dataset_size=settings["dataset_size"], batch_size=settings["batch_size"],
        num_seeds=settings["seeds"], num_data_seeds=settings["data_seeds"], seed=seed, data_seed=data_seed,
        checkpoint_epochs=tuple(checkpoint_epochs), **TRAINING,
    )
    result = train(mixture, net_config, train_config, out_dir=out_dir, progress=progress)
    return result, net_config, train_config


def run(args) -> dict:
    """Train, evaluate every evaluation epoch, and return the JSON-ready result (plus ``_raw``)."""
    import jax
    import numpy as np

    import cfgzero_theory
    from cfgzero_theory import GaussianMixture, analysis, guidance, mixtures, sampling, verdicts
    from cfgzero_theory.models import network_velocity, select
    from experiments._common import crossover_json, make_rules, mixture_json, progress

    s = args.settings
    mixture = mixtures.guided_class_2d(args.distance, args.data_offset, args.label)
    label = args.label
    eval_epochs = evaluation_epochs(s["epochs"])
    started = time.perf_counter()
    result, net_config, train_config = train_networks(
        mixture, s, args.seed, args.data_seed, eval_epochs, os.path.join(args.out, "checkpoints"), not args.no_progress)
    train_s = time.perf_counter() - started

    started = time.perf_counter()
    rules = make_rules(RULE_NAMES, args.scale, args.zero_init_steps)
    first_rules = {name: rules[name] for name in FIRST_RULES}
    key_first, key_eval, key_quality, key_data, key_boot = jax.random.split(jax.random.key(args.seed + 1000), 5)
    x0_first = jax.random.normal(key_first, (4096, 2))
    x0_eval = jax.random.normal(key_eval, (s["n_eval"], 2))
    times = sampling.time_grid(s["steps"])
    score = analysis.make_sample_scorer(mixture, label, key_quality)

    def evaluate(velocity_fn, params):
        """``{rule: {metric: (S,)}}`` of the final samples, and ``{rule: (S, N)}`` per-step learning errors."""
        quality, per_step = {}, {}
        for name in RULE_NAMES:
            steps = analysis.per_step_errors(velocity_fn, params, mixture, label, rules[name], x0_eval, times)
            quality[name] = {k: np.asarray(v) for k, v in score(steps.samples).items() if k != "nll_floor"}
            per_step[name] = np.asarray(steps.learning_error)
        return quality, per_step

    err_true = {name: [] for name in FIRST_RULES}  # against v* (primary)
    err_guided = {name: [] for name in FIRST_RULES}  # against the rule's exact field (secondary)
    zero_guided, bias = {}, {}
    quality = {name: {m: [] for m in ("jsd", "nll", "precision")} for name in RULE_NAMES}
    per_step = {name: [] for name in RULE_NAMES}
    # one step per evaluated epoch, then the exact fields (the limit of a perfect model) and exact class samples
    for epoch in progress([*eval_epochs, "exact"], not args.no_progress, "evaluating (epochs, then exact fields)"):
        if epoch == "exact":
            stacked = jax.tree_util.tree_map(lambda a: a[None], mixture)
            exact_q, _ = evaluate(GaussianMixture.velocity, stacked)
            data_q = score(mixture.sample(key_data, s["n_eval"], label)[None])
            continue
        networks = result.networks[epoch]
        errors = analysis.first_step_errors(network_velocity, networks, mixture, label, first_rules, x0_first)
        for name, e in errors.items():
            err_true[name].append(np.asarray(e.total_error))
            err_guided[name].append(np.asarray(e.learning_error))
            zero_guided[name], bias[name] = float(e.zero_error), float(e.guidance_bias)
            err_zero = float(e.zero_error_cond)
        q, steps = evaluate(network_velocity, networks)
        for name in RULE_NAMES:
            per_step[name].append(steps[name].mean(axis=0))
            for m in quality[name]:
                quality[name][m].append(q[name][m])
    eval_s = time.perf_counter() - started

    per_net = {name: np.stack(err_true[name], axis=1) for name in FIRST_RULES}  # (S, E)
    crossover = {}
    for i, name in enumerate(FIRST_RULES):
        c = verdicts.first_step_crossover(eval_epochs, per_net[name], err_zero, key=jax.random.fold_in(key_boot, i),
                                          level=LEVEL)
        crossover[name] = crossover_json(c)
    metric = {name: {m: np.stack(v, axis=1) for m, v in quality[name].items()} for name in RULE_NAMES}  # (S, E)
    sample_level = {}
    for i, m in enumerate(("jsd", "nll")):
        benefit = verdicts.benefit_over_cfg(metric["cfg"][m], metric["zero-init"][m], lower_is_better=True)
        low, high = analysis.bootstrap_mean_interval(benefit, key=jax.random.fold_in(key_boot, 10 + i), level=LEVEL)
        sample_level[m] = {"zero-init": {"mean": benefit.mean(axis=0).tolist(), "low": low.tolist(),
                                         "high": high.tolist(), "helps_fraction": (benefit > 0).mean(axis=0).tolist()}}

    losses = result.losses
    final_loss = float(losses[-1].mean())
    last = {name: {m: float(metric[name][m][:, -1].mean()) for m in ("jsd", "nll")} for name in RULE_NAMES}
    exact = {name: {m: float(exact_q[name][m][0]) for m in ("jsd", "nll", "precision")} for name in RULE_NAMES}
    convergence = {
        "loss_gap": final_loss / result.loss_floor - 1,
        "jsd_gap": {name: last[name]["jsd"] - exact[name]["jsd"] for name in RULE_NAMES},
        "nll_gap": {"cfg-zero-star": last["cfg-zero-star"]["nll"] - exact["cfg-zero-star"]["nll"]},
        "criteria": dict(CONVERGENCE),
    }
    convergence["passed"] = verdicts.converged(convergence["loss_gap"], convergence["jsd_gap"].values(),
                                               convergence["nll_gap"]["cfg-zero-star"], **CONVERGENCE)

    config = {
        "preset": args.preset, "preset_settings": s, "scale": args.scale, "label": label,
        "zero_init_steps": args.zero_init_steps, "geometry": {"distance": args.distance, "data_offset": args.data_offset},
        "mixture": {"expression": f"mixtures.guided_class_2d({args.distance:g}, {args.data_offset:g}, {label})",
                    **mixture_json(mixture)},
        "network": dataclasses.asdict(net_config), "training": dataclasses.asdict(train_config),
        "rules": {k: guidance.describe(r) for k, r in rules.items()},
        "seeds": {"root": args.seed, "data": list(range(args.data_seed, args.data_seed + s["data_seeds"])),
                  "networks_per_dataset": s["seeds"], "num_networks": train_config.num_networks,
                  "evaluation": args.seed + 1000},
        "bootstrap_level": LEVEL,
        "cfgzero_theory_version": cfgzero_theory.__version__, "jax_version": jax.__version__,
        "python_version": platform.python_version(), "jax_backend": jax.default_backend(),
        "jax_devices": len(jax.devices()), "argv": sys.argv[1:],
    }
    payload = {
        "config": config,
        "target": "true_velocity",
        "epochs": list(eval_epochs),
        "optimizer_steps": [int(e) * train_config.steps_per_epoch for e in eval_epochs],
        "steps_per_epoch": train_config.steps_per_epoch,
        "err_zero": err_zero,
        "err": {n: per_net[n].mean(axis=0).tolist() for n in FIRST_RULES},
        "err_per_network": {n: per_net[n].tolist() for n in FIRST_RULES},
        "frac_above_zero": {n: (per_net[n] > err_zero).mean(axis=0).tolist() for n in FIRST_RULES},
        "crossover_epoch": {n: crossover[n]["epoch"] for n in FIRST_RULES},
        "crossover_epoch_interval": {n: [crossover[n]["low"], crossover[n]["high"]] for n in FIRST_RULES},
        "crossover": crossover,
        "err_guided_target": {n: np.stack(err_guided[n], axis=1).mean(axis=0).tolist() for n in FIRST_RULES},
        "err_zero_guided_target": zero_guided,
        "guidance_bias": bias,
        "jsd": {n: metric[n]["jsd"].mean(axis=0).tolist() for n in RULE_NAMES},
        "nll": {n: metric[n]["nll"].mean(axis=0).tolist() for n in RULE_NAMES},
        "precision": {n: metric[n]["precision"].mean(axis=0).tolist() for n in RULE_NAMES},
        "jsd_per_network": {n: metric[n]["jsd"].tolist() for n in RULE_NAMES},
        "nll_per_network": {n: metric[n]["nll"].tolist() for n in RULE_NAMES},
        "jsd_exact": {n: exact[n]["jsd"] for n in RULE_NAMES},
        "nll_exact": {n: exact[n]["nll"] for n in RULE_NAMES},
        "precision_exact": {n: exact[n]["precision"] for n in RULE_NAMES},
        "data_samples": {m: float(np.asarray(data_q[m])[0]) for m in ("jsd", "nll", "precision")},
        "nll_floor": float(data_q["nll_floor"]),
        "sample_level": sample_level,
        "convergence": convergence,
        "per_step_learning_error": {n: np.stack(per_step[n]).tolist() for n in RULE_NAMES},
        "times": np.asarray(times).tolist(),
        "training_loss": losses.tolist(),
        "loss_floor": result.loss_floor,
        "runtime_s": {"training": train_s, "evaluation": eval_s},
    }
    payload["_raw"] = {"mixture": mixture, "result": result, "rules": rules, "label": label, "x0": x0_eval,
                       "times": times, "select": select, "velocity": network_velocity}
    return payload


def rule_verdict(payload, name: str) -> dict:
    """:func:`verdicts.crossover_verdict` of rule ``name`` (zero beats it at epochs >= 1, then it crosses
    below the grey line for good) from the JSON payload, with the rule's ``crossover`` entry."""
    from cfgzero_theory import verdicts

    cross = payload["crossover"][name]
    v = verdicts.crossover_verdict(payload["epochs"], payload["err"][name], payload["err_zero"], cross["epoch"])
    return {**v, "crossover": cross}


def verdict(payload) -> str:
    """Sentences on the crossover of CFG and CFG* against v*, the paper's ordering, convergence and the sample level."""
    from cfgzero_theory import verdicts
    from cfgzero_theory.guidance import KIND_LABELS

    zero = payload["err_zero"]
    lines = []
    per_rule = {name: rule_verdict(payload, name) for name in FIRST_RULES}
    for name, v in per_rule.items():
        title, err, frac = KIND_LABELS[name], payload["err"][name], payload["frac_above_zero"][name]
        c = v["crossover"]
        peak = max((e for e, ep in zip(err, payload["epochs"]) if ep >= 1), default=float("nan"))
        if v["reproduced"]:
            lines.append(
                f"{title}: crossover REPRODUCED — at epochs {_ranges(v['above_epochs'], payload['epochs'])} (>= 1) the mean first-step error "
                f"against v* exceeds the zero velocity's {zero:.3f} (peak {peak:.3f}; up to {max(frac):.0%} of networks "
                f"above); from epoch {c['epoch']:g} (90% interval {interval_text(c)}) it stays below (final {err[-1]:.3f}).")
        elif not v["zero_beats_early"]:
            lines.append(
                f"{title}: NOT reproduced — the mean error never exceeds the zero velocity's {zero:.3f} at any epoch >= 1 "
                f"(largest {peak:.3f}; at most {max(frac[1:] or [0]):.0%} of networks above at one epoch).")
        else:
            lines.append(
                f"{title}: NOT reproduced — zero beats {title} at epochs {_ranges(v['above_epochs'], payload['epochs'])}, but it is still above "
                f"the zero velocity's {zero:.3f} at the last epoch (final {err[-1]:.3f}; exact guidance bias "
                f"{payload['guidance_bias'][name]:.3f}).")
    a, b = per_rule["cfg"]["crossover"], per_rule["cfg-star"]["crossover"]
    if per_rule["cfg"]["reproduced"] and per_rule["cfg-star"]["reproduced"]:
        order = "earlier than" if b["epoch"] < a["epoch"] else ("at the same epoch as" if b["epoch"] == a["epoch"] else "later than")
        lines.append(f"Paper's ordering (optimized scale crosses earlier): CFG* crosses {order} CFG "
                     f"({b['epoch']:g} {interval_text(b)} vs {a['epoch']:g} {interval_text(a)}).")
    else:
        lines.append("Paper's ordering (optimized scale crosses earlier): not testable — both rules must cross.")
    conv = payload["convergence"]
    worst = max(conv["jsd_gap"].items(), key=lambda kv: abs(kv[1]))
    lines.append(
        f"Convergence at epoch {payload['epochs'][-1]}: {'PASSED' if conv['passed'] else 'FAILED'} — loss "
        f"{conv['loss_gap']:+.1%} from the floor (criterion ±{conv['criteria']['loss']:.0%}), largest JSD gap to the exact "
        f"field {worst[1]:+.3f} ({worst[0]}; ±{conv['criteria']['jsd']:g}), CFG-Zero* NLL gap "
        f"{conv['nll_gap']['cfg-zero-star']:+.2f} nats (±{conv['criteria']['nll']:g}).")
    for m, title in (("jsd", "JSD"), ("nll", "NLL")):
        row = payload["sample_level"][m]["zero-init"]
        helped, hurt = verdicts.interval_verdict(payload["epochs"], row["low"], row["high"])
        lines.append(f"Sample level ({title}, CFG vs CFG + zero-init, 90% interval over networks): zero-init helps at "
                     f"epochs {_ranges(helped, payload['epochs']) or 'none'}, hurts at {_ranges(hurt, payload['epochs']) or 'none'} "
                     f"(exact fields: {payload[m + '_exact']['cfg'] - payload[m + '_exact']['zero-init']:+.3f}).")
    return "\n".join(lines)


def _ranges(values, evaluated) -> str:
    """Evaluated epochs as runs: ``values = [1, 2, 3, 8, 16]`` of ``evaluated = [0, 1, 2, 3, 4, 8, 11, 16]``
    → ``"1–3, 8, 16"`` (a run is consecutive in ``evaluated``, not in the integers)."""
    position = {e: i for i, e in enumerate(evaluated)}
    runs = []
    for v in values:
        if runs and position[v] == position[runs[-1][-1]] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ", ".join(f"{r[0]}–{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)


# ----------------------------------------------------------------------------- figures
def _epoch_axis(ax, epochs):
    ax.set_xscale("symlog", linthresh=8.0, linscale=1.0)
    ticks = [e for e in (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if e <= epochs[-1]]
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlim(0, epochs[-1])


def plot_first_step(payload, rules, path):
    """Top: first-step error against v* per network (thin) and mean (thick), one grey line ‖v*‖, each rule's
    converged limit (dotted) and crossover epoch (vertical); bottom: the fraction of networks above the grey line."""
    import matplotlib.pyplot as plt
    import numpy as np

    from cfgzero_theory import plotting, verdicts
    from experiments._figures import GUIDANCE_BIAS, MODEL_ERROR, ZERO_ERROR, mark_crossover

    epochs = np.asarray(payload["epochs"])
    cfg = payload["config"]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(6.6, 7.4), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    ax.axhline(payload["err_zero"], color="grey", linewidth=2.5, alpha=0.6,
               label=f"zero velocity: {ZERO_ERROR} = {payload['err_zero']:.2f}")
    for name in FIRST_RULES:
        style = plotting.rule_style(rules[name])
        title = cfg["rules"][name]
        for row in np.asarray(payload["err_per_network"][name]):
            ax.plot(epochs, row, color=style["color"], alpha=0.2, linewidth=0.6)
        ax.plot(epochs, payload["err"][name], label=f"{title}: {MODEL_ERROR} (mean; thin: networks)", **style)
        ax.axhline(payload["guidance_bias"][name], color=style["color"], linestyle=":", linewidth=1.0,
                   label=f"exact {title} bias {GUIDANCE_BIAS} (converged limit)")
        cross = payload["crossover"][name]
        early = verdicts.epochs_above(epochs, payload["err"][name], payload["err_zero"])
        mark_crossover(ax, cross["epoch"] if cross["found"] else None, style["color"], title, bool(early))
        bx.plot(epochs, payload["frac_above_zero"][name], label=title, **style)
    ax.set_ylabel("first-step error at t = 0")
    ax.set_title(f"Zero vs early CFG against the true velocity v*: class {cfg['label']} at distance "
                 f"{cfg['geometry']['distance']:g}, data mean at {cfg['geometry']['data_offset']:g}, w = {cfg['scale']:g}, "
                 f"{cfg['seeds']['num_networks']} networks", fontsize=8.5)
    bx.set_ylabel("networks above\nthe zero line")
    bx.set_ylim(-0.05, 1.05)
    bx.set_xlabel(f"training epoch ({payload['steps_per_epoch']} optimizer steps each)")
    bx.legend(fontsize=7, loc="upper right")
    _epoch_axis(bx, epochs)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=2, frameon=False)  # column 2: CFG*
    fig.tight_layout(rect=(0, 0.11, 1, 1))
    written = plotting.save(fig, path)
    plt.close(fig)
    return written


def plot_sample_quality(payload, rules, path):
    """JSD and NLL of every rule per epoch (dotted: exact field; JSD's maximum ln 2 marked), and the zero-init
    benefit with its interval."""
    import matplotlib.pyplot as plt
    import numpy as np

    from cfgzero_theory import plotting
    from experiments._figures import mark_jsd_maximum

    epochs = np.asarray(payload["epochs"])
    cfg = payload["config"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for j, (m, title) in enumerate((("jsd", "JSD(samples ‖ class density), nats"), ("nll", "NLL of samples (nats)"))):
        ax = axes[0, j]
        for name in RULE_NAMES:
            style = plotting.rule_style(rules[name])
            ax.plot(epochs, payload[m][name], label=cfg["rules"][name], **style)
            ax.axhline(payload[m + "_exact"][name], color=style["color"], linestyle=":", linewidth=1.0)
        ax.axhline(payload["data_samples"][m], color="grey", linestyle="--", linewidth=1.0, label="exact class samples")
        ax.plot([], [], color="grey", linestyle=":", label="exact field, same rule and sampler")
        ax.set_yscale("log")
        if m == "jsd":
            mark_jsd_maximum(ax)
        ax.set_title(title, fontsize=9)
        row = payload["sample_level"][m]["zero-init"]
        bx = axes[1, j]
        color = plotting.rule_color(rules["zero-init"])
        bx.fill_between(epochs, row["low"], row["high"], color=color, alpha=0.2, linewidth=0, label="90% interval over networks")
        bx.plot(epochs, row["mean"], color=color, marker="^", label="CFG − (CFG + zero-init): > 0 zero-init helps")
        bx.axhline(0.0, color="black", linewidth=1.0)
        bx.axhline(payload[m + "_exact"]["cfg"] - payload[m + "_exact"]["zero-init"], color=color, linestyle=":",
                   label="exact-field limit")
        bx.set_xlabel("training epoch")
        _epoch_axis(bx, epochs)
        bx.legend(fontsize=7)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7.5, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(f"Final samples per epoch (mean over {cfg['seeds']['num_networks']} networks), class {cfg['label']}, "
                 f"w = {cfg['scale']:g}, {cfg['preset_settings']['steps']} Euler steps", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    written = plotting.save(fig, path)
    plt.close(fig)
    return written


def plot_trajectories(payload, path):
    """Trajectories of CFG and CFG-Zero* of network 0 early and at the last epoch, over the class density."""
    import jax
    import matplotlib.pyplot as plt
    import numpy as np

    from cfgzero_theory import plotting, sampling

    raw = payload["_raw"]
    mixture, rules, label = raw["mixture"], raw["rules"], raw["label"]
    epochs = payload["epochs"]
    early, late = epochs[min(2, len(epochs) - 1)], epochs[-1]
    x0 = raw["x0"][:128]
    means = np.asarray(mixture.means)
    lo = np.minimum(means.min(0), -3.0) - 3.0
    hi = np.maximum(means.max(0), 3.0) + 3.0
    fig, axes = plt.subplots(2, 2, figsize=(9, 8), sharex=True, sharey=True)
    for row, epoch in enumerate((early, late)):
        network = raw["select"](raw["result"].networks[epoch], 0)
        for col, name in enumerate(("cfg", "cfg-zero-star")):
            ax = axes[row, col]
            plotting.density_image(ax, lambda x: mixture.log_prob(x, label), lo, hi, 120)
            out = sampling.sample(raw["velocity"], network, x0, raw["times"], label, rules[name], return_trajectory=True)
            traj = np.asarray(jax.device_get(out.trajectory))
            color = plotting.rule_color(rules[name])
            ax.plot(traj[:, :, 0], traj[:, :, 1], color=color, alpha=0.25, linewidth=0.6)
            ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=5, color=color, zorder=3)
            ax.scatter(traj[0, :, 0], traj[0, :, 1], s=3, color="grey", zorder=2)
            ax.set_title(f"{payload['config']['rules'][name]}, epoch {epoch} (network 0)", fontsize=9)
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(lo[1], hi[1])
            ax.set_aspect("equal")
    for ax in axes[-1]:
        ax.set_xlabel("x₁")
    for ax in axes[:, 0]:
        ax.set_ylabel("x₂")
    fig.suptitle(f"Sampler trajectories from noise (grey) over the true density of class {label}", fontsize=10)
    fig.tight_layout()
    written = plotting.save(fig, path)
    plt.close(fig)
    return written


#: What the console table's columns mean, printed under it.
TABLE_LEGEND = (
    "err X: network-mean first-step error E‖ṽ₀^θ − v*₀‖ of rule X; X>line: share of networks whose error exceeds "
    "the zero line; zero line: a zero velocity's error E‖v*₀‖ (zero beats X where err X > zero line); JSD, NLL: final "
    "samples, mean over networks; row 'exact': the exact fields (err columns: the guidance bias, the converged limit).")


def format_table(payload) -> str:
    """Per evaluated epoch: first-step errors, shares of networks above the zero line, JSD and NLL; then the exact row."""
    head = (f"{'epoch':>5} {'steps':>6} {'err CFG':>8} {'CFG>line':>8} {'err CFG*':>8} {'CFG*>line':>9} {'zero line':>9} "
            + " ".join(f"{'JSD ' + n:>17}" for n in RULE_NAMES) + f" {'NLL cfg-zero-star':>17}")
    lines = [head, "-" * len(head)]
    err, above = payload["err"], payload["frac_above_zero"]
    for i, epoch in enumerate(payload["epochs"]):
        jsd = " ".join(f"{payload['jsd'][n][i]:>17.4f}" for n in RULE_NAMES)
        lines.append(
            f"{epoch:>5} {payload['optimizer_steps'][i]:>6} {err['cfg'][i]:>8.3f} {above['cfg'][i]:>8.0%} "
            f"{err['cfg-star'][i]:>8.3f} {above['cfg-star'][i]:>9.0%} {payload['err_zero']:>9.3f} {jsd} "
            f"{payload['nll']['cfg-zero-star'][i]:>17.3f}")
    exact = " ".join(f"{payload['jsd_exact'][n]:>17.4f}" for n in RULE_NAMES)
    lines.append(f"{'exact':>5} {'':>6} {payload['guidance_bias']['cfg']:>8.3f} {'':>8} "
                 f"{payload['guidance_bias']['cfg-star']:>8.3f} {'':>9} {'':>9} {exact} "
                 f"{payload['nll_exact']['cfg-zero-star']:>17.3f}")
    lines.append(TABLE_LEGEND)
    return "\n".join(lines)


def plan(args) -> str:
    """The first line of a run: what will be trained and evaluated, and where the outputs go."""
    s = args.settings
    return (f"crossover ({args.preset}): {s['data_seeds'] * s['seeds']} networks ({s['data_seeds']} datasets × "
            f"{s['seeds']}), {s['epochs']} epochs each, evaluated at {len(evaluation_epochs(s['epochs']))} epochs with "
            f"{len(RULE_NAMES)} rules; writing {os.path.abspath(args.out)}/ (checkpoints/ lets a rerun skip training)")


def main(argv=None) -> dict:
    start, args = start_study(parse_args, plan, argv)
    from experiments._common import draw_figures, outputs_line, publishable, retract_result, run_or_exit, write_json
    from experiments._figures import plot_training_loss

    payload = run_or_exit(run, args)
    rules = payload["_raw"]["rules"]
    drawings = {
        "first_step_error": lambda path: plot_first_step(payload, rules, path),
        "sample_quality": lambda path: plot_sample_quality(payload, rules, path),
        "trajectories": lambda path: plot_trajectories(payload, path),
        "training_loss": lambda path: plot_training_loss(payload["training_loss"], payload["loss_floor"], path,
                                                         log_epochs=len(payload["training_loss"]) > 8),
    }
    path = os.path.join(args.out, "crossover.json")
    retract_result(path)
    figures = draw_figures(drawings, args.out, not args.no_progress)
    payload = publishable(payload, figures, verdict, start)
    write_json(path, payload)
    print(format_table(payload))
    print(payload["verdict"])
    print(outputs_line(args.out, [path, *figures]) + f"; {payload['runtime_s']['total']:.1f} s "
          f"(training {payload['runtime_s']['training']:.1f} s, evaluation {payload['runtime_s']['evaluation']:.1f} s)")
    return payload


if __name__ == "__main__":
    main()
