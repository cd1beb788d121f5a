"""A live guidance widget for lectures: move ``w``, ``K`` and the training epoch, watch the samples.

:func:`guidance_widget` returns an ``ipywidgets`` container with

* a rule selector — ``CFG``, ``CFG + zero-init``, ``CFG*`` (optimized scale) and
  ``CFG-Zero*`` (optimized scale + zero-init): the kinds :data:`WIDGET_KINDS`, built by
  :func:`cfgzero_theory.guidance.make_rule`;
* sliders for the guidance scale ``w``, the number ``K`` of zero-init steps (active for the
  two zero-init rules) and — when ``networks`` are given — the training epoch (and the seed,
  when the networks hold several);
* a figure, re-rendered on every change: on the left the final samples and a few
  trajectories over the exact class density ``p_1(x | c)``; on the right the errors along
  the sampler's own path (the model's guided velocity against the exact guided field, the
  zero velocity's error ``‖ṽ*‖``, the guidance bias ``‖ṽ* − u_c‖``; zero-init steps shaded);
  in the heading the first-step error against the zero baseline (the paper's Fig. 3 right:
  step 0 of the path errors, which is exactly what
  :func:`cfgzero_theory.analysis.first_step_errors` computes) and exact sample metrics of the final
  samples (NLL under the true class density, JSD on a grid, share inside the class's 95 %
  highest-density region; :mod:`cfgzero_theory.metrics`).

Everything is computed by library calls: :func:`cfgzero_theory.analysis.per_step_errors`
(which runs :func:`cfgzero_theory.sampling.sample` with the exact field
``GaussianMixture.velocity`` or the selected network ``models.network_velocity``, and
compares every step with the exact guided field), :func:`cfgzero_theory.sampling.sample` for
the drawn trajectories and :mod:`cfgzero_theory.metrics`.  Rules are pytrees whose scale and ``K``
are leaves, and the velocity function, solver and shapes stay fixed, so each rule *kind*
compiles once (the first render of each rule takes seconds); moving a slider only re-runs
compiled programs and redraws (about half a second on two shared CPU cores, most of it
drawing the figure).

The figure is a plain :class:`matplotlib.figure.Figure` rendered to PNG into an
``ipywidgets.Image``, so it works in any Jupyter frontend, whatever the matplotlib backend,
and never touches pyplot.  ``ipywidgets`` is an optional dependency
(``pip install -e ".[demo]"``); it is imported when :func:`guidance_widget` is called.

Conventions (docs/design.md §2 and §3): theory time (``t = 0`` noise, ``t = 1`` data), ``w = 1`` is
conditional only, zero-init zeroes solver steps ``i < K``.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cfgzero_theory import analysis, checkpoint, metrics, plotting
from cfgzero_theory.animation import check_view, default_view
from cfgzero_theory.guidance import KIND_LABELS, ZERO_INIT_KINDS, describe, make_rule
from cfgzero_theory.mixture import GaussianMixture
from cfgzero_theory.models import Network, network_velocity, select
from cfgzero_theory.sampling import SOLVERS, sample, time_grid
from cfgzero_theory.validation import check_choice, check_int, check_real

__all__ = ["WIDGET_KINDS", "guidance_widget", "networks_from_checkpoints"]

#: The guidance kinds offered by the selector, in order (labels: ``guidance.KIND_LABELS``).
WIDGET_KINDS = ("cfg", "zero-init", "cfg-star", "cfg-zero-star")

#: Probability mass of the highest-density region behind the precision metric.
HDR_MASS = 0.95

_INSTALL_HINT = 'the guidance widget needs ipywidgets: pip install -e ".[demo]"'


# ----------------------------------------------------------------------------- networks
def networks_from_checkpoints(directory, mixture: GaussianMixture | None = None) -> dict[int, Network]:
    """Load every checkpoint of a :func:`cfgzero_theory.training.train` run: ``{epoch: Network}``.

    ``directory`` holds ``epoch_XXXXXX.safetensors`` files written by ``train(out_dir=...)``
    (e.g. ``figures/crossover/quick/checkpoints`` after ``python -m experiments.crossover``).
    The network and training configurations are read from the checkpoints' ``run``
    metadata, the template is rebuilt from :func:`cfgzero_theory.training.initial_state` (shapes
    only, with ``jax.eval_shape``),
    and each file is loaded strictly (:func:`cfgzero_theory.checkpoint.load_pytree`).  The
    networks are stacked over seeds, as in ``TrainResult.networks`` (the EMA parameters when
    the run used an EMA: what the files hold), and all share one module structure.

    With ``mixture``, the run's recorded mixture (weights, means, labels) must match it, so
    the widget compares the networks with the field they were trained on; ``ValueError``
    otherwise.  ``ValueError`` too when the folder holds no checkpoint or checkpoints of
    different runs.
    """
    from cfgzero_theory.models import NetworkConfig
    from cfgzero_theory.training import TrainConfig, initial_state

    directory = os.fspath(directory)
    found = checkpoint.list_checkpoints(directory)
    if not found:
        raise ValueError(f"networks: no checkpoints (epoch_XXXXXX.safetensors) in {directory!r}")
    runs = {checkpoint.read_metadata(path).get("run") for _, path in found}
    if len(runs) != 1 or None in runs:
        raise ValueError(f"networks: the checkpoints in {directory!r} are not all from one training run")
    run = json.loads(runs.pop())
    if mixture is not None:
        recorded = run["mixture"]
        same = (
            np.asarray(recorded["labels"]).shape == np.asarray(mixture.labels).shape
            and np.array_equal(np.asarray(recorded["labels"]), np.asarray(mixture.labels))
            and np.allclose(np.asarray(recorded["means"]), np.asarray(mixture.means), atol=1e-5)
            and np.allclose(np.asarray(recorded["weights"]), np.asarray(mixture.weights), atol=1e-6)
        )
        if not same:
            raise ValueError(f"networks: the checkpoints in {directory!r} were trained on a different mixture")
    net_config = NetworkConfig(**run["network"])
    training = dict(run["training"])
    training["checkpoint_epochs"] = tuple(training["checkpoint_epochs"])
    config = TrainConfig(**training)
    structure = {}

    def initial(keys):  # shapes only (jax.eval_shape): nothing is initialised or compiled
        structure["graphdef"], state = initial_state(net_config, config, keys)
        return state

    state = jax.eval_shape(initial, jax.random.split(jax.random.key(0), config.num_networks))
    graphdef = structure["graphdef"]
    template = {"networks": state.params, "losses": np.zeros((config.epochs, config.num_networks), np.float32)}
    return {epoch: Network(graphdef, checkpoint.load_pytree(path, template)["networks"]) for epoch, path in found}


def _checked_networks(networks, mixture) -> dict[int, Network]:
    if isinstance(networks, (str, os.PathLike)):
        return networks_from_checkpoints(networks, mixture)
    if not isinstance(networks, Mapping) or not networks:
        raise ValueError("networks must be a non-empty mapping epoch -> Network or a checkpoint directory")
    checked = {}
    seeds = set()
    for epoch, net in networks.items():
        epoch = check_int("networks epoch", epoch, minimum=0)
        if not isinstance(net, Network):
            raise ValueError(f"networks[{epoch}] must be a models.Network (stacked over seeds), got {type(net).__name__}")
        seeds.add(analysis.num_seeds(net.state))
        checked[epoch] = net
    if len(seeds) != 1:
        raise ValueError(f"networks: every epoch must hold the same number of seeds, got {sorted(seeds)}")
    return dict(sorted(checked.items()))


# ----------------------------------------------------------------------------- the widget
def guidance_widget(
    mixture: GaussianMixture,
    label: int,
    *,
    networks=None,
    rule: str = "cfg-zero-star",
    scale: float = 4.0,
    zero_init_steps: int = 1,
    epoch: int | None = None,
    max_scale: float = 8.0,
    max_zero_init_steps: int | None = None,
    num_points: int = 1000,
    num_trajectories: int = 12,
    num_steps: int = 25,
    solver: str = "euler",
    seed: int = 0,
    grid=None,
    res: int = 120,
    jsd_bins: int = 40,
):
    """An ``ipywidgets`` container to explore guidance live (see the module docstring).

    Args:
      mixture: the exact 2-D :class:`~cfgzero_theory.GaussianMixture` (background, targets,
        metrics; and the field itself when ``networks`` is ``None``).
      label: the guided class.
      networks: ``None`` (the exact field), a mapping ``epoch → Network`` stacked over seeds
        (``TrainResult.networks``), or a checkpoint directory of a training run on this
        mixture (loaded with :func:`networks_from_checkpoints`).
      rule, scale, zero_init_steps: initial guidance kind (one of :data:`WIDGET_KINDS`), ``w``
        and ``K``.
      epoch: initial epoch (default: the first epoch after 0, where zero usually beats CFG).
      max_scale, max_zero_init_steps: slider ranges (``K`` up to ``min(8, num_steps)`` by
        default).
      num_points: noise points sampled per render (shared by every setting: paired).
      num_trajectories: how many of them have their trajectory drawn.
      num_steps, solver: the sampler (``time_grid(num_steps)``, ``"euler"`` or ``"heun"``).
      seed: seed of the noise points (``jax.random.key(seed)``).
      grid: the view ``(lo, hi)``; default :func:`cfgzero_theory.animation.default_view`.
      res: background image resolution; jsd_bins: cells per axis of the JSD grid
        (:func:`cfgzero_theory.analysis.jsd_grid`).

    Returns:
      An ``ipywidgets.VBox``: the controls, the figure (an ``ipywidgets.Image``) and a status
      line.  For scripts and tests it also carries ``controls`` (a dict of the control
      widgets: ``"rule"``, ``"scale"``, ``"zero_init_steps"``, and ``"epoch"`` / ``"seed"``
      with networks), ``figure`` (the matplotlib figure), ``state`` (a dict with the last
      render's rule, samples, trajectories, first-step errors, per-step errors and metrics)
      and ``render()`` (re-render now).  Setting a control's ``value`` re-renders.

    Raises:
      ImportError: ipywidgets is missing (with the install command).
      ValueError: naming the argument, for a mixture that is not 2-D, an unknown class,
        unknown rule or solver, out-of-range settings or malformed networks.
    """
    try:
        import ipywidgets as widgets
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err

    # ---- validation
    if not isinstance(mixture, GaussianMixture):
        raise ValueError(f"mixture must be a GaussianMixture, got {type(mixture).__name__}")
    if mixture.dim != 2:
        raise ValueError(f"mixture must be 2-D, got dimension {mixture.dim}")
    label = mixture.check_label(check_int("label", label))
    if label is None:
        raise ValueError("label must be a class, not the null label")
    if mixture.is_singular:
        raise ValueError("mixture must have nonsingular covariances (the metrics need a data density)")
    check_choice("rule", rule, WIDGET_KINDS)
    check_choice("solver", solver, SOLVERS)
    num_points = check_int("num_points", num_points, minimum=1)
    num_trajectories = min(check_int("num_trajectories", num_trajectories, minimum=0), num_points)
    num_steps = check_int("num_steps", num_steps, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    res = check_int("res", res, minimum=2)
    jsd_bins = check_int("jsd_bins", jsd_bins, minimum=2)
    if max_zero_init_steps is None:
        max_zero_init_steps = min(8, num_steps)
    max_zero_init_steps = check_int("max_zero_init_steps", max_zero_init_steps, minimum=1, maximum=num_steps)
    max_scale = check_real("max_scale", max_scale, positive=True)
    scale = check_real("scale", scale, minimum=0.0, maximum=max_scale)
    zero_init_steps = check_int("zero_init_steps", zero_init_steps, minimum=0, maximum=max_zero_init_steps)
    if networks is not None:
        networks = _checked_networks(networks, mixture)
        epochs = list(networks)
        if epoch is None:
            epoch = next((e for e in epochs if e > 0), epochs[0])
        epoch = check_int("epoch", epoch, minimum=0)
        if epoch not in networks:
            raise ValueError(f"epoch must be one of the networks' epochs {epochs}, got {epoch!r}")
        num_seeds = analysis.num_seeds(networks[epochs[0]].state)
    elif epoch is not None:
        raise ValueError("epoch needs networks")
    if grid is None:
        lo, hi = default_view(mixture, label)
    else:
        lo, hi = check_view(grid)

    # ---- fixed inputs and the truth, computed once
    times = time_grid(num_steps)
    x0 = jax.random.normal(jax.random.key(seed), (num_points, 2), mixture.dtype)
    x0_traj = x0[:num_trajectories]
    # exact class samples: the 95% HDR threshold (as metrics.hdr_log_density_threshold) and the NLL floor
    reference_log_p = mixture.log_prob(mixture.sample(jax.random.key(seed + 1), metrics.HDR_NUM_REFERENCE, label), label)
    threshold = jnp.quantile(reference_log_p, 1.0 - HDR_MASS)
    nll_floor = float(-jnp.mean(reference_log_p))
    jsd_lo, jsd_hi = analysis.jsd_grid(mixture)
    exact_stack = jax.tree_util.tree_map(lambda a: a[None], mixture)
    step_axis = np.arange(1, num_steps + 1)

    # ---- controls
    style = {"description_width": "initial"}
    controls = {
        "rule": widgets.ToggleButtons(options=[(KIND_LABELS[k], k) for k in WIDGET_KINDS], value=rule,
                                      description="rule", style=style),
        "scale": widgets.FloatSlider(value=float(scale), min=0.0, max=float(max_scale), step=0.25,
                                     description="guidance scale w", continuous_update=False, style=style),
        "zero_init_steps": widgets.IntSlider(value=int(zero_init_steps), min=0, max=int(max_zero_init_steps),
                                             description="zero-init steps K", continuous_update=False, style=style),
    }
    if networks is not None:
        controls["epoch"] = widgets.SelectionSlider(options=epochs, value=epoch, description="training epoch",
                                                    continuous_update=False, style=style)
        if num_seeds > 1:
            controls["seed"] = widgets.IntSlider(value=0, min=0, max=num_seeds - 1, description="network seed",
                                                 continuous_update=False, style=style)
    image = widgets.Image(format="png")
    status = widgets.HTML()

    # ---- the figure (built once; renders update its artists)
    from matplotlib import rc_context
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    with plotting.style(), rc_context({"savefig.bbox": "standard"}):
        fig = Figure(figsize=(10.0, 5.0), dpi=100)
        fig.subplots_adjust(left=0.03, right=0.98, bottom=0.11, top=0.80, wspace=0.18)
        grid_spec = fig.add_gridspec(1, 2, width_ratios=(1.0, 1.15))
        ax_samples = fig.add_subplot(grid_spec[0])
        ax_steps = fig.add_subplot(grid_spec[1])
        plotting.density_image(ax_samples, lambda x: mixture.log_prob(x, label), lo, hi, res)
        ax_samples.set_xticks([])
        ax_samples.set_yticks([])
        for spine in ax_samples.spines.values():
            spine.set_visible(True)
            spine.set_color(plotting.OKABE_ITO["grey"])
        ax_samples.set_title(f"final samples and {num_trajectories} trajectories over exact p_1(x | c = {label})",
                             fontsize=8.5)
        trajectories = LineCollection([], linewidths=1.0, zorder=2)
        ax_samples.add_collection(trajectories)
        starts = ax_samples.scatter([], [], s=10, color="black", marker="o", zorder=4, label="noise x0")
        dots = ax_samples.scatter([], [], s=4, zorder=3, linewidths=0)
        outside = ax_samples.text(0.02, 0.02, "", transform=ax_samples.transAxes, fontsize=8)
        line_model, = ax_steps.plot(step_axis, np.zeros(len(step_axis)), label="model vs exact guided field ‖ṽθ − ṽ*‖")
        line_zero, = ax_steps.plot(step_axis, np.zeros(len(step_axis)), color=plotting.OKABE_ITO["grey"],
                                   label="zero velocity ‖ṽ*‖")
        line_bias, = ax_steps.plot(step_axis, np.zeros(len(step_axis)), color="black", linestyle=":",
                                   label="guidance bias ‖ṽ* − u_c‖")
        ax_steps.set_xlabel("solver step")
        ax_steps.set_ylabel("mean error along the sampler's path")
        ax_steps.set_title("errors at every step (zero-init steps shaded)", fontsize=8.5)
        ax_steps.set_xlim(0.5, num_steps + 0.5)
        heading = fig.suptitle("", fontsize=9, y=0.985, va="top")
    spans = []
    state: dict = {}

    def current():
        name = controls["rule"].value
        k = int(controls["zero_init_steps"].value) if name in ZERO_INIT_KINDS else None
        chosen = make_rule(name, float(controls["scale"].value), k)
        if networks is None:
            return name, chosen, GaussianMixture.velocity, mixture, exact_stack, "exact field"
        e = controls["epoch"].value
        s = controls["seed"].value if "seed" in controls else 0
        stack = networks[e]
        one_seed = Network(stack.graphdef, jax.tree_util.tree_map(lambda a: a[s : s + 1], stack.state))
        return name, chosen, network_velocity, select(stack, s), one_seed, f"network, epoch {e}, seed {s}"

    def render():
        started = time.perf_counter()
        name, chosen, velocity_fn, params, stacked, field = current()
        controls["zero_init_steps"].disabled = name not in ZERO_INIT_KINDS
        steps = analysis.per_step_errors(velocity_fn, stacked, mixture, label, chosen, x0, times, solver)
        paths = sample(velocity_fn, params, x0_traj, times, label, chosen, solver=solver, return_trajectory=True)
        samples = np.asarray(steps.samples[0], np.float64)
        finite = samples[np.all(np.isfinite(samples), axis=1)]
        quality = {
            "nll": float(metrics.mean_nll(mixture, samples, label)),
            "nll_floor": nll_floor,
            "jsd": float(metrics.jsd_to_density_on_grid(samples, lambda x: mixture.log_prob(x, label),
                                                        jsd_lo, jsd_hi, jsd_bins)),
            "precision": float(metrics.hdr_precision(mixture, samples, label, threshold=threshold)),
        }
        per_step = {
            "learning_error": np.asarray(steps.learning_error[0]),
            "zero_error": np.asarray(steps.zero_error[0]),
            "guidance_bias": np.asarray(steps.guidance_bias[0]),
            "zeroed": np.asarray(steps.zeroed),
        }
        # step 0 (x = x0, t = 0, the rule without its zero-init) is analysis.first_step_errors
        first_step = {key: float(per_step[key][0]) for key in ("learning_error", "zero_error", "guidance_bias")}
        traj = np.asarray(paths.trajectory, np.float64)  # (N + 1, n, 2)

        with plotting.style(), rc_context({"savefig.bbox": "standard"}):
            color = plotting.rule_color(chosen)
            trajectories.set_segments([traj[:, k] for k in range(traj.shape[1])])
            trajectories.set_color(color)
            trajectories.set_alpha(0.85)
            starts.set_offsets(traj[0] if traj.shape[1] else np.zeros((0, 2)))
            dots.set_offsets(samples)
            dots.set_color(color)
            out_of_view = int(np.sum(np.any((finite < lo) | (finite > hi), axis=1))) + len(samples) - len(finite)
            outside.set_text(f"{out_of_view} of {len(samples)} samples outside the view" if out_of_view else "")
            line_model.set_ydata(per_step["learning_error"])
            line_model.set_color(color)
            line_zero.set_ydata(per_step["zero_error"])
            line_bias.set_ydata(per_step["guidance_bias"])
            for span in spans:
                span.remove()
            spans.clear()
            k = int(per_step["zeroed"].sum())
            if k:
                spans.append(ax_steps.axvspan(0.5, k + 0.5, color=plotting.OKABE_ITO["orange"], alpha=0.18, zorder=0))
            top = max(np.nanmax(np.concatenate([per_step[n] for n in ("learning_error", "zero_error", "guidance_bias")])), 1e-6)
            ax_steps.set_ylim(0.0, 1.08 * top if np.isfinite(top) else 1.0)
            ax_steps.legend(loc="best", fontsize=7.5)
            if networks is None:
                first_line = (f"first step (t = 0): exact guided velocity ‖ṽ*‖ = {first_step['zero_error']:.2f}, "
                              f"guidance bias ‖ṽ* − u_c‖ = {first_step['guidance_bias']:.2f} (exact field: no learning error)")
            else:
                winner = "zero beats the model" if first_step["learning_error"] > first_step["zero_error"] else "the model beats zero"
                first_line = (f"first step (t = 0): ‖ṽθ − ṽ*‖ = {first_step['learning_error']:.2f} vs "
                              f"zero velocity ‖ṽ*‖ = {first_step['zero_error']:.2f} → {winner}")
            if per_step["zeroed"][0]:
                first_line += f"; K = {k} zeroes it"
            heading.set_text(
                f"{describe(chosen)} · {field} · {num_steps} {solver} steps\n{first_line}\n"
                f"final samples: NLL {quality['nll']:.2f} (exact samples {nll_floor:.2f}) · "
                f"JSD {quality['jsd']:.3f} · inside the 95% HDR {quality['precision']:.0%}"
            )
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=fig.dpi)
        image.value = buffer.getvalue()
        state.clear()
        state.update(rule=chosen, field=field, samples=samples, trajectories=traj, first_step=first_step,
                     per_step=per_step, metrics=quality)
        status.value = f"<small>rendered in {time.perf_counter() - started:.2f} s</small>"

    def on_change(_change):
        try:
            render()
        except Exception as err:  # keep the widget alive; say what went wrong
            status.value = f"<small style='color:#D55E00'>render failed: {type(err).__name__}: {err}</small>"
            raise

    for control in controls.values():
        control.observe(on_change, names="value")

    rows = [controls["rule"], widgets.HBox([controls["scale"], controls["zero_init_steps"]])]
    if networks is not None:
        rows.append(widgets.HBox([controls[n] for n in ("epoch", "seed") if n in controls]))
    box = widgets.VBox(rows + [image, status])
    box.controls = controls
    box.figure = fig
    box.state = state
    box.render = render
    render()
    return box
