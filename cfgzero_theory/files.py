"""Atomic file writes: a reader sees the old file or the new one, never a partial one.

:func:`atomic_write_bytes` writes ``data`` to a temporary file with a unique name in the
target's folder (``.<name>.<12 hex digits>.tmp``, created exclusively, so concurrent
writers never share one), flushes and ``fsync``-s it, renames it onto the target
(``os.replace``, atomic on POSIX) and ``fsync``-s the folder.  On any error, including
``KeyboardInterrupt``, the temporary file is removed and the error re-raised; a ``kill -9``
can leave one behind, which :func:`remove_temporaries` deletes.  Checkpoints, JSON results,
figures and PNG images all go through here.
"""

from __future__ import annotations

import os
import re
import secrets

__all__ = ["atomic_write_bytes", "remove_temporaries"]

_TEMPORARY_RE = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")


def _write_fully(file, data: bytes) -> None:
    """Write ``data`` to the open binary ``file`` in chunks (a seam for the tests)."""
    view = memoryview(data)
    chunk = 1 << 24
    for start in range(0, len(view), chunk):
        file.write(view[start : start + chunk])


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically (module docstring); creates the folder; returns ``path``.

    The file gets an ordinary new file's permissions (``0o666`` minus the umask).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    base = os.path.basename(path)
    while True:
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # pragma: no cover - 48 random bits collided
            continue
        break
    try:
        with os.fdopen(fd, "wb") as file:
            _write_fully(file, data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)
    return path


def remove_temporaries(directory: str | os.PathLike) -> list[str]:
    """Delete the temporary files killed atomic writes left in ``directory``; returns their paths.

    Only names of the form ``.<name>.<12 hex digits>.tmp`` (what :func:`atomic_write_bytes`
    creates) are touched.  Call it only while no other process writes into ``directory``
    (e.g. holding its :class:`~cfgzero_theory.checkpoint.FolderLock`), so no live write loses
    its temporary file.
    """
    directory = os.fspath(directory)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    removed = []
    for name in names:
        path = os.path.join(directory, name)
        if _TEMPORARY_RE.fullmatch(name) and os.path.isfile(path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    return sorted(removed)
