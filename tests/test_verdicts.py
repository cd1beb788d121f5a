"""The studies' pre-declared verdicts (cfgzero_theory.verdicts) on hand-built curves whose answer is known by construction."""

import math

import numpy as np
import pytest

from cfgzero_theory import verdicts

EPOCHS = [0, 1, 2, 4, 8]


def _two_seeds(curve):
    """Two seeds whose mean is ``curve`` (rows ``curve ± 0.01``): a seed axis for the bootstrap."""
    curve = np.asarray(curve, np.float64)
    return np.stack([curve - 0.01, curve + 0.01])


# ----------------------------------------------------------------------------- zero beats early CFG
def test_epoch_zero_never_decides():
    v = verdicts.crossover_verdict([0, 1, 2], [15.0, 13.0, 12.0], 14.0, crossover_epoch=1.0)
    assert v == {"zero_beats_early": False, "above_epochs": [], "reproduced": False}  # above only at epoch 0
    assert verdicts.epochs_above([0, 1, 2], [15.0, 13.0, 12.0], 14.0, first_epoch=0) == [0]


def test_crossover_at_a_known_epoch_is_reproduced():
    err = [15.0, 15.5, 14.5, 13.0, 12.0]  # above the zero line at epochs 1 and 2, below from 4 on
    cross = verdicts.first_step_crossover(EPOCHS, _two_seeds(err), 14.0)
    assert cross.epoch == 4.0 and cross.low == cross.high == 4.0 and cross.fraction == 1.0
    v = verdicts.crossover_verdict(EPOCHS, err, 14.0, cross.epoch)
    assert v == {"zero_beats_early": True, "above_epochs": [1, 2], "reproduced": True}


def test_never_crossing_is_not_reproduced():
    err = [16.0, 15.0, 15.0, 14.5, 14.1]  # zero beats the rule at every epoch
    cross = verdicts.first_step_crossover(EPOCHS, _two_seeds(err), 14.0)
    assert math.isnan(cross.epoch) and cross.high == math.inf and cross.fraction == 0.0
    v = verdicts.crossover_verdict(EPOCHS, err, 14.0, cross.epoch)
    assert v["zero_beats_early"] and v["above_epochs"] == [1, 2, 4, 8] and not v["reproduced"]


def test_never_above_is_not_reproduced_although_it_crosses():
    err = [13.0, 12.0, 11.0, 10.0, 9.0]  # below the line from the start: nothing to cross
    assert verdicts.first_step_crossover(EPOCHS, _two_seeds(err), 14.0).epoch == 1.0  # epoch 0 is not looked at
    assert verdicts.first_step_crossover(EPOCHS, _two_seeds(err), 14.0, first_epoch=0).epoch == 0.0
    v = verdicts.crossover_verdict(EPOCHS, err, 14.0, 1.0)
    assert not v["zero_beats_early"] and not v["reproduced"]


def test_a_dip_that_crosses_back_does_not_count():
    back_up = [15.0, 13.0, 12.0, 15.0, 15.0]  # below at 1-2, above again from 4
    assert math.isnan(verdicts.first_step_crossover(EPOCHS, _two_seeds(back_up), 14.0).epoch)
    dip = [15.0, 13.0, 15.0, 13.0, 12.0]  # below at 1, above at 2, below for good from 4
    cross = verdicts.first_step_crossover(EPOCHS, _two_seeds(dip), 14.0)
    assert cross.epoch == 4.0
    assert verdicts.crossover_verdict(EPOCHS, dip, 14.0, cross.epoch)["above_epochs"] == [2]


@pytest.mark.parametrize("none", [None, float("nan"), np.float32("nan")])
def test_a_missing_crossover_is_none_or_nan(none):
    v = verdicts.crossover_verdict(EPOCHS, [15.0, 15.0, 15.0, 15.0, 15.0], 14.0, none)
    assert v["zero_beats_early"] and not v["reproduced"]
    helped, turning = verdicts.helped_before(EPOCHS, [1.0, 1.0, -1.0, -1.0, -1.0], none)
    assert helped == [0, 1] and not turning


