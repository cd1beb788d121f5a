"""Shared pieces of the text-encoder parity tests (``test_sd3_clip_parity.py``, ``test_sd3_t5_parity.py``).

* :func:`perturbed` — a transformers model in eval mode with every parameter moved by
  ``scale·N(0, 1)`` (norm scales start at one, biases at zero: that would hide mapping mistakes);
* :func:`assert_close` — ``max |ours − ref| ≤ rtol · max(1, max |ref|)``;
* :func:`saved_tensors` / :func:`write_folder` — a saved transformers folder's tensors and
  config, and a copy of it with edited tensors or config (for the loader-error tests).
"""

import json

import numpy as np


def perturbed(torch, model, scale=0.2):
    model.eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn_like(param))
    return model


def assert_close(ours, ref, rtol=1e-4):
    ref = ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    ours = np.asarray(ours)
    assert ours.shape == ref.shape
    err = np.max(np.abs(ours - ref))
    assert err <= rtol * max(1.0, np.max(np.abs(ref))), err


def saved_tensors(model, folder):
    """Save ``model`` (safetensors) to ``folder``; returns ``(tensors, config dict)``."""
    from safetensors.numpy import load_file

    model.save_pretrained(folder, safe_serialization=True)
    return load_file(folder / "model.safetensors"), json.loads((folder / "config.json").read_text())


def write_folder(folder, tensors, config):
    """A transformers-style folder with ``config.json`` and (unless ``tensors`` is None) ``model.safetensors``."""
    from safetensors.numpy import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, folder / "model.safetensors")
    return folder
