"""The pieces every model port shares; each model lives in its own folder beside this one.

Layout
------
* :mod:`~cfgzero_theory.ports.attention` — one softmax attention with its backends;
* :mod:`~cfgzero_theory.ports.layers` — norms, MLPs, activations, timestep embeddings, RoPE;
* :mod:`~cfgzero_theory.ports.clip`, :mod:`~cfgzero_theory.ports.t5`, :mod:`~cfgzero_theory.ports.gemma` — the
  text encoders;
* :mod:`~cfgzero_theory.ports.autoencoder` — the KL image autoencoder (``AutoencoderKL``);
* :mod:`~cfgzero_theory.ports.loading` — weight maps, safetensors folders, config checks;
* :mod:`~cfgzero_theory.ports.lora` — LoRA files (diffusers/PEFT, kohya, original layouts) merged into weights;
* :mod:`~cfgzero_theory.ports.sharding` — weights split over a device mesh as they load;
* :mod:`~cfgzero_theory.ports.moved` — old import paths of moved names, with a warning;
* :mod:`~cfgzero_theory.ports.pipeline_parts` — pipeline folders, tokenizers, compiled encoder
  calls, initial noise, PNG files;
* :mod:`~cfgzero_theory.ports.tiny` — tiny random diffusers checkpoints for tests and demos.

Model folders (:mod:`cfgzero_theory.sd3`, :mod:`cfgzero_theory.flux`) hold a transformer, its
weight map and its pipeline.  **The import rule:** a model folder imports these shared modules,
never another model folder (a test checks it), so that a model can be read, changed or removed
on its own.  :func:`cfgzero_theory.pipelines.from_pretrained` is the one entry point.
"""
