"""Writing a run's files: atomically, with the umask's permissions, failures in plain words;
JSON outputs strict (finite numbers or null, never NaN)."""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

_PLAIN_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
}


def atomic_write_bytes(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it into place.

    A crash at any moment leaves either the old file or the new one, never a truncated one.
    A failure to write (disk full, permission denied...) raises OSError saying so plainly.
    `write` should hand the file whole buffers (see checkpoint.save_checkpoint): a writer
    that seeks within the file may turn a full disk into its own error instead of OSError.
    The file gets the permissions open() would give it (0o666 less the umask).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a run killed mid-write leaves its temporary file; one writer per run directory
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        # mkstemp makes the file owner-only; a run's files are shared like any other file
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        plain = _PLAIN_REASONS.get(err.errno) if err.errno is not None else None
        reason = plain or err.strerror or str(err)
        raise OSError(
            err.errno, f"could not write {path}: {reason}; any previous file there is intact"
        ) from err
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # the rename itself must survive a power cut


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        # some file systems (network, FUSE) cannot sync a directory; the rename is still atomic
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def finite_or_none(tree: Any) -> Any:
    """A copy of a JSON-like tree with every NaN / Inf float replaced by None.

    JSON has no NaN: Python would write the bare token `NaN`, which strict parsers reject.
    """
    if isinstance(tree, float):
        return tree if math.isfinite(tree) else None
    if isinstance(tree, dict):
        return {key: finite_or_none(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [finite_or_none(value) for value in tree]
    return tree


def write_json(obj: Any, path: str | os.PathLike, *, indent: int | None = 2) -> None:
    """Write `obj` as strict JSON (non-finite floats as null) with atomic_write_bytes."""
    text = json.dumps(finite_or_none(obj), indent=indent, allow_nan=False) + "\n"
    atomic_write_bytes(Path(path), lambda f: f.write(text.encode()))
