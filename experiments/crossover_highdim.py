"""The zero-init turning point in high dimension: an exact analogue of the paper's Table 1, by a fixed protocol.

The paper (arXiv 2503.18886, Table 1) compares CFG with CFG + zero-init by ImageNet FID at
training epochs 10, 20, 40, 80, 160 (28.57 vs 28.55, 11.00 vs 10.65, 12.61 vs 12.29,
13.53 vs 12.18, 2.84 vs 2.85): zero-init helps undertrained models and stops helping at the
*turning point* (160 epochs).  Here the data are exact Gaussian mixtures in ``d = 64``
dimensions (``--dim``), so every sample metric is computed against the truth instead of a
feature extractor.

Protocol (declared before any number; the numbers are in the JSON and the README):

* **Data.** ``num_mixtures`` random class-conditional mixtures (3 in every preset),
  :func:`~cfgzero_theory.mixtures.random_class_conditional` drawn from
  ``fold_in(key(s), 1)`` for the data seeds ``s = data_seed, data_seed + 1, …``, each with
  its own finite training set (``dataset_size`` points from ``key(s)``, as in
  :mod:`~cfgzero_theory.training`).  Geometry (``MIXTURE``, fixed before this protocol and
  the same for every metric): 4 classes × 4 components, class separation 4, component spread
  2, eigenvalues log-uniform in ``[0.1, 1]``.
* **Networks.** Per mixture, ``seeds`` networks trained together by one
  :func:`~cfgzero_theory.training.train` call (SiLU MLP, depth 3, width ``width``; AdamW,
  learning rate ``1e-2`` with cosine decay, label dropout 0.1, no EMA; ``dataset_size /
  batch_size`` optimizer steps per epoch), kept on the doubling grid ``0, 1, 2, 4, …,
  epochs`` (``eval_every = 0``; the paper's grid doubles too).
* **Sampling.** Guided class ``--label`` (0), ``w = --scale`` (4), ``K = --zero-init-steps``
  (1) zeroed steps, ``steps`` Euler steps (the paper's solver).  Every seed's model samples
  the same noise ``x0`` (``n_eval`` points) with CFG, CFG + zero-init and CFG-Zero*
  (:func:`sampling.sample`, vmapped over seeds).  A diagnostic, not a Table 1 number: the
  per-step learning errors along the trajectories of the first ``PER_STEP_POINTS = 128``
  noise points (:func:`analysis.per_step_errors`).
* **Metrics.** Two *headline* metrics, reported side by side, each with its interval: the
  mean NLL of the final samples under the true class density (exact), and the squared
  Fréchet distance between the samples' mean and covariance and the exact class moments
  (the FID formula without a feature extractor).  Secondary columns: MMD² to the class
  (closed-form Gaussian terms), mode-coverage total variation
  (:func:`metrics.mode_coverage`) and 95% HDR precision.  NLL and precision come from one
  compiled scorer per mixture (:func:`analysis.make_sample_scorer`, its HDR reference drawn
  once); Fréchet distance, MMD² and mode TV from the jitted :mod:`~cfgzero_theory.metrics`
  functions, compiled once per run (each costs ``O(n·K·d²)`` or less per seed).
  Two references bracket every number: the *exact field* sampled with the same rule, noise
  and steps (the limit of a perfect model: ``GaussianMixture.velocity`` as the model), and
  ``n_eval`` exact class samples (each metric's finite-``n`` floor).
* **Turning point.** The *zero-init benefit* at an epoch is ``CFG − (CFG + zero-init)`` of
  a metric (sign flipped for precision): ``> 0`` means zero-init helped.  The turning point
  of a metric in a mixture is the first evaluated epoch from which CFG + zero-init is worse
  than CFG (seed means) at *every* later evaluated epoch, with a 90% seed-bootstrap
  interval (:func:`analysis.crossover_epoch`, the rows of a seed kept paired); exact ties
  count as "not yet".  It is *found* (the paper's Table 1 reproduced on that metric in that
  mixture) if such an epoch exists **and** zero-init helped the seed mean at some earlier
  evaluated epoch; a curve on which zero-init never helped has no turning point.  The claim
  *holds* on a metric if a turning point is found in every mixture, *holds only in some
  settings* if in some, and *fails* if in none.  The same is computed for every metric.
* **Prediction, from the exact-field limit.**  A turning point needs zero-init to *hurt* a
  perfect model: as training converges, each seed's benefit tends to the exact field's, so
  where the exact-field benefit is positive zero-init keeps helping late in training and
  "worse from some epoch on" cannot happen.  For NLL the exact field should be hurt: with
  a perfect model the zeroed first step only drops a correct move that the remaining Euler
  steps do not fully make up, so a turning point is possible once the models are good
  enough.  For the Fréchet distance (and MMD) of *guided* samples against the *unguided*
  class, guidance's own bias dominates — at ``t = 0`` the mean shift ``(w − 1)(μ_c − μ̄)`` —
  and skipping the first guided step undoes part of it, so zero-init may help even the
  exact field, and then no turning point is possible on that metric however long the
  training.  This is a prediction checked by the run, not a tuned result: the run prints
  the exact-field benefit of every metric in every mixture, and the verdict says per metric
  in how many mixtures the exact limit is hurt by zero-init, in how many a turning point was
  found, and where the two disagree.
* **First step** (the paper's Fig. 3 right).  The error of CFG's and CFG*'s first guided
  velocity against the paper's target, the true conditional velocity
  ``v*₀ = u_c(x0) = μ_c − x0`` (:func:`analysis.first_step_errors`): ``E‖ṽ₀^θ − v*₀‖`` per
  seed against one grey line for every rule, the zero velocity's ``E‖v*₀‖``, and the epoch
  from which the seed mean stays below it (90% bootstrap interval).  Secondary (names ending
  in ``_guided_target``, keyed by rule): the same against each rule's exact guided field, which separates
  the learning error from the guidance bias.
* **Seeds.** Networks and training noise from ``--seed`` (0); evaluation noise, HDR
  references and exact class samples from ``key(seed + 1000)``, the same for every mixture;
  data seeds as above.

What the run reports: per mixture, the table of every metric and rule by epoch (seed means,
per-seed arrays, benefit with its 90% bootstrap interval, the exact-field and data
references) and the turning point of every metric; a summary across mixtures (per metric,
the turning points, how many were found, the exact-field benefits and how many are
negative); and the verdict text, which names the metric that shows a turning point, the one
that does not, and why (citing the sign of the exact-limit benefit).

The turning-point definition and the verdict rules are :mod:`cfgzero_theory.verdicts`
(definitions and unit tests there).

Outputs under ``--out`` (default ``runs/crossover_highdim/<preset>`` in the current directory;
the committed gallery is written by ``python -m experiments.figures`` only):
``crossover_highdim.json`` (configuration, seeds, library version,
every number, per-seed arrays) and figures ``turning_point`` (NLL and Fréchet benefit, one
column per mixture), ``sample_quality``, ``first_step_error`` and ``training_loss`` (the
first mixture; PNG and PDF); ``checkpoints/mixture_<data seed>/`` lets a rerun with the same
configuration skip training.

    python -m experiments.crossover_highdim                  # quick preset (default), ~3.5 min on 2 CPU cores
    python -m experiments.crossover_highdim --preset smoke   # plumbing check, < 1 min
    python -m experiments.crossover_highdim --preset paper   # 8 seeds per mixture, ~5.5 min on 2 CPU cores

Cost on 2 CPU cores shared with other jobs: quick 147 s (training 77 s, evaluation 63 s),
paper 317 s (training 155 s, evaluation 148 s); every program is compiled once per run, the
NLL/precision scorer once per mixture.
Cost grows with ``d``: the exact fields cost ``O(K·d²)`` per point and step, and the MMD
cross term needs ``O(n·K·d²)`` memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import platform
import sys
import time

from experiments._common import (TOY_SCALE, TOY_ZERO_INIT_STEPS, add_preset_overrides, crossover_json, interval_text,
                                 outputs_line, preset_settings, progress, settle_out, start_study, study_parser)

PRESETS = {
    # eval_every = 0: the doubling grid 0, 1, 2, 4, ..., epochs
    "smoke": dict(num_mixtures=3, seeds=2, epochs=4, eval_every=0, dataset_size=512, batch_size=128, n_eval=256,
                  steps=8, width=32),
    "quick": dict(num_mixtures=3, seeds=4, epochs=256, eval_every=0, dataset_size=2048, batch_size=256, n_eval=1024,
                  steps=16, width=256),
    "paper": dict(num_mixtures=3, seeds=8, epochs=256, eval_every=0, dataset_size=2048, batch_size=256, n_eval=1024,
                  steps=16, width=256),
}
#: ``random_class_conditional`` geometry (dimension-free distances, see its docstring).
MIXTURE = dict(num_classes=4, components_per_class=4, class_separation=4.0, component_spread=2.0, eig_range=(0.1, 1.0))
DEPTH = 3
#: The guidance kinds sampled (:data:`guidance.KINDS`; every JSON key naming a rule is one of them) ...
RULE_NAMES = ("cfg", "zero-init", "cfg-zero-star")
#: ... and those whose first step is compared with the zero velocity (the rules zero-init bets against).
FIRST_RULES = ("cfg", "cfg-star")
#: metric -> (title, +1 if lower is better, -1 if higher is better)
METRICS = {
    "nll": ("NLL (nats)", 1),
    "frechet": ("Fréchet distance²", 1),
    "mmd": ("MMD²", 1),
    "mode_tv": ("mode-coverage TV", 1),
    "precision": ("HDR precision (95%)", -1),
}
HEADLINE = ("nll", "frechet")
SECONDARY = tuple(m for m in METRICS if m not in HEADLINE)
LEVEL = 0.9
#: Noise points of the per-step learning-error diagnostic (:func:`analysis.per_step_errors`), the first of ``x0``.
PER_STEP_POINTS = 128


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and validate every argument, then create ``--out`` and prove it writable: a user error exits
    with status 2 and one line on stderr, before any import of JAX or any work."""
    p = study_parser("crossover_highdim", PRESETS, __doc__)
    p.add_argument("--dim", type=int, default=64, help="data dimension d (default 64)")
    p.add_argument("--scale", type=float, default=TOY_SCALE, help=f"guidance scale w (default {TOY_SCALE:g})")
    p.add_argument("--label", type=int, default=0, help=f"guided class, 0..{MIXTURE['num_classes'] - 1} (default 0)")
    p.add_argument("--zero-init-steps", type=int, default=TOY_ZERO_INIT_STEPS,
                   help=f"zero-init steps K (default {TOY_ZERO_INIT_STEPS})")
    p.add_argument("--solver", choices=("euler", "heun"), default="euler", help="ODE solver of the sampler (default euler)")
    p.add_argument("--learning-rate", type=float, default=1e-2, help="AdamW learning rate, cosine-decayed (default 1e-2)")
    p.add_argument("--seed", type=int, default=0, help="root seed of the networks, training noise and evaluation noise")
    p.add_argument("--data-seed", type=int, default=0,
                   help="first data seed: the mixtures use data-seed, data-seed + 1, ... (default 0)")
    add_preset_overrides(p, PRESETS, {"eval_every": " (0: doubling grid 0, 1, 2, 4, ...)"})
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    s = args.settings = preset_settings(p, args, PRESETS, {"eval_every": 0, "n_eval": 2})
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
    settle_out(p, args, "crossover_highdim")
    return args


