"""Pieces every text-to-image pipeline is made of.

* :func:`read_json` ``(path, what)`` — a JSON file, or a ``ValueError`` naming ``what``;
* :func:`pipeline_components` ``(folder, what, classes, required, optional)`` — the component
  subfolders a ``model_index.json`` lists, checked;
* :func:`load_tokenizer` ``(folder)``, :func:`token_ids` ``(tokenizer, prompts, length)`` and
  :func:`tokens_and_mask` (the same with the attention mask);
* :func:`as_prompt_list` ``(prompts, what)``;
* :func:`encode_tokens` ``(encoder, *arrays, **static)`` — an encoder call (token ids, and e.g.
  an attention mask) as one compiled program (one compile per encoder structure, array shapes
  and static options);
* :func:`initial_noise` ``(seed, shape, dtype)`` — the pipelines' ``N(0, I)`` draw;
* :func:`to_uint8` ``(images)`` and :func:`save_png` ``(images, path)``;
* :func:`save_video` ``(videos, path, fps=16)`` — MP4 (H.264 through imageio's own ffmpeg
  binary, no system ffmpeg needed) or GIF, chosen by the suffix, written atomically.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cfgzero_theory.files import atomic_write_bytes
from cfgzero_theory.validation import check_int, check_real

__all__ = ["VIDEO_SUFFIXES", "as_prompt_list", "encode_tokens", "initial_noise", "load_tokenizer",
           "pipeline_components", "read_json", "save_png", "save_video", "to_uint8", "token_ids", "tokens_and_mask"]

VIDEO_SUFFIXES = (".mp4", ".gif")


def read_json(path: Path, what: str) -> dict:
    """The JSON object in ``path``; ``ValueError`` naming ``what`` when it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from None


def pipeline_components(folder: str | os.PathLike, what: str, classes: Sequence[str], required: Sequence[str],
                        optional: Sequence[str] = ()) -> dict[str, Path | None]:
    """``{component: subfolder or None}`` for a diffusers pipeline folder whose ``model_index.json``
    names one of ``classes``; ``ValueError`` when it names another class (the message says it is not ``what``,
    e.g. ``"an SD3 pipeline"``), omits a ``required``
    component or lists a component whose subfolder is missing.  An ``optional`` component set to
    ``null`` (``[null, null]``) maps to ``None``."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    index = read_json(root / "model_index.json", "the pipeline index")
    if index.get("_class_name") not in classes:
        raise ValueError(f"{root} is not {what}: model_index.json names {index.get('_class_name')!r}, "
                         f"expected one of {tuple(classes)}")
    present = {}
    for name in (*required, *optional):
        entry = index.get(name)
        if entry is None or entry == [None, None]:
            if name in required:
                raise ValueError(f"{root}: model_index.json lists no {name!r} component")
            present[name] = None
        elif not (root / name).is_dir():
            raise ValueError(f"{root}: the {name}/ subfolder is missing")
        else:
            present[name] = root / name
    return present


def load_tokenizer(folder: str | os.PathLike):
    """The tokenizer saved in ``folder`` (``AutoTokenizer.from_pretrained``; no torch needed)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError('the pipelines tokenise with transformers: install it with pip install -e ".[sd3]"') from err
    return AutoTokenizer.from_pretrained(os.fspath(folder))


def tokens_and_mask(tokenizer, prompts: list[str], length: int) -> tuple[jax.Array, jax.Array]:
    """``prompts`` tokenised, padded to and truncated at ``length``: ids and attention mask (1 at
    real tokens, 0 at padding), both ``(B, length)`` int32."""
    tokens = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_attention_mask=True,
                       return_tensors="np")
    return (jnp.asarray(np.asarray(tokens["input_ids"]), jnp.int32),
            jnp.asarray(np.asarray(tokens["attention_mask"]), jnp.int32))


def token_ids(tokenizer, prompts: list[str], length: int) -> jax.Array:
    """``prompts`` tokenised, padded to and truncated at ``length``: ``(B, length)`` int32."""
    return tokens_and_mask(tokenizer, prompts, length)[0]


