"""One entry point for the model ports: ``from_pretrained(folder)`` reads ``model_index.json``.

A diffusers pipeline folder names its pipeline class in ``model_index.json``
(``"_class_name"``); :func:`from_pretrained` returns our JAX pipeline for it.  Every pipeline
has the same call, ``pipe(prompts, negative_prompts=None, guidance=KIND, scale=,
zero_init_steps=, num_steps=, height=, width=, seed=, latents=) -> (latents, images)``, with
the guidance kinds of :func:`cfgzero_theory.guidance.make_rule`.

Ported today (:data:`PIPELINES`): ``StableDiffusion3Pipeline`` (SD3 and SD3.5),
``FluxPipeline`` (FLUX.1 dev and schnell), ``WanPipeline`` and ``WanImageToVideoPipeline``
(Wan2.1; both are :class:`cfgzero_theory.wan.pipeline.WanPipeline`, which also takes ``image=``
and ``num_frames=`` and returns videos), and ``LuminaPipeline`` (Lumina-Next; older diffusers
wrote ``LuminaText2ImgPipeline``).  Any other class is refused with a ``ValueError`` naming the
class and listing what is supported.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

__all__ = ["PIPELINES", "RANDOM_BUILDERS", "build_random", "from_pretrained", "pipeline_class_name"]

#: diffusers pipeline class → ``"module:class"`` of our pipeline (imported on use).
PIPELINES = {
    "StableDiffusion3Pipeline": "cfgzero_theory.sd3.pipeline:SD3Pipeline",
    "FluxPipeline": "cfgzero_theory.flux.pipeline:FluxPipeline",
    "WanPipeline": "cfgzero_theory.wan.pipeline:WanPipeline",
    "WanImageToVideoPipeline": "cfgzero_theory.wan.pipeline:WanPipeline",
    "LuminaPipeline": "cfgzero_theory.lumina.pipeline:LuminaPipeline",
    "LuminaText2ImgPipeline": "cfgzero_theory.lumina.pipeline:LuminaPipeline",
}

#: model name → ``"module:function"`` building a random diffusers checkpoint of that model.
RANDOM_BUILDERS = {
    "sd3": "cfgzero_theory.sd3.tiny:build_random_pipeline",
    "flux": "cfgzero_theory.flux.tiny:build_random_pipeline",
    "wan": "cfgzero_theory.wan.tiny:build_random_pipeline",
    "lumina": "cfgzero_theory.lumina.tiny:build_random_pipeline",
}


def _resolve(reference: str):
    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)


def pipeline_class_name(folder: str | os.PathLike) -> str:
    """The ``_class_name`` of ``folder/model_index.json``; ``ValueError`` when there is none."""
    root = Path(os.path.expanduser(os.fspath(folder)))
    if not root.is_dir():
        raise ValueError(f"folder {str(root)!r} is not a folder")
    index = root / "model_index.json"
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except FileNotFoundError:
        raise ValueError(f"folder {str(root)!r} has no model_index.json: not a diffusers pipeline folder") from None
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"cannot read {index}: {err}") from None
    if not isinstance(name, str):
        raise ValueError(f"{index} names no pipeline class (_class_name)")
    return name


def from_pretrained(folder: str | os.PathLike, dtype=None, sharding=None, **options):
    """Our pipeline for the diffusers pipeline folder ``folder`` (see the module docstring).

    ``dtype`` casts every weight (``None``: as stored); ``sharding`` splits the weights over a
    device mesh as they load (e.g. :func:`cfgzero_theory.ports.sharding.mesh_sharding` ``()``);
    ``options`` go to the pipeline's own ``from_pretrained`` (e.g. ``compilation_cache=False``).
    """
    name = pipeline_class_name(folder)
    if name not in PIPELINES:
        raise ValueError(f"{name} is not ported: model_index.json of {os.fspath(folder)!r} names {name!r}; "
                         f"supported pipeline classes: {sorted(PIPELINES)}")
    return _resolve(PIPELINES[name]).from_pretrained(os.path.expanduser(os.fspath(folder)), dtype=dtype, sharding=sharding, **options)


def build_random(model: str, folder: str | os.PathLike, size: str = "tiny", seed: int = 0, torch_dtype=None):
    """Build a random diffusers pipeline of ``model`` (a key of :data:`RANDOM_BUILDERS`) and
    size ``size`` with diffusers (the ``[test]`` extra; nothing downloaded), save it to
    ``folder`` and return the diffusers pipeline; :func:`from_pretrained` ``(folder)`` loads it
    as ours.  ``torch_dtype`` casts the weights before saving."""
    if model not in RANDOM_BUILDERS:
        raise ValueError(f"model must be one of {tuple(RANDOM_BUILDERS)}, got {model!r}")
    return _resolve(RANDOM_BUILDERS[model])(folder, size, seed=seed, torch_dtype=torch_dtype)
