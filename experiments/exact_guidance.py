"""What CFG, CFG*, zero-init and CFG-Zero* do when every field is exact.

On the exact 2-D class-conditional mixture (``mixtures.class_conditional_2d()``) every
velocity is known in closed form, so a guidance rule has no learning error: whatever it
gets wrong is *guidance bias* ``‖ṽ* − u_c‖`` (docs/design.md §4).  For the conditional-only
baseline (CFG with ``w = 1``), CFG, CFG*, zero-init CFG and CFG-Zero* at one scale ``w``
this experiment

(a) samples with each rule from the same noise and measures the per-step bias
    ``‖ṽ*(x_i, t_i) − u_c(x_i, t_i)‖`` along that rule's own trajectory, and checks the
    closed form of the first step, ``ṽ*_0 − u_c = (w − 1)(μ_c − μ̄)`` for exact CFG, and that
    CFG-Zero*'s first step is exactly zero;
(b) draws the final samples over the true class density;
(c) scores them against the true class with :func:`analysis.sample_quality` (JSD on a grid,
    mean NLL, MMD² against the exact class mixture, mode coverage), plus MMD² against true
    class samples; true class samples give the reference floor of each metric;
(d) shows the errata counterexample of docs/design.md §5: ``v_c = (2, 1)``, ``v_u = (1, 0)``,
    ``w = 2``, true ``v* = (3, 2)``: plain CFG is exact, CFG* is not.

Everything is composed from library calls (``sampling.sample``, ``metrics``, ``guidance``);
the experiment holds no formula of its own.  Outputs, under ``--out`` (default
``runs/exact_guidance`` in the current directory; the committed gallery is written by
``python -m experiments.figures`` only): ``exact_guidance.json`` (config, per-step bias
arrays, checks, metrics; non-finite numbers are written as ``null``) and the figures
``bias.{png,pdf}``, ``samples.{png,pdf}``, ``metrics.{png,pdf}``, ``errata.{png,pdf}``.

    python -m experiments.exact_guidance                # defaults, well under a minute on 2 CPU cores
    python -m experiments.exact_guidance --quick --out /tmp/eg   # tiny settings (tests)
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import sys
import time

from experiments._common import (TOY_SCALE, TOY_ZERO_INIT_STEPS, OneLineErrorParser, default_out, make_rules,
                                 prepare_output_dir, start_study)

#: Defaults of the full run; ``--quick`` replaces those in QUICK unless given explicitly.
DEFAULTS = {
    "out": default_out("exact_guidance"),
    "scale": TOY_SCALE,
    "steps": 32,
    "n": 4096,
    "seed": 0,
    "label": 0,
    "solver": "euler",
    "zero_init_steps": TOY_ZERO_INIT_STEPS,
    "bins": 64,
    "bandwidth": 1.0,
    "extent": None,
    "dtype": "float64",
    "res": 160,
}
QUICK = {"steps": 8, "n": 256, "bins": 24, "res": 48}

#: The guidance kinds compared (:data:`guidance.KINDS`; the JSON's per-rule keys), in table order.
RULES = ("conditional", "cfg", "cfg-star", "zero-init", "cfg-zero-star")

#: The mixture: ``mixtures.class_conditional_2d(**MIXTURE)`` (its classes are ``0 .. num_classes − 1``).
MIXTURE = {"num_classes": 3}

#: Errata counterexample of docs/design.md §5.
ERRATA = {"v_cond": (2.0, 1.0), "v_uncond": (1.0, 0.0), "scale": 2.0, "v_true": (3.0, 2.0)}

#: Relative tolerance of the first-step closed-form check, per dtype.
CHECK_RTOL = {"float64": 1e-9, "float32": 1e-4}

#: Most points drawn per scatter panel (the metrics always use every sample).
MAX_SCATTER = 2500


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and validate every argument, then create ``--out`` and prove it writable: a user error exits
    with status 2 and one line on stderr, before any import of JAX or any work."""
    p = OneLineErrorParser(
        prog="python -m experiments.exact_guidance",
        description=(
            "Exact guidance bias and sample quality of CFG, CFG*, zero-init CFG and CFG-Zero* "
            "(and the conditional-only baseline) on the exact 2-D class-conditional mixture."
        ),
    )
    p.add_argument("--out", default=None, help=f"output folder (default {DEFAULTS['out']})")
    p.add_argument("--scale", type=float, default=None, help=f"guidance scale w (default {DEFAULTS['scale']})")
    p.add_argument("--steps", type=int, default=None, help=f"solver steps (default {DEFAULTS['steps']}; quick {QUICK['steps']})")
    p.add_argument("--n", type=int, default=None, help=f"samples per rule (default {DEFAULTS['n']}; quick {QUICK['n']})")
    p.add_argument("--seed", type=int, default=None, help=f"PRNG seed (default {DEFAULTS['seed']})")
    p.add_argument("--label", type=int, default=None,
                   help=f"class to guide towards, 0..{MIXTURE['num_classes'] - 1} (default {DEFAULTS['label']})")
    p.add_argument("--solver", choices=("euler", "heun"), default=None, help=f"ODE solver (default {DEFAULTS['solver']})")
    p.add_argument("--zero-init-steps", type=int, default=None,
                   help=f"zero-init steps K: solver steps i < K use a zero velocity (default "
                        f"{DEFAULTS['zero_init_steps']}); the official CFG-Zero* repository's zero_steps is K − 1")
    p.add_argument("--bins", type=int, default=None, help=f"JSD grid cells per axis (default {DEFAULTS['bins']}; quick {QUICK['bins']})")
    p.add_argument("--bandwidth", type=float, default=None, help=f"MMD Gaussian-kernel bandwidth h (default {DEFAULTS['bandwidth']})")
    p.add_argument(
        "--extent", type=float, default=None,
        help="half-width L of the square JSD grid [-L, L]^2 (default: the mixture's means ± 4 std, rounded up)",
    )
    p.add_argument("--dtype", choices=("float64", "float32"), default=None, help=f"JAX float precision (default {DEFAULTS['dtype']})")
    p.add_argument("--res", type=int, default=None, help=f"density-image resolution (default {DEFAULTS['res']}; quick {QUICK['res']})")
    p.add_argument("--quick", action="store_true", help=f"tiny settings for tests: {QUICK}")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    for name, default in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, QUICK.get(name, default) if args.quick else default)
    for name, least in (("steps", 1), ("n", 2), ("bins", 2), ("res", 2)):
        if getattr(args, name) < least:
            p.error(f"--{name} must be at least {least}")
    if args.zero_init_steps < 0:
        p.error("--zero-init-steps must be non-negative")
    if not 0 <= args.label < MIXTURE["num_classes"]:
        p.error(f"--label must be a class of the mixture, 0..{MIXTURE['num_classes'] - 1}; got {args.label}")
    if not (args.bandwidth > 0 and math.isfinite(args.bandwidth)):
        p.error("--bandwidth must be positive")
    if args.extent is not None and not args.extent > 0:
        p.error("--extent must be positive")
    if not math.isfinite(args.scale):
        p.error("--scale must be finite")
    if args.extent is not None and not math.isfinite(args.extent):
        p.error("--extent must be finite")
    prepare_output_dir(p, args.out)
    return args


