"""Checkpoints of arbitrary JAX pytrees as safetensors files, written atomically.

The training loop trains many seeds at once (every leaf carries a leading seed axis) and
writes a checkpoint at chosen epochs; resuming from one must be bit-identical
(docs/design.md §7: safetensors only, never pickle; temp file then rename; loaders say which
keys and shapes are wrong).

Public API
----------
* :func:`save_pytree` ``(path, tree, metadata=None) -> None``
* :func:`load_pytree` ``(path, template) -> tree`` — ``template`` gives the structure,
  shapes and dtypes (a pytree of arrays or :class:`jax.ShapeDtypeStruct`, e.g. from
  :func:`jax.eval_shape`);
* :func:`read_metadata` ``(path) -> dict[str, str]``;
* :func:`checkpoint_path` ``(directory, epoch) -> str``,
  :func:`list_checkpoints` ``(directory) -> list[tuple[int, str]]``,
  :func:`latest_checkpoint` ``(directory) -> tuple[int, str] | None``;
* :func:`remove_temporaries` ``(directory) -> list[str]`` — leftovers of killed writes;
* :class:`FolderLock` ``(directory)`` — one writer per folder (a context manager).

File format
-----------
A checkpoint is one plain safetensors file (``epoch_{epoch:06d}.safetensors``), one tensor
per pytree leaf, readable by any safetensors reader.

*Tensor names* are the leaf's pytree path (:func:`jax.tree_util.tree_flatten_with_path`),
components joined by ``/``: dict keys (``str(key)``), attribute names (NamedTuples such as
optax states, dataclasses) and sequence indices.  A ``flax.nnx.Variable`` contributes no
``value`` component, so an ``nnx.State`` leaf reads ``model/hidden/0/kernel``; an optax
chain state reads ``opt_state/0/mu/hidden/0/kernel``.  ``%`` and ``/`` inside a component
are escaped as ``%25`` and ``%2F``.  Flattening order (hence the names) is deterministic;
two leaves that would get the same name (e.g. dict keys ``0`` and ``"0"``) are a
``ValueError``, as is the name ``__metadata__`` (reserved by safetensors).  A bare array
(no path) is stored as ``_root``.  Empty subtrees (``optax.EmptyState()``, ``None``) store
nothing; the template restores them.

*Leaves* are converted to NumPy (``np.asarray``, i.e. gathered to the host; single-process
only).  Every dtype safetensors can hold round-trips bit-exactly, including bool, all
integer widths, 0-d scalars, ``bfloat16`` and the float8 types (``safetensors.numpy`` cannot
*read* those, so this module decodes tensors itself through ``ml_dtypes``); ``complex128``
and other dtypes safetensors lacks raise ``ValueError`` on save.  Typed PRNG key arrays
(``jax.random.key``, dtype ``key<fry>``) are stored as their :func:`jax.random.key_data`
(``uint32``, shape ``key_shape + (2,)`` for threefry) and rewrapped with
:func:`jax.random.wrap_key_data` on load.

*Metadata* (safetensors header, ``str -> str``): the caller's ``metadata`` plus reserved
keys prefixed ``checkpoint.`` (callers may not use that prefix):

* ``checkpoint.format`` = ``"cfgzero_theory.checkpoint/2"``;
* ``checkpoint.prng_keys`` = JSON object ``{tensor name: PRNG impl name}`` (e.g.
  ``"threefry2x32"``) listing the tensors that are key data;
* ``checkpoint.digests`` = JSON object ``{tensor name: SHA-256}`` of each tensor's dtype,
  shape and bytes as stored.

:func:`read_metadata` returns all of it.  A safetensors file without ``checkpoint.format``
(e.g. weights written elsewhere) still loads if its names, shapes and dtypes fit.

Verification
------------
:func:`load_pytree` recomputes every tensor's digest and compares it with the stored one:
a flipped bit, a NaN written over a value, or two tensors' names or offsets swapped in the
header is a ``ValueError`` naming the tensor and the file.  Files of format ``/1`` (written
before digests existed) still load, with a ``UserWarning`` that they are unverified;
foreign safetensors files (no ``checkpoint.format``) load unverified, silently.

Atomicity
---------
The file is serialised in memory, written to a hidden temporary file in the *same*
directory (``.<name>.<random>.tmp``), flushed and ``fsync``-ed, then ``os.replace``-d onto
the target and the directory is ``fsync``-ed.  A process killed at any moment leaves the
old checkpoint or the new one, never a partial file; on any error (including
``KeyboardInterrupt``) the temporary file is removed and the error re-raised.
:func:`list_checkpoints` ignores temporary files; a ``kill -9`` can leave one behind, and
:func:`remove_temporaries` deletes them (the writer holding the folder's
:class:`FolderLock` calls it when it starts).  Both come from :mod:`cfgzero_theory.files`,
the one atomic-write mechanism of the project (JSON and figures use it too).

Loading
-------
:func:`load_pytree` is strict: the file's tensor names must equal the template's, with the
same shapes and dtypes.  All problems are gathered into one ``ValueError`` (missing keys,
unexpected keys, ``key 'x': expected shape (3, 4) float32, found (3, 5) float32``).  A file
that is not valid safetensors (garbage, truncated, trailing bytes) raises ``ValueError``
``"<path> is not a readable safetensors checkpoint: ..."``.  A missing file raises the
built-in :class:`FileNotFoundError` (not ``ValueError``), so "no checkpoint yet" is easy to
tell apart from "a broken checkpoint".

Each restored leaf takes the kind of its template leaf: ``np.ndarray`` / NumPy scalar ->
NumPy; Python ``bool``/``int``/``float``/``complex`` -> the same Python type; ``jax.Array``
or ``jax.ShapeDtypeStruct`` -> ``jax.Array``, placed with the template's sharding when it
has one and keeping its ``weak_type``.  Saved leaves are gathered to host memory; no part of
this module runs under ``jit``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import socket
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, deserialize
from safetensors.numpy import save as _st_save

from cfgzero_theory.files import atomic_write_bytes, remove_temporaries
from cfgzero_theory.validation import check_int, limited_list

__all__ = [
    "FORMAT",
    "FolderLock",
    "atomic_write_bytes",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_pytree",
    "read_metadata",
    "remove_temporaries",
    "save_pytree",
]

FORMAT = "cfgzero_theory.checkpoint/2"
"""Value of the ``checkpoint.format`` metadata entry."""

_RESERVED_PREFIX = "checkpoint."
_FORMAT_KEY = "checkpoint.format"
_PRNG_KEY = "checkpoint.prng_keys"
_DIGESTS_KEY = "checkpoint.digests"
_UNVERIFIED_FORMATS = ("cfgzero_theory.checkpoint/1",)
_LOCK_NAME = ".lock"
_ROOT_NAME = "_root"
_CHECKPOINT_RE = re.compile(r"epoch_(\d+)\.safetensors")
_MAX_LISTED = 20

# safetensors dtype tag -> NumPy dtype (ml_dtypes supplies bfloat16 and float8).
_ST_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "C64": np.dtype(np.complex64),
}
for _tag, _name in [
    ("BF16", "bfloat16"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu"),
]:
    if hasattr(ml_dtypes, _name):
        _ST_DTYPES[_tag] = np.dtype(getattr(ml_dtypes, _name))
del _tag, _name
_SAVABLE_DTYPES = frozenset(_ST_DTYPES.values())


# --------------------------------------------------------------------------- paths


def checkpoint_path(directory: str | os.PathLike, epoch: int) -> str:
    """Path of the checkpoint of ``epoch`` in ``directory``: ``epoch_{epoch:06d}.safetensors``."""
    epoch = check_int("epoch", epoch, minimum=0)
    return os.path.join(os.fspath(directory), f"epoch_{epoch:06d}.safetensors")


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, str]]:
    """``(epoch, path)`` of every checkpoint file in ``directory``, sorted by epoch.

    Only regular files named exactly as :func:`checkpoint_path` names them count; temporary
    files of an unfinished write and unrelated files are ignored.  A directory that does not
    exist holds no checkpoints (``[]``).
    """
    directory = os.fspath(directory)
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in entries:
        match = _CHECKPOINT_RE.fullmatch(name)
        if match is None:
            continue
        epoch = int(match.group(1))
        if name != f"epoch_{epoch:06d}.safetensors":  # not canonical (e.g. epoch_7)
            continue
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            found.append((epoch, path))
    found.sort()
    return found


def latest_checkpoint(directory: str | os.PathLike) -> tuple[int, str] | None:
    """``(epoch, path)`` of the highest-epoch checkpoint in ``directory``, or ``None``."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