def evaluation_epochs(epochs: int, eval_every: int) -> tuple[int, ...]:
    """Every ``eval_every``-th epoch, or (``eval_every = 0``) the doubling grid ``0, 1, 2, 4, …``; always the last."""
    if eval_every == 0:
        grid = [0] + [2**i for i in range(epochs.bit_length()) if 2**i < epochs]
    else:
        grid = list(range(0, epochs, eval_every))
    return tuple(sorted(set(grid + [epochs])))


def build_mixture(dim: int, data_seed: int):
    import jax

    from cfgzero_theory import mixtures

    key = jax.random.fold_in(jax.random.key(data_seed), 1)
    return mixtures.random_class_conditional(key, dim, **MIXTURE)


def describe_mixture(dim: int, data_seed: int) -> str:
    return (f"mixtures.random_class_conditional(fold_in(key({data_seed}), 1), dim={dim}, "
            + ", ".join(f"{k}={v}" for k, v in MIXTURE.items()) + f"); dataset from key({data_seed})")


def _sample_seeds(velocity_fn, params, x0, times, labels, rule, solver):
    """Final samples ``(S, n, d)`` of every seed's model (leading axis of ``params``) from the shared noise ``x0``:
    :func:`sampling.sample` vmapped over seeds, one compiled program per velocity function and rule type."""
    return _sample_seeds_jit()(velocity_fn, params, x0, times, labels, rule, solver)


