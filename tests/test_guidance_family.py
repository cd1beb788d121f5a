"""The guidance family against diffusers' guiders and the Lumina pipelines' guidance lines.

Diffusers guiders are driven as a pipeline drives them: each step ``set_state`` (10-step
run), ``prepare_inputs`` (which is where APG creates its momentum buffer, at step 0), then
``forward(pred_cond, pred_uncond)``.  Our rules run inside one jitted ``jax.lax.scan`` over
the same 10 steps, carrying the guidance state, with ``step`` traced.
Tolerance (fp32): rtol 1e-5 and atol 1e-5·max|reference| (diffusers' APG projects in
float64, TCFG's SVD is LAPACK's in torch and XLA's here); 1e-4 only for APG + guidance
rescale on 2-number samples, where the rescale's σ ratio amplifies rounding (see
``_rescale_rtol``).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfgzero_theory import guidance as G
from cfgzero_theory import guidance_family as F

SHAPES = [(4, 2), (2, 16, 8, 8), (1, 16, 3, 8, 8)]
N = 10
RTOL = 1e-5


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed + 7919 * len(shape))
    c = rng.normal(size=(N,) + shape).astype(np.float32)
    u = (0.7 * c + 0.5 * rng.normal(size=c.shape)).astype(np.float32)
    return c, u


def _close(got, want, rtol=RTOL):
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=rtol * np.abs(want).max())


def _rescale_rtol(shape, rescale):
    """Guidance rescale multiplies by σ(v_c)/σ(ṽ); with 2 numbers per sample σ(ṽ) = |ṽ₁ − ṽ₂|/√2
    can be small, amplifying APG's fp32-vs-fp64 projection difference (up to ~70× in shape (4, 2))."""
    return 1e-4 if rescale and np.prod(shape[1:]) < 8 else RTOL


@jax.jit
def _run(rule, c, u):
    """All N steps of ``rule`` in one scan, carrying its state; ``step`` is traced int32."""

    def body(state, xs):
        step, v_c, v_u = xs
        v, state = G.apply_rule(rule, state, v_c, v_u, step)
        return state, v

    steps = jnp.arange(c.shape[0], dtype=jnp.int32)
    return jax.lax.scan(body, G.init_rule_state(rule, c[0]), (steps, c, u))[1]


def _check(rule, c, u, want, rtol=RTOL):
    """``rule`` over the run equals ``want``; negating both inputs negates it (same compiled scan)."""
    got = _run(rule, c, u)
    _close(got, want, rtol)
    _close(_run(rule, -c, -u), -np.asarray(got))
    return got


def _run_diffusers(torch, guider, c, u):
    out = []
    for i in range(len(c)):
        guider.set_state(step=i, num_inference_steps=len(c), timestep=torch.tensor(1000.0 - 100.0 * i))
        guider.prepare_inputs({})
        out.append(guider.forward(torch.from_numpy(c[i]), torch.from_numpy(u[i])).pred.numpy())
    return np.stack(out)


def _wrap(rule, start, stop, rescale):
    """Our composition of diffusers' ``start``/``stop`` and ``guidance_rescale`` options."""
    if (start, stop) != (0.0, 1.0):
        rule = F.GuidanceInterval(rule, start, stop, N)
    if rescale > 0:
        rule = F.GuidanceRescale(rule, rescale)
    return rule


PLAIN, INTERVAL, RESCALE, BOTH = (0.0, 1.0, 0.0), (0.1, 0.6, 0.0), (0.0, 1.0, 0.7), (0.1, 0.6, 0.7)
# (use_original_formulation, (start, stop, guidance_rescale)): each formulation plain and wrapped
CFG_CASES = [(False, PLAIN), (False, INTERVAL), (False, BOTH), (True, PLAIN), (True, BOTH)]
NONLINEAR_CASES = [(False, INTERVAL), (True, RESCALE)]  # APG, TCFG: slower to compile


