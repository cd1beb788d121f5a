"""The figure style's rule families: each rule gets its family's colour, wrappers their inner rule's."""

import pytest

from cfgzero_theory import CFG, CFGStar, CFGZeroStar, ZeroInit, make_rule, plotting
from cfgzero_theory.guidance_family import APG, ChannelSubset, GuidanceInterval, GuidanceRescale


@pytest.mark.parametrize(
    "rule, family",
    [
        (CFG(4.0), "cfg"),
        (CFG(1.0), "conditional"),
        (CFG(0.0), "unconditional"),
        (CFGStar(4.0), "cfg-star"),
        (CFGZeroStar(4.0), "cfg-zero-star"),
        (make_rule("zero-init", 4.0, 1), "zero-init"),
        (make_rule("conditional", zero_init_steps=1), "conditional"),
        (GuidanceInterval(CFG(4.0), 0.1, 0.6, 10), "cfg"),
        (GuidanceRescale(CFGZeroStar(4.0), 0.7), "cfg-zero-star"),
        (ChannelSubset(CFGStar(4.0), 3), "cfg-star"),
        (ZeroInit(ChannelSubset(CFGStar(4.0), 3), 1), "cfg-zero-star"),
        (APG(4.0), "other"),
        (ZeroInit(APG(4.0), 1), "zero-init"),
    ],
)
def test_rule_family(rule, family):
    assert plotting.rule_family(rule) == family
    assert plotting.rule_color(rule) == plotting.FAMILY_COLORS[family]


def test_unknown_family_name_is_rejected():
    with pytest.raises(ValueError, match="family"):
        plotting.rule_family("nope")
