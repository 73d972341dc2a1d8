"""A GloVe-format embedding of class names for Mask^X's `model.transfer.input=embedding`.

The paper feeds T GloVe vectors: knowledge of a class from text, none from its pixels. Real
GloVe vectors say nothing about synthetic shapes and cannot be downloaded at run time, so a
study writes this stand-in instead: each class's vector is made from the letters of its name
alone (hashed character 2- to 4-grams, unit length). Like GloVe it is fixed, computed without
any image or mask, and relates classes only as far as their names do ("circle" and
"semicircle", "L-shape" and "T-shape" share n-grams); unlike GloVe it carries no meaning
beyond spelling. Any real GloVe file can be used instead (model.transfer.embedding_file).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from everyseg.engine.files import atomic_write_bytes

DIM = 300
NGRAMS = (2, 3, 4)


def name_vector(name: str, *, dim: int = DIM) -> np.ndarray:
    """(dim,) unit vector of the hashed character n-grams of `name` (lower case, with
    boundary marks); crc32 keeps it the same on every machine and Python."""
    text = f"<{name.lower()}>"
    vector = np.zeros(dim)
    for n in NGRAMS:
        for i in range(len(text) - n + 1):
            code = zlib.crc32(text[i : i + n].encode())
            sign = 1.0 if code & 1 else -1.0  # a signed hash keeps unrelated names near 0
            vector[(code >> 1) % dim] += sign
    norm = np.linalg.norm(vector)
    return vector / norm if norm else vector


def write_name_embedding(class_names: Sequence[str], out: Path, *, dim: int = DIM) -> Path:
    """Write `out`: one `name v1 ... v_dim` line per class (spaces in a name as underscores,
    which word_vectors looks up)."""
    lines = [
        " ".join(["_".join(name.split()), *(f"{v:.6f}" for v in name_vector(name, dim=dim))])
        for name in class_names
    ]
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(out, lambda f: f.write(text.encode()))
    return out


def class_names_of(coco_json: Path) -> list[str]:
    """The category names of a COCO JSON file, in id order."""
    with open(coco_json, encoding="utf-8") as f:
        categories = json.load(f).get("categories", [])
    return [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
