"""Parity of :mod:`cfgzero_theory.schedules` with diffusers' ``FlowMatchEulerDiscreteScheduler``.

Schedules: for each configuration the diffusers scheduler is built with the same config and
``set_timesteps(N, sigmas=..., mu=...)`` is called as a pipeline calls it.

* Default (float32) JAX: ``sigmas`` within 2e-6 absolute, ``timesteps`` (``σ·1000``) within
  2e-3 absolute of ``scheduler.sigmas`` / ``scheduler.timesteps``.
* ``jax_enable_x64``: our schedule in float64 is compared with the NumPy array diffusers hands
  to ``torch.from_numpy`` just before its float32 cast (captured with a spy): 1e-12 absolute
  where diffusers works in float64; where it works in float32 (a custom ``sigmas`` list is
  rounded to float32 first), one float32 ulp (2**-23) for XLA's float32 division.  The
  float32 outputs then equal diffusers' to one float32 ulp (1.2e-7; timesteps 1.3e-4).

Euler step: ``FlowMatchEuler.step`` against ``scheduler.step(model_output, timestep, sample)``
with the scheduler driven in order through its steps: float32 within 1e-6 relative + 2e-6
absolute (our own schedule, eager and jitted); bfloat16 within one bf16 ulp (2**-7 relative)
on diffusers' sigmas.
"""

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfgzero_theory.schedules import (
    FlowMatchEuler,
    FlowSchedule,
    euler_step,
    flow_match_euler_schedule,
    flux_mu,
    flux_sigmas,
)

pytestmark = pytest.mark.parity

STEPS = [1, 2, 28, 50]
OPTION_STEPS = [2, 28]  # every static option is one compiled program per N: fewer N keep this file fast
FLUX_MU = flux_mu(1024)  # a 512×512 Flux image: 64×64 latents packed 2×2 → 1024 tokens

# (scheduler config, set_timesteps keywords); "flux" in the keywords stands for flux_sigmas(N).
CORE_CONFIGS = [
    *[({"shift": shift}, {}) for shift in (1.0, 3.0, 5.0)],
    *[
        ({"use_dynamic_shifting": True, "time_shift_type": kind}, {"mu": mu})
        for kind in ("exponential", "linear")
        for mu in (0.5, 1.15, FLUX_MU)
    ],
    *[
        ({"use_dynamic_shifting": True, "time_shift_type": kind}, {"mu": FLUX_MU, "sigmas": "flux"})
        for kind in ("exponential", "linear")
    ],
    ({"shift": 3.0}, {"sigmas": "flux", "mu": 0.7}),  # mu without dynamic shifting: ignored
]
OPTION_CONFIGS = [
    ({"shift": 3.0, "shift_terminal": 0.1}, {}),
    ({"shift": 5.0, "shift_terminal": 0.0}, {}),  # 0 disables the stretch, as in diffusers
    ({"use_dynamic_shifting": True, "shift_terminal": 0.02}, {"mu": 1.15, "sigmas": "flux"}),
    ({"shift": 3.0, "use_karras_sigmas": True}, {}),
    ({"shift": 3.0, "use_exponential_sigmas": True}, {}),
    ({"shift": 3.0, "use_beta_sigmas": True}, {}),
    ({"use_dynamic_shifting": True, "use_karras_sigmas": True}, {"mu": FLUX_MU, "sigmas": "flux"}),
    ({"shift": 3.0, "invert_sigmas": True}, {}),
]


def _case_id(case):
    config, keywords = case
    return "-".join(f"{k}={v}" for k, v in {**config, **keywords}.items())


def _resolve(config, keywords, num_steps):
    keywords = dict(keywords)
    if keywords.get("sigmas") == "flux":
        keywords["sigmas"] = flux_sigmas(num_steps)
    return config, keywords