def test_exact_theory_allows_a_crossover_only_below_the_zero_line():
    assert verdicts.exact_allows_crossover(10.5, 14.07)  # the crossover study's geometry: (w − 1)·3.5 < ‖v*₀‖
    assert not verdicts.exact_allows_crossover(42.0, 14.0)
    assert not verdicts.exact_allows_crossover(14.0, 14.0)  # the limit on the line is not below it


# ----------------------------------------------------------------------------- sample level and convergence
def test_interval_verdict_reads_the_sign_of_the_interval():
    low, high = [1.0, 0.5, -1.0, -2.0, -0.1], [2.0, 1.0, 0.5, -0.5, 0.1]
    assert verdicts.interval_verdict(EPOCHS, low, high) == ([1], [4])  # epoch 0 (low > 0) never counts
    assert verdicts.interval_verdict(EPOCHS, low, high, first_epoch=0) == ([0, 1], [4])


def test_convergence_needs_every_gap_within_its_tolerance():
    tolerances = dict(loss=0.05, jsd=0.05, nll=0.5)
    assert verdicts.converged(0.04, [0.01, -0.049], -0.3, **tolerances)
    assert not verdicts.converged(-0.06, [0.01], 0.3, **tolerances)
    assert not verdicts.converged(0.0, [0.01, 0.051], 0.3, **tolerances)
    assert not verdicts.converged(0.0, [0.01], 0.51, **tolerances)


# ----------------------------------------------------------------------------- turning point
def test_benefit_sign_convention():
    np.testing.assert_array_equal(verdicts.benefit_over_cfg([2.0, 1.0], [1.0, 2.0], lower_is_better=True), [1.0, -1.0])
    np.testing.assert_array_equal(verdicts.benefit_over_cfg([0.2, 0.9], [0.5, 0.4], lower_is_better=False), [0.3, -0.5])
    tie = verdicts.benefit_over_cfg([1.0], [1.0], lower_is_better=False)
    assert tie[0] == 0.0 and not np.signbit(tie[0])  # no −0 in the JSON


def test_turning_point_at_a_known_epoch():
    cfg = _two_seeds([5.0, 4.0, 3.0, 2.0, 1.0])
    zero_init = cfg - np.array([1.0, 1.0, -0.5, -0.5, -0.5])  # helps at 0 and 1, worse from 2 on
    tp = verdicts.turning_point(EPOCHS, cfg, zero_init, lower_is_better=True)
    assert tp.crossover.epoch == 2.0 and tp.helped_epochs == [0, 1] and tp.turning_point
    np.testing.assert_allclose(tp.benefit, np.broadcast_to([1.0, 1.0, -0.5, -0.5, -0.5], (2, 5)))


def test_turning_point_of_a_metric_where_higher_is_better():
    precision = _two_seeds([0.5, 0.6, 0.7, 0.8, 0.9])
    zero_init = precision + np.array([0.1, 0.1, 0.0, -0.1, -0.1])  # higher precision with zero-init first
    tp = verdicts.turning_point(EPOCHS, precision, zero_init, lower_is_better=False)
    assert tp.helped_epochs == [0, 1] and tp.crossover.epoch == 4.0 and tp.turning_point  # the tie at 2 is "not yet"


@pytest.mark.parametrize("benefit, epoch, helped, turning", [
    ([1.0, 1.0, 1.0, 1.0, 1.0], None, [0, 1, 2, 4, 8], False),  # never worse: no crossover
    ([1.0, -1.0, -1.0, -1.0, 1.0], None, [0, 8], False),  # worse, then better again at the end: crosses back
    ([1.0, -1.0, -1.0, 1.0, -1.0], 8.0, [0, 4], True),  # a dip undone; worse for good only at the last epoch
    ([-1.0, -1.0, -1.0, -1.0, -1.0], 0.0, [], False),  # worse from the start: zero-init never helped
    ([1.0, 0.0, 0.0, 0.0, 0.0], None, [0], False),  # ties count as "not yet"
])
def test_turning_point_cases(benefit, epoch, helped, turning):
    cfg = _two_seeds([3.0, 3.0, 3.0, 3.0, 3.0])
    tp = verdicts.turning_point(EPOCHS, cfg, cfg - np.asarray(benefit), lower_is_better=True)
    assert (math.isnan(tp.crossover.epoch) if epoch is None else tp.crossover.epoch == epoch)
    assert tp.helped_epochs == helped and tp.turning_point is turning


