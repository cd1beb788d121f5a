"""The zero-init turning point in high dimension: an exact analogue of the paper's Table 1.

The paper (arXiv 2503.18886, Table 1) compares CFG with CFG + zero-init by ImageNet FID at
training epochs 10, 20, 40, 80, 160 (28.57 vs 28.55, 11.00 vs 10.65, 12.61 vs 12.29,
13.53 vs 12.18, 2.84 vs 2.85): zero-init helps undertrained models and stops helping at the
*turning point* (160 epochs).  Here the data distribution is an exact Gaussian mixture in
``d = 64`` dimensions (``--dim``, tested up to 256), so every sample metric is computed
against the truth instead of a feature extractor.

Study.  Small class-conditional flow-matching networks (several seeds at once,
:func:`~cfgzero_theory.training.train`) are trained on a finite dataset drawn from
:func:`~cfgzero_theory.mixtures.random_class_conditional`.  At every evaluated epoch, for
the guided class ``--label``, scale ``w = --scale`` and ``K = --zero-init-steps``, each
seed's model samples the same noise ``x0`` with CFG, CFG + zero-init and CFG-Zero*
(:func:`analysis.per_step_errors`), and the final samples are scored exactly with
:func:`analysis.sample_quality`: mean NLL under the true class density, squared Fréchet
distance to the exact class moments, MMD² (closed-form Gaussian terms), mode-coverage total
variation and HDR precision.  The first-step learning error of CFG and CFG* against the zero
velocity's error (:func:`analysis.first_step_errors`, the paper's Fig. 3 right) is recorded
too.  Two references bracket every number: the *exact* field sampled with the same rule,
noise and steps (the limit of a perfect model: ``GaussianMixture.velocity`` as the model),
and ``n_eval`` exact class samples (the finite-``n`` floor of each metric).

Turning point.  The *zero-init benefit* at an epoch is ``CFG − (CFG + zero-init)`` of the
seed-mean metric (sign flipped for precision, so positive always means zero-init helped).
The turning point is the first evaluated epoch from which CFG + zero-init is worse than CFG
at *every* later evaluated epoch, found with :func:`analysis.crossover_epoch` applied to the
per-seed metric curves of CFG (as "model") and CFG + zero-init (as "baseline"), which also
gives a 90% percentile interval from resampling seeds (rows of a seed stay paired); exact
ties (e.g. precision 0 vs 0 early in training) count as "not yet".  If the last evaluated
epoch still favours zero-init, it is reported as "none found in the evaluated range".
Turning points are reported for all five metrics; the *primary* one (``--metric``) is the
headline.

Why NLL is the primary metric (``--metric nll``; ``frechet`` and the others are available).
The premise of the turning point is that for a perfect model zeroing the first step can only
hurt, so a metric that can show a turning point must agree with that in the exact-field
limit.  NLL does (zero-init worsens the exact field's NLL by about 3 nats at ``w = 4``); the
Fréchet distance — the FID formula, so the closer analogue of the paper's metric — does not:
guided samples are compared with the *unguided* true class, guidance's bias
``(w − 1)(μ_c − μ̄)`` dominates it, and skipping the first guided step undoes part of that
bias (and inflates the covariance by about ``(N/(N − K))²``), so zero-init improves the
exact field's Fréchet distance by about 0.6 at ``w = 4`` and keeps improving every model's,
whatever its training.  NLL is also exact (no moment approximation) and sensitive to the
off-distribution samples a bad early trajectory produces.  Its known weakness — it rewards
over-concentration (exact Euler samples score below the class entropy) — is why the other
metrics are printed beside it.

Choices (quick preset; see ``PRESETS``), tuned by looking at the numbers:

* mixture: 4 classes × 4 components, ``class_separation = 4``, ``component_spread = 2``,
  eigenvalues log-uniform in ``[0.1, 1]``, drawn from ``fold_in(key(data_seed), 1)``; the
  dataset (``dataset_size = 2048`` points) from ``key(data_seed)`` as in ``training``;
* network: SiLU MLP, width 256, depth 3; AdamW, learning rate ``1e-2``, cosine decay;
* few steps per epoch (2048 / 256 = 8), 256 epochs, evaluated on a doubling grid
  ``0, 1, 2, 4, …, 256`` (``--eval-every 0``; the paper's grid doubles too), so the early
  epochs are genuinely undertrained (NLL 150–185 nats against a class entropy of 53.5,
  Fréchet 20–50) and the last ones approach the exact-field limit (NLL 57 against 50,
  Fréchet 3.7 against 2.4 for CFG at epoch 256);
* sampler: 16 Euler steps (the paper's solver), ``K = 1`` zeroed step, ``w = 4``;
  ``n_eval = 1024`` samples per seed, 4 seeds.

Findings (quick preset, defaults, JAX 0.10.2 on CPU).  NLL turning point at epoch 32 (90%
interval [16, 32]): zero-init improves NLL by up to 12 nats at epochs 1–8, ties at 16 and
costs 2–4 nats from epoch 32 on (exact-field limit: −2.8).  The turning point moves with the
setting but is always found: ``--label 1`` 64 [32, 64], ``--data-seed 1`` 16 [16, 32],
``--seed 1`` 32 [16, 32], ``--scale 3`` 16 [16, 16], ``--dim 128`` 32 [32, 64], ``--dim 256``
32 [16, 32] (stronger guidance, or a harder class, moves it later; at ``d >= 128`` the
quick budget ends far from the exact-field limit, NLL 318 against 193 at ``d = 256``).  Precision turns at the same epoch; Fréchet
distance and MMD show none (see above).  The first-step comparison of the paper's Fig. 3
crosses already at epoch 1 (the learned ``−x0`` part of the velocity beats zero almost at
once in high dimension), so here it does not predict the sample-level turning point: zero-init
keeps helping long after the model's first step is better than zero, because the bad guided
trajectories of undertrained models go wrong at later steps too.  CFG-Zero* is by far the
best rule early (NLL 118 vs 184 for CFG at epoch 2) and the worst late.

Outputs under ``--out``: ``crossover_highdim.json`` (configuration, seeds, library version,
every number, per-seed arrays) and figures ``turning_point``, ``sample_quality``,
``first_step_error``, ``training_loss`` (PNG and PDF); checkpoints under
``checkpoints/`` let a rerun with the same configuration skip training.

    python -m experiments.crossover_highdim                  # quick preset (default), ~1.5 min on 2 CPU cores
    python -m experiments.crossover_highdim --preset smoke   # plumbing check, ~30 s
    python -m experiments.crossover_highdim --preset paper   # 16 seeds, 1024 epochs (long on CPU)

Cost grows with ``d``: the exact fields along every trajectory cost ``O(K·d²)`` per point and
step, and the MMD cross term needs ``O(n·K·d²)`` memory.  Quick preset on 2 CPU cores:
``d = 64`` ~80 s, ``d = 128`` ~3 min, ``d = 256`` ~4 min (1.3 GB peak memory); the paper
preset is meant for an accelerator or a long CPU run.
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
    # eval_every = 0: the doubling grid 0, 1, 2, 4, ..., epochs
    "smoke": dict(seeds=2, epochs=4, eval_every=0, dataset_size=512, batch_size=128, n_eval=256, steps=8, width=32),
    "quick": dict(seeds=4, epochs=256, eval_every=0, dataset_size=2048, batch_size=256, n_eval=1024, steps=16, width=256),
    "paper": dict(seeds=16, epochs=1024, eval_every=0, dataset_size=2048, batch_size=256, n_eval=4096, steps=32, width=256),
}
#: ``random_class_conditional`` geometry (dimension-free distances, see its docstring).
MIXTURE = dict(num_classes=4, components_per_class=4, class_separation=4.0, component_spread=2.0, eig_range=(0.1, 1.0))
DEPTH = 3
RULE_NAMES = ("cfg", "cfg_zero_init", "cfg_zero_star")
RULE_TITLES = {"cfg": "CFG", "cfg_zero_init": "CFG + zero-init", "cfg_zero_star": "CFG-Zero*"}
#: metric -> (title, +1 if lower is better, -1 if higher is better)
METRICS = {
    "nll": ("NLL (nats)", 1),
    "frechet": ("Fréchet distance²", 1),
    "mmd": ("MMD²", 1),
    "mode_tv": ("mode-coverage TV", 1),
    "precision": ("HDR precision (95%)", -1),
}
LEVEL = 0.9


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.crossover_highdim", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="size of the study (default quick)")
    p.add_argument("--out", default=None, help="output folder (default figures/crossover_highdim/<preset>)")
    p.add_argument("--dim", type=int, default=64, help="data dimension d (default 64; 64..256 tested)")
    p.add_argument("--scale", type=float, default=4.0, help="guidance scale w (default 4)")
    p.add_argument("--label", type=int, default=0, help=f"guided class, 0..{MIXTURE['num_classes'] - 1} (default 0)")
    p.add_argument("--zero-init-steps", type=int, default=1, help="zero-init steps K (default 1)")
    p.add_argument("--metric", choices=sorted(METRICS), default="nll", help="primary metric of the turning point (default nll)")
    p.add_argument("--solver", choices=("euler", "heun"), default="euler", help="ODE solver of the sampler (default euler)")
    p.add_argument("--learning-rate", type=float, default=1e-2, help="AdamW learning rate, cosine-decayed (default 1e-2)")
    p.add_argument("--seed", type=int, default=0, help="root seed of the networks, training noise and evaluation noise")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the mixture and of the finite dataset")
    for name in PRESETS["quick"]:
        extra = " (0: doubling grid 0, 1, 2, 4, ...)" if name == "eval_every" else ""
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"override the preset's {name}{extra}")
    p.add_argument("--no-progress", action="store_true", help="hide the training progress bar")
    args = p.parse_args(argv)
    args.settings = dict(PRESETS[args.preset])
    for name in args.settings:
        value = getattr(args, name)
        if value is not None:
            minimum = {"eval_every": 0, "n_eval": 2}.get(name, 1)
            if value < minimum:
                p.error(f"--{name.replace('_', '-')} must be at least {minimum}")
            args.settings[name] = value
    s = args.settings
    if s["batch_size"] > s["dataset_size"]:
        p.error(f"--batch-size ({s['batch_size']}) must not exceed --dataset-size ({s['dataset_size']})")
    if args.dim < 2:
        p.error("--dim must be at least 2")
    if not (math.isfinite(args.scale) and args.scale > 0):
        p.error("--scale must be positive")
    if not 0 <= args.label < MIXTURE["num_classes"]:
        p.error(f"--label must be a class of the mixture, 0..{MIXTURE['num_classes'] - 1}")
    if not 1 <= args.zero_init_steps < s["steps"]:
        p.error(f"--zero-init-steps must be at least 1 and below the number of sampler steps ({s['steps']})")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        p.error("--learning-rate must be positive")
    if args.out is None:
        args.out = os.path.join("figures", "crossover_highdim", args.preset)
    return args


def evaluation_epochs(epochs: int, eval_every: int) -> tuple[int, ...]:
    """Every ``eval_every``-th epoch, or (``eval_every = 0``) the doubling grid ``0, 1, 2, 4, …``; always the last."""
    if eval_every == 0:
        grid = [0] + [2**i for i in range(epochs.bit_length()) if 2**i < epochs]
    else:
        grid = list(range(0, epochs, eval_every))
    return tuple(sorted(set(grid + [epochs])))


def build_rules(scale: float, zero_init_steps: int) -> dict:
    from cfgzero_theory import CFG, CFGZeroStar, ZeroInit

    return {
        "cfg": CFG(scale),
        "cfg_zero_init": ZeroInit(CFG(scale), zero_init_steps),
        "cfg_zero_star": CFGZeroStar(scale, zero_init_steps),
    }


def build_mixture(dim: int, data_seed: int):
    import jax

    from cfgzero_theory import mixtures

    key = jax.random.fold_in(jax.random.key(data_seed), 1)
    return mixtures.random_class_conditional(key, dim, **MIXTURE)


def run(args) -> dict:
    """Train, evaluate every checkpoint epoch, and return the JSON-ready result (plus ``_raw``)."""
    import jax
    import numpy as np

    import cfgzero_theory
    from cfgzero_theory import CFG, CFGStar, GaussianMixture, analysis, guidance, sampling
    from cfgzero_theory.models import NetworkConfig, network_velocity
    from cfgzero_theory.training import TrainConfig, train

    preset = args.settings
    started = time.perf_counter()
    mixture = build_mixture(args.dim, args.data_seed)
    label = mixture.check_label(args.label)
    eval_epochs = evaluation_epochs(preset["epochs"], preset["eval_every"])
    net_config = NetworkConfig(dim=args.dim, num_classes=len(mixture.classes), width=preset["width"], depth=DEPTH)
    train_config = TrainConfig(
        epochs=preset["epochs"], dataset_size=preset["dataset_size"], batch_size=preset["batch_size"],
        learning_rate=args.learning_rate, num_seeds=preset["seeds"], seed=args.seed, data_seed=args.data_seed,
        checkpoint_epochs=eval_epochs,
    )
    result = train(mixture, net_config, train_config, out_dir=os.path.join(args.out, "checkpoints"),
                   progress=not args.no_progress)
    train_s = time.perf_counter() - started

    started = time.perf_counter()
    rules = build_rules(args.scale, args.zero_init_steps)
    first_rules = {"cfg": CFG(args.scale), "cfg_star": CFGStar(args.scale)}  # the rules zero-init bets against
    key_first, key_eval, key_quality, key_data, key_boot = jax.random.split(jax.random.key(args.seed + 1000), 5)
    x0_first = jax.random.normal(key_first, (4096, args.dim))
    x0_eval = jax.random.normal(key_eval, (preset["n_eval"], args.dim))
    times = sampling.time_grid(preset["steps"])
    num_seeds = preset["seeds"]

    def evaluate(velocity_fn, params):
        """Per-rule final-sample metrics ``{rule: {metric: (S,)}}`` and per-step learning errors ``{rule: (S, N)}``."""
        samples, per_step = [], {}
        for name in RULE_NAMES:
            steps = analysis.per_step_errors(velocity_fn, params, mixture, label, rules[name], x0_eval, times,
                                             solver=args.solver)
            samples.append(steps.samples)
            per_step[name] = np.asarray(steps.learning_error)
        # one call for all rules: the HDR reference and threshold are drawn once
        q = analysis.sample_quality(mixture, jax.numpy.concatenate(samples), label, key_quality)
        s = samples[0].shape[0]
        quality = {name: {m: np.asarray(q[m][i * s:(i + 1) * s]) for m in METRICS} for i, name in enumerate(RULE_NAMES)}
        return quality, per_step, float(np.asarray(q["nll_floor"])[0])

    first = {name: [] for name in first_rules}
    first_total = {name: [] for name in first_rules}
    zero_baseline, guidance_bias = {}, {}
    quality = {name: {m: [] for m in METRICS} for name in RULE_NAMES}
    per_step = {name: [] for name in RULE_NAMES}
    for epoch in eval_epochs:
        networks = result.networks[epoch]
        errors = analysis.first_step_errors(network_velocity, networks, mixture, label, first_rules, x0_first)
        for name, e in errors.items():
            first[name].append(np.asarray(e.learning_error))
            first_total[name].append(np.asarray(e.total_error))
            zero_baseline[name], guidance_bias[name] = float(e.zero_error), float(e.guidance_bias)
        q, steps, nll_floor = evaluate(network_velocity, networks)
        for name in RULE_NAMES:
            per_step[name].append(steps[name].mean(axis=0))
            for m in METRICS:
                quality[name][m].append(q[name][m])

    # references: the exact field sampled the same way (a perfect model), and n_eval exact class samples
    stacked = jax.tree_util.tree_map(lambda a: a[None], mixture)
    exact_q, _, _ = evaluate(GaussianMixture.velocity, stacked)
    data_q = analysis.sample_quality(mixture, mixture.sample(key_data, preset["n_eval"], label), label, key_quality)
    eval_s = time.perf_counter() - started

    per_seed = {name: {m: np.stack(quality[name][m], axis=1) for m in METRICS} for name in RULE_NAMES}  # (S, E)
    epochs_arr = np.asarray(eval_epochs)
    turning = {}
    for i, (m, (_, sign)) in enumerate(METRICS.items()):
        cfg, zi = sign * per_seed["cfg"][m], sign * per_seed["cfg_zero_init"][m]
        cross = analysis.crossover_epoch(epochs_arr, cfg, zi, key=jax.random.fold_in(key_boot, i), level=LEVEL)
        turning[m] = _cross_json(cross)
    first_cross = {}
    first_per_seed = {name: np.stack(first[name], axis=1) for name in first_rules}
    for i, name in enumerate(first_rules):
        cross = analysis.crossover_epoch(epochs_arr, first_per_seed[name], zero_baseline[name],
                                         key=jax.random.fold_in(key_boot, 100 + i), level=LEVEL)
        first_cross[name] = _cross_json(cross)

    table = {}
    for m, (_, sign) in METRICS.items():
        benefit = sign * (per_seed["cfg"][m] - per_seed["cfg_zero_init"][m]) + 0.0  # > 0: zero-init helped (+0.0: no -0)
        table[m] = {
            **{name: per_seed[name][m].mean(axis=0).tolist() for name in RULE_NAMES},
            "per_seed": {name: per_seed[name][m].tolist() for name in RULE_NAMES},
            "zero_init_benefit": benefit.mean(axis=0).tolist(),
            "zero_init_benefit_per_seed": benefit.tolist(),
            "zero_init_helps_seeds": (benefit > 0).sum(axis=0).tolist(),
            "cfg_zero_star_benefit": (sign * (per_seed["cfg"][m] - per_seed["cfg_zero_star"][m])).mean(axis=0).tolist(),
            "exact": {name: float(exact_q[name][m][0]) for name in RULE_NAMES},
            "exact_zero_init_benefit": float(sign * (exact_q["cfg"][m][0] - exact_q["cfg_zero_init"][m][0])) + 0.0,
            "data": float(np.asarray(data_q[m])),
            "lower_is_better": sign > 0,
        }

    mixture_desc = (f"mixtures.random_class_conditional(fold_in(key({args.data_seed}), 1), dim={args.dim}, "
                    + ", ".join(f"{k}={v}" for k, v in MIXTURE.items()) + ")")
    config = {
        **{k: v for k, v in vars(args).items() if k not in ("out", "settings") and k not in preset},
        "preset_settings": preset, "mixture": mixture_desc, "depth": DEPTH,
        "network": dataclasses.asdict(net_config), "training": dataclasses.asdict(train_config),
        "rules": {k: guidance.describe(r) for k, r in rules.items()},
        "first_step_rules": {k: guidance.describe(r) for k, r in first_rules.items()},
        "seeds": {"root": args.seed, "data": args.data_seed, "num_seeds": num_seeds, "evaluation": args.seed + 1000},
        "bootstrap_level": LEVEL,
        "cfgzero_theory_version": cfgzero_theory.__version__, "jax_version": jax.__version__,
        "python_version": platform.python_version(), "jax_backend": jax.default_backend(),
        "jax_devices": len(jax.devices()), "argv": sys.argv[1:],
    }
    payload = {
        "config": config,
        "epochs": list(eval_epochs),
        "primary_metric": args.metric,
        "turning_point": {"metric": args.metric, **turning[args.metric]},
        "turning_points": turning,
        "table": table,
        "nll_floor": nll_floor,
        "first_step": {
            "err_zero": zero_baseline,
            "guidance_bias": guidance_bias,
            **{f"err_{name}": first_per_seed[name].mean(axis=0).tolist() for name in first_rules},
            **{f"err_{name}_per_seed": first_per_seed[name].tolist() for name in first_rules},
            **{f"total_err_{name}": np.stack(first_total[name], axis=1).mean(axis=0).tolist() for name in first_rules},
            "crossover": first_cross,
        },
        "per_step_learning_error": {name: np.stack(per_step[name]).tolist() for name in RULE_NAMES},
        "times": np.asarray(times).tolist(),
        "training_loss": result.losses.tolist(),
        "loss_floor": result.loss_floor,
        "runtime_s": {"training": train_s, "evaluation": eval_s},
    }
    payload["_raw"] = {"rules": rules, "first_rules": first_rules}
    return payload


def _num(value):
    return None if value is None or not math.isfinite(value) else float(value)


def _cross_json(c) -> dict:
    return {"epoch": _num(c.epoch), "low": _num(c.low), "high": _num(c.high), "fraction": c.fraction,
            "found": _num(c.epoch) is not None}


def _interval(tp) -> str:
    high = "never" if tp["high"] is None else f"{tp['high']:g}"
    low = "never" if tp["low"] is None else f"{tp['low']:g}"
    return f"[{low}, {high}]"


def turning_sentence(payload, metric: str) -> str:
    """One sentence on the turning point of ``metric`` (or its absence)."""
    tp, row, epochs = payload["turning_points"][metric], payload["table"][metric], payload["epochs"]
    title = METRICS[metric][0].split(" (")[0]
    benefit = row["zero_init_benefit"]
    helped = [e for e, b in zip(epochs, benefit) if b > 0]
    exact = row["exact_zero_init_benefit"]
    limit = (f"in the exact-field limit zero-init {'helps' if exact > 0 else 'hurts'} ({exact:+.3g}), so "
             + ("a turning point is expected once the models are good enough." if exact <= 0 else
                "on this metric it may never stop helping."))
    if not tp["found"]:
        return (f"{title}: turning point NONE FOUND in the evaluated range (epochs {epochs[0]}–{epochs[-1]}): "
                f"CFG + zero-init is still at least as good as CFG at epoch {epochs[-1]} (benefit {benefit[-1]:+.3g}; "
                f"{tp['fraction']:.0%} of seed-bootstrap replicates have a turning point); {limit}")
    if tp["epoch"] == epochs[0]:
        return (f"{title}: zero-init never helped the seed mean in the evaluated range (CFG better from epoch "
                f"{epochs[0]}); {limit}")
    return (f"{title}: TURNING POINT at epoch {tp['epoch']:g} ({LEVEL:.0%} seed-bootstrap interval {_interval(tp)}, "
            f"{tp['fraction']:.0%} of replicates have one): from there on CFG + zero-init is worse than CFG at every "
            f"evaluated epoch; zero-init helped at epochs {helped} (largest benefit {max(benefit):+.3g} at epoch "
            f"{epochs[benefit.index(max(benefit))]}); {limit}")


def verdict(payload) -> str:
    primary = payload["primary_metric"]
    lines = [f"Primary ({primary}) — " + turning_sentence(payload, primary)]
    others = [m for m in METRICS if m != primary]
    for m in others:
        tp = payload["turning_points"][m]
        where = f"epoch {tp['epoch']:g} {_interval(tp)}" if tp["found"] else "none found in the evaluated range"
        lines.append(f"  {m}: turning point {where}; exact-limit benefit {payload['table'][m]['exact_zero_init_benefit']:+.3g}")
    fs = payload["first_step"]
    for name in ("cfg", "cfg_star"):
        c = fs["crossover"][name]
        where = f"epoch {c['epoch']:g} {_interval(c)}" if c["found"] else "never in the evaluated range"
        lines.append(f"  first-step error of {payload['config']['first_step_rules'][name]} below the zero "
                     f"velocity's ({fs['err_zero'][name]:.3f}) from {where}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- table
def format_table(payload) -> str:
    cfg = payload["config"]
    s = cfg["preset_settings"]
    lines = [
        f"Table 1 analogue — d = {cfg['dim']}, class {cfg['label']}, w = {cfg['scale']:g}, K = {cfg['zero_init_steps']}, "
        f"{s['steps']} {cfg['solver']} steps, {s['seeds']} seeds × {s['n_eval']} samples (means over seeds; "
        f"benefit = CFG − (CFG + zero-init), sign flipped for precision: > 0 means zero-init helped; "
        f"'helps' = seeds where it helped)"
    ]
    fs = payload["first_step"]
    for m in sorted(METRICS, key=lambda k: k != payload["primary_metric"]):
        title, _ = METRICS[m]
        row = payload["table"][m]
        tag = " — PRIMARY" if m == payload["primary_metric"] else ""
        ref = {"nll": f"; class entropy {payload['nll_floor']:.2f}", "precision": "; target 0.95"}.get(m, "")
        lines += ["", f"{title}{tag} ({'lower' if row['lower_is_better'] else 'higher'} is better; "
                      f"{s['n_eval']} exact class samples score {row['data']:.4g}{ref})"]
        head = f"{'epoch':>6} {'CFG':>10} {'+zero-init':>11} {'CFG-Zero*':>10} {'benefit':>9} {'helps':>6}"
        if m == payload["primary_metric"]:
            head += f" {'1st-step err CFG':>17} {'(zero)':>8}"
        lines += [head, "-" * len(head)]
        for i, epoch in enumerate(payload["epochs"]):
            line = (f"{epoch:>6} {row['cfg'][i]:>10.4g} {row['cfg_zero_init'][i]:>11.4g} {row['cfg_zero_star'][i]:>10.4g} "
                    f"{row['zero_init_benefit'][i]:>+9.3g} {row['zero_init_helps_seeds'][i]:>3}/{s['seeds']:<2}")
            if m == payload["primary_metric"]:
                line += f" {fs['err_cfg'][i]:>17.3f} {fs['err_zero']['cfg']:>8.3f}"
            lines.append(line)
        ex = row["exact"]
        lines.append(f"{'exact':>6} {ex['cfg']:>10.4g} {ex['cfg_zero_init']:>11.4g} {ex['cfg_zero_star']:>10.4g} "
                     f"{row['exact_zero_init_benefit']:>+9.3g}")
        tp = payload["turning_points"][m]
        where = (f"epoch {tp['epoch']:g}, {LEVEL:.0%} seed-bootstrap interval {_interval(tp)}" if tp["found"]
                 else "none found in the evaluated range")
        lines.append(f"turning point (CFG + zero-init worse than CFG from then on): {where}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures
def _epoch_axis(ax, payload):
    epochs = payload["epochs"]
    if payload["config"]["preset_settings"]["eval_every"] == 0 and len(epochs) > 2:
        ax.set_xscale("symlog", linthresh=1.0, linscale=0.5)
        ax.set_xticks(epochs)
        ax.set_xticklabels([str(e) for e in epochs], fontsize=7)
        ax.minorticks_off()
    ax.set_xlim(epochs[0], epochs[-1])


def _metric_panel(ax, payload, metric, rules, legend=False):
    import numpy as np

    from cfgzero_theory import plotting

    epochs = np.asarray(payload["epochs"])
    row = payload["table"][metric]
    for name in RULE_NAMES:
        per_seed = np.asarray(row["per_seed"][name])
        style = plotting.rule_style(rules[name])
        ax.plot(epochs, per_seed.mean(axis=0), label=payload["config"]["rules"][name], **style)
        ax.fill_between(epochs, per_seed.min(axis=0), per_seed.max(axis=0), color=style["color"], alpha=0.12, linewidth=0)
        ax.axhline(row["exact"][name], color=style["color"], linestyle=":", linewidth=1.0, alpha=0.9)
    ax.axhline(row["data"], color="grey", linestyle="--", linewidth=1.0, label="exact class samples (finite-n floor)")
    ax.plot([], [], color="grey", linestyle=":", linewidth=1.0, label="exact field, same rule (perfect model)")
    if metric in ("frechet", "mmd", "nll"):
        _log_y(ax)
    ax.set_title(METRICS[metric][0] + (" ↓" if row["lower_is_better"] else " ↑"))
    _epoch_axis(ax, payload)
    if legend:
        ax.legend(fontsize=7)


def _log_y(ax):
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _benefit_panel(ax, payload, metric, rules, legend=False):
    import numpy as np

    from cfgzero_theory import plotting

    epochs = np.asarray(payload["epochs"])
    row = payload["table"][metric]
    color = plotting.rule_color(rules["cfg_zero_init"])
    per_seed = np.asarray(row["zero_init_benefit_per_seed"])
    for s in per_seed:
        ax.plot(epochs, s, color=color, alpha=0.3, linewidth=0.7)
    ax.plot(epochs, per_seed.mean(axis=0), color=color, marker="^", label="CFG − (CFG + zero-init), seed mean (thin: seeds)")
    ax.axhline(0.0, color="black", linewidth=1.0)
    ax.axhline(row["exact_zero_init_benefit"], color=color, linestyle=":", linewidth=1.0, label="exact-field limit")
    tp = payload["turning_points"][metric]
    if tp["found"]:
        ax.axvline(tp["epoch"], color="black", linewidth=1.2, alpha=0.7)
        hi = epochs[-1] if tp["high"] is None else tp["high"]
        ax.axvspan(tp["low"], hi, color="grey", alpha=0.15, linewidth=0, label=f"{LEVEL:.0%} seed-bootstrap interval")
    sign = "" if row["lower_is_better"] else " (sign flipped)"
    status = f"turning point {tp['epoch']:g}" if tp["found"] else "no turning point"
    ax.set_title(f"zero-init benefit{sign}: {status}", fontsize=8.5)
    ax.set_xlabel("training epoch")
    _epoch_axis(ax, payload)
    if legend:
        ax.legend(fontsize=7)


def plot_turning_point(payload, rules, path):
    import matplotlib.pyplot as plt

    from cfgzero_theory import plotting

    metric = payload["primary_metric"]
    cfg = payload["config"]
    fig, axes = plt.subplots(2, 1, figsize=(6.6, 6.4), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    _metric_panel(axes[0], payload, metric, rules, legend=True)
    axes[0].set_ylabel(METRICS[metric][0] + " of final samples")
    axes[0].set_title(f"Table 1 analogue, d = {cfg['dim']}, class {cfg['label']}, w = {cfg['scale']:g}, "
                      f"K = {cfg['zero_init_steps']} (band: seed min–max; dotted: exact field)", fontsize=9)
    _benefit_panel(axes[1], payload, metric, rules, legend=True)
    axes[1].set_ylabel("CFG − (CFG + zero-init)")
    tp = payload["turning_points"][metric]
    text = (f"turning point: epoch {tp['epoch']:g}, {LEVEL:.0%} interval {_interval(tp)} (shaded)" if tp["found"]
            else "turning point: none found in the evaluated range")
    axes[1].set_title(text, fontsize=9)
    fig.tight_layout()
    written = plotting.save(fig, path)
    plt.close(fig)
    return written


def plot_sample_quality(payload, rules, path):
    import matplotlib.pyplot as plt

    from cfgzero_theory import plotting

    fig, axes = plt.subplots(2, len(METRICS), figsize=(3.3 * len(METRICS), 6.6), sharex=True)
    for j, metric in enumerate(METRICS):
        _metric_panel(axes[0, j], payload, metric, rules)
        _benefit_panel(axes[1, j], payload, metric, rules)
    axes[0, 0].set_ylabel("metric of final samples (band: seed min–max)")
    axes[1, 0].set_ylabel("zero-init benefit (> 0: zero-init helped)")
    handles, labels = [], []
    for ax in (axes[0, 0], axes[1, 0]):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    handles.append(plt.Line2D([], [], color="black", linewidth=1.2, alpha=0.7))
    labels.append("turning point")
    cfg = payload["config"]
    fig.suptitle(f"Exact sample quality per epoch (mean over {cfg['preset_settings']['seeds']} seeds), d = {cfg['dim']}, "
                 f"class {cfg['label']}, w = {cfg['scale']:g}, K = {cfg['zero_init_steps']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    written = plotting.save(fig, path)
    plt.close(fig)
    return written


def main(argv=None) -> dict:
    start = time.perf_counter()
    args = parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    from cfgzero_theory import plotting
    from experiments._common import publishable, run_or_exit, write_json
    from experiments._figures import plot_first_step_errors, plot_training_loss

    payload = run_or_exit(run, args)
    raw = payload["_raw"]
    figures = []
    with plotting.style():
        figures += plot_turning_point(payload, raw["rules"], os.path.join(args.out, "turning_point"))
        figures += plot_sample_quality(payload, raw["rules"], os.path.join(args.out, "sample_quality"))
        fs, cfg = payload["first_step"], payload["config"]
        figures += plot_first_step_errors(
            payload["epochs"],
            {name: fs[f"err_{name}_per_seed"] for name in raw["first_rules"]},
            fs["err_zero"],
            {name: fs["crossover"][name]["epoch"] if fs["crossover"][name]["found"] else None for name in raw["first_rules"]},
            raw["first_rules"], cfg["first_step_rules"],
            f"First step vs the zero velocity, d = {cfg['dim']}, class {cfg['label']}, w = {cfg['scale']:g}, "
            f"{cfg['preset_settings']['seeds']} seeds (band: min–max)",
            os.path.join(args.out, "first_step_error"),
            epoch_axis=lambda ax: _epoch_axis(ax, payload),
        )
        figures += plot_training_loss(
            payload["training_loss"], payload["loss_floor"], os.path.join(args.out, "training_loss"),
            evaluated_epochs=payload["epochs"][1:], log_epochs=len(payload["training_loss"]) > 8,
        )
    payload = publishable(payload, figures, verdict, start)
    path = os.path.join(args.out, "crossover_highdim.json")
    write_json(path, payload)
    print(format_table(payload))
    print()
    print(payload["verdict"])
    print(f"wrote {path} and {len(figures)} figure files; {payload['runtime_s']['total']:.1f} s "
          f"(training {payload['runtime_s']['training']:.1f} s, evaluation {payload['runtime_s']['evaluation']:.1f} s)")
    return payload


if __name__ == "__main__":
    main()