# --------------------------------------------------------------------------- naming


@functools.cache
def _nnx_variable_type() -> type | None:
    try:
        from flax import nnx
    except ImportError:  # flax is optional for this module
        return None
    return nnx.Variable


def _component(entry: Any) -> str:
    if isinstance(entry, jax.tree_util.DictKey):
        text = str(entry.key)
    elif isinstance(entry, jax.tree_util.GetAttrKey):
        text = entry.name
    elif isinstance(entry, jax.tree_util.SequenceKey):
        text = str(entry.idx)
    elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
        text = str(entry.key)
    else:
        text = str(entry)
    return text.replace("%", "%25").replace("/", "%2F")


def _join(path: tuple) -> str:
    return "/".join(_component(entry) for entry in path) if path else _ROOT_NAME


def _named_leaves(tree: Any) -> tuple[list[str], list[Any], Any]:
    """Names, leaves and treedef of ``tree``; names unique (else ``ValueError``)."""
    try:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
    except (TypeError, ValueError) as err:  # e.g. dict keys 0 and "0", which cannot be sorted together
        raise ValueError(f"tree cannot be flattened into named leaves (are its dict keys of one type?): {err}") from None
    variable = _nnx_variable_type()
    is_variable = (lambda x: isinstance(x, variable)) if variable is not None else None
    names: list[str] = []
    for path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)[0]:
        if variable is not None and isinstance(node, variable):
            sub = jax.tree_util.tree_flatten_with_path(node)[0]
            if len(sub) == 1 and sub[0][0] == (jax.tree_util.GetAttrKey("value"),):
                names.append(_join(path))
            else:
                names.extend(_join(path + subpath) for subpath, _ in sub)
        else:
            names.append(_join(path))
    if len(names) != len(leaves):  # pragma: no cover - defensive
        raise RuntimeError("internal error: leaf naming does not match tree_flatten")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(
                f"two pytree leaves get the same checkpoint name {name!r} "
                "(e.g. dict keys 0 and '0'); rename one"
            )
        if name == "__metadata__":
            raise ValueError("the pytree path '__metadata__' is reserved by safetensors")
        seen.add(name)
    return names, leaves, treedef