def rule_label(key: str, rule) -> str:
    from cfgzero_theory.guidance import describe

    return "conditional only (CFG w=1)" if key == "conditional" else describe(rule)


def _floats(a) -> list:
    import numpy as np

    return np.asarray(a, dtype=np.float64).tolist()


def sample_scores(mixture, samples, reference, label, grid, bins, bandwidth) -> dict:
    """Every exact metric of one sample set ``(n, 2)`` against class ``label``.

    JSD on the ``bins × bins`` grid ``[grid[0], grid[1]]²``, mean NLL, MMD² to the exact class
    mixture and mode-coverage total variation are :func:`analysis.sample_quality`'s; added
    here, what it does not report: the share of samples on the JSD grid, MMD² against the true
    class samples ``reference`` (bandwidth ``bandwidth``) and the mode-coverage shares.
    """
    import numpy as np

    from cfgzero_theory import analysis, metrics

    lo, hi = grid
    quality = analysis.sample_quality(mixture, samples, label, bandwidth=bandwidth, bins=bins,
                                      grid=(np.full(2, lo), np.full(2, hi)))
    coverage = metrics.mode_coverage(mixture, samples, label)
    return {
        "jsd": float(quality["jsd"]),
        "fraction_on_grid": float(metrics.histogram_on_grid(samples, lo, hi, bins)[1]),
        "mean_nll": float(quality["nll"]),
        "mmd2_vs_samples": float(metrics.mmd_rbf(samples, reference, bandwidth)),
        "mmd2_vs_exact": float(quality["mmd"]),
        "mode_coverage": {
            "shares": _floats(coverage.shares),
            "weights": _floats(coverage.weights),
            "total_variation": float(quality["mode_tv"]),
            "off_class": float(coverage.off_class),
            "unassigned": float(coverage.unassigned),
        },
    }


