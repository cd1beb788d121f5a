"""``sample_flow`` beyond parity: sharding of the batch axis, vmapped scales, stateful rules, presets."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfgzero_theory import NULL_LABEL, CFGZeroStar, GaussianMixture, mixtures, presets
from cfgzero_theory.guidance_family import APG
from cfgzero_theory.sampling import mixture_flow_model, sample, sample_flow, sigmas_to_times

SHARDED = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from cfgzero_theory import NULL_LABEL, CFGZeroStar, mixtures, presets
    from cfgzero_theory.sampling import mixture_flow_model, sample_flow

    assert len(jax.devices()) == 4
    gm = mixtures.class_conditional_2d()
    p = presets.get("wan2.1-t2v-480p")
    x0 = jax.random.normal(jax.random.key(0), (64, 2))
    labels = jnp.full((64,), 1)
    args = (gm, x0, p.schedule(12), labels, jnp.full_like(labels, NULL_LABEL), p.rule())
    plain = sample_flow(mixture_flow_model, *args, solver=p.solver()).samples
    batch = NamedSharding(Mesh(np.array(jax.devices()), ("batch",)), P("batch"))
    sharded_args = (gm, jax.device_put(x0, batch), p.schedule(12), jax.device_put(labels, batch),
                    jax.device_put(jnp.full_like(labels, NULL_LABEL), batch), p.rule())
    out = sample_flow(mixture_flow_model, *sharded_args, solver=p.solver()).samples
    assert len(out.sharding.device_set) == 4, out.sharding
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain), atol=1e-3)  # float32: fused differently per shard; w = 5 amplifies rounding
    print("ok")
    """
)


def test_batch_axis_sharded_over_four_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def _run(rule, preset="sd3", n=32):
    gm = mixtures.class_conditional_2d()
    p = presets.get(preset)
    x0 = jax.random.normal(jax.random.key(1), (n, 2))
    labels = jnp.full((n,), 1)
    return gm, x0, sample_flow(mixture_flow_model, gm, x0, p.schedule(), labels, jnp.full_like(labels, NULL_LABEL),
                               rule, solver=p.solver(), return_trajectory=True)


def test_vmap_over_guidance_scales_matches_separate_runs():
    gm = mixtures.class_conditional_2d()
    p = presets.get("sd3")
    x0 = jax.random.normal(jax.random.key(1), (16, 2))
    labels = jnp.full((16,), 1)

    def final(scale):
        return sample_flow(mixture_flow_model, gm, x0, p.schedule(), labels, jnp.full_like(labels, NULL_LABEL),
                           CFGZeroStar(scale, 1), solver=p.solver()).samples

    scales = jnp.array([1.5, 4.0])
    both = jax.vmap(final)(scales)
    for i, w in enumerate(scales):
        np.testing.assert_allclose(np.asarray(both[i]), np.asarray(final(w)), atol=1e-5)


def test_records_opt_scale_and_zeroed_steps():
    _, x0, out = _run(CFGZeroStar(4.0, 2))
    assert out.trajectory.shape == (29, 32, 2) and out.opt_scale.shape == (28, 32)
    np.testing.assert_array_equal(np.asarray(out.guided[:2]), 0.0)
    v_c, v_u = np.asarray(out.v_cond[5]), np.asarray(out.v_uncond[5])
    want = (v_c * v_u).sum(1) / ((v_u * v_u).sum(1) + 1e-8)
    np.testing.assert_allclose(np.asarray(out.opt_scale[5]), want, rtol=1e-5)


def test_stateful_rule_in_the_theory_sampler_matches_the_sigma_sampler():
    """APG carries its momentum through both loops; Euler on the same grid gives the same samples
    (APG is odd in its inputs, so the two conventions agree)."""
    rule = APG(3.0, momentum=-0.5, norm_threshold=5.0, eta=0.5)
    gm, x0, out = _run(rule)
    theory = sample(GaussianMixture.velocity, gm, x0, sigmas_to_times(presets.get("sd3").schedule().sigmas), 1, rule)
    np.testing.assert_allclose(np.asarray(out.samples), np.asarray(theory.samples), atol=5e-5)


def test_presets_are_data_and_reject_bad_choices():
    for name, p in presets.PRESETS.items():
        kwargs = {"image_seq_len": 4096} if p.resolution_shift else {}
        schedule = p.schedule(**kwargs)
        assert schedule.timesteps.shape == (p.num_steps,) and schedule.sigmas.shape == (p.num_steps + 1,)
        assert float(schedule.sigmas[-1]) == 0.0 and np.all(np.diff(np.asarray(schedule.sigmas)) < 0)
        for kind in presets.GUIDANCE_KINDS:
            p.rule(kind)
    with pytest.raises(ValueError, match="preset"):
        presets.get("sd4")
    with pytest.raises(ValueError, match="image_seq_len"):
        presets.get("flux-dev").schedule()
    with pytest.raises(ValueError, match="guidance"):
        presets.get("sd3").rule("pag")
    with pytest.raises(ValueError, match="zero_init_steps"):
        presets.get("sd3").rule(zero_init_steps=-1)