@functools.lru_cache(maxsize=1)
def _sample_seeds_jit():
    import jax

    from cfgzero_theory import sampling

    def sample_seeds(velocity_fn, params, x0, times, labels, rule, solver):
        one = lambda p: sampling.sample(velocity_fn, p, x0, times, labels, rule, solver=solver).samples  # noqa: E731
        return jax.vmap(one)(params)

    return jax.jit(sample_seeds, static_argnums=(0, 6))


def run(args) -> dict:
    """Train one set of networks per mixture, evaluate every kept epoch, return the JSON-ready result (plus ``_raw``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import cfgzero_theory
    from cfgzero_theory import GaussianMixture, analysis, guidance, metrics, sampling, verdicts
    from experiments._common import make_rules
    from cfgzero_theory.models import NetworkConfig, network_velocity
    from cfgzero_theory.training import TrainConfig, train

    s = args.settings
    eval_epochs = evaluation_epochs(s["epochs"], s["eval_every"])
    data_seeds = [args.data_seed + i for i in range(s["num_mixtures"])]
    num_seeds = s["seeds"]

    # ---- training: one call per mixture (the jitted epoch function is compiled once per process)
    trained = []
    train_times = []
    for data_seed in data_seeds:
        started = time.perf_counter()
        mixture = build_mixture(args.dim, data_seed)
        net_config = NetworkConfig(dim=args.dim, num_classes=len(mixture.classes), width=s["width"], depth=DEPTH)
        train_config = TrainConfig(
            epochs=s["epochs"], dataset_size=s["dataset_size"], batch_size=s["batch_size"],
            learning_rate=args.learning_rate, num_seeds=num_seeds, seed=args.seed, data_seed=data_seed,
            checkpoint_epochs=eval_epochs,
        )
        result = train(mixture, net_config, train_config,
                       out_dir=os.path.join(args.out, "checkpoints", f"mixture_{data_seed}"), progress=not args.no_progress)
        trained.append((mixture, result, train_config))
        train_times.append(time.perf_counter() - started)

    # ---- evaluation: every program compiled once per run (the scorer once per mixture), references computed once
    started_eval = time.perf_counter()
    rules = make_rules(RULE_NAMES, args.scale, args.zero_init_steps)
    first_rules = make_rules(FIRST_RULES, args.scale, args.zero_init_steps)
    key_first, key_eval, key_quality, key_data, key_boot = jax.random.split(jax.random.key(args.seed + 1000), 5)
    x0_first = jax.random.normal(key_first, (4096, args.dim))
    x0_eval = jax.random.normal(key_eval, (s["n_eval"], args.dim))
    times = sampling.time_grid(s["steps"])
    rows = len(RULE_NAMES) * num_seeds  # the scorer's batch: every rule's samples of one epoch

    states = []
    for mixture, _, _ in trained:
        label = mixture.check_label(args.label)
        states.append({
            "label": label, "score": analysis.make_sample_scorer(mixture, label, key_quality),
            "bandwidth": analysis.default_bandwidth(mixture, label),
            "quality": {name: {m: [] for m in METRICS} for name in RULE_NAMES},
            "first_true": {n: [] for n in FIRST_RULES}, "first_guided": {n: [] for n in FIRST_RULES},
            "per_step": {n: [] for n in RULE_NAMES}, "eval_s": 0.0,
        })

    def score_rows(state, mixture, samples):
        """Every metric of ``samples (B, n, d)`` as ``{metric: (B,)}``.

        NLL and precision: the mixture's compiled scorer, fed blocks of ``rows`` sample sets
        (padded: one shape, one compilation).  Fréchet distance, MMD² and mode TV: the jitted
        library functions, one sample set at a time (the mixture is an argument, so they
        compile once per run; measured faster than a vmapped program on 2 CPU cores, and the
        scorer's ``moments=True`` program — NLL, Fréchet and MMD in one — deadlocks the XLA
        CPU runtime of JAX 0.10.2 on its second call there).
        """
        samples = np.asarray(samples)  # one (uncommitted) layout for network and reference samples: one compilation
        count = samples.shape[0]
        padded = -(-count // rows) * rows
        x = jnp.asarray(np.concatenate([samples, np.broadcast_to(samples[:1], (padded - count, *samples.shape[1:]))]))
        out = {m: [] for m in ("nll", "precision")}
        for i in range(0, padded, rows):
            q = state["score"](x[i:i + rows])
            for m in out:
                out[m].append(np.asarray(q[m]))
            state["nll_floor"] = float(q["nll_floor"])
        out = {m: np.concatenate(v)[:count] for m, v in out.items()}
        label, h = state["label"], state["bandwidth"]
        out["frechet"] = np.array([float(metrics.frechet_to_mixture(x[i], mixture, label)) for i in range(count)])
        out["mmd"] = np.array([float(metrics.mmd_rbf_to_mixture(x[i], mixture, label, h)) for i in range(count)])
        out["mode_tv"] = np.array([float(metrics.mode_coverage(mixture, x[i], label).total_variation)
                                   for i in range(count)])
        return out

    def sample_rules(mixture, state, velocity_fn, params, diagnostics=True):
        """Final samples of every rule ``(R·S', n_eval, d)``, and (``diagnostics``) per-step learning errors
        ``{rule: (S', N)}`` on the first ``PER_STEP_POINTS`` noise points."""
        samples, per_step = [], {}
        labels = jnp.full((s["n_eval"],), state["label"], jnp.int32)
        for name in RULE_NAMES:
            samples.append(_sample_seeds(velocity_fn, params, x0_eval, times, labels, rules[name], args.solver))
            if diagnostics:
                steps = analysis.per_step_errors(velocity_fn, params, mixture, state["label"], rules[name],
                                                 x0_eval[:PER_STEP_POINTS], times, solver=args.solver)
                per_step[name] = np.asarray(steps.learning_error)
        return jnp.concatenate(samples), per_step

    def evaluate_epoch(mixture, result, state, epoch):
        """First-step errors, final samples of every rule and their metrics, per-step errors at one epoch."""
        networks = result.networks[epoch]
        errors = analysis.first_step_errors(network_velocity, networks, mixture, state["label"], first_rules, x0_first)
        for name, e in errors.items():
            state["first_true"][name].append(np.asarray(e.total_error))
            state["first_guided"][name].append(np.asarray(e.learning_error))
            state.setdefault("zero_guided", {})[name] = float(e.zero_error)
            state.setdefault("bias", {})[name] = float(e.guidance_bias)
            state["err_zero"] = float(e.zero_error_cond)
        samples, per_step = sample_rules(mixture, state, network_velocity, networks)
        q = score_rows(state, mixture, samples)
        for r, name in enumerate(RULE_NAMES):
            state["per_step"][name].append(per_step[name].mean(axis=0))
            for m in METRICS:
                state["quality"][name][m].append(q[m][r * num_seeds:(r + 1) * num_seeds])

    def evaluate_references(mixture, state):
        """The exact field sampled the same way (a perfect model), and ``n_eval`` exact class samples."""
        stacked = jax.tree_util.tree_map(lambda a: a[None], mixture)
        exact_samples, _ = sample_rules(mixture, state, GaussianMixture.velocity, stacked, diagnostics=False)
        data = mixture.sample(key_data, s["n_eval"], state["label"])[None]
        q = score_rows(state, mixture, jnp.concatenate([exact_samples, data]))
        state["exact"] = {name: {m: float(q[m][r]) for m in METRICS} for r, name in enumerate(RULE_NAMES)}
        state["data"] = {m: float(q[m][len(RULE_NAMES)]) for m in METRICS}

    stages = [(i, epoch) for i in range(len(trained)) for epoch in eval_epochs] + [(i, "exact") for i in range(len(trained))]
    for i, stage in progress(stages, not args.no_progress, "evaluating (every mixture's epochs, then exact fields)"):
        t0 = time.perf_counter()
        (mixture, result, _), state = trained[i], states[i]
        if stage == "exact":
            evaluate_references(mixture, state)
        else:
            evaluate_epoch(mixture, result, state, stage)
        state["eval_s"] += time.perf_counter() - t0
    eval_s = time.perf_counter() - started_eval

    entries = []
    for k, ((mixture, result, train_config), state, data_seed) in enumerate(zip(trained, states, data_seeds)):
        per_seed = {name: {m: np.stack(state["quality"][name][m], axis=1) for m in METRICS} for name in RULE_NAMES}
        table, turning = {}, {}
        for i, (m, (_, sign)) in enumerate(METRICS.items()):
            key = jax.random.fold_in(key_boot, 100 * k + i)
            tp = verdicts.turning_point(eval_epochs, per_seed["cfg"][m], per_seed["zero-init"][m], sign > 0,
                                        key=key, level=LEVEL)
            benefit = tp.benefit  # > 0: zero-init helped
            low, high = analysis.bootstrap_mean_interval(benefit, key=jax.random.fold_in(key, 1), level=LEVEL)
            turning[m] = {**crossover_json(tp.crossover), "helped_epochs": tp.helped_epochs,
                          "turning_point": tp.turning_point}
            table[m] = {
                **{name: per_seed[name][m].mean(axis=0).tolist() for name in RULE_NAMES},
                "per_seed": {name: per_seed[name][m].tolist() for name in RULE_NAMES},
                "benefit": {  # sign·(CFG − rule): > 0, the rule beat CFG
                    "zero-init": {
                        "mean": benefit.mean(axis=0).tolist(), "low": low.tolist(), "high": high.tolist(),
                        "per_seed": benefit.tolist(), "helps_seeds": (benefit > 0).sum(axis=0).tolist(),
                        "exact": float(verdicts.benefit_over_cfg(state["exact"]["cfg"][m],
                                                                 state["exact"]["zero-init"][m], sign > 0)),
                    },
                    "cfg-zero-star": {"mean": verdicts.benefit_over_cfg(per_seed["cfg"][m], per_seed["cfg-zero-star"][m],
                                                                        sign > 0).mean(axis=0).tolist()},
                },
                "exact": {name: state["exact"][name][m] for name in RULE_NAMES},
                "data": state["data"][m],
                "lower_is_better": sign > 0,
            }
        first_true = {name: np.stack(state["first_true"][name], axis=1) for name in FIRST_RULES}  # (S, E)
        first_cross = {}
        for i, name in enumerate(FIRST_RULES):
            c = verdicts.first_step_crossover(eval_epochs, first_true[name], state["err_zero"], first_epoch=0,
                                              key=jax.random.fold_in(key_boot, 100 * k + 50 + i), level=LEVEL)
            first_cross[name] = crossover_json(c)
        entries.append({
            "index": k,
            "data_seed": data_seed,
            "description": describe_mixture(args.dim, data_seed),
            "table": table,
            "turning_points": turning,
            "nll_floor": state["nll_floor"],
            "first_step": {
                "target": "true_velocity",
                "err_zero": state["err_zero"],
                "err": {n: first_true[n].mean(axis=0).tolist() for n in FIRST_RULES},
                "err_per_seed": {n: first_true[n].tolist() for n in FIRST_RULES},
                "crossover": first_cross,
                "err_guided_target": {n: np.stack(state["first_guided"][n], axis=1).mean(axis=0).tolist()
                                      for n in FIRST_RULES},
                "err_per_seed_guided_target": {n: np.stack(state["first_guided"][n], axis=1).tolist() for n in FIRST_RULES},
                "err_zero_guided_target": state["zero_guided"],
                "guidance_bias": state["bias"],
            },
            "per_step_learning_error": {n: np.stack(state["per_step"][n]).tolist() for n in RULE_NAMES},
            "training_loss": np.asarray(result.losses).tolist(),
            "loss_floor": float(result.loss_floor),
            "runtime_s": {"training": train_times[k], "evaluation": state["eval_s"]},
        })

    summary = summarize(entries)

    config = {
        "preset": args.preset, "preset_settings": s, "dim": args.dim, "scale": args.scale, "label": args.label,
        "zero_init_steps": args.zero_init_steps, "solver": args.solver, "learning_rate": args.learning_rate,
        "headline_metrics": list(HEADLINE), "secondary_metrics": list(SECONDARY),
        "mixture_geometry": {k: list(v) if isinstance(v, tuple) else v for k, v in MIXTURE.items()},
        "mixtures": [{"data_seed": ds, "description": describe_mixture(args.dim, ds)} for ds in data_seeds],
        "depth": DEPTH,
        "network": dataclasses.asdict(net_config),
        "training": {**dataclasses.asdict(trained[0][2]), "data_seed": data_seeds},
        "rules": {k: guidance.describe(r) for k, r in rules.items()},
        "first_step_rules": {k: guidance.describe(r) for k, r in first_rules.items()},
        "seeds": {"root": args.seed, "data": data_seeds, "num_seeds": num_seeds, "evaluation": args.seed + 1000},
        "bootstrap_level": LEVEL,
        "cfgzero_theory_version": cfgzero_theory.__version__, "jax_version": jax.__version__,
        "python_version": platform.python_version(), "jax_backend": jax.default_backend(),
        "jax_devices": len(jax.devices()), "argv": sys.argv[1:],
    }
    payload = {
        "config": config,
        "epochs": list(eval_epochs),
        "optimizer_steps": [int(e) * trained[0][2].steps_per_epoch for e in eval_epochs],
        "mixtures": entries,
        "summary": summary,
        "times": np.asarray(times).tolist(),
        "runtime_s": {"training": float(sum(train_times)), "evaluation": eval_s},
    }
    payload["_raw"] = {"rules": rules, "first_rules": first_rules}
    return payload


# ----------------------------------------------------------------------------- verdict
def summarize(entries: list[dict]) -> dict:
    """Per metric, across mixtures: turning points and their intervals, and :func:`verdicts.summarize_turning_points`
    (count, claim, exact-limit prediction and disagreements; mixtures named by their data seeds)."""
    from cfgzero_theory import verdicts

    summary = {}
    for m in METRICS:
        points = [e["turning_points"][m] for e in entries]
        exact = [e["table"][m]["benefit"]["zero-init"]["exact"] for e in entries]
        seeds = [e["data_seed"] for e in entries]
        found = [bool(p["turning_point"]) for p in points]
        counts = verdicts.summarize_turning_points(found, [p["found"] for p in points], exact)
        summary[m] = {
            "headline": m in HEADLINE,
            "data_seeds": seeds,
            "turning_points": [p["epoch"] if p["turning_point"] else None for p in points],
            "intervals": [[p["low"], p["high"]] if p["turning_point"] else None for p in points],
            "found": found,
            "exact_benefit": {"zero-init": exact},
            **{k: [seeds[i] for i in v] if isinstance(v, list) else v for k, v in counts.items()},
        }
    return summary


def _title(metric: str) -> str:
    return METRICS[metric][0].split(" (")[0]


def _point_text(point) -> str:
    if point["turning_point"]:
        return f"epoch {point['epoch']:g} {interval_text(point)}"
    if point["found"]:
        return "none (zero-init never helped the seed mean)"
    return "none in the evaluated range"


def _reason(metric: str, hurts: int, total: int) -> str:
    """Why a turning point is (im)possible on ``metric``, from the sign of its exact-limit benefit."""
    if hurts == total:
        return (f"in the exact-field limit zero-init hurts in {hurts} of {total} mixtures, so a perfect model loses by "
                "zeroing the first step and a turning point is possible once the models are good enough")
    moments = (" (guided samples are scored against the unguided class: guidance's own bias dominates this metric "
               "and skipping the first guided step undoes part of it)" if metric in ("frechet", "mmd") else "")
    if hurts == 0:
        return (f"in the exact-field limit zero-init hurts in 0 of {total} mixtures: it helps even the exact field"
                f"{moments}, so the late benefit tends to a positive value and no turning point is possible")
    return (f"in the exact-field limit zero-init hurts in {hurts} of {total} mixtures: a turning point is possible "
            f"only in those{moments}")


def metric_sentence(payload, metric: str) -> str:
    """One sentence on ``metric`` across mixtures: turning points, exact-limit benefits and their agreement."""
    sm = payload["summary"][metric]
    total, found = sm["num_mixtures"], sm["num_found"]
    state = {"holds": "HOLDS", "holds in some": "HOLDS IN SOME MIXTURES", "fails": "FAILS"}[sm["claim"]]
    parts = []
    for entry in payload["mixtures"]:
        point, row = entry["turning_points"][metric], entry["table"][metric]["benefit"]["zero-init"]
        parts.append(f"data seed {entry['data_seed']}: {_point_text(point)} (last-epoch benefit "
                     f"{row['mean'][-1]:+.3g}, exact {row['exact']:+.3g})")
    text = (f"{_title(metric)}: turning point in {found} of {total} mixtures — the paper's claim {state} on this metric — "
            + "; ".join(parts) + f". Why: {_reason(metric, sm['exact_hurts'], total)}.")
    if sm["not_reached"]:
        text += (f" Not reached in data seeds {sm['not_reached']}: the exact limit is hurt by zero-init, but zero-init "
                 "still helps at the last evaluated epoch (the models are not yet close enough to the limit).")
    if sm["never_helped"]:
        text += f" In data seeds {sm['never_helped']} zero-init never helped the seed mean, so there is nothing to turn."
    if sm["against_prediction"]:
        text += (f" Against the prediction in data seeds {sm['against_prediction']}: a turning point although zero-init "
                 "does not hurt the exact field (the evaluated models are still far from the limit).")
    return text


def verdict(payload) -> str:
    summary = payload["summary"]
    total = len(payload["mixtures"])
    lines = [f"Headline metrics ({total} mixtures, data seeds {payload['config']['seeds']['data']}; turning point = first "
             f"evaluated epoch from which CFG + zero-init is worse than CFG at every later epoch, after zero-init helped; "
             f"{LEVEL:.0%} seed-bootstrap interval):"]
    lines += [metric_sentence(payload, m) for m in HEADLINE]
    shows = [m for m in HEADLINE if summary[m]["num_found"] > 0]
    lacks = [m for m in HEADLINE if summary[m]["num_found"] == 0]
    lines.append(
        "Which metric shows a turning point: "
        + (", ".join(f"{_title(m)} ({summary[m]['num_found']}/{total} mixtures; exact limit hurt by zero-init in "
                     f"{summary[m]['exact_hurts']}/{total})" for m in shows) or "none")
        + "; which does not: "
        + (", ".join(f"{_title(m)} (0/{total}; exact limit hurt by zero-init in {summary[m]['exact_hurts']}/{total}"
                     + (", i.e. zero-init helps even a perfect model" if summary[m]["exact_hurts"] == 0 else "") + ")"
                     for m in lacks) or "none")
        + ".")
    lines.append("Secondary metrics:")
    for m in SECONDARY:
        sm = summary[m]
        pts = ", ".join(_point_text(e["turning_points"][m]) for e in payload["mixtures"])
        lines.append(f"  {m}: turning point in {sm['num_found']} of {total} ({pts}); exact limit hurt by zero-init in "
                     f"{sm['exact_hurts']} of {total}")
    names = payload["config"]["first_step_rules"]
    for name in FIRST_RULES:
        parts = []
        for entry in payload["mixtures"]:
            fs = entry["first_step"]
            c = fs["crossover"][name]
            where = f"epoch {c['epoch']:g} {interval_text(c)}" if c["found"] else "never in the evaluated range"
            parts.append(f"data seed {entry['data_seed']}: {where} (E‖v*₀‖ = {fs['err_zero']:.3f}, converged-limit "
                         f"bias {fs['guidance_bias'][name]:.3f})")
        lines.append(f"First step of {names[name]} against v*₀ = u_c(x0) below the zero velocity's error from: "
                     + "; ".join(parts))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- table
def format_table(payload) -> str:
    cfg = payload["config"]
    s = cfg["preset_settings"]
    lines = [
        f"Table 1 analogue — d = {cfg['dim']}, class {cfg['label']}, w = {cfg['scale']:g}, K = {cfg['zero_init_steps']}, "
        f"{s['steps']} {cfg['solver']} steps, {s['seeds']} seeds × {s['n_eval']} samples per mixture (means over seeds; "
        f"benefit = CFG − (CFG + zero-init), sign flipped for precision: > 0 means zero-init helped; "
        f"[90% seed-bootstrap interval])",
        "1st-step CFG−v*: seed-mean first-step error E‖ṽ₀^θ − v*₀‖ of CFG; zero line: a zero velocity's error E‖v*₀‖ "
        "(zero beats CFG where the error is above it); rows 'exact': the exact fields, 'data': exact class samples",
    ]
    epochs = payload["epochs"]
    for entry in payload["mixtures"]:
        lines += ["", f"=== mixture {entry['index']} (data seed {entry['data_seed']}; class entropy "
                      f"{entry['nll_floor']:.2f} nats) — headline metrics side by side"]
        head = f"{'epoch':>6}"
        for m in HEADLINE:
            t = _title(m)[:9]
            head += f" | {t + ' CFG':>15} {'+zero-init':>10} {'benefit [90%]':>24}"
        head += f" | {'1st-step CFG−v*':>15} {'zero line':>9}"
        lines += [head, "-" * len(head)]
        fs = entry["first_step"]
        for i, epoch in enumerate(epochs):
            line = f"{epoch:>6}"
            for m in HEADLINE:
                row = entry["table"][m]
                gain = row["benefit"]["zero-init"]
                band = f"{gain['mean'][i]:+.3g} [{gain['low'][i]:+.3g}, {gain['high'][i]:+.3g}]"
                line += f" | {row['cfg'][i]:>15.4g} {row['zero-init'][i]:>10.4g} {band:>24}"
            line += f" | {fs['err']['cfg'][i]:>15.3f} {fs['err_zero']:>9.3f}"
            lines.append(line)
        line = f"{'exact':>6}"
        for m in HEADLINE:
            row = entry["table"][m]
            line += f" | {row['exact']['cfg']:>15.4g} {row['exact']['zero-init']:>10.4g} " \
                    f"{row['benefit']['zero-init']['exact']:>+24.3g}"
        lines.append(line)
        line = f"{'data':>6}"
        for m in HEADLINE:
            line += f" | {entry['table'][m]['data']:>15.4g} {'':>10} {'':>24}"
        lines.append(line)
        for m in HEADLINE:
            lines.append(f"turning point, {_title(m)}: {_point_text(entry['turning_points'][m])}")
        sec = "; ".join(f"{m} {_point_text(entry['turning_points'][m])} (exact benefit "
                        f"{entry['table'][m]['benefit']['zero-init']['exact']:+.3g})" for m in SECONDARY)
        lines.append(f"secondary: {sec}")
    lines += ["", "Summary across mixtures (turning point per mixture; exact-limit benefit per mixture):"]
    for m in METRICS:
        sm = payload["summary"][m]
        pts = ", ".join("—" if e is None else f"{e:g}" for e in sm["turning_points"])
        ex = ", ".join(f"{b:+.3g}" for b in sm["exact_benefit"]["zero-init"])
        tag = "headline " if sm["headline"] else "secondary"
        lines.append(f"  {tag} {m:>9}: found {sm['num_found']}/{sm['num_mixtures']} [{pts}]; exact benefit [{ex}] "
                     f"(hurt in {sm['exact_hurts']}/{sm['num_mixtures']})")
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


def _log_y(ax):
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _metric_panel(ax, payload, entry, metric, rules, legend=False):
    import numpy as np

    from cfgzero_theory import plotting

    epochs = np.asarray(payload["epochs"])
    row = entry["table"][metric]
    for name in RULE_NAMES:
        per_seed = np.asarray(row["per_seed"][name])
        style = plotting.rule_style(rules[name])
        ax.plot(epochs, per_seed.mean(axis=0), label=payload["config"]["rules"][name], **style)
        ax.fill_between(epochs, per_seed.min(axis=0), per_seed.max(axis=0), color=style["color"], alpha=0.12, linewidth=0)
        ax.axhline(row["exact"][name], color=style["color"], linestyle=":", linewidth=1.0, alpha=0.9)
    ax.axhline(row["data"], color="grey", linestyle="--", linewidth=1.0, label="exact class samples (finite-n floor)")
    ax.plot([], [], color="grey", linestyle=":", linewidth=1.0, label="exact field, same rule (perfect model)")
    values = np.concatenate([np.asarray(row["per_seed"][n]).ravel() for n in RULE_NAMES]
                            + [[row["data"]], list(row["exact"].values())])
    if metric in ("frechet", "mmd", "nll") and np.all(values > 0):
        _log_y(ax)
    ax.set_title(METRICS[metric][0] + (" ↓" if row["lower_is_better"] else " ↑"))
    _epoch_axis(ax, payload)
    if legend:
        ax.legend(fontsize=7)


def _benefit_panel(ax, payload, entry, metric, rules, legend=False):
    import numpy as np

    from cfgzero_theory import plotting

    epochs = np.asarray(payload["epochs"])
    row = entry["table"][metric]
    color = plotting.rule_color(rules["zero-init"])
    gain = row["benefit"]["zero-init"]
    per_seed = np.asarray(gain["per_seed"])
    for s in per_seed:
        ax.plot(epochs, s, color=color, alpha=0.3, linewidth=0.7)
    ax.plot(epochs, per_seed.mean(axis=0), color=color, marker="^", label="seed mean (thin: seeds)")
    ax.axhline(0.0, color="black", linewidth=1.0)
    ax.axhline(gain["exact"], color=color, linestyle=":", linewidth=1.2,
               label="exact-field limit (perfect model)")
    tp = entry["turning_points"][metric]
    if tp["turning_point"]:
        ax.axvline(tp["epoch"], color="black", linewidth=1.2, alpha=0.7, label="turning point")
        hi = epochs[-1] if tp["high"] is None else tp["high"]
        ax.axvspan(tp["low"], hi, color="grey", alpha=0.15, linewidth=0, label=f"{LEVEL:.0%} seed-bootstrap interval")
    sign = "" if row["lower_is_better"] else " (sign flipped)"
    status = f"turning point {tp['epoch']:g} {interval_text(tp)}" if tp["turning_point"] else "no turning point"
    ax.set_title(f"{_title(metric)} benefit{sign}: {status}", fontsize=8.5)
    _epoch_axis(ax, payload)
    if legend:
        ax.legend(fontsize=7)


def plot_turning_point(payload, rules, path):
    """Zero-init benefit on NLL (top) and Fréchet distance (bottom), one column per mixture."""
    import matplotlib.pyplot as plt

    from cfgzero_theory import plotting

    cfg = payload["config"]
    entries = payload["mixtures"]
    cols = len(entries)
    fig, axes = plt.subplots(len(HEADLINE), cols, figsize=(3.9 * cols + 0.6, 3.0 * len(HEADLINE) + 0.8),
                             sharex=True, squeeze=False)
    for j, entry in enumerate(entries):
        for r, metric in enumerate(HEADLINE):
            ax = axes[r, j]
            _benefit_panel(ax, payload, entry, metric, rules, legend=(r == 0 and j == 0))
            if r == 0:
                ax.set_title(f"data seed {entry['data_seed']}\n" + ax.get_title(), fontsize=8.5)
            if j == 0:
                ax.set_ylabel(f"{METRICS[metric][0]}:\nCFG − (CFG + zero-init)")
            if r == len(HEADLINE) - 1:
                ax.set_xlabel("training epoch")
    fig.suptitle(f"Table 1 analogue, d = {cfg['dim']}, class {cfg['label']}, w = {cfg['scale']:g}, "
                 f"K = {cfg['zero_init_steps']}, {cfg['preset_settings']['seeds']} seeds per mixture: zero-init benefit "
                 f"(> 0: zero-init helped)\nthin: seeds; dotted: exact-field limit; vertical line: turning point; shaded: its "
                 f"{LEVEL:.0%} seed-bootstrap interval", fontsize=9.5)
    fig.tight_layout()
    written = plotting.save(fig, path)
    plt.close(fig)
    return written


def plot_sample_quality(payload, rules, path, index: int = 0):
    import matplotlib.pyplot as plt

    from cfgzero_theory import plotting

    entry = payload["mixtures"][index]
    fig, axes = plt.subplots(2, len(METRICS), figsize=(3.3 * len(METRICS), 6.6), sharex=True)
    for j, metric in enumerate(METRICS):
        _metric_panel(axes[0, j], payload, entry, metric, rules)
        _benefit_panel(axes[1, j], payload, entry, metric, rules)
        axes[1, j].set_xlabel("training epoch")
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
    fig.suptitle(f"Mixture {index} (data seed {entry['data_seed']}): exact sample quality per epoch (mean over "
                 f"{cfg['preset_settings']['seeds']} seeds), d = {cfg['dim']}, class {cfg['label']}, w = {cfg['scale']:g}, "
                 f"K = {cfg['zero_init_steps']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    written = plotting.save(fig, path)
    plt.close(fig)
    return written


def plan(args) -> str:
    """The first line of a run: what will be trained and evaluated, and where the outputs go."""
    s = args.settings
    return (f"crossover_highdim ({args.preset}): {s['num_mixtures']} mixtures in d = {args.dim} × {s['seeds']} networks, "
            f"{s['epochs']} epochs each, evaluated at {len(evaluation_epochs(s['epochs'], s['eval_every']))} epochs with "
            f"{len(RULE_NAMES)} rules × {len(METRICS)} metrics; writing {os.path.abspath(args.out)}/ (checkpoints/ lets a rerun skip "
            "training)")


def main(argv=None) -> dict:
    start, args = start_study(parse_args, plan, argv)
    from experiments._common import draw_figures, publishable, retract_result, run_or_exit, write_json
    from experiments._figures import plot_first_step_errors, plot_training_loss

    payload = run_or_exit(run, args)
    raw = payload["_raw"]
    cfg = payload["config"]
    first = payload["mixtures"][0]
    fs = first["first_step"]
    drawings = {
        "turning_point": lambda path: plot_turning_point(payload, raw["rules"], path),
        "sample_quality": lambda path: plot_sample_quality(payload, raw["rules"], path),
        "first_step_error": lambda path: plot_first_step_errors(
            payload["epochs"],
            fs["err_per_seed"],
            fs["err_zero"],
            {name: fs["crossover"][name]["epoch"] if fs["crossover"][name]["found"] else None for name in FIRST_RULES},
            raw["first_rules"], cfg["first_step_rules"],
            f"First step vs the zero velocity, mixture 0 (data seed {first['data_seed']}), d = {cfg['dim']}, "
            f"class {cfg['label']}, w = {cfg['scale']:g}, {cfg['preset_settings']['seeds']} seeds (band: min–max)",
            path, epoch_axis=lambda ax: _epoch_axis(ax, payload), limits=fs["guidance_bias"]),
        "training_loss": lambda path: plot_training_loss(
            first["training_loss"], first["loss_floor"], path, evaluated_epochs=payload["epochs"][1:],
            log_epochs=len(first["training_loss"]) > 8,
            title=f"Training loss, mixture 0 (data seed {first['data_seed']}), {cfg['preset_settings']['seeds']} seeds"),
    }
    path = os.path.join(args.out, "crossover_highdim.json")
    retract_result(path)
    figures = draw_figures(drawings, args.out, not args.no_progress)
    payload = publishable(payload, figures, verdict, start)
    write_json(path, payload)
    print(format_table(payload))
    print()
    print(payload["verdict"])
    rt = payload["runtime_s"]
    print(outputs_line(args.out, [path, *figures]) + f"; {rt['total']:.1f} s (training {rt['training']:.1f} s, "
          f"evaluation {rt['evaluation']:.1f} s)")
    return payload


if __name__ == "__main__":
    main()
