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
  target and the same grey line, the zero velocity's error ``E‖v*₀‖``.  Secondary (named
  ``*_guided_target``): the error against the exact field of the same rule, which isolates
  the learning error from the guidance bias.
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

Outputs under ``--out``: ``crossover.json`` (every number, the mixture as numbers) and figures
``first_step_error``, ``sample_quality``, ``trajectories``, ``training_loss`` (PNG and PDF);
``checkpoints/`` lets a rerun of the same configuration skip training.

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

from experiments._common import interval_text

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
RULE_NAMES = ("cfg", "cfg_star", "cfg_zero_init", "cfg_zero_star")
FIRST_RULES = ("cfg", "cfg_star")
#: Convergence criteria at the last epoch: loss gap (relative), JSD gap (nats), CFG-Zero* NLL gap (nats).
CONVERGENCE = dict(loss=0.05, jsd=0.05, nll=0.5)
LEVEL = 0.9


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.crossover", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="size of the study (default quick)")
    p.add_argument("--out", default=None, help="output folder (default figures/crossover/<preset>)")
    p.add_argument("--scale", type=float, default=4.0, help="guidance scale w (default 4)")
    p.add_argument("--distance", type=float, default=GEOMETRY["distance"],
                   help=f"distance of the guided class's mean from the noise mean (default {GEOMETRY['distance']:g})")
    p.add_argument("--data-offset", type=float, default=GEOMETRY["data_offset"],
                   help=f"distance of the data mean from the noise mean, along the class's axis (default {GEOMETRY['data_offset']:g})")
    p.add_argument("--label", type=int, default=GEOMETRY["label"], help="guided class: 0, 1 or 2 (default 1)")
    p.add_argument("--zero-init-steps", type=int, default=1, help="zero-init steps K (default 1)")
    p.add_argument("--seed", type=int, default=0, help="root seed of the networks and training noise")
    p.add_argument("--data-seed", type=int, default=0, help="first data seed (datasets use data-seed, data-seed + 1, ...)")
    for name in PRESETS["quick"]:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"override the preset's {name}")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    args.settings = dict(PRESETS[args.preset])
    for name in args.settings:
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                p.error(f"--{name.replace('_', '-')} must be at least 1")
            args.settings[name] = value
    s = args.settings
    if s["batch_size"] > s["dataset_size"]:
        p.error(f"--batch-size ({s['batch_size']}) must not exceed --dataset-size ({s['dataset_size']})")
    if not (math.isfinite(args.scale) and args.scale > 0):
        p.error("--scale must be positive")
    if not (math.isfinite(args.distance) and math.isfinite(args.data_offset) and 0 <= args.data_offset < args.distance):
        p.error("--data-offset and --distance must satisfy 0 <= data-offset < distance")
    if not 0 <= args.label < 3:
        p.error("--label must be a class of the mixture: 0, 1 or 2")
    if not 1 <= args.zero_init_steps < s["steps"]:
        p.error(f"--zero-init-steps must be at least 1 and below the number of sampler steps ({s['steps']})")
    if args.out is None:
        args.out = os.path.join("figures", "crossover", args.preset)
    return args


def evaluation_epochs(epochs: int) -> tuple[int, ...]:
    """Every epoch up to 8, then 2 per doubling (``8·2^(k/2)`` rounded), and always the last."""
    grid = set(range(min(epochs, 8) + 1))
    k = 1
    while (e := round(8 * 2 ** (k / 2))) < epochs:
        grid.add(e)
        k += 1
    return tuple(sorted(grid | {epochs}))