def test_lumina_rope_factors_switch_at_the_watershed():
    """The pipeline's rule: ``t < watershed`` → (linear = s, ntk = 1), else (1, s); and t = 1 − τ/1000."""
    from cfgzero_theory.lumina import lumina_time, rope_scaling_factors

    for tau, watershed in [(1000.0, 0.3), (700.0, 0.3), (650.0, 0.3), (0.0, 1.0), (10.0, 1.0)]:
        t = float(lumina_time(tau))
        assert t == pytest.approx(1 - tau / 1000)
        linear, ntk = (float(f) for f in rope_scaling_factors(t, 2.0, watershed))
        assert (linear, ntk) == ((2.0, 1.0) if t < watershed else (1.0, 2.0))


def _half_model(mixture, x, sigma, timestep, labels):
    """A deliberately worse prediction: half the exact conditional field."""
    return 0.5 * mixture_flow_model(mixture, x, sigma, timestep, labels)


def test_perturbed_guidance_adds_its_term_inside_its_interval_only():
    from cfgzero_theory import CFG
    from cfgzero_theory.sampling import PerturbedGuidance
    from cfgzero_theory.schedules import flow_match_euler_schedule

    gm = mixtures.class_conditional_2d()
    x = jax.random.normal(jax.random.key(1), (64, 2))
    labels = jnp.ones((64,), jnp.int32)
    schedule, steps = flow_match_euler_schedule(10, shift=3.0), 10
    term = PerturbedGuidance(_half_model, scale=2.0, start=0.15, stop=0.55)  # active at steps 2 … 5
    out = sample_flow(mixture_flow_model, gm, x, schedule, labels, jnp.full_like(labels, NULL_LABEL), CFG(3.0),
                      perturbed=term, return_trajectory=True)
    plain = out.v_uncond + 3.0 * (out.v_cond - out.v_uncond)
    extra = np.asarray(out.guided - plain)
    for i in range(steps):
        expected = 2.0 * (out.v_cond[i] - 0.5 * out.v_cond[i]) if 2 <= i <= 5 else jnp.zeros_like(out.v_cond[i])
        np.testing.assert_allclose(extra[i], np.asarray(expected), atol=1e-5, err_msg=f"step {i}")
    assert bool(term.active(2, steps)) and not bool(term.active(1, steps)) and not bool(term.active(6, steps))
    with pytest.raises(ValueError, match="start must not exceed stop"):
        PerturbedGuidance(_half_model, start=0.5, stop=0.2)
    with pytest.raises(ValueError, match="model_fn must be callable"):
        PerturbedGuidance("skip")
    with pytest.raises(ValueError, match="perturbed must be a PerturbedGuidance"):
        sample_flow(mixture_flow_model, gm, x, schedule, labels, labels, CFG(3.0), perturbed=2.0)


def test_switching_kind_scale_or_k_does_not_recompile():
    """One compiled loop serves every rule of make_rule; only the step count (a shape) recompiles.

    Counted with the jitted loop's own compilation cache, not with timings.
    """
    from cfgzero_theory import make_rule, sampling

    gm = mixtures.class_conditional_2d()
    x0 = jax.random.normal(jax.random.key(3), (16, 2))
    labels = jnp.full((16,), 1)
    preset = presets.get("sd3")

    def run(rule, steps=7):
        return sample_flow(mixture_flow_model, gm, x0, preset.schedule(steps), labels, jnp.full_like(labels, NULL_LABEL),
                           rule, solver=preset.solver()).samples

    before = sampling._sample_flow_jit._cache_size()
    outputs = {}
    for kind in ("cfg", "cfg-star", "zero-init", "cfg-zero-star", "conditional"):
        for w, k in ((2.0, 1), (5.5, 3)):
            scale = None if kind == "conditional" else w
            k = k if kind in ("zero-init", "cfg-zero-star", "conditional") else None
            outputs[kind, w, k] = run(make_rule(kind, scale, k))
    assert sampling._sample_flow_jit._cache_size() == before + 1
    assert len({np.asarray(o).tobytes() for o in outputs.values()}) == len(outputs)  # every setting took effect
    run(make_rule("cfg", 2.0), steps=9)
    assert sampling._sample_flow_jit._cache_size() == before + 2


def test_conditional_branch_only_calls_the_model_on_the_batch_once_per_step():
    """``uncond_context=None``: one forward of batch B per step (not 2B), ``v_u = v_c``; the
    result equals the two-branch run of the ``conditional`` kind, zero-init included."""
    gm = mixtures.class_conditional_2d()
    p = presets.get("sd3")
    x0 = jax.random.normal(jax.random.key(3), (16, 2))
    labels = jnp.full((16,), 1)
    batches = []

    def counting_model(mixture, x, sigma, timestep, context):
        batches.append(x.shape[0])  # recorded while tracing: the batch each call sees
        return mixture_flow_model(mixture, x, sigma, timestep, context)

    rule = presets.get("flux-dev").rule(zero_init_steps=2)
    one = sample_flow(counting_model, gm, x0, p.schedule(6), labels, None, rule, return_trajectory=True)
    assert set(batches) == {16}
    np.testing.assert_array_equal(np.asarray(one.v_uncond), np.asarray(one.v_cond))
    np.testing.assert_array_equal(np.asarray(one.guided[:2]), 0.0)
    two = sample_flow(mixture_flow_model, gm, x0, p.schedule(6), labels, jnp.full_like(labels, NULL_LABEL), rule)
    np.testing.assert_allclose(np.asarray(one.samples), np.asarray(two.samples), rtol=1e-6, atol=1e-6)