def _diffusers_schedule(torch, diffusers, config, keywords, num_steps, monkeypatch=None):
    """``(sigmas, timesteps)`` of diffusers, and (with ``monkeypatch``) its sigmas before the float32 cast."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    captured = []
    if monkeypatch is not None:
        from_numpy = torch.from_numpy

        def spy(array):
            captured.append(np.array(array))
            return from_numpy(array)

        monkeypatch.setattr(torch, "from_numpy", spy)
    scheduler.set_timesteps(num_steps, **keywords)
    if monkeypatch is not None:
        monkeypatch.undo()
    return scheduler.sigmas.numpy(), scheduler.timesteps.numpy(), (captured[0] if captured else None)


def _grid(core_steps, option_steps):
    return [
        pytest.param(case, num_steps, id=f"{_case_id(case)}-N={num_steps}")
        for configs, steps in ((CORE_CONFIGS, core_steps), (OPTION_CONFIGS, option_steps))
        for case in configs
        for num_steps in steps
    ]


GRID = _grid(STEPS, OPTION_STEPS)
X64_GRID = _grid([1, 50], [28])  # the float64 programs are compiled afresh, so a sparser grid


@pytest.mark.parametrize("case, num_steps", GRID)
def test_schedule_equals_diffusers_float32(torch, diffusers, case, num_steps):
    config, keywords = _resolve(*case, num_steps)
    want_sigmas, want_timesteps, _ = _diffusers_schedule(torch, diffusers, config, keywords, num_steps)
    got = flow_match_euler_schedule(num_steps, **config, **keywords)
    assert got.sigmas.dtype == got.timesteps.dtype == jnp.float32
    assert got.sigmas.shape == (num_steps + 1,) and got.num_steps == num_steps
    np.testing.assert_allclose(np.asarray(got.sigmas), want_sigmas, rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(got.timesteps), want_timesteps, rtol=0, atol=2e-3)


@pytest.mark.parametrize("case, num_steps", X64_GRID)
def test_schedule_equals_diffusers_before_cast_x64(torch, diffusers, x64, monkeypatch, case, num_steps):
    config, keywords = _resolve(*case, num_steps)
    want_sigmas, want_timesteps, before_cast = _diffusers_schedule(
        torch, diffusers, config, keywords, num_steps, monkeypatch
    )
    wide = flow_match_euler_schedule(num_steps, **config, **keywords, dtype=jnp.float64)
    assert wide.sigmas.dtype == jnp.float64
    wide_sigmas = np.asarray(wide.sigmas[:-1])
    if config.get("invert_sigmas"):
        wide_sigmas = 1 - wide_sigmas
    atol = 1e-12 if before_cast.dtype == np.float64 else 2.0**-23
    np.testing.assert_allclose(wide_sigmas, before_cast, rtol=0, atol=atol)
    # diffusers' final cast and timesteps = σ·T, applied to our float64 sigmas
    narrow = np.asarray(wide.sigmas).astype(np.float32)
    np.testing.assert_allclose(narrow, want_sigmas, rtol=0, atol=2.0**-23)
    np.testing.assert_allclose(narrow[:-1] * np.float32(1000), want_timesteps, rtol=0, atol=1.3e-4)


def test_double_shift_of_the_smallest_sigma(torch, diffusers):
    """The last sigma is the shifted ``1/T`` shifted once more, in diffusers and here."""
    shift, num_train = 3.0, 1000

    def shifted(sigma):
        return shift * sigma / (1 + (shift - 1) * sigma)

    want, _, _ = _diffusers_schedule(torch, diffusers, {"shift": shift}, {}, 10)
    got = flow_match_euler_schedule(10, shift=shift)
    for last in (float(want[-2]), float(got.sigmas[-2])):
        assert last == pytest.approx(shifted(shifted(1 / num_train)), rel=1e-6)
        assert last > 2 * shifted(1 / num_train)


def _flux_pipeline_source(diffusers):
    """The Flux pipeline's source; the module itself needs transformers, which is not a test dependency."""
    return (Path(diffusers.__file__).parent / "pipelines" / "flux" / "pipeline_flux.py").read_text()


