"""Figures shared by the training studies (``crossover``, ``crossover_highdim``).

Each function draws one figure from plain arrays, saves it with ``plotting.save`` (PNG and
PDF) and returns the written paths; call it inside ``plotting.style()``.
"""

from __future__ import annotations


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
    every rule — the zero velocity's error ``E‖v*₀‖`` (``zero``) — a thin vertical line at
    each crossover epoch (``None``: no crossover) and, with ``limits`` (``{rule: value}``),
    each rule's converged limit, its guidance bias ``E‖ṽ₀* − v*₀‖``, dotted in its colour."""
    import matplotlib.pyplot as plt
    import numpy as np

    from cfgzero_theory import plotting

    epochs = np.asarray(epochs)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, errors in per_seed.items():
        errors = np.asarray(errors)
        style = plotting.rule_style(rules[name])
        ax.plot(epochs, errors.mean(axis=0), label=f"{names[name]}: ‖ṽ₀^θ − v*₀‖", **style)
        ax.fill_between(epochs, errors.min(axis=0), errors.max(axis=0), color=style["color"], alpha=0.15, linewidth=0)
        if limits is not None and name in limits:
            ax.axhline(limits[name], color=style["color"], linestyle=":", linewidth=1.0, alpha=0.8,
                       label=f"{names[name]}: exact bias ‖ṽ₀* − v*₀‖ (converged limit)")
        if crossover.get(name) is not None:
            ax.axvline(crossover[name], color=style["color"], linewidth=0.8, alpha=0.5)
    ax.axhline(float(zero), color="grey", linewidth=2.5, alpha=0.6, label=f"zero velocity: ‖v*₀‖ = {float(zero):.2f}")
    ax.set_xlabel("training epoch")
    ax.set_ylabel("first-step error at t = 0 (mean over x0 ~ N(0, I))")
    if epoch_axis is not None:
        epoch_axis(ax)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written = plotting.save(fig, path)
    plt.close(fig)
    return written
