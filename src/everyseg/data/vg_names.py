"""Class names of Visual Genome objects: one spelling per class.

The rule (README, "Visual Genome"):
1. every name is normalised: lower case, stripped, inner whitespace collapsed to one space;
2. an object's class is its first non-blank synset when it has one, else its first non-blank
   name; a WordNet synset `tennis_racket.n.01` gives its lemma with spaces, `tennis racket`
   (COCO's spelling), so "man", "men" and "guy", all `man.n.01`, are one class (senses of a
   lemma merge);
3. an aliases file (YAML or JSON mapping alias -> canonical name, both normalised) renames the
   result: a full synset key (`man.n.01`) wins over its lemma's (`man`). An alias whose target
   is itself an alias is refused (one step, so no order of application matters).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import yaml

from everyseg.data.validate import DataError

_SYNSET = re.compile(r"(.+)\.[nvasr]\.\d+")


def normalise(name: str) -> str:
    """Lower case, no leading / trailing whitespace, inner whitespace one space."""
    return " ".join(name.lower().split())


def class_name(names: list[str], synsets: list[str], aliases: dict[str, str] | None = None) -> str:
    """The class of an object with these VG names and synsets ("" when all are blank)."""
    synset = _first(synsets)
    if synset:
        lemma = _synset_lemma(synset)
        if aliases:
            return aliases.get(synset) or aliases.get(lemma, lemma)
        return lemma
    name = _first(names)
    return aliases.get(name, name) if aliases else name


def _first(names: list[str]) -> str:
    return next((name for name in map(normalise, names) if name), "")


@functools.lru_cache(maxsize=1 << 16)  # VG has ~4M objects, tens of thousands of synsets
def _synset_lemma(synset: str) -> str:
    match = _SYNSET.fullmatch(synset)
    return normalise(match.group(1).replace("_", " ")) if match else synset


def read_aliases(path: str | Path) -> dict[str, str]:
    """alias -> canonical name from a YAML or JSON mapping, both sides normalised.

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