# ----------------------------------------------------------------------------- diffusers parity
@pytest.mark.parity
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("original, wrap", CFG_CASES)
def test_cfg_equals_diffusers_every_step(torch, diffusers, shape, original, wrap):
    from diffusers.guiders import ClassifierFreeGuidance

    start, stop, rescale = wrap
    c, u = _inputs(shape)
    first, end = int(start * N), int(stop * N)
    for scale in [0.0, 3.5] if original else [1.0, 4.5]:  # 1.0 / 0.0: diffusers' "close" shortcut
        guider = ClassifierFreeGuidance(
            guidance_scale=scale, guidance_rescale=rescale, use_original_formulation=original, start=start, stop=stop
        )
        rule = _wrap(F.CFGOriginal(scale) if original else G.CFG(scale), start, stop, rescale)
        got = _check(rule, c, u, _run_diffusers(torch, guider, c, u))
        if rescale == 0:  # outside the interval the conditional prediction, exactly
            outside = [i for i in range(N) if not first <= i < end]
            np.testing.assert_array_equal(np.asarray(got)[outside], c[outside])


@pytest.mark.parity
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("original, wrap", NONLINEAR_CASES)
def test_apg_equals_diffusers_every_step(torch, diffusers, shape, original, wrap):
    from diffusers.guiders import AdaptiveProjectedGuidance

    start, stop, rescale = wrap
    c, u = _inputs(shape, seed=1)
    norms = np.sqrt(np.sum((c - u).reshape(N, shape[0], -1) ** 2, axis=-1))
    clip = float(0.5 * norms.min())  # every step's difference gets clipped
    assert clip < norms.min()
    scale = 3.5 if original else 4.5
    cases = [(scale, m, r, eta) for m in (0.0, -0.5, 0.3) for r in (0.0, clip) for eta in (0.0, 1.0)]
    cases.append((0.0 if original else 1.0, -0.5, clip, 0.0))  # "close" scale: v_c, momentum untouched
    for w, momentum, threshold, eta in cases:
        guider = AdaptiveProjectedGuidance(
            guidance_scale=w,
            adaptive_projected_guidance_momentum=momentum or None,
            adaptive_projected_guidance_rescale=threshold,
            eta=eta,
            guidance_rescale=rescale,
            use_original_formulation=original,
            start=start,
            stop=stop,
        )
        rule = _wrap(F.APG(w, momentum, threshold, eta, use_original_formulation=original), start, stop, rescale)
        _check(rule, c, u, _run_diffusers(torch, guider, c, u), _rescale_rtol(shape, rescale))


@pytest.mark.parity
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("original, wrap", NONLINEAR_CASES)
def test_tcfg_equals_diffusers_every_step(torch, diffusers, shape, original, wrap):
    from diffusers.guiders import TangentialClassifierFreeGuidance

    start, stop, rescale = wrap
    c, u = _inputs(shape, seed=2)
    for scale in [0.0, 3.5] if original else [1.0, 4.5]:
        guider = TangentialClassifierFreeGuidance(
            guidance_scale=scale, guidance_rescale=rescale, use_original_formulation=original, start=start, stop=stop
        )
        rule = _wrap(F.TangentialCFG(scale, use_original_formulation=original), start, stop, rescale)
        _check(rule, c, u, _run_diffusers(torch, guider, c, u))


@pytest.mark.parity
def test_interval_bounds_equal_diffusers_is_cfg_enabled(torch, diffusers):
    from diffusers.guiders import ClassifierFreeGuidance

    for start, stop in [(0.1, 0.6), (0.29, 0.7), (0.0, 0.29), (0.35, 1.0), (0.5, 0.5)]:
        guider = ClassifierFreeGuidance(guidance_scale=3.0, start=start, stop=stop)
        for n in (1, 7, 10, 33, 100):
            first, end = F.GuidanceInterval(G.CFG(3.0), start, stop, n).bounds
            for i in range(n):
                guider.set_state(step=i, num_inference_steps=n, timestep=torch.tensor(0.0))
                assert guider._is_cfg_enabled() == (first <= i < end), (start, stop, n, i)


def test_apg_momentum_frozen_outside_interval_like_diffusers():
    """Diffusers only updates APG's buffer on enabled steps; so do we (state unchanged outside)."""
    c, u = _inputs((2, 4, 3, 5), seed=3)
    rule = F.GuidanceInterval(F.APG(3.0, -0.5, 0.0, 0.0), 0.3, 0.6, N)
    step = jax.jit(G.apply_rule)
    state = G.init_rule_state(rule, c[0])
    for i in range(N):
        _, new = step(rule, state, c[i], u[i], jnp.int32(i))
        if 3 <= i < 6:
            assert not np.array_equal(new, state)
        else:
            np.testing.assert_array_equal(new, state)
        state = new