def build_rules(scale: float, zero_init_steps: int) -> dict:
    from cfgzero_theory import CFG, CFGStar, CFGZeroStar, ZeroInit

    return {
        "cfg": CFG(scale),
        "cfg_star": CFGStar(scale),
        "cfg_zero_init": ZeroInit(CFG(scale), zero_init_steps),
        "cfg_zero_star": CFGZeroStar(scale, zero_init_steps),
    }


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
    from cfgzero_theory import GaussianMixture, analysis, guidance, mixtures, sampling
    from cfgzero_theory.models import network_velocity, select
    from experiments._common import crossover_json, mixture_json, progress

    s = args.settings
    mixture = mixtures.guided_class_2d(args.distance, args.data_offset, args.label)
    label = args.label
    eval_epochs = evaluation_epochs(s["epochs"])
    started = time.perf_counter()
    result, net_config, train_config = train_networks(
        mixture, s, args.seed, args.data_seed, eval_epochs, os.path.join(args.out, "checkpoints"), not args.no_progress)
    train_s = time.perf_counter() - started

    started = time.perf_counter()
    rules = build_rules(args.scale, args.zero_init_steps)
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
    for epoch in progress(eval_epochs, not args.no_progress, "evaluating"):
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

    stacked = jax.tree_util.tree_map(lambda a: a[None], mixture)
    exact_q, _ = evaluate(GaussianMixture.velocity, stacked)
    data_q = score(mixture.sample(key_data, s["n_eval"], label)[None])
    eval_s = time.perf_counter() - started

    epochs = np.asarray(eval_epochs)
    early = epochs >= 1
    per_net = {name: np.stack(err_true[name], axis=1) for name in FIRST_RULES}  # (S, E)
    crossover = {}
    for i, name in enumerate(FIRST_RULES):
        c = analysis.crossover_epoch(epochs[early], per_net[name][:, early], err_zero,
                                     key=jax.random.fold_in(key_boot, i), level=LEVEL)
        crossover[name] = crossover_json(c)
    metric = {name: {m: np.stack(v, axis=1) for m, v in quality[name].items()} for name in RULE_NAMES}  # (S, E)
    sample_level = {}
    for i, m in enumerate(("jsd", "nll")):
        benefit = metric["cfg"][m] - metric["cfg_zero_init"][m]  # > 0: zero-init helped
        low, high = analysis.bootstrap_mean_interval(benefit, key=jax.random.fold_in(key_boot, 10 + i), level=LEVEL)
        sample_level[m] = {"zero_init_benefit": benefit.mean(axis=0).tolist(), "low": low.tolist(), "high": high.tolist(),
                           "helps_fraction": (benefit > 0).mean(axis=0).tolist()}

    losses = result.losses
    final_loss = float(losses[-1].mean())
    last = {name: {m: float(metric[name][m][:, -1].mean()) for m in ("jsd", "nll")} for name in RULE_NAMES}
    exact = {name: {m: float(exact_q[name][m][0]) for m in ("jsd", "nll", "precision")} for name in RULE_NAMES}
    convergence = {
        "loss_gap": final_loss / result.loss_floor - 1,
        "jsd_gap": {name: last[name]["jsd"] - exact[name]["jsd"] for name in RULE_NAMES},
        "nll_gap_cfg_zero_star": last["cfg_zero_star"]["nll"] - exact["cfg_zero_star"]["nll"],
        "criteria": dict(CONVERGENCE),
    }
    convergence["passed"] = bool(
        abs(convergence["loss_gap"]) <= CONVERGENCE["loss"]
        and all(abs(g) <= CONVERGENCE["jsd"] for g in convergence["jsd_gap"].values())
        and abs(convergence["nll_gap_cfg_zero_star"]) <= CONVERGENCE["nll"]
    )

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
        **{f"err_{n}": per_net[n].mean(axis=0).tolist() for n in FIRST_RULES},
        **{f"err_{n}_per_network": per_net[n].tolist() for n in FIRST_RULES},
        **{f"frac_above_zero_{n}": (per_net[n] > err_zero).mean(axis=0).tolist() for n in FIRST_RULES},
        **{f"crossover_epoch_{n}": crossover[n]["epoch"] for n in FIRST_RULES},
        **{f"crossover_epoch_{n}_interval": [crossover[n]["low"], crossover[n]["high"]] for n in FIRST_RULES},
        "crossover": crossover,
        **{f"err_{n}_guided_target": np.stack(err_guided[n], axis=1).mean(axis=0).tolist() for n in FIRST_RULES},
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
    """Whether zero beats ``name`` early (epochs >= 1) and whether it crosses below the grey line for good."""
    epochs, err, zero = payload["epochs"], payload[f"err_{name}"], payload["err_zero"]
    above = [e for e, v in zip(epochs, err) if e >= 1 and v > zero]
    cross = payload["crossover"][name]
    return {"zero_beats_early": bool(above), "above_epochs": above, "crossover": cross,
            "reproduced": bool(above) and cross["found"]}


