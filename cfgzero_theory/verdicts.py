"""The pre-declared verdicts of the studies, computed from measured curves.

Each study in ``experiments/`` declares, before any number, what would confirm or refute a
claim of the paper.  The definitions live here, so that a verdict is computed in one place and
can be tested on curves whose answer is known by construction.  Inputs are evaluated epochs
``e_0 < e_1 < … < e_{E−1}`` (training epochs at which the networks were evaluated) and
per-epoch values: seed means ``(E,)`` or per-seed rows ``(S, E)``.  Values must be finite
(``ValueError`` otherwise: a verdict read off a curve with a hole would be a guess); a
crossover epoch that does not exist is ``None`` or NaN.

**"Zero beats early CFG"** (the paper's Fig. 3 right).  ``m_e``: the network-mean first-step
error ``E‖ṽ₀^θ − v*₀‖`` of a rule against the true conditional velocity ``v*₀ = u_c(x0)``;
``z``: the zero velocity's error ``E‖v*₀‖`` (the grey line).

* *Zero beats the rule at* ``e`` when ``m_e > z`` (strictly).  *Early* means ``e ≥ 1``:
  epoch 0 is the untrained network, reported and never deciding (:func:`epochs_above`).
* *Crossover epoch*: the first evaluated epoch ``e* ≥ 1`` such that ``m_e < z`` at every
  evaluated ``e ≥ e*`` (a dip below that is undone later does not count); none if the last
  epoch is not below.  :func:`first_step_crossover` computes it with the seed-bootstrap
  interval of :func:`analysis.crossover_epoch` on the epochs ``≥ first_epoch``.
* *Reproduced* (:func:`crossover_verdict`): zero beats the rule at some early epoch **and** a
  crossover exists (it then lies after every such epoch).
* *Allowed by exact theory* (:func:`exact_allows_crossover`): trained to convergence the error
  tends to the rule's guidance bias ``b = E‖ṽ₀* − v*₀‖``, so the rule can end below the grey
  line only if ``b < z``.

**Sample level** (:func:`interval_verdict`).  With a bootstrap interval ``[lo_e, hi_e]`` of the
zero-init benefit (below) at each epoch, zero-init *helps* at the early epochs with
``lo_e > 0`` and *hurts* at those with ``hi_e < 0``.

**Convergence** (:func:`converged`): ``|loss / floor − 1| ≤ c_loss``, every ``|JSD gap|`` to
the exact field ``≤ c_jsd`` and ``|NLL gap| ≤ c_nll``.

**"Zero-init stops helping"** (the paper's Table 1).  For a sample metric with orientation
``s = +1`` (lower is better) or ``s = −1`` (higher is better), and per-seed values ``C_e`` of
CFG and ``Z_e`` of CFG + zero-init:

* *Zero-init benefit* ``b_e = s·(C_e − Z_e)``; ``b_e > 0``: zero-init helped
  (:func:`benefit_over_cfg`).
* *Worse from* ``e*`` *on*: the crossover epoch of the pair ``(s·C, s·Z)``, i.e. the first
  evaluated epoch from which the seed-mean benefit ``b̄_e < 0`` at every later evaluated epoch
  (ties ``b̄_e = 0`` count as "not yet"), with its seed-bootstrap interval (rows of a seed
  kept paired).
* *Turning point* (:func:`turning_point`): such an ``e*`` exists **and** zero-init helped the
  seed mean (``b̄_e > 0``) at some evaluated ``e < e*``.  A curve on which zero-init never
  helped has nothing to turn.
* *Prediction from the exact limit*: as training converges each seed's benefit tends to the
  exact field's ``b*`` (the same rule, noise and sampler on the exact velocities), so a
  turning point is possible only where ``b* < 0``, i.e. where zero-init hurts a perfect model.
* *Across mixtures* (:func:`summarize_turning_points`): the claim *holds* if a turning point
  is found in every mixture, *holds in some* mixtures, or *fails* in none; a mixture with
  ``b* < 0`` whose benefit never stays negative is *not reached*, one with a turning point
  although ``b* ≥ 0`` is *against the prediction*.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from cfgzero_theory import analysis

#: Claim states of :func:`claim_status`.
CLAIMS = ("holds", "holds in some", "fails")


# ----------------------------------------------------------------------------- input checks
def _epochs(epochs) -> np.ndarray:
    """``epochs`` as a finite, strictly increasing, non-empty 1-D float array."""
    e = np.asarray(epochs, dtype=np.float64)
    if e.ndim != 1 or e.size == 0 or not np.all(np.isfinite(e)):
        raise ValueError(f"epochs must be a non-empty finite 1-D sequence, got shape {e.shape}")
    if np.any(np.diff(e) <= 0):
        raise ValueError("epochs must be strictly increasing")
    return e


def _curve(name: str, values, shape: tuple) -> np.ndarray:
    """``values`` broadcast to ``shape``, finite; ``ValueError`` naming ``name`` otherwise."""
    try:
        v = np.broadcast_to(np.asarray(values, dtype=np.float64), shape)
    except ValueError:
        raise ValueError(f"{name} must broadcast to shape {shape}, got {np.shape(values)}") from None
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite (no NaN or infinity)")
    return v


def _rows(name: str, values, num_epochs: int) -> np.ndarray:
    """``values`` as finite per-seed rows ``(S, E)``; a 1-D curve is one row."""
    v = np.asarray(values, dtype=np.float64)
    v = v[None] if v.ndim == 1 else v
    if v.ndim != 2 or v.shape[0] < 1 or v.shape[1] != num_epochs:
        raise ValueError(f"{name} must have shape (E,) or (S, E) with E = {num_epochs}, got {np.shape(values)}")
    return _curve(name, v, v.shape)


def _epoch_or_none(name: str, epoch) -> float | None:
    """A crossover epoch as a float, ``None`` for "no crossover" (``None`` or NaN)."""
    if epoch is None:
        return None
    try:
        e = float(epoch)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, None or NaN, got {epoch!r}") from None
    if math.isnan(e):
        return None
    if math.isinf(e):
        raise ValueError(f"{name} must be finite, None or NaN, got {epoch!r}")
    return e


def _plain(e: float):
    """An epoch as an ``int`` when whole (for JSON and text), else a float."""
    return int(e) if float(e).is_integer() else float(e)


# ----------------------------------------------------------------------------- first step
def epochs_above(epochs, values, line, first_epoch: float = 1) -> list:
    """The evaluated epochs ``e ≥ first_epoch`` at which ``values_e > line_e`` (strictly).

    ``values``: a curve ``(E,)``; ``line``: a scalar or ``(E,)``.  With the first-step error
    as ``values`` and the zero velocity's as ``line``, these are the epochs at which zero
    beats the rule (early ones with the default ``first_epoch = 1``).
    """
    e = _epochs(epochs)
    v = _curve("values", values, e.shape)
    z = _curve("line", line, e.shape)
    return [_plain(x) for x, a, b in zip(e, v, z) if x >= first_epoch and a > b]


def crossover_verdict(epochs, mean_error, zero, crossover_epoch, first_epoch: float = 1) -> dict:
    """Whether zero beats a rule early and the rule then crosses below the zero line for good.

    ``mean_error``: the network-mean first-step error ``m_e`` ``(E,)``; ``zero``: the zero
    velocity's error ``z`` (scalar or ``(E,)``); ``crossover_epoch``: the crossover of
    :func:`first_step_crossover` (``None`` or NaN: none).  Returns ``{"zero_beats_early":
    bool, "above_epochs": [e ≥ first_epoch with m_e > z], "reproduced": bool}`` with
    *reproduced* = zero beats early **and** a crossover exists.
    """
    above = epochs_above(epochs, mean_error, zero, first_epoch)
    crossed = _epoch_or_none("crossover_epoch", crossover_epoch) is not None
    return {"zero_beats_early": bool(above), "above_epochs": above, "reproduced": bool(above) and crossed}


def first_step_crossover(epochs, per_network, zero, *, first_epoch: float = 1, key=None,
                         level: float = 0.9) -> analysis.Crossover:
    """The crossover epoch ``e* ≥ first_epoch`` of the network-mean error below the zero line.

    :func:`analysis.crossover_epoch` on the evaluated epochs ``≥ first_epoch`` only (so epoch
    0, the untrained network, never decides with the default), with its bootstrap interval
    over the networks (rows of ``per_network (S, E)``) at ``level``, drawn with ``key``.
    """
    e = _epochs(epochs)
    err = _rows("per_network", per_network, e.size)
    line = _curve("zero", zero, err.shape)
    keep = e >= first_epoch
    if not np.any(keep):
        raise ValueError(f"first_epoch ({first_epoch}) must not exceed the last evaluated epoch ({e[-1]:g})")
    return analysis.crossover_epoch(e[keep], err[:, keep], line[:, keep], key=key, level=level)


def exact_allows_crossover(guidance_bias: float, zero: float) -> bool:
    """Whether a rule trained to convergence can end below the zero line: its limit ``b < z``."""
    b, z = _curve("guidance_bias", guidance_bias, ()), _curve("zero", zero, ())
    return bool(b < z)


# ----------------------------------------------------------------------------- sample level, convergence
def interval_verdict(epochs, low, high, first_epoch: float = 1) -> tuple[list, list]:
    """``(helps, hurts)``: the epochs ``≥ first_epoch`` whose benefit interval lies above 0 (``low > 0``)
    and those whose interval lies below 0 (``high < 0``)."""
    e = _epochs(epochs)
    lo, hi = _curve("low", low, e.shape), _curve("high", high, e.shape)
    if np.any(lo > hi):
        raise ValueError("low must not exceed high at any epoch")
    helps = [_plain(x) for x, a in zip(e, lo) if x >= first_epoch and a > 0]
    hurts = [_plain(x) for x, b in zip(e, hi) if x >= first_epoch and b < 0]
    return helps, hurts


def converged(loss_gap: float, jsd_gaps, nll_gap: float, *, loss: float, jsd: float, nll: float) -> bool:
    """The convergence criterion: ``|loss_gap| ≤ loss``, every ``|jsd_gaps| ≤ jsd``, ``|nll_gap| ≤ nll``.

    ``loss_gap = final loss / loss floor − 1``; ``jsd_gaps``: each rule's JSD minus the same
    rule's on the exact field; ``nll_gap``: the same for CFG-Zero*'s NLL.  A NaN gap is a
    ``ValueError``, not a pass or a fail.
    """
    for name, c in (("loss", loss), ("jsd", jsd), ("nll", nll)):
        if not (math.isfinite(c) and c >= 0):
            raise ValueError(f"{name} must be a finite non-negative tolerance, got {c!r}")
    gaps = np.atleast_1d(np.asarray(list(jsd_gaps), dtype=np.float64))
    _curve("jsd_gaps", gaps, gaps.shape)
    lg, ng = float(_curve("loss_gap", loss_gap, ())), float(_curve("nll_gap", nll_gap, ()))
    return bool(abs(lg) <= loss and np.all(np.abs(gaps) <= jsd) and abs(ng) <= nll)


# ----------------------------------------------------------------------------- turning point
class TurningPoint(NamedTuple):
    """Result of :func:`turning_point`.

    ``crossover``: the first epoch from which CFG + zero-init is worse than CFG at every later
    evaluated epoch, with its seed-bootstrap interval (:class:`analysis.Crossover`, ``epoch``
    NaN when there is none); ``benefit (S, E)``: the per-seed zero-init benefit
    ``s·(C − Z)``; ``helped_epochs``: the epochs where its seed mean is ``> 0``;
    ``turning_point``: a crossover exists and some helped epoch precedes it.
    """

    crossover: analysis.Crossover
    benefit: np.ndarray
    helped_epochs: list
    turning_point: bool


def benefit_over_cfg(cfg, rule, lower_is_better: bool) -> np.ndarray:
    """``s·(cfg − rule)`` with ``s = +1`` if lower is better, ``−1`` otherwise: ``> 0`` where ``rule`` beat CFG.

    With CFG + zero-init as ``rule`` this is the zero-init benefit ``b``.  ``cfg`` and ``rule``
    share a shape (e.g. seeds × epochs, or scalars); ``−0`` is returned as ``0``.
    """
    c = np.asarray(cfg, dtype=np.float64)
    r = _curve("rule", rule, c.shape)
    c = _curve("cfg", c, c.shape)
    if not isinstance(lower_is_better, (bool, np.bool_)):
        raise ValueError(f"lower_is_better must be a bool, got {lower_is_better!r}")
    return (1.0 if lower_is_better else -1.0) * (c - r) + 0.0


def helped_before(epochs, mean_benefit, crossover_epoch) -> tuple[list, bool]:
    """``(helped, turning)``: the epochs with ``mean_benefit > 0``, and whether one precedes ``crossover_epoch``.

    ``turning`` is the turning-point rule given the crossover (``None`` or NaN: none, so no
    turning point).
    """
    e = _epochs(epochs)
    b = _curve("mean_benefit", mean_benefit, e.shape)
    helped = [_plain(x) for x, v in zip(e, b) if v > 0]
    cross = _epoch_or_none("crossover_epoch", crossover_epoch)
    return helped, cross is not None and any(x < cross for x in helped)


def turning_point(epochs, cfg, zero_init, lower_is_better: bool, *, key=None, level: float = 0.9) -> TurningPoint:
    """The turning point of a sample metric: where CFG + zero-init becomes worse than CFG for good.

    ``cfg`` and ``zero_init``: per-seed values ``(S, E)`` (or one curve ``(E,)``) of the
    metric at the evaluated ``epochs``, the same noise for both rules.  The crossover of the
    seed means of ``(s·cfg, s·zero_init)`` is :func:`analysis.crossover_epoch` (bootstrap over
    seeds at ``level``, drawn with ``key``); see the module docstring for the definition.
    """
    e = _epochs(epochs)
    c = _rows("cfg", cfg, e.size)
    z = _rows("zero_init", zero_init, e.size)
    if z.shape != c.shape:
        raise ValueError(f"cfg and zero_init must share a shape, got {c.shape} and {z.shape}")
    benefit = benefit_over_cfg(c, z, lower_is_better)
    s = 1.0 if lower_is_better else -1.0
    cross = analysis.crossover_epoch(e, s * c, s * z, key=key, level=level)
    helped, turning = helped_before(e, benefit.mean(axis=0), cross.epoch)
    return TurningPoint(cross, benefit, helped, turning)


def claim_status(num_found: int, total: int) -> str:
    """``"holds"`` (a turning point in every one of ``total`` mixtures), ``"holds in some"`` or ``"fails"`` (in none)."""
    if not (isinstance(total, (int, np.integer)) and total >= 1):
        raise ValueError(f"total must be a positive integer, got {total!r}")
    if not (isinstance(num_found, (int, np.integer)) and 0 <= num_found <= total):
        raise ValueError(f"num_found must be an integer in [0, total = {total}], got {num_found!r}")
    return CLAIMS[0] if num_found == total else (CLAIMS[1] if num_found else CLAIMS[2])


def summarize_turning_points(turning: Sequence[bool], crossed: Sequence[bool], exact_benefit: Sequence[float]) -> dict:
    """One metric across mixtures: how many turn, the exact-limit prediction, and where they disagree.

    Per mixture ``k``: ``turning[k]`` (a turning point), ``crossed[k]`` (zero-init worse for
    good from some epoch, with or without having helped before) and ``exact_benefit[k]``
    (``b*``, the exact field's zero-init benefit).  Returns ``num_found``, ``num_mixtures``,
    ``claim`` (:func:`claim_status`), ``exact_hurts`` (mixtures with ``b* < 0``),
    ``consistent_with_exact_limit`` (mixtures where "turns" equals "``b* < 0``"), and the
    indices of the mixtures ``not_reached`` (``b* < 0``, never worse for good),
    ``never_helped`` (worse for good, but zero-init never helped before) and
    ``against_prediction`` (a turning point although ``b* ≥ 0``).
    """
    turning = [bool(t) for t in turning]
    crossed = [bool(c) for c in crossed]
    exact = np.asarray(exact_benefit, dtype=np.float64)
    if not turning or not (len(turning) == len(crossed) == exact.size) or exact.ndim != 1:
        raise ValueError("turning, crossed and exact_benefit must be non-empty and of equal length")
    _curve("exact_benefit", exact, exact.shape)
    if any(t and not c for t, c in zip(turning, crossed)):
        raise ValueError("a turning point needs a crossover: turning[k] implies crossed[k]")
    hurts = exact < 0
    num_found = sum(turning)
    return {
        "num_found": num_found,
        "num_mixtures": len(turning),
        "claim": claim_status(num_found, len(turning)),
        "exact_hurts": int(hurts.sum()),
        "consistent_with_exact_limit": int(sum(t == h for t, h in zip(turning, hurts))),
        "not_reached": [k for k, (c, h) in enumerate(zip(crossed, hurts)) if h and not c],
        "never_helped": [k for k, (t, c) in enumerate(zip(turning, crossed)) if c and not t],
        "against_prediction": [k for k, (t, h) in enumerate(zip(turning, hurts)) if t and not h],
    }