# ----------------------------------------------------------------------------- Lumina
def _torch_lumina_next(torch, cond, uncond, guidance_scale):
    """Transcription of LuminaPipeline's guidance lines (conditional half first in the batch)."""
    if not guidance_scale > 1.0:  # do_classifier_free_guidance is False: one conditional pass
        return cond
    noise_pred = torch.cat([cond, uncond], dim=0)
    eps, rest = noise_pred[:, :3], noise_pred[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half, half], dim=0)
    noise_pred = torch.cat([eps, rest], dim=1)
    noise_pred, _ = noise_pred.chunk(2, dim=0)
    return noise_pred


def _torch_lumina2(torch, cond, uncond, guidance_scale, i, num_inference_steps, cfg_trunc_ratio, cfg_normalization):
    """Transcription of Lumina2Pipeline's guidance lines at loop index ``i``."""
    truncated = (i + 1) / num_inference_steps > cfg_trunc_ratio
    if guidance_scale > 1 and not truncated:
        pred = uncond + guidance_scale * (cond - uncond)
        if cfg_normalization:
            pred = pred * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(pred, dim=-1, keepdim=True))
        return pred
    return cond


@pytest.mark.parity
@pytest.mark.parametrize("shape", SHAPES)
def test_lumina_next_channel_subset_equals_pipeline(torch, shape):
    c, u = _inputs(shape, seed=4)
    run = jax.jit(jax.vmap(F.lumina_next_cfg, in_axes=(0, 0, None)))  # all steps at once, scale traced
    for scale in (0.5, 1.0, 4.0):
        want = [_torch_lumina_next(torch, torch.from_numpy(a), torch.from_numpy(b), scale).numpy() for a, b in zip(c, u)]
        got = run(c, u, scale)
        _close(got, np.stack(want))
        if scale > 1:  # channels >= 3 are the conditional's, exactly
            np.testing.assert_array_equal(np.asarray(got)[:, :, 3:], c[:, :, 3:])
    _close(F.lumina_next_cfg(c[0], u[0], 4.0, channels=None), G.cfg(c[0], u[0], 4.0))


@pytest.mark.parity
@pytest.mark.parametrize("shape", SHAPES)
def test_lumina2_truncation_and_renormalisation_equal_pipeline(torch, shape):
    c, u = _inputs(shape, seed=5)
    steps = jnp.arange(N, dtype=jnp.int32)
    for ratio, normalization in [(1.0, True), (0.55, True), (0.25, False)]:
        rule = F.CFGTruncation(F.Renormalize(G.CFG(1.0)) if normalization else G.CFG(1.0), ratio, N)
        assert rule.guided_steps == int(ratio * N)
        run = jax.jit(jax.vmap(lambda a, b, i, w: F.lumina2_cfg(a, b, w, i, N, ratio, normalization), (0, 0, 0, None)))
        for scale in (1.0, 4.0):  # scale 1: the pipeline's do_classifier_free_guidance is False
            want = [
                _torch_lumina2(torch, torch.from_numpy(c[i]), torch.from_numpy(u[i]), scale, i, N, ratio, normalization)
                for i in range(N)
            ]
            _close(run(c, u, steps, scale), np.stack([w.numpy() for w in want]))


def test_renormalize_plain_equalises_and_clamp_only_shrinks():
    c, u = _inputs((2, 4, 5, 6), seed=6)
    c, u = c[0], u[0]
    small = G.CFG(0.2)(c, u)  # norm below the conditional's in some rows
    for axis in (-1, None):
        axes = (axis % 4,) if axis is not None else (1, 2, 3)
        norm = lambda v: np.sqrt(np.sum(np.asarray(v) ** 2, axis=axes))  # noqa: E731
        plain = F.Renormalize(G.CFG(0.2), axis=axis)(c, u)
        _close(norm(plain), norm(c))
        clamped = F.Renormalize(G.CFG(0.2), axis=axis, clamp=True)(c, u)
        assert np.all(norm(clamped) <= norm(c) * (1 + 1e-6))
        _close(norm(clamped), np.minimum(norm(small), norm(c)))