def verdict(payload) -> str:
    """Sentences on the crossover of CFG and CFG* against v*, the paper's ordering, convergence and the sample level."""
    titles = {"cfg": "CFG", "cfg_star": "CFG*"}
    zero = payload["err_zero"]
    lines = []
    verdicts = {name: rule_verdict(payload, name) for name in FIRST_RULES}
    for name, v in verdicts.items():
        title, err, frac = titles[name], payload[f"err_{name}"], payload[f"frac_above_zero_{name}"]
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
    a, b = verdicts["cfg"]["crossover"], verdicts["cfg_star"]["crossover"]
    if verdicts["cfg"]["reproduced"] and verdicts["cfg_star"]["reproduced"]:
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
        f"{conv['nll_gap_cfg_zero_star']:+.2f} nats (±{conv['criteria']['nll']:g}).")
    for m, title in (("jsd", "JSD"), ("nll", "NLL")):
        row = payload["sample_level"][m]
        helped = [e for e, lo in zip(payload["epochs"], row["low"]) if e >= 1 and lo > 0]
        hurt = [e for e, hi in zip(payload["epochs"], row["high"]) if e >= 1 and hi < 0]
        lines.append(f"Sample level ({title}, CFG vs CFG + zero-init, 90% interval over networks): zero-init helps at "
                     f"epochs {_ranges(helped, payload['epochs']) or 'none'}, hurts at {_ranges(hurt, payload['epochs']) or 'none'} "
                     f"(exact fields: {payload[m + '_exact']['cfg'] - payload[m + '_exact']['cfg_zero_init']:+.3f}).")
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
    """Top: first-step error against v* per network (thin) and mean (thick), one grey line ‖v*‖;
    bottom: the fraction of networks above it."""
    import matplotlib.pyplot as plt
    import numpy as np

    from cfgzero_theory import plotting

    epochs = np.asarray(payload["epochs"])
    cfg = payload["config"]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(6.6, 6.0), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    for name in FIRST_RULES:
        style = plotting.rule_style(rules[name])
        for row in np.asarray(payload[f"err_{name}_per_network"]):
            ax.plot(epochs, row, color=style["color"], alpha=0.2, linewidth=0.6)
        ax.plot(epochs, payload[f"err_{name}"], label=f"{cfg['rules'][name]}: E‖ṽ₀^θ − v*₀‖ (mean; thin: networks)", **style)
        ax.axhline(payload["guidance_bias"][name], color=style["color"], linestyle=":", linewidth=1.0,
                   label=f"exact {cfg['rules'][name]} bias ‖ṽ₀* − v*₀‖ (converged limit)")
        v = rule_verdict(payload, name)
        if v["reproduced"]:
            ax.axvline(v["crossover"]["epoch"], color=style["color"], linewidth=0.8, alpha=0.6)
        bx.plot(epochs, payload[f"frac_above_zero_{name}"], color=style["color"], marker=style.get("marker"))
    ax.axhline(payload["err_zero"], color="grey", linewidth=2.5, alpha=0.6, label=f"zero velocity: E‖v*₀‖ = {payload['err_zero']:.2f}")
    ax.set_ylabel("first-step error at t = 0")
    ax.set_title(f"Zero vs early CFG against the true velocity v*: class {cfg['label']} at distance "
                 f"{cfg['geometry']['distance']:g}, data mean at {cfg['geometry']['data_offset']:g}, w = {cfg['scale']:g}, "
                 f"{cfg['seeds']['num_networks']} networks", fontsize=8.5)
    ax.legend(fontsize=7)
    bx.set_ylabel("networks above\nthe zero line")
    bx.set_ylim(-0.05, 1.05)
    bx.set_xlabel(f"training epoch ({payload['steps_per_epoch']} optimizer steps each)")
    _epoch_axis(bx, epochs)
    fig.tight_layout()
    written = plotting.save(fig, path)
    plt.close(fig)
    return written


