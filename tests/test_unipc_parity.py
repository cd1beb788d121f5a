"""Parity of :mod:`cfgzero_theory.unipc` with diffusers' flow-mode ``UniPCMultistepScheduler``.

The reference is the real scheduler, configured as Wan2.1 does (``prediction_type=
"flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=F``) plus the
solver options under test, driven in a Python loop by a smooth nonlinear velocity field
``v(x, σ) = tanh(x)·(1 + σ) − 0.3·x`` written once in torch and once in jax.numpy; our
``UniPC`` runs the same field inside one jitted ``lax.scan``.

Tolerances (float32 latents; errors relative to the max magnitude of the reference):
schedules are bit-identical (a traced ``flow_shift`` without x64: sigmas within 4 ulp,
timesteps within 1); every intermediate latent of a trajectory to 1e-5 (observed ≤ 9.3e-7:
torch and XLA differ in the last bit of tanh/log/expm1 and in the 2×2/3×3 solves, and that
accumulates over 50 steps); a single step from diffusers' own state, with float32 or
bfloat16 ``v``, to 5e-6 (observed ≤ 8e-7); the scan-compiled run equals the eager loop to
2e-6 (observed 3e-7: XLA fuses differently under ``jit``).  diffusers' non-finite final
steps (bh1, or no ``lower_order_final``) are checked separately.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cfgzero_theory.schedules import FlowSchedule
from cfgzero_theory.unipc import UniPC, UniPCState, unipc_flow_schedule

pytestmark = pytest.mark.parity

VIDEO, IMAGE = (2, 16, 4, 8, 8), (2, 4, 8, 8)
WAN = UniPC()  # solver_order=2, "bh2", lower_order_final, no disabled corrector
TRAJECTORY_TOL = 1e-5
STEP_TOL = 5e-6


def _scheduler(diffusers, num_steps, flow_shift, solver=WAN):
    scheduler = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
        num_train_timesteps=1000,
        solver_order=solver.order,
        solver_type=solver.solver_type,
        lower_order_final=solver.lower_order_final,
        disable_corrector=list(solver.disable_corrector),
    )
    scheduler.set_timesteps(num_steps)
    scheduler.set_begin_index(0)  # as Wan's pipeline does; our step index is explicit too
    return scheduler


def _torch_field(torch, x, sigma):
    return torch.tanh(x) * (1 + sigma) - 0.3 * x


def _jax_field(x, sigma):
    return jnp.tanh(x) * (1 + sigma) - 0.3 * x


def _reference_run(torch, scheduler, x):
    """Every latent diffusers produces; a last step that raises (singular solve) gives NaN."""
    x = torch.from_numpy(x)
    latents = []
    for i, t in enumerate(scheduler.timesteps):
        try:
            x = scheduler.step(_torch_field(torch, x, scheduler.sigmas[i]), t, x).prev_sample
        except torch.linalg.LinAlgError:
            assert i == len(scheduler.timesteps) - 1
            x = torch.full_like(x, float("nan"))
        latents.append(x.numpy().copy())
    return np.stack(latents)


@jax.jit
def _scan_run(solver, schedule, x):
    def body(carry, i):
        x, state = carry
        x, state = solver.step(state, schedule, i, x, _jax_field(x, schedule.sigmas[i]))
        return (x, state), x

    init = (x, solver.init(x, schedule))
    return lax.scan(body, init, jnp.arange(schedule.num_steps))[1]


def _assert_close(got, want, tol):
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, rtol=tol, atol=tol * np.abs(want).max())


def _latents(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# --- schedule ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1, 2, 3, 5, 40, 50])
@pytest.mark.parametrize("flow_shift", [1.0, 3.0, 5.0])
def test_schedule_equals_diffusers(torch, diffusers, num_steps, flow_shift):
    scheduler = _scheduler(diffusers, num_steps, flow_shift)
    schedule = unipc_flow_schedule(num_steps, flow_shift=flow_shift)
    assert schedule.sigmas.dtype == jnp.float32 and schedule.num_steps == num_steps
    np.testing.assert_array_equal(np.asarray(schedule.sigmas), scheduler.sigmas.numpy())
    np.testing.assert_array_equal(np.asarray(schedule.timesteps), scheduler.timesteps.numpy())


def test_schedule_reproduces_float64_truncation(torch, diffusers):
    """N = 3, F = 1: σ_2 = 0.334 and 0.334·1000 is 333.99… in float64, so the timestep is 333."""
    schedule = unipc_flow_schedule(3)
    assert int(schedule.timesteps[2]) == 333 == int(_scheduler(diffusers, 3, 1.0).timesteps[2])
    assert float(schedule.sigmas[0]) == np.float32(1 - 1e-6)


@pytest.mark.parametrize("num_steps", [3, 9, 50])
def test_schedule_with_traced_flow_shift(torch, diffusers, num_steps):
    traced = jax.jit(lambda shift: unipc_flow_schedule(num_steps, flow_shift=shift))
    for flow_shift in (1.0, 3.0, 5.0):
        scheduler = _scheduler(diffusers, num_steps, flow_shift)
        schedule = traced(jnp.float32(flow_shift))
        want = scheduler.sigmas.numpy()
        ulps = np.abs(np.asarray(schedule.sigmas).view(np.int32) - want.view(np.int32))
        assert ulps.max() <= 4
        assert np.abs(np.asarray(schedule.timesteps) - scheduler.timesteps.numpy()).max() <= 1


@pytest.mark.parametrize("num_steps", [3, 9, 37])
def test_schedule_with_traced_flow_shift_is_exact_in_x64(torch, diffusers, x64, num_steps):
    traced = jax.jit(lambda shift: unipc_flow_schedule(num_steps, flow_shift=shift))
    for flow_shift in (1.0, 3.0, 5.0):
        scheduler = _scheduler(diffusers, num_steps, flow_shift)
        schedule = traced(jnp.asarray(flow_shift))
        np.testing.assert_array_equal(np.asarray(schedule.sigmas), scheduler.sigmas.numpy())
        np.testing.assert_array_equal(np.asarray(schedule.timesteps), scheduler.timesteps.numpy())


# --- whole trajectories -----------------------------------------------------------------

TRAJECTORIES = [
    # Wan's configuration at every N, on the video shape.
    *[(WAN, n, VIDEO, 5.0) for n in (2, 5, 20, 50)],
    # The other options, one run each on the image shape (N = 5 reaches order 3 and drops
    # back to 2 and 1 with lower_order_final).
    (UniPC(1), 5, IMAGE, 3.0),
    (UniPC(2, "bh2", False), 5, IMAGE, 3.0),
    (UniPC(2, "bh1", False), 5, IMAGE, 3.0),
    (UniPC(3), 5, IMAGE, 3.0),
    (UniPC(3, "bh1"), 20, IMAGE, 1.0),
    (UniPC(3, "bh2", False), 50, IMAGE, 3.0),
    (UniPC(2, disable_corrector=(0, 2)), 5, VIDEO, 3.0),
]


@pytest.mark.parametrize("solver, num_steps, shape, flow_shift", TRAJECTORIES)
def test_trajectory_equals_diffusers(torch, diffusers, solver, num_steps, shape, flow_shift):
    x = _latents(shape, seed=num_steps)
    scheduler = _scheduler(diffusers, num_steps, flow_shift, solver)
    want = _reference_run(torch, scheduler, x)
    got = np.asarray(_scan_run(solver, unipc_flow_schedule(num_steps, flow_shift=flow_shift), x))
    assert got.shape == want.shape
    final_ok = solver.lower_order_final and solver.solver_type == "bh2"
    compared = num_steps if final_ok else num_steps - 1
    for k in range(compared):
        _assert_close(got[k], want[k], TRAJECTORY_TOL)
    if final_ok:
        return
    assert not np.isfinite(want[-1]).any()  # diffusers' last step to σ = 0 is not finite here
    if solver.lower_order_final:
        # bh1: diffusers computes (−∞)·0 in UniP-1; ours returns its limit x̂0.
        _assert_close(got[-1], scheduler.model_outputs[-1].numpy(), TRAJECTORY_TOL)
    else:
        # Order ≥ 2 extrapolation over h = ∞ diverges in both.
        assert not np.isfinite(got[-1]).any()


# --- single steps from diffusers' own state ----------------------------------------------


def _state_of(scheduler, shape):
    """diffusers' history between two ``step`` calls as a :class:`UniPCState`."""
    zeros = np.zeros(shape, np.float32)
    outputs = [zeros if m is None else m.numpy() for m in scheduler.model_outputs]
    pending = scheduler.last_sample is not None
    return UniPCState(
        model_outputs=np.stack(outputs),
        last_sample=scheduler.last_sample.numpy() if pending else zeros,
        last_order=np.int32(scheduler.this_order if pending else 0),
        lower_order_nums=np.int32(scheduler.lower_order_nums),
    )


