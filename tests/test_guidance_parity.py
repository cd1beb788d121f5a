"""Parity with diffusers' ``ClassifierFreeZeroStarGuidance`` at every step of a run.

The guider is driven exactly as a diffusers pipeline drives it (``set_state`` each step,
then ``forward(pred_cond, pred_uncond)``); our ``cfg_zero_star`` receives the same tensors.
Tolerance: fp32 exact up to 1e-6 relative; bf16 to 1 ulp-ish (2e-2 relative).
"""

import numpy as np
import pytest

from cfgzero_theory import guidance

pytestmark = pytest.mark.parity

SHAPES = [(4, 2), (2, 16, 8, 8), (1, 16, 3, 8, 8), (2, 64, 12)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale, zero_init_steps", [(4.0, 1), (3.5, 2), (1.0, 1), (7.5, 0)])
def test_cfg_zero_star_equals_diffusers_guider_every_step(torch, diffusers, shape, scale, zero_init_steps):
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    guider = ClassifierFreeZeroStarGuidance(guidance_scale=scale, zero_init_steps=zero_init_steps)
    num_steps = 6
    rng = np.random.default_rng(hash((shape, scale)) % 2**32)
    for step in range(num_steps):
        v_c = rng.normal(size=shape).astype(np.float32)
        v_u = (0.7 * v_c + 0.5 * rng.normal(size=shape)).astype(np.float32)
        guider.set_state(step=step, num_inference_steps=num_steps, timestep=torch.tensor(1000.0 - step))
        want = guider.forward(torch.from_numpy(v_c), torch.from_numpy(v_u)).pred.numpy()
        got = np.asarray(guidance.cfg_zero_star(v_c, v_u, scale, step, zero_init_steps))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
        if step < zero_init_steps:
            np.testing.assert_array_equal(got, 0.0)


def test_optimized_scale_equals_diffusers_in_bf16(torch, diffusers):
    import jax.numpy as jnp
    from diffusers.guiders.classifier_free_zero_star_guidance import cfg_zero_star_scale

    rng = np.random.default_rng(0)
    v_c = rng.normal(size=(3, 4, 8, 8)).astype(np.float32)
    v_u = (v_c + 0.3 * rng.normal(size=v_c.shape)).astype(np.float32)
    t_c = torch.from_numpy(v_c).to(torch.bfloat16)
    t_u = torch.from_numpy(v_u).to(torch.bfloat16)
    want = cfg_zero_star_scale(t_c.flatten(1), t_u.flatten(1)).float().numpy().ravel()
    got = guidance.optimized_scale(jnp.asarray(v_c, jnp.bfloat16), jnp.asarray(v_u, jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32).ravel(), want, rtol=1e-2)


def test_plain_cfg_equals_diffusers_guider(torch, diffusers):
    from diffusers.guiders import ClassifierFreeGuidance

    guider = ClassifierFreeGuidance(guidance_scale=4.5)
    rng = np.random.default_rng(1)
    v_c, v_u = (rng.normal(size=(2, 4, 8, 8)).astype(np.float32) for _ in range(2))
    guider.set_state(step=3, num_inference_steps=10, timestep=torch.tensor(500.0))
    want = guider.forward(torch.from_numpy(v_c), torch.from_numpy(v_u)).pred.numpy()
    np.testing.assert_allclose(guidance.cfg(v_c, v_u, 4.5), want, rtol=1e-6, atol=1e-6)