def test_truncation_counts_steps_like_lumina2_not_like_int():
    assert F.CFGTruncation(G.CFG(2.0), 0.29, 100).guided_steps == 29  # (29)/100 <= 0.29
    assert F.GuidanceInterval(G.CFG(2.0), 0.0, 0.29, 100).bounds == (0, 28)  # int(28.999999999999996)
    assert F.CFGTruncation(G.CFG(2.0), 0.25, 10).guided_steps == 2
    assert F.CFGTruncation(G.CFG(2.0), 1.0, 10).guided_steps == 10


# ----------------------------------------------------------------------------- properties
def _family(c_like):
    clip = float(0.5 * np.sqrt(np.sum(c_like[0] ** 2)))
    return [
        F.CFGOriginal(3.0),
        F.GuidanceInterval(G.CFGStar(4.0), 0.1, 0.6, N),
        F.GuidanceRescale(G.CFG(5.0), 0.7),
        F.APG(4.0, -0.5, clip, 0.0),
        F.GuidanceInterval(F.APG(3.0, 0.3, clip, 1.0, use_original_formulation=True), 0.2, 0.9, N),
        F.TangentialCFG(4.0),
        F.ChannelSubset(G.CFGZeroStar(4.0), 3),
        F.ChannelSubset(F.APG(4.0, -0.5, clip, 0.0), 2),
        F.Renormalize(G.CFG(4.0)),
        F.CFGTruncation(F.Renormalize(F.APG(4.0, -0.5, 0.0, 0.5), axis=None, clamp=True), 0.55, N),
    ]


def test_lumina_rules_are_odd():
    """The parity tests check oddness of CFG, APG, TCFG and their wrappers; here the rest."""
    c, u = _inputs((2, 4, 3, 5), seed=8)
    for rule in [
        F.GuidanceInterval(F.ChannelSubset(G.CFGZeroStar(4.0), 3), 0.1, 0.6, N),
        F.ChannelSubset(F.APG(4.0, -0.5, 1.0, 0.0), 2),
        F.CFGTruncation(F.Renormalize(F.APG(4.0, -0.5, 0.0, 0.5), axis=None, clamp=True), 0.55, N),
    ]:
        _close(_run(rule, -c, -u), -np.asarray(_run(rule, c, u)))


def test_jit_with_traced_step_matches_eager():
    """Every step gate with a traced int32 step equals the eager Python-int evaluation."""
    c, u = _inputs((2, 4, 3, 5), seed=9)
    once = jax.jit(lambda rule, v_c, v_u, step: rule(v_c, v_u, step))
    # zero-init below 1, interval [0, 8), truncation below 5
    rule = F.CFGTruncation(F.GuidanceInterval(F.ChannelSubset(G.CFGZeroStar(4.0), 3), 0.0, 0.8, N), 0.55, N)
    for i in (0, 1, 4, 5):
        got = once(rule, c[i], u[i], jnp.int32(i))
        _close(got, rule(c[i], u[i], i))
        if i in (0, 5):
            np.testing.assert_array_equal(got, c[i] if i == 5 else np.concatenate([0 * c[i][:, :3], c[i][:, 3:]], 1))


def test_numbers_are_leaves_and_options_are_static():
    interval = F.GuidanceInterval(G.CFG(2.0), 0.1, 0.6, N)
    assert jax.tree_util.tree_leaves(interval) == [2.0, False, 0]  # scale, optimized, K
    apg = F.APG(4.0, -0.5, 2.0, 0.0, use_original_formulation=True)
    assert jax.tree_util.tree_leaves(apg) == [4.0, -0.5, 2.0, 0.0]
    assert jax.tree_util.tree_leaves(F.Renormalize(F.ChannelSubset(G.CFG(3.0), 3), axis=(1, 2), clamp=True)) == [
        3.0, False, 0]
    for rule in _family(np.ones((1, 2), np.float32)):
        leaves, tree = jax.tree_util.tree_flatten(rule)
        assert jax.tree_util.tree_unflatten(tree, leaves) == rule
    # static options change the tree structure; numbers do not
    tree = jax.tree_util.tree_structure
    assert tree(F.APG(4.0)) != tree(F.APG(4.0, use_original_formulation=True))
    assert tree(F.GuidanceInterval(G.CFG(2.0), 0.1, 0.6, N)) != tree(F.GuidanceInterval(G.CFG(2.0), 0.2, 0.6, N))
    assert tree(F.APG(4.0, -0.5)) == tree(F.APG(7.0, 0.3))