def as_prompt_list(prompts, what: str) -> list[str]:
    """A string or a non-empty list of strings as a list; ``ValueError`` naming ``what`` otherwise."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what} must be a string or a non-empty list of strings, got {prompts!r}")
    return prompts


@functools.partial(jax.jit, static_argnums=(0, 3))
def _encode_jit(graphdef, state, arrays, static):
    return nnx.merge(graphdef, state)(*arrays, **dict(static))


def encode_tokens(encoder: nnx.Module, *arrays, **static):
    """``encoder(*arrays, **static)`` as a compiled program: ``arrays`` are traced (token ids, an
    attention mask, pixels), ``static`` are hashable keyword options."""
    graphdef, state = nnx.split(encoder)
    return _encode_jit(graphdef, state, arrays, tuple(sorted(static.items())))


def initial_noise(seed: int, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """``jax.random.normal(PRNGKey(seed), shape)`` drawn in float32, cast to ``dtype``."""
    seed = check_int("seed", seed)
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32).astype(dtype)


def to_uint8(images) -> np.ndarray:
    """Images in ``[0, 1]`` → ``uint8`` (``round(255·x)``)."""
    return np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def save_png(images, path: str | os.PathLike) -> str:
    """Write ``images`` (``(H, W, 3)``, or ``(B, H, W, 3)`` tiled left to right) as one PNG, atomically."""
    from PIL import Image

    array = np.asarray(images)
    if array.ndim == 4:
        array = np.concatenate(list(array), axis=1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must have shape (H, W, C) or (B, H, W, C) with C in 1, 3, 4; got {np.shape(images)}")
    pixels = to_uint8(array)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


def _video_frames(videos) -> np.ndarray:
    """``(F, H, W, 3)`` or ``(B, F, H, W, 3)`` (tiled left to right) in ``[0, 1]`` → uint8 ``(F, H, W, 3)``."""
    array = np.asarray(videos)
    if array.ndim == 5:
        array = np.concatenate(list(array), axis=2)
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] < 1:
        raise ValueError(f"videos must have shape (F, H, W, 3) or (B, F, H, W, 3); got {np.shape(videos)}")
    return to_uint8(array)


def save_video(videos, path: str | os.PathLike, fps: float = 16) -> str:
    """Write ``videos`` (frames in ``[0, 1]``, ``(F, H, W, 3)`` or ``(B, F, H, W, 3)`` tiled left to
    right) to ``path`` as MP4 (H.264, yuv420p, quality 8 of imageio's 0–10; height and width must
    be even) or GIF (looping), by its suffix; atomically, through a temporary file.  Needs
    ``imageio`` and ``imageio-ffmpeg`` (``pip install -e ".[video]"``)."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"path must end in one of {VIDEO_SUFFIXES}, got {os.fspath(path)!r}")
    fps = check_real("fps", fps, positive=True)
    frames = _video_frames(videos)
    try:
        import imageio.v2 as imageio
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError('writing videos needs imageio and imageio-ffmpeg: pip install -e ".[video]"') from err
    if suffix == ".gif":
        buffer = io.BytesIO()
        imageio.mimwrite(buffer, list(frames), format="GIF", duration=1000 / fps, loop=0)
        return atomic_write_bytes(path, buffer.getvalue())
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"an MP4 (yuv420p) needs an even height and width, got {frames.shape[1]}×{frames.shape[2]}")
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        # imageio-ffmpeg starts ffmpeg with subprocess, whose fork is followed at once by exec in C:
        # no Python (and no JAX) runs in the child, so JAX's warning about forking does not apply.
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        scratch = os.path.join(folder, "video.mp4")
        with imageio.get_writer(scratch, format="FFMPEG", fps=fps, codec="libx264", quality=8,
                                pixelformat="yuv420p", macro_block_size=1) as writer:
            for frame in frames:
                writer.append_data(frame)
        with open(scratch, "rb") as file:
            return atomic_write_bytes(path, file.read())
