"""Alias files: a YAML or JSON mapping alias -> canonical class name, read one way for all.

`data.class_aliases` (merging sources) and `everyseg convert vg --aliases` read the same kind
of file. An alias whose target is itself an alias is refused: one step must be enough, so no
order of application matters.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import yaml

from everyseg.data.validate import DataError


def read_alias_file(path: str | Path, *, normalise: Callable[[str], str] = str) -> dict[str, str]:
    """alias -> canonical name, both sides passed through `normalise`.

    Raises FileNotFoundError, or DataError naming the file and the entry at fault.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except FileNotFoundError:
        raise FileNotFoundError(f"aliases file {path} not found") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason})") from None
    except (ValueError, yaml.YAMLError) as err:
        raise DataError(f"{path}: not valid {path.suffix[1:] or 'YAML'}: {err}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a mapping alias -> name, got {type(raw).__name__}")
    aliases: dict[str, str] = {}
    for alias, target in raw.items():
        if not (isinstance(alias, str) and isinstance(target, str)):
            raise DataError(f"{path}: {alias!r}: {target!r}: aliases and names must be strings")
        key, value = normalise(alias), normalise(target)
        if not (key and value):
            raise DataError(f"{path}: {alias!r}: {target!r}: an empty name")
        if aliases.get(key, value) != value:
            raise DataError(f"{path}: {key!r} is mapped to both {aliases[key]!r} and {value!r}")
        aliases[key] = value
    for key, value in aliases.items():
        if value in aliases and aliases[value] != value:
            raise DataError(
                f"{path}: {key!r} -> {value!r}, but {value!r} is itself an alias of "
                f"{aliases[value]!r}; map {key!r} to the final name"
            )
    return aliases