@pytest.mark.parametrize(
    "solver, v_dtype",
    [(WAN, "float32"), (WAN, "bfloat16"), (UniPC(3, "bh1"), "float32")],
    ids=["wan", "wan-bf16-v", "order3-bh1"],
)
def test_each_step_equals_diffusers_on_random_tensors(torch, diffusers, solver, v_dtype):
    """Each step starts from diffusers' own state, so errors cannot accumulate.

    ``bfloat16`` ``v`` with float32 latents is Wan's pipeline: ``σ·v`` is rounded to bf16 and
    ``x̂0`` is float32 in both.
    """
    num_steps, shape = 8, IMAGE
    schedule = unipc_flow_schedule(num_steps, flow_shift=3.0)
    scheduler = _scheduler(diffusers, num_steps, 3.0, solver)
    step = jax.jit(UniPC.step)
    rng = np.random.default_rng(7)
    for i, t in enumerate(scheduler.timesteps):
        x, v = rng.normal(size=(2, *shape)).astype(np.float32)
        state = jax.tree.map(jnp.asarray, _state_of(scheduler, shape))
        v_jax, v_torch = jnp.asarray(v).astype(v_dtype), torch.from_numpy(v).to(getattr(torch, v_dtype))
        got, got_state = step(solver, state, schedule, jnp.int32(i), jnp.asarray(x), v_jax)
        want = scheduler.step(v_torch, t, torch.from_numpy(x)).prev_sample.numpy()
        assert got.dtype == jnp.float32 and want.dtype == np.float32
        want_state = _state_of(scheduler, shape)
        if i == num_steps - 1 and solver.solver_type == "bh1":
            assert np.isnan(want).all()  # diffusers' (−∞)·0; ours is the limit x̂0
            want = want_state.model_outputs[-1]
        _assert_close(got, want, STEP_TOL)
        _assert_close(got_state.model_outputs, want_state.model_outputs, STEP_TOL)
        _assert_close(got_state.last_sample, want_state.last_sample, STEP_TOL)
        assert int(got_state.last_order) == want_state.last_order
        assert int(got_state.lower_order_nums) == want_state.lower_order_nums


