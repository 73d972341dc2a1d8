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
import re
from pathlib import Path

from everyseg.data.aliases import read_alias_file

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
    """alias -> canonical name from a YAML or JSON mapping, both sides normalised."""
    return read_alias_file(path, normalise=normalise)