def test_flux_helpers_equal_pipeline(torch, diffusers):
    source = _flux_pipeline_source(diffusers)
    tree = ast.parse(source)
    definition = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "calculate_shift")
    namespace = {}
    exec(compile(ast.Module([definition], type_ignores=[]), "pipeline_flux.py", "exec"), namespace)
    calculate_shift = namespace["calculate_shift"]
    for seq_len in (256, 1024, 4096, 6400):
        assert flux_mu(seq_len) == calculate_shift(seq_len)
    assert flux_mu(4096) == pytest.approx(1.15) and flux_mu(256) == pytest.approx(0.5)

    assert "np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)" in source
    np.testing.assert_array_equal(flux_sigmas(28), np.linspace(1.0, 1 / 28, 28))


@pytest.mark.parametrize("shape", [(2, 16, 8, 8), (1, 4096, 64)])
def test_euler_step_equals_diffusers_every_step(torch, diffusers, shape):
    num_steps = 8
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(num_steps)
    schedule = flow_match_euler_schedule(num_steps, shift=3.0)
    solver = FlowMatchEuler()
    state = solver.init(jnp.zeros(shape), schedule)
    assert state == ()
    jitted_step = jax.jit(solver.step)
    rng = np.random.default_rng(sum(shape))
    sample = rng.normal(size=shape).astype(np.float32)
    for i, timestep in enumerate(scheduler.timesteps):
        velocity = rng.normal(size=shape).astype(np.float32)
        want = scheduler.step(torch.from_numpy(velocity), timestep, torch.from_numpy(sample)).prev_sample.numpy()
        got, new_state = solver.step(state, schedule, i, sample, velocity)
        got_jit, _ = jitted_step(state, schedule, jnp.int32(i), sample, velocity)
        assert new_state == () and got.dtype == jnp.float32
        for value in (got, got_jit):
            np.testing.assert_allclose(np.asarray(value), want, rtol=1e-6, atol=2e-6)
        sample = want


