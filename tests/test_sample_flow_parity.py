"""Whole trajectories of ``sample_flow`` against PyTorch loops around the real diffusers schedulers.

Each reference loop is what a diffusers pipeline runs: ``scheduler.set_timesteps``, then per
step the two branches of the "network", a diffusers guider (or the pipeline's own guidance
lines), and ``scheduler.step``.  The network is the exact Gaussian-mixture velocity written
in PyTorch (``tests/torch_mixture.py``, float64 dense solves, cast to float32), never our JAX
field.  Our side runs the same schedule, solver and rule as one jitted ``lax.scan`` in float32.

Tolerance: every intermediate latent to 2e-4 absolute (latents of unit scale; the float32
field of the JAX mixture and the float64 torch field differ by ~1e-6 per step).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_mixture import TorchMixture

from cfgzero_theory import NULL_LABEL, CFG, CFGZeroStar, GaussianMixture, mixtures, presets
from cfgzero_theory.guidance_family import APG, ChannelSubset
from cfgzero_theory.lumina import lumina_next_model
from cfgzero_theory.sampling import mixture_flow_model, sample, sample_flow, sigmas_to_times
from cfgzero_theory.schedules import FlowSchedule, flow_match_euler_schedule, flux_mu, flux_sigmas
from cfgzero_theory.unipc import UniPC, unipc_flow_schedule

pytestmark = pytest.mark.parity
ATOL = 2e-4


def _mixture(dim):
    if dim == 2:
        return mixtures.class_conditional_2d(radius=2.0, cluster_radius=0.5, std=0.3)
    return mixtures.random_class_conditional(jax.random.key(3), dim, num_classes=3, components_per_class=2,
                                             class_separation=1.5, component_spread=0.5)


def _torch_mixture(torch, gm):
    return TorchMixture(torch, gm.weights, gm.means, gm.covs, gm.labels)


def _noise(shape, seed=0):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32)


def _reference_loop(torch, scheduler, tm, x0, label, guide, model_time=None):
    """Latents before every step and after the last, ``(N + 1, B, ...)``; ``guide(i, t, v_c, v_u)``."""
    latents = torch.from_numpy(x0.copy())
    states = [latents.numpy().copy()]
    for i, timestep in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i] if model_time is None else model_time(timestep)
        v_c = tm.sigma_prediction(latents, sigma, label)
        v_u = tm.sigma_prediction(latents, sigma, NULL_LABEL)
        latents = scheduler.step(guide(i, timestep, v_c, v_u), timestep, latents).prev_sample
        states.append(latents.numpy().copy())
    return np.stack(states)


def _ours(gm, x0, schedule, label, rule, solver):
    labels = jnp.full((x0.shape[0],), label)
    out = sample_flow(mixture_flow_model, gm, x0, schedule, labels, jnp.full_like(labels, NULL_LABEL), rule,
                      solver=solver, return_trajectory=True)
    return np.asarray(out.trajectory)


def _diffusers_guider(torch, guider, num_steps):
    def guide(i, timestep, v_c, v_u):
        guider.set_state(step=i, num_inference_steps=num_steps, timestep=timestep)
        guider.prepare_inputs({})  # where stateful guiders (APG) create their buffers
        return guider.forward(v_c, v_u).pred

    return guide


def test_torch_reference_field_equals_the_jax_mixture(torch, x64):
    gm = _mixture(8)
    tm = _torch_mixture(torch, gm)
    x = np.asarray(jax.random.normal(jax.random.key(1), (16, 8)), np.float64) * 2
    for t in (0.0, 0.3, 0.9):
        for label in (0, 2, NULL_LABEL):
            want = tm.theory_velocity(torch.from_numpy(x), t, label).numpy()
            np.testing.assert_allclose(np.asarray(gm.velocity(x, t, label)), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("preset, shape", [("sd3", (64, 2)), ("sd3.5-large", (2, 4, 4, 4))])
def test_sd3_euler_cfg_zero_star_trajectory(torch, diffusers, preset, shape):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    p = presets.get(preset)
    gm = _mixture(int(np.prod(shape[1:])))
    x0 = _noise(shape)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=p.shift)
    scheduler.set_timesteps(p.num_steps)
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=p.scale, zero_init_steps=p.zero_init_steps)
    want = _reference_loop(torch, scheduler, _torch_mixture(torch, gm), x0, 1,
                           _diffusers_guider(torch, guider, p.num_steps))
    got = _ours(gm, x0, p.schedule(), 1, p.rule("cfg-zero-star"), p.solver())
    np.testing.assert_allclose(got, want, atol=ATOL)
    np.testing.assert_array_equal(got[1], got[0])  # the zeroed first step leaves the latents in place


def test_flux_dynamic_shift_packed_tokens_cfg_trajectory(torch, diffusers):
    """Flux's schedule (mu from the token count, custom sigmas) on packed tokens ``(B, N, C)``."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.guiders import ClassifierFreeGuidance

    shape, steps = (2, 16, 4), 12
    gm = _mixture(64)
    x0 = _noise(shape, 1)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    mu = flux_mu(1024)
    scheduler.set_timesteps(sigmas=flux_sigmas(steps), mu=mu)
    guider = ClassifierFreeGuidance(guidance_scale=3.0)
    want = _reference_loop(torch, scheduler, _torch_mixture(torch, gm), x0, 2,
                           _diffusers_guider(torch, guider, steps))
    schedule = flow_match_euler_schedule(steps, use_dynamic_shifting=True, mu=mu, sigmas=flux_sigmas(steps))
    got = _ours(gm, x0, schedule, 2, CFG(3.0), presets.get("flux-dev").solver())
    np.testing.assert_allclose(got, want, atol=ATOL)