def _is_prng_dtype(dtype: Any) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


# --------------------------------------------------------------------------- saving


class FolderLock:
    """One writer per folder: ``with FolderLock(directory): ...``.

    Entering creates ``directory/.lock`` exclusively (``O_EXCL``) holding the owner's process
    id, host and start time; leaving removes it.  A second writer gets a ``ValueError``
    naming the holder.  A lock whose holder is gone (same host, process no longer running,
    e.g. after ``kill -9``) is stale: it is taken over, and :attr:`stale_holder` says whose it
    was.  Locks held from another host are never taken over (remove the file by hand if
    that host is gone).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, _LOCK_NAME)
        self.stale_holder: dict | None = None
        self._held = False

    def __enter__(self) -> FolderLock:
        os.makedirs(self.directory, exist_ok=True)
        owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._alive(holder):
                    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
                    raise ValueError(
                        f"{self.directory} is in use by process {holder.get('pid')} on {holder.get('host')} "
                        f"(since {started}); wait for it to finish or choose another folder") from None
                self.stale_holder = holder or {}
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as file:
                file.write(owner)
            self._held = True
            return self
        raise ValueError(f"{self.directory}: could not take the folder lock {self.path}")

    def __exit__(self, *exc) -> None:
        if self._held:
            self._held = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as file:
                holder = json.load(file)
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError):
            return None  # unreadable or half-written: treat as stale

    @staticmethod
    def _alive(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # cannot tell: assume alive
        pid = holder.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return False
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _digest(array: np.ndarray) -> str:
    """SHA-256 of a tensor's dtype, shape and C-order bytes."""
    sha = hashlib.sha256(f"{array.dtype.str}{tuple(array.shape)}".encode())
    sha.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return sha.hexdigest()