def test_turning_point_matches_its_definition_on_random_curves():
    """Brute force over every epoch, straight from the module docstring's words."""
    rng = np.random.default_rng(0)
    for _ in range(60):
        benefit = rng.choice([-1.0, 0.0, 1.0], size=len(EPOCHS))
        cfg = np.full((1, len(EPOCHS)), 2.0)
        tp = verdicts.turning_point(EPOCHS, cfg, cfg - benefit, lower_is_better=True)
        worse_for_good = [e for i, e in enumerate(EPOCHS) if all(b < 0 for b in benefit[i:])]
        expected = worse_for_good[0] if worse_for_good else None
        assert (math.isnan(tp.crossover.epoch) if expected is None else tp.crossover.epoch == expected), benefit
        assert tp.turning_point == (expected is not None and any(b > 0 for e, b in zip(EPOCHS, benefit) if e < expected))


def test_claim_status():
    assert [verdicts.claim_status(k, 3) for k in (3, 2, 1, 0)] == ["holds", "holds in some", "holds in some", "fails"]


def test_summary_across_mixtures_names_the_disagreements():
    s = verdicts.summarize_turning_points(turning=[True, False, False, True], crossed=[True, False, True, True],
                                          exact_benefit=[-1.0, -2.0, 0.5, 0.0])
    assert s == {"num_found": 2, "num_mixtures": 4, "claim": "holds in some", "exact_hurts": 2,
                 "consistent_with_exact_limit": 2,  # mixture 0 (turns, hurt) and 2 (no turn, helped)
                 "not_reached": [1], "never_helped": [2], "against_prediction": [3]}


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, argument", [
    (lambda: verdicts.epochs_above([0, 2, 1], [1.0, 2.0, 3.0], 0.0), "epochs"),
    (lambda: verdicts.epochs_above([0, 1, 2], [1.0, float("nan"), 3.0], 0.0), "values"),
    (lambda: verdicts.epochs_above([0, 1, 2], [1.0, 2.0], 0.0), "values"),
    (lambda: verdicts.crossover_verdict([0, 1], [1.0, 2.0], float("nan"), 1.0), "line"),
    (lambda: verdicts.crossover_verdict([0, 1], [1.0, 2.0], 0.0, "soon"), "crossover_epoch"),
    (lambda: verdicts.crossover_verdict([0, 1], [1.0, 2.0], 0.0, math.inf), "crossover_epoch"),
    (lambda: verdicts.first_step_crossover([0, 1], np.ones((2, 3)), 0.0), "per_network"),
    (lambda: verdicts.first_step_crossover([0, 1], np.ones((2, 2)), 0.0, first_epoch=5), "first_epoch"),
    (lambda: verdicts.exact_allows_crossover(float("nan"), 1.0), "guidance_bias"),
    (lambda: verdicts.interval_verdict([0, 1], [1.0, 2.0], [0.0, 3.0]), "low"),
    (lambda: verdicts.converged(float("nan"), [0.0], 0.0, loss=0.1, jsd=0.1, nll=0.1), "loss_gap"),
    (lambda: verdicts.converged(0.0, [0.0], 0.0, loss=-0.1, jsd=0.1, nll=0.1), "loss"),
    (lambda: verdicts.benefit_over_cfg([1.0, 2.0], [1.0], lower_is_better=1), "lower_is_better"),
    (lambda: verdicts.benefit_over_cfg([1.0, 2.0], [1.0, 2.0, 3.0], lower_is_better=True), "rule"),
    (lambda: verdicts.turning_point([0, 1], [[1.0, np.nan]], [[1.0, 2.0]], True), "cfg"),
    (lambda: verdicts.turning_point([0, 1], np.ones((2, 2)), np.ones((3, 2)), True), "share a shape"),
    (lambda: verdicts.claim_status(4, 3), "num_found"),
    (lambda: verdicts.claim_status(0, 0), "total"),
    (lambda: verdicts.summarize_turning_points([True], [False], [-1.0]), "turning"),
    (lambda: verdicts.summarize_turning_points([True], [True, False], [-1.0]), "equal length"),
    (lambda: verdicts.summarize_turning_points([False], [False], [float("nan")]), "exact_benefit"),
])
def test_bad_input_is_a_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()
