"""Parity of the jitted sampler with a PyTorch loop around the real diffusers scheduler and guider.

The loop is the one a diffusers pipeline runs: ``FlowMatchEulerDiscreteScheduler`` (SD3's
``shift = 3``) steps σ from 1 to 0 and ``ClassifierFreeZeroStarGuidance`` combines the two
branches; the network is the exact mixture velocity, turned into diffusers' σ convention by
our adapter.  Our sampler runs on ``t = 1 − σ`` with the theory-convention field.
Tolerance: float32, 1e-4 absolute on samples of unit scale after 28 steps.
"""

import jax
import numpy as np
import pytest

from cfgzero_theory import NULL_LABEL, CFGZeroStar, GaussianMixture
from cfgzero_theory.sampling import sample, sigma_velocity_fn, sigmas_to_times

pytestmark = pytest.mark.parity


@pytest.mark.parametrize("shift, scale, zero_init_steps", [(3.0, 4.0, 1), (1.0, 2.5, 2)])
def test_sampler_equals_diffusers_scheduler_loop(torch, diffusers, shift, scale, zero_init_steps):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    means = np.array([[2.0, 1.0], [1.5, -1.0], [-2.0, 0.5], [-1.0, -2.0]])
    gm = GaussianMixture([1.0, 2.0, 1.0, 1.5], means, np.tile(0.15 * np.eye(2), (4, 1, 1)), [0, 0, 1, 1])
    v_sigma = sigma_velocity_fn(GaussianMixture.velocity)
    n, steps = 64, 28
    x0 = np.asarray(jax.random.normal(jax.random.key(0), (n, 2)))

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=scale, zero_init_steps=zero_init_steps)
    latents = torch.from_numpy(x0.copy())
    for i, timestep in enumerate(scheduler.timesteps):
        sigma = float(scheduler.sigmas[i])
        x = latents.numpy()
        pred_cond = torch.from_numpy(np.array(v_sigma(gm, x, sigma, np.full(n, 1))))
        pred_uncond = torch.from_numpy(np.array(v_sigma(gm, x, sigma, np.full(n, NULL_LABEL))))
        guider.set_state(step=i, num_inference_steps=steps, timestep=timestep)
        pred = guider.forward(pred_cond, pred_uncond).pred
        latents = scheduler.step(pred, timestep, latents).prev_sample
    reference = latents.numpy()

    times = sigmas_to_times(scheduler.sigmas.numpy())
    ours = sample(GaussianMixture.velocity, gm, x0, times, 1, CFGZeroStar(scale, zero_init_steps)).samples
    np.testing.assert_allclose(np.asarray(ours), reference, atol=1e-4)