def save_pytree(
    path: str | os.PathLike, tree: Any, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tree`` to the safetensors file ``path``, atomically.

    ``tree`` is any pytree of arrays (``jax.Array``, NumPy arrays, Python scalars, typed PRNG
    key arrays), e.g. a dict holding an ``nnx.State``, an optax state, keys and an epoch
    counter.  ``metadata`` is extra ``str -> str`` header data (keys may not start with
    ``"checkpoint."``).  Parent directories are created.  See the module docstring for
    names and format.
    """
    path = os.fspath(path)
    user_metadata = dict(metadata or {})
    for key, value in user_metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(
                f"metadata must map str to str, got {key!r}: {type(value).__name__}"
            )
        if key.startswith(_RESERVED_PREFIX):
            raise ValueError(
                f"metadata key {key!r} uses the reserved prefix {_RESERVED_PREFIX!r}"
            )

    names, leaves, _ = _named_leaves(tree)
    tensors: dict[str, np.ndarray] = {}
    prng_impls: dict[str, str] = {}
    for name, leaf in zip(names, leaves):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and _is_prng_dtype(dtype):
            prng_impls[name] = str(jax.random.key_impl(leaf))
            array = np.asarray(jax.random.key_data(leaf))
        else:
            array = np.asarray(leaf)
        if array.dtype not in _SAVABLE_DTYPES:
            raise ValueError(
                f"leaf {name!r} has dtype {array.dtype}, which safetensors cannot store "
                f"(supported: {sorted(str(d) for d in _SAVABLE_DTYPES)})"
            )
        # (not np.ascontiguousarray: it turns 0-d arrays into shape (1,))
        tensors[name] = array if array.flags.c_contiguous else array.copy(order="C")

    header = {
        **user_metadata,
        _FORMAT_KEY: FORMAT,
        _PRNG_KEY: json.dumps(prng_impls, sort_keys=True),
        _DIGESTS_KEY: json.dumps({name: _digest(array) for name, array in tensors.items()}, sort_keys=True),
    }
    data = _st_save(tensors, metadata=header)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    atomic_write_bytes(path, data)


# --------------------------------------------------------------------------- loading


def _read_file(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata of a safetensors file; ``ValueError`` if it is not one."""
    with open(path, "rb") as file:  # FileNotFoundError propagates
        data = file.read()
    try:
        views = deserialize(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        metadata = header.get("__metadata__") or {}
        tensors = {}
        for name, view in views:
            tag = view["dtype"]
            if tag not in _ST_DTYPES:
                raise ValueError(f"tensor {name!r} has unsupported dtype {tag}")
            tensors[name] = np.frombuffer(view["data"], dtype=_ST_DTYPES[tag]).reshape(
                view["shape"]
            )
    except (SafetensorError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a readable safetensors checkpoint: {err}") from err
    return tensors, dict(metadata)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """All header metadata of the checkpoint ``path`` (caller's and ``checkpoint.*``)."""
    return _read_file(os.fspath(path))[1]


def _prng_impls(path: str, metadata: dict[str, str]) -> dict[str, str]:
    text = metadata.get(_PRNG_KEY)
    fmt = metadata.get(_FORMAT_KEY)
    if fmt is not None and fmt != FORMAT and fmt not in _UNVERIFIED_FORMATS:
        raise ValueError(f"{path} has checkpoint format {fmt!r}; this reader knows {FORMAT!r}")
    if text is None:
        return {}
    try:
        impls = json.loads(text)
        if not isinstance(impls, dict) or not all(isinstance(v, str) for v in impls.values()):
            raise TypeError("expected a JSON object of strings")
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{path} is not a readable safetensors checkpoint: bad {_PRNG_KEY} entry: {err}"
        ) from err
    return impls


def _verify(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Compare every tensor with its stored digest; ``ValueError`` naming the first bad one."""
    fmt = metadata.get(_FORMAT_KEY)
    if fmt is None:
        return  # a foreign safetensors file: nothing to verify against
    text = metadata.get(_DIGESTS_KEY)
    if text is None:
        if fmt in _UNVERIFIED_FORMATS:
            warnings.warn(f"{path} was written without digests ({fmt}); it is loaded unverified", stacklevel=3)
            return
        raise ValueError(f"{path} is not a readable safetensors checkpoint: no {_DIGESTS_KEY} entry")
    try:
        digests = json.loads(text)
        if not isinstance(digests, dict):
            raise TypeError("expected a JSON object")
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a readable safetensors checkpoint: bad {_DIGESTS_KEY}: {err}") from err
    if set(digests) != set(tensors):
        raise ValueError(f"{path} is corrupted: its digests list {sorted(digests)[:5]}…, its tensors "
                         f"{sorted(tensors)[:5]}…")
    for name in sorted(tensors):
        if _digest(tensors[name]) != digests[name]:
            raise ValueError(f"{path} is corrupted: tensor {name!r} does not match its stored digest")


def _convert_weak(x: jax.Array, weak: bool) -> jax.Array:
    """``x`` weakly typed again when its template was (e.g. ``jnp.asarray(3)``), so a resumed
    computation promotes dtypes exactly as the original did.

    JAX has no public way to mark an array weakly typed; a 0-d array is rebuilt from its
    Python value (exact, and weakly typed when its dtype is JAX's default for that Python
    type), anything else keeps its (equal) values and dtype, strongly typed.
    """
    if not weak or x.ndim:
        return x
    rebuilt = jnp.asarray(x.item())
    return rebuilt if rebuilt.dtype == x.dtype else x


_PY_SCALARS = (bool, int, float, complex)


class _Mismatch(Exception):
    """A template leaf the file cannot fill (collected into one ``ValueError``)."""


def _restore_leaf(name: str, stored: np.ndarray, template: Any, impl: str | None) -> Any:
    """The restored leaf for ``template``; raises ``_Mismatch`` describing a mismatch."""
    if type(template) in _PY_SCALARS:  # exact types: np.float64 subclasses float
        expected = np.asarray(template)
        shape, dtype = expected.shape, expected.dtype
    elif hasattr(template, "shape") and hasattr(template, "dtype"):
        shape, dtype = tuple(template.shape), template.dtype
    else:
        raise _Mismatch(f"template leaf {name!r} is not an array ({type(template).__name__})")

    found_dtype = f"PRNG key data ({impl})" if impl is not None else str(stored.dtype)
    if _is_prng_dtype(dtype):
        data_spec = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
        want = (tuple(data_spec.shape), np.dtype(data_spec.dtype))
        if impl is None:
            raise _Mismatch(
                f"key {name!r}: expected a PRNG key array {dtype} of shape {shape}, "
                f"found plain {stored.dtype} data of shape {stored.shape}"
            )
        if (stored.shape, stored.dtype) != want:
            raise _Mismatch(
                f"key {name!r}: expected PRNG key data of shape {want[0]} {want[1]}, "
                f"found {stored.shape} {stored.dtype}"
            )
        try:
            keys = jax.random.wrap_key_data(jnp.asarray(stored), impl=impl)
        except Exception as err:  # unknown impl name and the like
            raise _Mismatch(
                f"key {name!r}: cannot rebuild PRNG keys with impl {impl!r}: {err}"
            ) from err
        if keys.dtype != dtype:
            raise _Mismatch(f"key {name!r}: expected dtype {dtype}, found {keys.dtype}")
        sharding = getattr(template, "sharding", None)
        return jax.device_put(keys, sharding) if sharding is not None else keys

    if impl is not None or stored.dtype != np.dtype(dtype) or stored.shape != shape:
        raise _Mismatch(
            f"key {name!r}: expected shape {shape} {np.dtype(dtype)}, "
            f"found {stored.shape} {found_dtype}"
        )
    if type(template) in _PY_SCALARS:
        return type(template)(stored.item())
    if isinstance(template, np.generic):
        return stored.copy()[()]
    if isinstance(template, np.ndarray):
        return stored.copy()
    sharding = getattr(template, "sharding", None)
    array = jax.device_put(stored, sharding) if sharding is not None else jax.device_put(stored)
    if array.dtype != stored.dtype:
        raise _Mismatch(
            f"key {name!r}: dtype {stored.dtype} cannot be a JAX array here "
            f"(became {array.dtype}; enable jax_enable_x64?)"
        )
    return _convert_weak(array, bool(getattr(template, "weak_type", False)))


def load_pytree(path: str | os.PathLike, template: Any) -> Any:
    """Read the checkpoint ``path`` into a pytree shaped like ``template``, bit-exactly.

    ``template`` is a pytree of arrays or :class:`jax.ShapeDtypeStruct` (e.g.
    ``jax.eval_shape`` of the state initialiser) with the structure, shapes and dtypes
    expected.  Every tensor is checked against its stored digest first (module docstring).
    Raises ``ValueError`` naming every missing key, unexpected key and shape/dtype mismatch,
    naming the tensor whose digest does not match, or naming the file if it is not readable
    safetensors; ``FileNotFoundError`` if ``path`` does not exist.
    """
    path = os.fspath(path)
    tensors, metadata = _read_file(path)
    impls = _prng_impls(path, metadata)
    _verify(path, tensors, metadata)
    names, template_leaves, treedef = _named_leaves(template)

    missing = [name for name in names if name not in tensors]
    unexpected = sorted(set(tensors) - set(names))
    problems = []
    if missing:
        problems.append(f"missing keys {limited_list(missing, most=_MAX_LISTED)}")
    if unexpected:
        problems.append(f"unexpected keys {limited_list(unexpected, most=_MAX_LISTED)}")
    restored = []
    for name, leaf in zip(names, template_leaves):
        if name not in tensors:
            continue
        try:
            restored.append(_restore_leaf(name, tensors[name], leaf, impls.get(name)))
        except _Mismatch as err:
            problems.append(str(err))
    if problems:
        raise ValueError(
            f"checkpoint {path} does not match the template: " + "; ".join(problems)
        )
    return jax.tree_util.tree_unflatten(treedef, restored)