def test_euler_step_bfloat16_equals_diffusers(torch, diffusers):
    """Diffusers upcasts the sample, forms ``dt·v`` in the model dtype and casts the result back."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    schedule = FlowSchedule(jnp.asarray(scheduler.sigmas.numpy()), jnp.asarray(scheduler.timesteps.numpy()))
    rng = np.random.default_rng(3)
    sample = torch.from_numpy(rng.normal(size=(2, 16, 8, 8)).astype(np.float32)).to(torch.bfloat16)
    for i, timestep in enumerate(scheduler.timesteps):
        velocity = torch.from_numpy(rng.normal(size=sample.shape).astype(np.float32)).to(torch.bfloat16)
        want = scheduler.step(velocity, timestep, sample).prev_sample
        got, _ = FlowMatchEuler().step(
            (), schedule, i, jnp.asarray(sample.float().numpy(), jnp.bfloat16), jnp.asarray(velocity.float().numpy(), jnp.bfloat16)
        )
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), want.float().numpy(), rtol=2.0**-7, atol=1e-6)
        sample = want


def test_euler_step_function_and_pytree():
    x, v = jnp.ones((2, 3)), jnp.full((2, 3), 2.0)
    np.testing.assert_allclose(euler_step(x, v, 0.75, 0.5), 1 - 0.25 * 2)
    assert jax.tree_util.tree_leaves(FlowMatchEuler()) == []
    schedule = flow_match_euler_schedule(4)
    jitted = jax.jit(lambda solver, i, x: solver.step((), schedule, i, x, v)[0])
    want = x + (schedule.sigmas[2] - schedule.sigmas[1]) * v
    np.testing.assert_allclose(jitted(FlowMatchEuler(), jnp.int32(1), x), want, rtol=1e-6)


def test_jit_and_vmap_over_shift_and_mu(torch, diffusers):
    shifts = jnp.asarray([1.0, 2.0, 3.0, 5.0])
    batched = jax.jit(jax.vmap(lambda shift: flow_match_euler_schedule(28, shift=shift)))(shifts)
    flux = flux_sigmas(28)
    batched_flux = jax.jit(jax.vmap(lambda shift: flow_match_euler_schedule(28, shift=shift, sigmas=flux)))(shifts)
    for k, shift in enumerate(shifts.tolist()):
        single = flow_match_euler_schedule(28, shift=shift)
        np.testing.assert_allclose(batched.sigmas[k], single.sigmas, rtol=0, atol=2e-7)
        np.testing.assert_allclose(batched.timesteps[k], single.timesteps, rtol=0, atol=2e-4)
        want, _, _ = _diffusers_schedule(torch, diffusers, {"shift": shift}, {}, 28)
        np.testing.assert_allclose(batched.sigmas[k], want, rtol=0, atol=2e-6)
        want_flux, _, _ = _diffusers_schedule(torch, diffusers, {"shift": shift}, {"sigmas": flux}, 28)
        np.testing.assert_allclose(batched_flux.sigmas[k], want_flux, rtol=0, atol=2e-6)

    mus = jnp.asarray([0.5, FLUX_MU, 1.15])
    for kind in ("exponential", "linear"):
        by_mu = jax.jit(
            jax.vmap(lambda mu: flow_match_euler_schedule(50, use_dynamic_shifting=True, mu=mu, time_shift_type=kind))
        )(mus)
        for k, mu in enumerate(mus.tolist()):
            config = {"use_dynamic_shifting": True, "time_shift_type": kind}
            want, _, _ = _diffusers_schedule(torch, diffusers, config, {"mu": mu}, 50)
            np.testing.assert_allclose(by_mu.sigmas[k], want, rtol=0, atol=2e-6)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 2.5}, "num_inference_steps"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
        ({"shift": 0.0}, "shift"),
        ({"shift": -2.0}, "shift"),
        ({"shift": float("nan")}, "shift"),
        ({"shift": jnp.ones(2)}, "shift"),
        ({"use_dynamic_shifting": True}, "mu"),
        ({"use_dynamic_shifting": True, "mu": float("inf")}, "mu"),
        ({"use_dynamic_shifting": True, "mu": 0.0, "time_shift_type": "linear"}, "mu"),
        ({"time_shift_type": "cosine"}, "time_shift_type"),
        ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "use_karras_sigmas"),
        ({"use_exponential_sigmas": True, "use_beta_sigmas": True}, "use_beta_sigmas"),
        ({"sigmas": [1.0, 0.5]}, "sigmas"),
        ({"sigmas": np.ones((4, 1))}, "sigmas"),
        ({"num_inference_steps": 3, "sigmas": [1.0, np.nan, 0.2]}, "sigmas must be finite"),  # diffusers: NaN
        ({"num_inference_steps": 3, "sigmas": [1.0, np.inf, 0.2]}, "sigmas must be finite"),
        ({"num_inference_steps": 3, "sigmas": [1.0, 0.5, 0.7]}, "sigmas must be strictly decreasing"),
        ({"num_inference_steps": 3, "sigmas": [1.0, 0.5, 0.5]}, "sigmas must be strictly decreasing"),
        ({"num_inference_steps": 3, "sigmas": [2.0, 0.5, 0.2]}, r"sigmas must be finite and lie in \[0, 1\]"),
        ({"num_inference_steps": 3, "sigmas": [1.0, 0.5, -0.2]}, r"sigmas must be finite and lie in \[0, 1\]"),
        ({"num_inference_steps": True}, "num_inference_steps"),
        ({"num_train_timesteps": True}, "num_train_timesteps"),
        ({"shift": True}, "shift"),
        ({"shift": float("inf")}, "shift"),
        ({"use_dynamic_shifting": True, "mu": True}, "mu"),
        ({"shift_terminal": 1.0}, "shift_terminal"),
        ({"shift_terminal": -0.1}, "shift_terminal"),
        ({"shift_terminal": 0.1, "num_inference_steps": 1}, "shift_terminal"),
        ({"dtype": jnp.int32}, "dtype"),
    ],
)
def test_invalid_arguments(kwargs, name):
    kwargs = {"num_inference_steps": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        flow_match_euler_schedule(kwargs.pop("num_inference_steps"), **kwargs)


def test_numpy_numbers_are_accepted():
    reference = flow_match_euler_schedule(4, shift=3.0)
    schedule = flow_match_euler_schedule(np.int64(4), num_train_timesteps=np.int32(1000), shift=np.float32(3.0))
    np.testing.assert_array_equal(schedule.sigmas, reference.sigmas)
    assert flux_mu(np.int64(1024)) == flux_mu(1024)


def _exponential_shift_as_diffusers(sigmas, mu):
    """diffusers' ``e^μ / (e^μ + (1/σ − 1))`` in float32 (``e^μ`` from float64, as the schedule rounds it)."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        scale = np.float32(np.exp(np.float64(mu)))
        return scale / (scale + (np.float32(1) / sigmas - np.float32(1)))