@pytest.mark.parametrize("steps, flow_shift", [(20, 3.0), (7, 5.0)])
def test_wan_unipc_video_cfg_zero_star_trajectory(torch, diffusers, steps, flow_shift):
    """Wan2.1's UniPC (flow mode, order 2, bh2) with its multistep history in the scan carry, on video latents."""
    from diffusers import UniPCMultistepScheduler
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    shape = (2, 4, 2, 2, 4)
    gm = _mixture(64)
    x0 = _noise(shape, 2)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=flow_shift)
    scheduler.set_timesteps(steps)
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=2)
    want = _reference_loop(torch, scheduler, _torch_mixture(torch, gm), x0, 0,
                           _diffusers_guider(torch, guider, steps))
    got = _ours(gm, x0, unipc_flow_schedule(steps, flow_shift=flow_shift), 0, CFGZeroStar(5.0, 2), UniPC())
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_stateful_apg_trajectory(torch, diffusers):
    """APG's momentum buffer carried through the scan equals diffusers' guider over a whole run."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.guiders import AdaptiveProjectedGuidance

    steps = 16
    gm = _mixture(2)
    x0 = _noise((64, 2), 3)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    guider = AdaptiveProjectedGuidance(guidance_scale=4.0, adaptive_projected_guidance_momentum=-0.5,
                                       adaptive_projected_guidance_rescale=2.0, eta=0.5)
    want = _reference_loop(torch, scheduler, _torch_mixture(torch, gm), x0, 1,
                           _diffusers_guider(torch, guider, steps))
    rule = APG(4.0, momentum=-0.5, norm_threshold=2.0, eta=0.5)
    got = _ours(gm, x0, flow_match_euler_schedule(steps, shift=3.0), 1, rule, presets.get("sd3").solver())
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_lumina_next_convention_trajectory(torch, diffusers):
    """Lumina-Next as its pipeline drives it: the network sees ``1 − τ/1000``, returns prediction and
    learned variance, guidance on three channels, the prediction negated before the Euler step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    shape, steps, scale = (2, 4, 4, 4), 10, 4.0
    gm = _mixture(64)
    tm = _torch_mixture(torch, gm)
    x0 = _noise(shape, 4)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(steps)

    def torch_network(latents, t_lumina, label):  # theory velocity u_t, then a "variance" half
        u = (-tm.sigma_prediction(latents, 1 - t_lumina, label))
        return torch.cat([u, 0.1 * latents], dim=1)

    latents = torch.from_numpy(x0.copy())
    states = [x0]
    for timestep in scheduler.timesteps:  # the pipeline's lines, transcribed
        t_lumina = float(1 - timestep / 1000)
        pred = torch.cat([torch_network(latents, t_lumina, 1), torch_network(latents, t_lumina, NULL_LABEL)])
        pred = pred.chunk(2, dim=1)[0]
        eps, rest = pred[:, :3], pred[:, 3:]
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        half = uncond + scale * (cond - uncond)
        pred = torch.cat([torch.cat([half, half], dim=0), rest], dim=1).chunk(2, dim=0)[0]
        latents = scheduler.step(-pred, timestep, latents).prev_sample
        states.append(latents.numpy().copy())
    want = np.stack(states)

    def network_fn(mixture, x, t, labels, linear_factor, ntk_factor):
        u = -mixture_flow_model(mixture, x, 1 - t, None, labels)
        return jnp.concatenate([u, 0.1 * x], axis=1)

    p = presets.get("lumina-next")
    labels = jnp.full((shape[0],), 1)
    schedule = flow_match_euler_schedule(steps)
    out = sample_flow(lumina_next_model(network_fn), gm, x0, schedule, labels, jnp.full_like(labels, NULL_LABEL),
                      p.rule("cfg", scale=scale), solver=p.solver(), return_trajectory=True)
    np.testing.assert_allclose(np.asarray(out.trajectory), want, atol=ATOL)
    assert isinstance(p.rule("cfg"), ChannelSubset)


def test_sigma_sampler_equals_theory_sampler_on_the_exact_mixture():
    gm = _mixture(2)
    x0 = _noise((128, 2), 5)
    schedule = flow_match_euler_schedule(28, shift=3.0)
    labels = jnp.full((128,), 1)
    ours = sample_flow(mixture_flow_model, gm, x0, schedule, labels, jnp.full_like(labels, NULL_LABEL),
                       CFGZeroStar(4.0)).samples
    theory = sample(GaussianMixture.velocity, gm, x0, sigmas_to_times(schedule.sigmas), 1, CFGZeroStar(4.0)).samples
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theory), atol=2e-5)


def test_sample_flow_rejects_bad_input():
    gm = _mixture(2)
    x0 = _noise((4, 2))
    labels = jnp.full((4,), 1)
    schedule = flow_match_euler_schedule(4)
    with pytest.raises(ValueError, match="latents"):
        sample_flow(mixture_flow_model, gm, x0[0], schedule, labels, labels, CFG(2.0))
    with pytest.raises(ValueError, match="schedule"):
        sample_flow(mixture_flow_model, gm, x0, FlowSchedule(schedule.sigmas[:-1], schedule.timesteps), labels,
                    labels, CFG(2.0))
    with pytest.raises(ValueError, match="context"):
        sample_flow(mixture_flow_model, gm, x0, schedule, labels[:3], labels, CFG(2.0))