def run(args) -> dict:
    """Compute everything (no plotting); returns the JSON-ready result plus raw arrays under ``_raw``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import cfgzero_theory
    from cfgzero_theory import GaussianMixture, guidance, metrics, mixtures, sampling
    from experiments._common import progress

    mixture = mixtures.class_conditional_2d(**MIXTURE)
    label = mixture.check_label(args.label)
    extent = args.extent
    if extent is None:
        reach = np.abs(np.asarray(mixture.means)).max() + 4 * np.sqrt(np.asarray(mixture.eigvals).max())
        extent = float(math.ceil(reach))
    grid = (-extent, extent)

    key = jax.random.PRNGKey(args.seed)
    key_noise, key_ref, key_true = jax.random.split(key, 3)
    x0 = jax.random.normal(key_noise, (args.n, mixture.dim), mixture.dtype)
    reference = mixture.sample(key_ref, args.n, label)  # MMD reference set
    true_samples = mixture.sample(key_true, args.n, label)  # the "exact sampler" row
    times = sampling.time_grid(args.steps, dtype=mixture.dtype)
    rules = make_rules(RULES, args.scale, args.zero_init_steps)

    results, raw = {}, {"samples": {}, "bias": {}}
    first_step_guided = {}
    for name in progress(rules, not args.no_progress, "sampling and bias along the trajectories", unit="rule"):
        rule = rules[name]
        out = sampling.sample(
            GaussianMixture.velocity, mixture, x0, times, label, rule, solver=args.solver,
            return_trajectory=True,
        )
        bias = metrics.guidance_bias_along_trajectory(mixture, out.trajectory, times, label, rule)  # (N, B)
        recorded = jnp.linalg.norm(out.guided - out.v_cond, axis=-1)  # the sampler's own velocities
        first_step_guided[name] = out.guided[0]
        raw["samples"][name] = np.asarray(out.samples)
        raw["bias"][name] = np.asarray(bias)
        results[name] = {
            "name": rule_label(name, rule),
            "bias": {
                "mean": _floats(jnp.mean(bias, axis=1)),
                "std": _floats(jnp.std(bias, axis=1)),
                "median": _floats(jnp.median(bias, axis=1)),
                "q10": _floats(jnp.quantile(bias, 0.1, axis=1)),
                "q90": _floats(jnp.quantile(bias, 0.9, axis=1)),
            },
            "first_step_bias_mean": float(jnp.mean(bias[0])),
            "mean_bias_over_steps": float(jnp.mean(bias)),
            "bias_recorded_vs_recomputed_max_abs": float(jnp.max(jnp.abs(recorded - bias))),
        }
        if name == "cfg":
            cfg_first_vector = out.guided[0] - out.v_cond[0]

    raw["samples"]["true"] = np.asarray(true_samples)
    scores = {name: sample_scores(mixture, raw["samples"][name], reference, label, grid, args.bins, args.bandwidth)
              for name in progress(raw["samples"], not args.no_progress, "scoring the samples", unit="set")}
    for name in rules:
        results[name]["metrics"] = scores[name]

    # (a) first step: exact CFG's bias is (w − 1)(μ_c − μ̄) for every sample.
    closed = metrics.cfg_first_step_bias(mixture, label, args.scale)
    closed_norm = float(jnp.linalg.norm(closed))
    tol = CHECK_RTOL[args.dtype] * (1.0 + closed_norm)
    vector_dev = float(jnp.max(jnp.abs(cfg_first_vector - closed)))
    norm_dev = float(jnp.max(jnp.abs(raw["bias"]["cfg"][0] - closed_norm)))
    zero_rules = [k for k in guidance.ZERO_INIT_KINDS if args.zero_init_steps >= 1]
    first_step = {
        "closed_form": "(w - 1) * (mu_c - mu_bar)",
        "closed_form_vector": _floats(closed),
        "closed_form_norm": closed_norm,
        "class_mean": _floats(mixture.mean(label)),
        "mixture_mean": _floats(mixture.mean(None)),
        "measured_cfg_bias_mean": results["cfg"]["first_step_bias_mean"],
        "max_abs_vector_deviation": vector_dev,
        "max_abs_norm_deviation": norm_dev,
        "tolerance": tol,
        "passed": bool(vector_dev <= tol and norm_dev <= tol),
        "zero_init_first_step_exactly_zero": {k: bool(jnp.all(first_step_guided[k] == 0)) for k in zero_rules},
        "conditional_bias_max": float(np.max(raw["bias"]["conditional"])),
    }

    # (d) the errata counterexample, through the library's rules.
    v_c = jnp.asarray([ERRATA["v_cond"]], mixture.dtype)
    v_u = jnp.asarray([ERRATA["v_uncond"]], mixture.dtype)
    v_true = jnp.asarray(ERRATA["v_true"], mixture.dtype)
    w_err = ERRATA["scale"]
    guided = {kind: rule(v_c, v_u)[0] for kind, rule in make_rules(("cfg", "cfg-star"), w_err, 0).items()}
    s_star = guidance.optimized_scale(v_c, v_u)[0, 0]
    errata = {
        **{k: list(v) if isinstance(v, tuple) else v for k, v in ERRATA.items()},
        "s_star": float(s_star),
        "guided": {kind: _floats(v) for kind, v in guided.items()},
        "error": {kind: float(jnp.linalg.norm(v - v_true)) for kind, v in guided.items()},
    }

    config = {k: getattr(args, k) for k in DEFAULTS} | {"quick": args.quick, "extent": extent}
    config |= {
        "grid": list(grid),
        "mixture": f"mixtures.class_conditional_2d(num_classes={MIXTURE['num_classes']})",
        "mixture_params": {
            "weights": _floats(mixture.weights),
            "means": _floats(mixture.means),
            "covs": _floats(mixture.covs),
            "labels": np.asarray(mixture.labels).tolist(),
        },
        "rules": {k: rule_label(k, r) for k, r in rules.items()},
        "cfgzero_theory_version": cfgzero_theory.__version__,
        "jax_version": jax.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "jax_backend": jax.default_backend(),
        "argv": sys.argv[1:],
    }
    return {
        "config": config,
        "times": _floats(times),
        "rules": results,
        "true_samples": {"name": "true class samples (exact sampler)", "metrics": scores["true"]},
        "first_step_check": first_step,
        "errata": errata,
        "_raw": raw,
        "_mixture": mixture,
    }


# ----------------------------------------------------------------------------- figures
def plot_bias(result, path):
    import matplotlib.pyplot as plt
    import numpy as np

    from cfgzero_theory import plotting

    cfg = result["config"]
    times = np.asarray(result["times"])[:-1]
    rules = make_rules(RULES, cfg["scale"], cfg["zero_init_steps"])
    n_first = min(6, len(times))
    fig, (ax_t, ax_i) = plt.subplots(
        1, 2, figsize=(10, 4.0), gridspec_kw={"width_ratios": [1.6, 1]}, layout="constrained"
    )
    for key, rule in rules.items():
        r = result["rules"][key]
        mean = np.asarray(r["bias"]["mean"])
        st = plotting.rule_style(rule)
        ax_t.plot(times, mean, label=r["name"], color=st["color"], linestyle=st["linestyle"], marker=st["marker"], markersize=3)
        ax_t.fill_between(times, r["bias"]["q10"], r["bias"]["q90"], color=st["color"], alpha=0.10, linewidth=0)
        ax_i.plot(np.arange(n_first), mean[:n_first], **st)
    check = result["first_step_check"]
    ax_i.plot(
        [0], [check["closed_form_norm"]], linestyle="none", marker="o", markersize=11, markerfacecolor="none",
        markeredgecolor="black", label=f"exact CFG at t=0, closed form |w−1|·‖μ_c−μ̄‖ = {check['closed_form_norm']:.3g}",
    )
    ax_t.set_xlabel("time t (0 = noise, 1 = data)")
    ax_t.set_ylabel("guidance bias ‖ṽ* − u_c‖ (mean over samples)")
    ax_t.set_title("all steps (band: 10–90% of samples)")
    fig.suptitle(
        f"Exact guidance bias ‖ṽ* − u_c‖ along each rule's own trajectory: class {cfg['label']}, "
        f"w={cfg['scale']:g}, {cfg['steps']} {cfg['solver']} steps, n={cfg['n']}"
    )
    ax_t.legend(loc="upper right")
    ax_i.set_xlabel("solver step i")
    ax_i.set_ylabel("mean ‖ṽ* − u_c‖")
    ax_i.set_xticks(np.arange(n_first))
    ax_i.set_title("first steps (step 0 is t = 0)")
    ring = ax_i.get_legend_handles_labels()
    ax_i.legend(ring[0][-1:], ring[1][-1:], loc="upper right", fontsize=7.5)
    ax_t.set_ylim(bottom=0)
    ax_i.set_ylim(bottom=0)
    written = plotting.save(fig, path)
    plt.close(fig)
    return written


def plot_samples(result, path):
    import matplotlib.pyplot as plt
    import numpy as np

    from cfgzero_theory import metrics, plotting

    cfg, mixture, raw = result["config"], result["_mixture"], result["_raw"]
    label = cfg["label"]
    rules = make_rules(RULES, cfg["scale"], cfg["zero_init_steps"])
    panels = [(k, rules[k], result["rules"][k]["name"], result["rules"][k]["metrics"]) for k in rules]
    panels.append(("true", "exact", result["true_samples"]["name"], result["true_samples"]["metrics"]))
    ncols = 3
    nrows = math.ceil(len(panels) / ncols)
    # View: the class's components ± 4 std (rounded up to 0.5), centred on the class mean.
    in_class = np.asarray(mixture.labels) == label
    centre = np.asarray(mixture.mean(label))
    reach = np.abs(np.asarray(mixture.means)[in_class] - centre).max() + 4 * np.sqrt(np.asarray(mixture.eigvals).max())
    half = math.ceil(2 * reach) / 2
    view_lo, view_hi = centre - half, centre + half
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 3.55 * nrows), sharex=True, sharey=True, layout="constrained")
    log_density = lambda x: mixture.log_prob(x, label)  # noqa: E731
    for ax, (key, rule, name, m) in zip(axes.ravel(), panels):
        plotting.density_image(ax, log_density, view_lo, view_hi, cfg["res"])
        pts = raw["samples"][key]
        _, in_view = metrics.histogram_on_grid(pts, view_lo, view_hi, 1)
        pts = pts[:MAX_SCATTER]
        ax.scatter(pts[:, 0], pts[:, 1], s=2.5, alpha=0.45, color=plotting.rule_color(rule), linewidths=0, rasterized=True)
        outside = "" if float(in_view) == 1.0 else f"  ({100 * (1 - float(in_view)):.1f}% off view)"
        ax.set_title(
            f"{name}\nJSD {m['jsd']:.3f}  NLL {m['mean_nll']:.2f}  mode TV {m['mode_coverage']['total_variation']:.2f}{outside}",
            fontsize=8.5,
        )
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("x₁")
    for ax in axes[:, 0]:
        ax.set_ylabel("x₂")
    fig.suptitle(
        f"Final samples over the true density of class {label} (grey), exact fields, w={cfg['scale']:g}, "
        f"{cfg['steps']} {cfg['solver']} steps, n={cfg['n']} ({min(cfg['n'], MAX_SCATTER)} drawn)",
        fontsize=9.5,
    )
    written = plotting.save(fig, path)
    plt.close(fig)
    return written


def plot_metrics(result, path):
    import matplotlib.pyplot as plt
    import numpy as np

    from cfgzero_theory import plotting

    cfg = result["config"]
    rules = make_rules(RULES, cfg["scale"], cfg["zero_init_steps"])
    keys = list(rules)
    names = [result["rules"][k]["name"] for k in keys]
    colors = [plotting.rule_color(rules[k]) for k in keys]
    true_m = result["true_samples"]["metrics"]
    specs = [
        ("jsd", f"JSD to density (nats, {cfg['bins']}² grid)", lambda m: m["jsd"]),
        ("mean_nll", "mean NLL under class density", lambda m: m["mean_nll"]),
        ("mmd2_vs_samples", f"MMD² vs true samples (h={cfg['bandwidth']:g})", lambda m: m["mmd2_vs_samples"]),
        ("mode_tv", "mode-coverage total variation", lambda m: m["mode_coverage"]["total_variation"]),
    ]
    fig, axes = plt.subplots(1, len(specs), figsize=(12, 3.3), sharey=True)
    y = np.arange(len(keys))
    for ax, (_, title, get) in zip(axes, specs):
        vals = [get(result["rules"][k]["metrics"]) for k in keys]
        ax.barh(y, vals, color=colors)
        ax.axvline(get(true_m), color=plotting.rule_color("exact"), linestyle="--", linewidth=1.2, label="true samples")
        ax.set_title(title)
        ax.set_xlabel("value (lower is better)" if _ != "mean_nll" else "nats (true samples ≈ entropy)")
        ax.grid(axis="y", visible=False)
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    axes[-1].legend(loc="lower right")
    fig.suptitle(f"Final-sample quality against the true class {cfg['label']} (exact fields, w={cfg['scale']:g}, n={cfg['n']})")
    fig.tight_layout()
    written = plotting.save(fig, path)
    plt.close(fig)
    return written


def plot_errata(result, path):
    import matplotlib.pyplot as plt
    import numpy as np

    from cfgzero_theory import plotting

    e = result["errata"]
    cfg, star = e["guided"]["cfg"], e["guided"]["cfg-star"]
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    arrows = [
        ("v_u (unconditional)", e["v_uncond"], plotting.rule_color("unconditional"), 2.0, "-"),
        ("v_c (conditional)", e["v_cond"], plotting.rule_color("conditional"), 2.0, "-"),
        (f"s*·v_u  (s* = {e['s_star']:g})", list(e["s_star"] * np.asarray(e["v_uncond"])), plotting.OKABE_ITO["grey"], 1.5, "--"),
        ("true v*", e["v_true"], plotting.rule_color("exact"), 5.0, "-"),
        (f"CFG (w={e['scale']:g}): error {e['error']['cfg']:.3g}", cfg, plotting.rule_color("cfg"), 2.0, "--"),
        (f"CFG* (w={e['scale']:g}): error {e['error']['cfg-star']:.3g}", star, plotting.rule_color("cfg-star"), 2.0, "-"),
    ]
    for name, vec, color, width, ls in arrows:
        ax.annotate(
            "", xy=vec, xytext=(0, 0),
            arrowprops=dict(arrowstyle="-|>", color=color, lw=width, linestyle=ls, shrinkA=0, shrinkB=0, mutation_scale=14),
        )
        ax.plot([], [], color=color, linewidth=width, linestyle=ls, label=f"{name}  = ({vec[0]:g}, {vec[1]:g})")
    ax.plot(*zip(star, e["v_true"]), color=plotting.rule_color("cfg-star"), linestyle=":", linewidth=1)
    mid = 0.5 * (np.asarray(star) + np.asarray(e["v_true"]))
    ax.annotate(f"‖CFG* − v*‖ = {e['error']['cfg-star']:.3g}", xy=mid, xytext=(mid[0], mid[1] + 0.35), ha="center",
                fontsize=8, color=plotting.rule_color("cfg-star"))
    ax.text(3.55, -0.2, "s* = ⟨v_c, v_u⟩ / (‖v_u‖² + 1e-8)", ha="right", fontsize=7.5, color=plotting.OKABE_ITO["grey"])
    ax.set_xlim(-0.3, 3.6)
    ax.set_ylim(-0.3, 3.2)
    ax.set_aspect("equal")
    ax.set_xlabel("component 1")
    ax.set_ylabel("component 2")
    ax.set_title("Errata (docs/design.md §5): the s* bound does not guarantee a lower error\n"
                 "plain CFG hits v* exactly, CFG* misses it", fontsize=9.5)
    ax.legend(loc="upper left", fontsize=7.5)
    fig.tight_layout()
    written = plotting.save(fig, path)
    plt.close(fig)
    return written


# ----------------------------------------------------------------------------- report
def format_table(result) -> str:
    rows = [(r["name"], r["first_step_bias_mean"], r["mean_bias_over_steps"], r["metrics"]) for r in result["rules"].values()]
    rows.append((result["true_samples"]["name"], float("nan"), float("nan"), result["true_samples"]["metrics"]))
    head = f"{'rule':<36} {'bias@t0':>8} {'bias avg':>8} {'JSD':>7} {'NLL':>7} {'MMD²smp':>8} {'MMD²ex':>8} {'modeTV':>7} {'off-cls':>7} {'on-grid':>7}"
    lines = [head, "-" * len(head)]
    for name, b0, bavg, m in rows:
        fmt = lambda v: "—" if math.isnan(v) else f"{v:.3f}"  # noqa: E731
        lines.append(
            f"{name:<36} {fmt(b0):>8} {fmt(bavg):>8} {m['jsd']:>7.4f} {m['mean_nll']:>7.3f} "
            f"{m['mmd2_vs_samples']:>8.4f} {m['mmd2_vs_exact']:>8.4f} {m['mode_coverage']['total_variation']:>7.3f} "
            f"{m['mode_coverage']['off_class']:>7.3f} {m['fraction_on_grid']:>7.3f}"
        )
    return "\n".join(lines)


def plan(args) -> str:
    """The first line of a run: what will be computed, and where the outputs go."""
    return (f"exact_guidance: 5 rules on the exact class_conditional_2d, class {args.label}, w = {args.scale:g}, "
            f"{args.steps} {args.solver} steps, n = {args.n}, {args.dtype}; writing {os.path.abspath(args.out)}/")


def main(argv=None) -> dict:
    start, args = start_study(parse_args, plan, argv)
    import jax

    jax.config.update("jax_enable_x64", args.dtype == "float64")

    from experiments._common import draw_figures, outputs_line, retract_result, run_or_exit, write_json

    result = run_or_exit(run, args)
    compute_s = time.perf_counter() - start
    drawings = {"bias": plot_bias, "samples": plot_samples, "metrics": plot_metrics, "errata": plot_errata}
    path = os.path.join(args.out, "exact_guidance.json")
    retract_result(path)
    figures = draw_figures({name: functools.partial(draw, result) for name, draw in drawings.items()}, args.out,
                           not args.no_progress)
    result = {k: v for k, v in result.items() if not k.startswith("_")}
    result["figures"] = [os.path.basename(f) for f in figures]
    result["runtime_s"] = {"compute": compute_s, "total": time.perf_counter() - start}
    write_json(path, result)

    check = result["first_step_check"]
    print(
        f"first step, exact CFG: closed form (w-1)(mu_c - mu_bar) = {check['closed_form_vector']} "
        f"(norm {check['closed_form_norm']:.6g}); measured mean bias {check['measured_cfg_bias_mean']:.6g}; "
        f"max deviation {max(check['max_abs_vector_deviation'], check['max_abs_norm_deviation']):.2e} "
        f"<= {check['tolerance']:.1e}: {'OK' if check['passed'] else 'FAILED'}"
    )
    for k, ok in check["zero_init_first_step_exactly_zero"].items():
        print(f"first step of {result['rules'][k]['name']} exactly zero: {ok}")
    e = result["errata"]
    print(f"errata: s*={e['s_star']:g}, CFG={e['guided']['cfg']} (error {e['error']['cfg']:g}), "
          f"CFG*={e['guided']['cfg-star']} (error {e['error']['cfg-star']:g})")
    print(format_table(result))
    print(outputs_line(args.out, [path, *figures]) + f"; {result['runtime_s']['total']:.1f} s")
    if not check["passed"]:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