@pytest.mark.parametrize("mu", [-800.0, -120.0, -20.0, 0.0, 0.7, FLUX_MU, 5.0, 20.0, 88.0, 89.0, 120.0, 800.0, 1.7e5])
def test_exponential_time_shift_is_finite_for_any_mu_and_equals_diffusers_where_that_is(mu):
    """Where ``e^μ`` overflows (μ > 88.7 in float32) or underflows at σ = 1, diffusers' form is
    inf/inf or 0/0 = NaN; the schedule then uses ``sigmoid(μ − log(1/σ − 1))``, the same
    quantity.  Where diffusers' form is finite the two agree to a float32 ulp."""
    sigmas = np.asarray(flux_sigmas(28), np.float32)
    ours = np.asarray(flow_match_euler_schedule(28, use_dynamic_shifting=True, mu=mu, sigmas=sigmas).sigmas[:-1])
    old = _exponential_shift_as_diffusers(sigmas, mu)
    assert np.all(np.isfinite(ours)) and np.all((ours >= 0) & (ours <= 1))
    assert np.all(np.diff(ours) <= 0)  # still a decreasing schedule
    finite = np.isfinite(old)
    np.testing.assert_allclose(ours[finite], old[finite], rtol=2.4e-7, atol=1.2e-7)
    if not finite.all():  # the limits: every σ < 1 goes to 1 (μ → ∞) or to 0 (μ → −∞); σ = 1 stays 1
        assert ours[0] == 1.0
        np.testing.assert_allclose(ours[1:], 1.0 if mu > 0 else 0.0, atol=1e-6)
    jitted = jax.jit(lambda m: flow_match_euler_schedule(28, use_dynamic_shifting=True, mu=m, sigmas=sigmas).sigmas)
    np.testing.assert_array_equal(jitted(jnp.float32(mu))[:-1], ours)


def test_flux_preset_at_huge_image_seq_len_stays_finite():
    """image_seq_len = 1e9 used to give μ ≈ 1.7e5 and a NaN schedule; a float is not a token count."""
    from cfgzero_theory import presets

    preset = presets.get("flux-dev")
    schedule = preset.schedule(image_seq_len=10**9)
    assert np.all(np.isfinite(np.asarray(schedule.sigmas))) and np.all(np.isfinite(np.asarray(schedule.timesteps)))
    np.testing.assert_allclose(np.asarray(schedule.sigmas)[:-1], 1.0, atol=1e-6)
    for bad in (1e9, 4096.0, 0, -5, True):
        with pytest.raises(ValueError, match="^image_seq_len must be an integer >= 1"):
            preset.schedule(image_seq_len=bad)


def test_time_grid_refuses_an_infinite_shift():
    """sampling.time_grid validates ``shift`` with validation.check_real(positive=True): inf and NaN are refused."""
    from cfgzero_theory.sampling import time_grid

    for bad in (float("inf"), float("nan"), 0.0, True):
        with pytest.raises(ValueError, match="shift"):
            time_grid(8, shift=bad)


def test_invalid_helper_arguments():
    with pytest.raises(ValueError, match="num_inference_steps"):
        flux_sigmas(0)
    with pytest.raises(ValueError, match="image_seq_len"):
        flux_mu(2.5)
    with pytest.raises(ValueError, match="max_seq_len"):
        flux_mu(1024, base_seq_len=256, max_seq_len=256)
