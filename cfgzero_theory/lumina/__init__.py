"""Lumina-Next in JAX: its sampling convention today; the model port is being built here.

* :mod:`cfgzero_theory.lumina.convention` — how diffusers' ``LuminaPipeline`` drives the
  network (time ``t = 1 − τ/1000``, the time-aware RoPE factors, the negated prediction of the
  first half of the channels), as a ``model_fn`` adapter for
  :func:`~cfgzero_theory.sampling.sample_flow` (:func:`lumina_next_model`).
"""

from cfgzero_theory.lumina.convention import lumina_next_model, lumina_time, rope_scaling_factors

__all__ = ["lumina_next_model", "lumina_time", "rope_scaling_factors"]