def test_scales_vmap_through_the_rules():
    c, u = _inputs((2, 4, 3, 5), seed=10)
    scales = jnp.array([1.0, 2.5, 4.0])
    for make in (lambda w: F.APG(w, -0.5, 1.0, 0.0), lambda w: F.TangentialCFG(w)):
        batched = jax.vmap(lambda w: _run(make(w), c, u))(scales)
        for k, w in enumerate([1.0, 2.5, 4.0]):
            _close(batched[k], _run(make(w), c, u))


def test_special_cases():
    c, u = _inputs((3, 6), seed=11)
    c, u = c[0], u[0]
    np.testing.assert_allclose(F.CFGOriginal(2.0)(c, u), G.cfg(c, u, 3.0), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(F.CFGOriginal(0.0)(c, u), c)
    _close(F.APG(4.0, 0.0, 0.0, 1.0)(c, u), G.cfg(c, u, 4.0))  # APG without its parts is CFG
    np.testing.assert_array_equal(F.APG(1.0, -0.5, 1.0, 0.0)(c, u), c)  # diffusers' "close to 1"
    np.testing.assert_allclose(F.GuidanceRescale(G.CFG(4.0), 0.0)(c, u), G.cfg(c, u, 4.0), rtol=1e-6)
    rescaled = F.GuidanceRescale(G.CFG(4.0), 1.0)(c, u)
    _close(np.std(np.asarray(rescaled), axis=1, ddof=1), np.std(c, axis=1, ddof=1))
    zero = F.GuidanceRescale(G.make_rule("zero-init", 4.0, 1), 0.7)(c, u, 0)  # σ(ṽ) = 0: no NaN
    np.testing.assert_array_equal(zero, 0.0)
    np.testing.assert_array_equal(F.Renormalize(G.make_rule("zero-init", 4.0, 1))(c, u, 0), 0.0)


def test_describe_labels():
    labels = [G.describe(rule) for rule in _family(np.ones((1, 2), np.float32))]
    assert len(set(labels)) == len(labels) and all(labels)
    assert G.describe(F.CFGOriginal(3.0)) == "CFG original (w=3)"
    assert "0.1" in G.describe(F.GuidanceInterval(G.CFG(2.0), 0.1, 0.6, N))
    assert G.describe(F.APG(4.0, -0.5, 2.0, 0.0)).startswith("APG (w=4, m=-0.5")
    assert G.describe(F.GuidanceRescale(G.CFG(4.0), 0.7)) == "CFG (w=4) + rescale 0.7"


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: F.GuidanceInterval(G.CFG(2.0), 0.1, 0.6, -3), "num_steps"),
        (lambda: F.GuidanceInterval(G.CFG(2.0), 0.1, 0.6, 0), "num_steps"),
        (lambda: F.GuidanceInterval(G.CFG(2.0), 0.1, 0.6, 2.5), "num_steps"),
        (lambda: F.GuidanceInterval(G.CFG(2.0), 0.7, 0.6, 10), "start"),
        (lambda: F.GuidanceInterval(G.CFG(2.0), -0.1, 0.6, 10), "start"),
        (lambda: F.GuidanceInterval(G.CFG(2.0), 0.1, 1.5, 10), "stop"),
        (lambda: F.GuidanceRescale(G.CFG(2.0), 1.5), "rescale"),
        (lambda: F.GuidanceRescale(G.CFG(2.0), -0.1), "rescale"),
        (lambda: F.APG(2.0, norm_threshold=-1.0), "norm_threshold"),
        (lambda: F.APG(2.0, use_original_formulation="yes"), "use_original_formulation"),
        (lambda: F.ChannelSubset(G.CFG(2.0), 0), "channels"),
        (lambda: F.ChannelSubset(G.CFG(2.0), 2.0), "channels"),
        (lambda: F.Renormalize(G.CFG(2.0), axis="last"), "axis"),
        (lambda: F.Renormalize(G.CFG(2.0), axis=0)(np.ones((2, 3)), np.ones((2, 3))), "axis"),
        (lambda: F.CFGTruncation(G.CFG(2.0), -0.5, 10), "ratio"),
        (lambda: F.CFGTruncation(G.CFG(2.0), 0.5, -1), "num_steps"),
    ],
)
def test_bad_arguments_raise_naming_them(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_rules_are_frozen():
    rule = F.APG(4.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.scale = 2.0
