"""Guidance rules: identities, shapes, dtypes, the exact guided field and the error split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfgzero_theory import CFG, CFGStar, CFGZeroStar, GaussianMixture, ZeroInit, guidance

SHAPES = [(4, 2), (3, 4, 8, 8), (2, 4, 3, 8, 8), (2, 16, 5)]


def pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
def test_optimized_scale_per_batch_element(shape):
    v_c, v_u = pair(shape)
    s = guidance.optimized_scale(v_c, v_u)
    assert s.shape == (shape[0],) + (1,) * (len(shape) - 1)
    for b in range(shape[0]):
        c, u = v_c[b].ravel().astype(np.float64), v_u[b].ravel().astype(np.float64)
        np.testing.assert_allclose(s.ravel()[b], c @ u / (u @ u + 1e-8), rtol=1e-5)
    # s* minimises ‖v_c − s·v_u‖ over s (least squares), per sample
    for b in range(shape[0]):
        c, u = v_c[b].ravel(), v_u[b].ravel()
        best = np.linalg.lstsq(u[:, None].astype(np.float64), c.astype(np.float64), rcond=None)[0][0]
        np.testing.assert_allclose(s.ravel()[b], best, rtol=1e-5)


def test_optimized_scale_equal_branches_and_dtypes():
    v = np.random.default_rng(1).normal(size=(3, 7)).astype(np.float32)
    np.testing.assert_allclose(guidance.optimized_scale(v, v), np.ones((3, 1)), rtol=1e-6)
    bf = jnp.asarray(v, jnp.bfloat16)
    s = guidance.optimized_scale(bf, bf)
    assert s.dtype == jnp.bfloat16  # computed in float32, cast back like diffusers
    np.testing.assert_allclose(np.asarray(s, np.float32), 1.0, rtol=1e-2)
    zero = np.zeros((2, 3), np.float32)
    assert np.all(np.isfinite(guidance.optimized_scale(zero, zero)))
    with pytest.raises(ValueError, match="share a shape"):
        guidance.optimized_scale(np.zeros((2, 3)), np.zeros((2, 4)))


@pytest.mark.parametrize("shape", SHAPES)
def test_scale_one_is_conditional_and_zero_is_unconditional(shape):
    v_c, v_u = pair(shape, 2)
    for rule in (guidance.cfg, guidance.cfg_star):
        np.testing.assert_allclose(rule(v_c, v_u, 1.0), v_c, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(guidance.cfg(v_c, v_u, 0.0), v_u, atol=1e-6)
    # w = 0 in CFG* gives the projection of v_c on v_u, s*·v_u
    np.testing.assert_allclose(guidance.cfg_star(v_c, v_u, 0.0), guidance.optimized_scale(v_c, v_u) * v_u, atol=1e-6)


def test_projection_form_of_cfg_star():
    """``CFG* = P_u v_c + w·(I − P_u) v_c`` with ``P_u`` the orthogonal projector on ``v_u``."""
    v_c, v_u = pair((6, 5), 3)
    for w in (0.5, 2.0, 7.0):
        out = np.asarray(guidance.cfg_star(v_c, v_u, w), np.float64)
        for b in range(6):
            u = v_u[b].astype(np.float64)
            projector = np.outer(u, u) / (u @ u)
            want = projector @ v_c[b] + w * (np.eye(5) - projector) @ v_c[b]
            np.testing.assert_allclose(out[b], want, rtol=1e-5, atol=1e-5)


def test_rules_are_odd():
    v_c, v_u = pair((3, 4, 6), 4)
    for rule in (CFG(3.0), CFGStar(3.0), CFGZeroStar(3.0, 1)):
        np.testing.assert_allclose(rule(-v_c, -v_u, 2), -rule(v_c, v_u, 2), atol=1e-6)
    np.testing.assert_allclose(guidance.optimized_scale(-v_c, -v_u), guidance.optimized_scale(v_c, v_u))


def test_zero_init_with_traced_step():
    v_c, v_u = pair((2, 3), 5)
    run = jax.jit(lambda step: guidance.cfg_zero_star(v_c, v_u, 4.0, step, zero_init_steps=2))
    for step in range(4):
        out = run(step)
        if step < 2:
            np.testing.assert_array_equal(out, 0.0)
        else:
            np.testing.assert_allclose(out, guidance.cfg_star(v_c, v_u, 4.0), atol=1e-6)
    zero_init_cfg = guidance.make_rule("zero-init", 2.0, 1)
    np.testing.assert_allclose(zero_init_cfg(v_c, v_u, 0), 0.0)
    np.testing.assert_allclose(zero_init_cfg(v_c, v_u, 1), guidance.cfg(v_c, v_u, 2.0), atol=1e-6)


def test_rules_are_pytrees_that_vmap_over_scales():
    v_c, v_u = pair((2, 3), 6)
    scales = jnp.array([1.0, 2.0, 4.0])
    out = jax.vmap(lambda w: CFGStar(w)(v_c, v_u))(scales)
    for i, w in enumerate(scales):
        np.testing.assert_allclose(out[i], guidance.cfg_star(v_c, v_u, float(w)), atol=1e-6)
    assert jax.tree_util.tree_leaves(CFGZeroStar(3.0, 2)) == [3.0, True, 2]  # scale, optimized, K
    assert guidance.describe(CFGZeroStar(4.0, 1)) == "CFG-Zero* (w=4, K=1)"
    assert guidance.describe(guidance.make_rule("zero-init", 2.5, 2)) == "CFG + zero-init (w=2.5, K=2)"


def test_errata_counterexample_plain_cfg_beats_optimized_scale():
    """docs/design.md §5: v_c = (2, 1), v_u = (1, 0), w = 2, true v* = (3, 2): CFG is exact, CFG* is not."""
    v_c, v_u, target = np.array([[2.0, 1.0]]), np.array([[1.0, 0.0]]), np.array([[3.0, 2.0]])
    np.testing.assert_allclose(guidance.cfg(v_c, v_u, 2.0), target)
    star = np.asarray(guidance.cfg_star(v_c, v_u, 2.0))
    assert np.linalg.norm(star - target) > 0.9  # CFG* gives (2, 2)
    np.testing.assert_allclose(star, [[2.0, 2.0]], atol=1e-6)


def test_exact_guided_velocity_first_step_bias():
    """At t = 0 exact CFG differs from ``u_c`` by exactly ``(w − 1)(μ_c − μ̄)``."""
    rng = np.random.default_rng(7)
    means = rng.normal(size=(6, 2)) * 3
    gm = GaussianMixture(rng.uniform(0.5, 1, 6), means, np.tile(0.2 * np.eye(2), (6, 1, 1)), np.arange(6) % 2)
    x0 = rng.normal(size=(50, 2)).astype(np.float32)
    w = 3.0
    guided = guidance.exact_guided_velocity(gm, x0, 0.0, 1, CFG(w))
    u_c = gm.velocity(x0, 0.0, 1)
    bias = np.asarray(guided - u_c)
    want = (w - 1) * np.asarray(gm.mean(1) - gm.mean())
    np.testing.assert_allclose(bias, np.broadcast_to(want, bias.shape), atol=1e-4)
    # a "model" that outputs the true conditional velocity: its whole error is guidance bias
    errors = guidance.decompose_guidance_error(u_c, guided, u_c)
    np.testing.assert_allclose(errors.guidance_bias, np.linalg.norm(want), rtol=1e-4)
    np.testing.assert_allclose(errors.learning_error, errors.guidance_bias, rtol=1e-6)
    np.testing.assert_allclose(errors.total_error, 0.0)
    np.testing.assert_allclose(errors.zero_error, np.linalg.norm(np.asarray(guided), axis=1), rtol=1e-6)
    # per-point s* in the exact field (each point is its own batch element)
    star = guidance.exact_guided_velocity(gm, x0, 0.4, 1, CFGStar(w))
    for i in (0, 17):
        np.testing.assert_allclose(
            star[i], CFGStar(w)(gm.velocity(x0[i : i + 1], 0.4, 1), gm.velocity(x0[i : i + 1], 0.4))[0], rtol=1e-5
        )


def test_decomposition_triangle_inequality():
    rng = np.random.default_rng(8)
    model, exact, cond = (rng.normal(size=(20, 3, 4)) for _ in range(3))
    e = guidance.decompose_guidance_error(model, exact, cond)
    assert e.learning_error.shape == (20,)
    assert np.all(e.total_error <= e.learning_error + e.guidance_bias + 1e-9)
    np.testing.assert_allclose(e.zero_error, np.linalg.norm(exact.reshape(20, -1), axis=1), rtol=1e-6)


def test_every_kind_scale_and_k_share_one_compilation():
    """Kind, scale and K are traced data: one compiled program serves all the rules of make_rule."""
    v_c, v_u = pair((3, 4), 9)
    run = jax.jit(lambda rule, step: rule(v_c, v_u, step))
    expected = {
        ("cfg", 2.0, None): guidance.cfg(v_c, v_u, 2.0),
        ("cfg-star", 3.0, None): guidance.cfg_star(v_c, v_u, 3.0),
        ("zero-init", 2.0, 1): guidance.cfg(v_c, v_u, 2.0),
        ("cfg-zero-star", 5.0, 1): guidance.cfg_star(v_c, v_u, 5.0),
        ("conditional", None, 0): v_c,
    }
    for (kind, w, k), want in expected.items():
        rule = guidance.make_rule(kind, w, k)
        np.testing.assert_allclose(run(rule, 1), want, atol=1e-6)
        if k is not None:  # with K = 2 step 1 is zeroed
            np.testing.assert_array_equal(run(guidance.make_rule(kind, w, 2), 1), 0.0)
    assert run._cache_size() == 1
    # a rule of another class is another program (tree structures differ)
    from cfgzero_theory.guidance_family import TangentialCFG

    run(TangentialCFG(2.0), 0)
    assert run._cache_size() == 2


def test_make_rule_is_the_one_vocabulary():
    rules = {kind: guidance.make_rule(kind, 4.0 if kind != "conditional" else None) for kind in guidance.KINDS}
    assert {kind: r.kind for kind, r in rules.items()} == {kind: kind for kind in guidance.KINDS}
    assert [guidance.zero_init_steps(rules[k]) for k in guidance.KINDS] == [0, 0, 1, 1, 0]
    assert rules["cfg-zero-star"] == CFGZeroStar(4.0, 1) and rules["cfg-star"] == CFGStar(4.0)
    assert rules["cfg"] == CFG(4.0)
    # one encoding: zero-init folds into the rule's own K, and ZeroInit refuses these rules
    assert guidance.with_zero_init(CFGStar(4.0), 2) == CFGZeroStar(4.0, 2)
    assert guidance.with_zero_init(CFGZeroStar(4.0, 3), 1) == CFGZeroStar(4.0, 3)
    with pytest.raises(ValueError, match="with_zero_init"):
        ZeroInit(CFGStar(4.0), 1)
    for bad, match in [
        (lambda: guidance.make_rule("cfg_zero_star", 4.0), "kind must be one of"),
        (lambda: guidance.make_rule("cfg", None), "scale is required"),
        (lambda: guidance.make_rule("cfg", 4.0, 2), "'zero-init'"),
        (lambda: guidance.make_rule("cfg-star", 4.0, 1), "'cfg-zero-star'"),
        (lambda: guidance.make_rule("conditional", 3.0), "scale of the conditional"),
        (lambda: guidance.make_rule("cfg", float("nan")), "scale must be a finite number"),
        (lambda: guidance.make_rule("zero-init", 4.0, True), "zero_init_steps must be an integer"),
        (lambda: CFG(float("inf")), "scale must be a finite number"),
        (lambda: CFGZeroStar(4.0, -1), "zero_init_steps must be an integer >= 0"),
        (lambda: CFGZeroStar(4.0, 1.5), "zero_init_steps must be an integer >= 0"),
        (lambda: guidance.Guidance(4.0, 1, 0), "optimized must be a bool"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()
    assert guidance.make_rule("zero-init", 4, np.int64(2)) == guidance.make_rule("zero-init", 4.0, 2)
    with pytest.raises(ValueError, match="share a shape"):  # no silent broadcasting of (4, 2) against (4, 1)
        CFG(4.0)(np.ones((4, 2)), np.ones((4, 1)))


def test_rules_describe_themselves_through_wrappers():
    from cfgzero_theory.guidance_family import APG, ChannelSubset, GuidanceInterval, GuidanceRescale

    star0 = guidance.make_rule("cfg-zero-star", 4.0, 2)
    wrapped = GuidanceRescale(GuidanceInterval(ChannelSubset(star0, 3), 0.0, 0.5, 10), 0.7)
    assert guidance.rule_kind(wrapped) == "cfg-zero-star" and guidance.rule_family(wrapped) == "cfg-zero-star"
    assert guidance.zero_init_steps(wrapped) == 2
    stripped = guidance.without_zero_init(wrapped)  # through every wrapper, not only the outermost
    assert guidance.zero_init_steps(stripped) == 0 and guidance.rule_kind(stripped) == "cfg-star"
    assert stripped.rule.rule.rule == CFGStar(4.0)
    assert guidance.rule_family(CFG(0.0)) == "unconditional" and guidance.rule_family(CFG(1.0)) == "conditional"
    assert guidance.describe(guidance.make_rule("conditional", zero_init_steps=1)) == "conditional + zero-init (K=1)"
    apg = ZeroInit(APG(3.0), 2)
    assert guidance.rule_family(APG(3.0)) == "other" and guidance.rule_family(apg) == "zero-init"
    assert guidance.zero_init_steps(ZeroInit(ZeroInit(APG(3.0), 1), 3)) == 3
    assert guidance.without_zero_init(apg) == APG(3.0)
    # works on traced rules too (analysis strips zero-init inside jit)
    k = jax.jit(lambda r: guidance.zero_init_steps(guidance.with_zero_init(r, 0)))(star0)
    assert int(k) == 2