# --- scan vs eager, bad arguments -------------------------------------------------------


def test_scan_equals_eager_loop(torch, diffusers):
    solver, schedule = WAN, unipc_flow_schedule(6, flow_shift=3.0)
    x = jnp.asarray(_latents(IMAGE, seed=1))
    scanned = _scan_run(solver, schedule, x)
    state = solver.init(x, schedule)
    for i in range(schedule.num_steps):
        x, state = solver.step(state, schedule, i, x, _jax_field(x, schedule.sigmas[i]))
        _assert_close(x, scanned[i], 2e-6)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: unipc_flow_schedule(0), "num_inference_steps"),
        (lambda: unipc_flow_schedule(2.5), "num_inference_steps"),
        (lambda: unipc_flow_schedule(True), "num_inference_steps"),
        (lambda: unipc_flow_schedule(4, flow_shift=0.0), "flow_shift"),
        (lambda: unipc_flow_schedule(4, flow_shift=-3.0), "flow_shift"),
        (lambda: unipc_flow_schedule(4, flow_shift=float("nan")), "flow_shift"),
        (lambda: unipc_flow_schedule(4, flow_shift="3"), "flow_shift"),
        (lambda: unipc_flow_schedule(4, flow_shift=True), "flow_shift"),
        (lambda: unipc_flow_schedule(4, flow_shift=float("inf")), "flow_shift"),
        (lambda: unipc_flow_schedule(4, flow_shift=np.ones(2)), "flow_shift"),
        (lambda: unipc_flow_schedule(4, num_train_timesteps=True), "num_train_timesteps"),
        (lambda: unipc_flow_schedule(4, num_train_timesteps=1), "num_train_timesteps"),
        (lambda: unipc_flow_schedule(4, dtype=jnp.int32), "dtype"),
        (lambda: UniPC(order=0), "order"),
        (lambda: UniPC(order=2.0), "order"),
        (lambda: UniPC(solver_type="bh3"), "solver_type"),
        (lambda: UniPC(lower_order_final=1), "lower_order_final"),
        (lambda: UniPC(disable_corrector=(-1,)), "disable_corrector"),
        (lambda: UniPC(disable_corrector=3), "disable_corrector"),
        (lambda: UniPC(disable_corrector=(True,)), "disable_corrector"),
        (lambda: UniPC(order=True), "order"),
        (lambda: UniPC().init(jnp.zeros(IMAGE), FlowSchedule(jnp.ones(3), jnp.ones(3))), "schedule"),
    ],
)
def test_bad_arguments_raise(torch, diffusers, make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_numpy_numbers_are_accepted():
    reference = unipc_flow_schedule(6, flow_shift=3.0)
    schedule = unipc_flow_schedule(np.int64(6), flow_shift=np.float32(3.0), num_train_timesteps=np.int32(1000))
    np.testing.assert_array_equal(schedule.sigmas, reference.sigmas)
    np.testing.assert_array_equal(schedule.timesteps, reference.timesteps)
    solver = UniPC(order=np.int64(2), disable_corrector=(np.int32(1),))
    assert solver.order == 2 and type(solver.order) is int and solver.disable_corrector == (1,)
