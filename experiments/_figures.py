"""Figures shared by the training studies (``crossover``, ``crossover_highdim``).

Each function draws one figure from plain arrays, saves it with ``plotting.save`` (PNG and
PDF) and returns the written paths; call it inside ``plotting.style()``.
"""

from __future__ import annotations

import math

#: The first-step quantities in mathtext (E: mean over the noise x0 ~ N(0, I)): the model's guided
#: velocity against the true velocity v*₀ = u_c(x0), the exact rule's (its converged limit), a zero velocity's.
MODEL_ERROR = r"$\mathrm{E}\,\|\tilde v_0^\theta - v^*_0\|$"
GUIDANCE_BIAS = r"$\mathrm{E}\,\|\tilde v_0^* - v^*_0\|$"
ZERO_ERROR = r"$\mathrm{E}\,\|v^*_0\|$"


def mark_crossover(ax, epoch, color: str, name: str, zero_beats_early: bool = True) -> None:
    """Rule ``name``'s crossover ``epoch`` as a vertical line in its ``color``, labelled for the legend;
    ``None`` (no crossover) adds a legend entry saying so instead.  Where zero never beat the rule
    at an early epoch (``zero_beats_early`` false: above the zero line at initialisation only),
    the line only marks where the rule's error stays below the zero line, and the label says
    that this is not a crossover by the protocol."""
    if epoch is None:
        ax.plot([], [], linestyle="none", label=f"{name}: no crossover in the evaluated epochs")
    elif not zero_beats_early:
        ax.axvline(epoch, color=color, linewidth=1.0, alpha=0.6, linestyle="--",
                   label=f"{name}: below the line from epoch {epoch:g}; no crossover (above at epoch 0 only)")
    else:
        ax.axvline(epoch, color=color, linewidth=1.0, alpha=0.6, label=f"{name}: crossover at epoch {epoch:g}")


def mark_jsd_maximum(ax) -> None:
    """A dotted line at ``ln 2``, the largest JSD (samples entirely off the class density), labelled on the
    axes just above it (room is made at the top); call after setting the y scale."""
    from matplotlib.transforms import blended_transform_factory

    ln2 = math.log(2)
    ax.axhline(ln2, color="black", linestyle=(0, (1, 2)), linewidth=1.0)
    bottom, top = ax.get_ylim()
    ax.set_ylim(bottom, max(top, ln2 * (1.4 if ax.get_yscale() == "log" else 1.12)))
    ax.text(0.01, ln2, " ln 2 = 0.693: the JSD's maximum (samples entirely off the class)", fontsize=7,
            va="bottom", ha="left", transform=blended_transform_factory(ax.transAxes, ax.transData))


def plot_training_loss(losses, loss_floor: float, path: str, evaluated_epochs=(), log_epochs: bool = False,
                       title: str | None = None):
    """Mean training loss per epoch (band: min–max over seeds) against the exact loss floor (optional ``title``)."""
    import matplotlib.pyplot as plt
    import numpy as np

    from cfgzero_theory import plotting

    losses = np.asarray(losses)
    epochs = np.arange(1, losses.shape[0] + 1)
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    ax.plot(epochs, losses.mean(axis=1), color=plotting.rule_color("exact"), label="training loss (mean over seeds)")
    ax.fill_between(epochs, losses.min(axis=1), losses.max(axis=1), color="grey", alpha=0.2, linewidth=0)
    ax.axhline(loss_floor, color="grey", linestyle="--", label=f"loss floor (exact mixture) {loss_floor:.3f}")
    for e in evaluated_epochs:
        ax.axvline(e, color="grey", linewidth=0.5, alpha=0.3)
    ax.set_xlabel("epoch" + (" (thin lines: evaluated epochs)" if len(evaluated_epochs) else ""))
    ax.set_ylabel("flow-matching loss  E‖v_θ − (x1 − x0)‖²")
    ax.set_yscale("log")
    if log_epochs:
        ax.set_xscale("log")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written = plotting.save(fig, path)
    plt.close(fig)
    return written


def plot_first_step_errors(epochs, per_seed: dict, zero: float, crossover: dict, rules: dict, names: dict, title: str,
                           path: str, epoch_axis=None, limits: dict | None = None):
    """First-step error ``E‖ṽ₀^θ − v*₀‖`` against the true conditional velocity ``v*₀ = u_c(x0)``
    per rule vs epoch (mean over seeds; band: min–max over seeds), one thick grey line for
    every rule — the zero velocity's error ``E‖v*₀‖`` (``zero``) — a vertical line at each
    crossover epoch (``None``: no crossover, said in the legend) and, with ``limits``
    (``{rule: value}``), each rule's converged limit, its guidance bias ``E‖ṽ₀* − v*₀‖``,
    dotted in its colour; the legend sits under the axes."""
    import matplotlib.pyplot as plt
    import numpy as np

    from cfgzero_theory import plotting

    epochs = np.asarray(epochs)
    fig, ax = plt.subplots(figsize=(6.6, 5.6))
    ax.axhline(float(zero), color="grey", linewidth=2.5, alpha=0.6, label=f"zero velocity: {ZERO_ERROR} = {float(zero):.2f}")
    for name, errors in per_seed.items():
        errors = np.asarray(errors)
        style = plotting.rule_style(rules[name])
        ax.plot(epochs, errors.mean(axis=0), label=f"{names[name]}: {MODEL_ERROR} (seed mean)", **style)
        ax.fill_between(epochs, errors.min(axis=0), errors.max(axis=0), color=style["color"], alpha=0.15, linewidth=0)
        if limits is not None and name in limits:
            ax.axhline(limits[name], color=style["color"], linestyle=":", linewidth=1.0, alpha=0.8,
                       label=f"{names[name]}: exact bias {GUIDANCE_BIAS} (converged limit)")
        mark_crossover(ax, crossover.get(name), style["color"], names[name])
    ax.set_xlabel("training epoch")
    ax.set_ylabel("first-step error at t = 0 (mean over x0 ~ N(0, I))")
    if epoch_axis is not None:
        epoch_axis(ax)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    written = plotting.save(fig, path)
    plt.close(fig)
    return written
