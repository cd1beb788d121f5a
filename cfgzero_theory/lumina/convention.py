"""Lumina-Next's sampling convention, as diffusers' ``LuminaPipeline`` drives its network.

Lumina-Next's network works in the theory convention (docs/design.md §2): it is conditioned on
``t = 1 − τ/1000`` (``τ`` the scheduler timestep, so ``t = 1 − σ`` with ``t = 1`` the
image) and predicts the theory velocity ``u_t = x_data − ε`` in the first half of its
output channels (the second half is a learned variance the sampler drops).  The pipeline
negates that prediction before diffusers' σ-convention Euler step, i.e. it hands the solver
``v_σ = −u_t``; guidance is applied before the negation (rules are odd, so the order does
not matter) and only on the first three latent channels
(:class:`~cfgzero_theory.guidance_family.ChannelSubset`, ``channels=3``).

The rotary embedding is time-aware: with ``s = √(H·W) / default_image_size`` (the
resolution's scale), steps with ``t < scaling_watershed`` use linear interpolation
(``linear_factor = s``, ``ntk_factor = 1``), later steps NTK scaling (``linear_factor = 1``,
``ntk_factor = s``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from cfgzero_theory.validation import check_int, check_real

Array = jax.Array


def lumina_time(timestep, num_train_timesteps: int = 1000) -> Array:
    """The time Lumina-Next's network sees: ``t = 1 − τ / num_train_timesteps``."""
    return 1 - jnp.asarray(timestep) / num_train_timesteps


def rope_scaling_factors(t, scaling_factor, scaling_watershed=1.0) -> tuple[Array, Array]:
    """``(linear_factor, ntk_factor)`` of the time-aware rotary embedding at network time ``t``.

    ``t < scaling_watershed``: ``(scaling_factor, 1)``; otherwise ``(1, scaling_factor)``
    (traceable; ``scaling_watershed = 1`` keeps linear interpolation for every step but a
    final ``t = 1``).
    """
    early = jnp.asarray(t) < scaling_watershed
    one = jnp.ones_like(jnp.asarray(scaling_factor, jnp.result_type(float)))
    return jnp.where(early, scaling_factor, one), jnp.where(early, one, scaling_factor)


def lumina_next_model(
    network_fn: Callable[..., Array],
    *,
    scaling_factor: float = 1.0,
    scaling_watershed: float = 1.0,
    num_train_timesteps: int = 1000,
) -> Callable[..., Array]:
    """Wrap a Lumina-Next network into a σ-convention ``model_fn`` for ``sample_flow``.

    ``network_fn(params, x, t, context, linear_factor, ntk_factor)`` returns ``2C`` channels
    on axis 1 for ``C``-channel latents ``x`` (prediction, learned variance).  The wrapper
    feeds it ``t = 1 − τ/num_train_timesteps`` and the rotary factors of
    :func:`rope_scaling_factors`, keeps the first ``C`` channels and negates them.
    """
    scaling_factor = check_real("scaling_factor", scaling_factor, positive=True)
    scaling_watershed = check_real("scaling_watershed", scaling_watershed)
    num_train_timesteps = check_int("num_train_timesteps", num_train_timesteps, minimum=1)

    def model_fn(params, x, sigma, timestep, context):
        t = lumina_time(timestep, num_train_timesteps)
        linear_factor, ntk_factor = rope_scaling_factors(t, scaling_factor, scaling_watershed)
        out = network_fn(params, x, t, context, linear_factor, ntk_factor)
        return -out[:, : x.shape[1]]

    return model_fn