def plot_sample_quality(payload, rules, path):
    """JSD and NLL of every rule per epoch (dotted: exact field), and the zero-init benefit with its interval."""
    import matplotlib.pyplot as plt
    import numpy as np

    from cfgzero_theory import plotting

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
        ax.set_title(title, fontsize=9)
        row = payload["sample_level"][m]
        bx = axes[1, j]
        color = plotting.rule_color(rules["cfg_zero_init"])
        bx.fill_between(epochs, row["low"], row["high"], color=color, alpha=0.2, linewidth=0, label="90% interval over networks")
        bx.plot(epochs, row["zero_init_benefit"], color=color, marker="^", label="CFG − (CFG + zero-init): > 0 zero-init helps")
        bx.axhline(0.0, color="black", linewidth=1.0)
        bx.axhline(payload[m + "_exact"]["cfg"] - payload[m + "_exact"]["cfg_zero_init"], color=color, linestyle=":",
                   label="exact-field limit")
        bx.set_xlabel("training epoch")
        _epoch_axis(bx, epochs)
        bx.legend(fontsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"Final samples per epoch (mean over {cfg['seeds']['num_networks']} networks), class {cfg['label']}, "
                 f"w = {cfg['scale']:g}, {cfg['preset_settings']['steps']} Euler steps", fontsize=10)
    fig.tight_layout()
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
        for col, name in enumerate(("cfg", "cfg_zero_star")):
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


def format_table(payload) -> str:
    head = (f"{'epoch':>5} {'steps':>6} {'err CFG':>8} {'>zero':>6} {'err CFG*':>8} {'>zero':>6} {'zero':>7} "
            + " ".join(f"{'JSD ' + n:>18}" for n in RULE_NAMES) + f" {'NLL cfg-zero*':>14}")
    lines = [head, "-" * len(head)]
    for i, epoch in enumerate(payload["epochs"]):
        jsd = " ".join(f"{payload['jsd'][n][i]:>18.4f}" for n in RULE_NAMES)
        lines.append(
            f"{epoch:>5} {payload['optimizer_steps'][i]:>6} {payload['err_cfg'][i]:>8.3f} {payload['frac_above_zero_cfg'][i]:>6.0%} "
            f"{payload['err_cfg_star'][i]:>8.3f} {payload['frac_above_zero_cfg_star'][i]:>6.0%} {payload['err_zero']:>7.3f} {jsd} "
            f"{payload['nll']['cfg_zero_star'][i]:>14.3f}")
    exact = " ".join(f"{payload['jsd_exact'][n]:>18.4f}" for n in RULE_NAMES)
    lines.append(f"{'exact':>5} {'':>6} {payload['guidance_bias']['cfg']:>8.3f} {'':>6} {payload['guidance_bias']['cfg_star']:>8.3f} "
                 f"{'':>6} {'':>7} {exact} {payload['nll_exact']['cfg_zero_star']:>14.3f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    start = time.perf_counter()
    args = parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    from cfgzero_theory import plotting
    from experiments._common import outputs_line, publishable, run_or_exit, write_json
    from experiments._figures import plot_training_loss

    payload = run_or_exit(run, args)
    rules = payload["_raw"]["rules"]
    figures = []
    with plotting.style():
        figures += plot_first_step(payload, rules, os.path.join(args.out, "first_step_error"))
        figures += plot_sample_quality(payload, rules, os.path.join(args.out, "sample_quality"))
        figures += plot_trajectories(payload, os.path.join(args.out, "trajectories"))
        figures += plot_training_loss(payload["training_loss"], payload["loss_floor"], os.path.join(args.out, "training_loss"),
                                      log_epochs=len(payload["training_loss"]) > 8)
    payload = publishable(payload, figures, verdict, start)
    path = os.path.join(args.out, "crossover.json")
    write_json(path, payload)
    print(format_table(payload))
    print(payload["verdict"])
    print(outputs_line(args.out, [path, *figures]) + f"; {payload['runtime_s']['total']:.1f} s "
          f"(training {payload['runtime_s']['training']:.1f} s, evaluation {payload['runtime_s']['evaluation']:.1f} s)")
    return payload


if __name__ == "__main__":
    main()
