"""JSON outputs (metrics, results): written atomically, finite numbers or null, never NaN."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


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
    """Write `obj` as strict JSON (non-finite floats as null) atomically: a temp file beside
    it, then os.replace, so a crash never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory, so os.replace is an atomic rename; open() keeps the umask's permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(finite_or_none(obj), f, indent=indent, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
