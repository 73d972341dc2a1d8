"""Class names as datasets spell them: VOC's and COCO's spellings, and a user's alias file.

Sources are merged by class name, so two spellings of one class must meet. A name's key is
the name after the user's aliases (alias -> canonical), then VOC's spelling -> COCO's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from everyseg.config import ConfigError
from everyseg.data.aliases import read_alias_file
from everyseg.data.validate import DataError

# PASCAL VOC's own spelling -> COCO's, for the six classes the two data sets spell apart
VOC_TO_COCO: dict[str, str] = {
    "aeroplane": "airplane",
    "diningtable": "dining table",
    "motorbike": "motorcycle",
    "pottedplant": "potted plant",
    "sofa": "couch",
    "tvmonitor": "tv",
}


def coco_spelling(name: str) -> str:
    """COCO's spelling of a VOC class name; any other name as it is."""
    return VOC_TO_COCO.get(name, name)


def class_key(name: str, aliases: Mapping[str, str]) -> str:
    """What merges classes: the alias-resolved name in COCO's spelling."""
    return coco_spelling(aliases.get(name, name))


def read_class_aliases(path: str | Path | None) -> dict[str, str]:
    """data.class_aliases: a YAML (or JSON) mapping alias -> canonical name (data/aliases.py).

    Raises ConfigError naming the file for anything but a flat mapping of non-empty strings,
    and for chains (a canonical name that is itself an alias): one step must be enough.
    """
    if path is None:
        return {}
    try:
        return read_alias_file(path)
    except FileNotFoundError:
        raise ConfigError(f"data.class_aliases {path}: file not found") from None
    except DataError as err:
        raise ConfigError(f"data.class_aliases {err}") from None


@dataclass(frozen=True)
class Vocabulary:
    """The merged classes: label k (1..K) is class_names[k - 1], category label_to_cat_id[k]."""

    class_names: list[str]
    label_to_cat_id: dict[int, int]
    source_labels: list[dict[int, int]]  # per source: its own label -> merged label
    notes: list[str]  # which names were matched to another spelling, and how


def merge_vocabulary(
    class_names: Sequence[Sequence[str]],
    label_to_cat_id: Sequence[Mapping[int, int]],
    *,
    aliases: Mapping[str, str],
    val_categories: Sequence[tuple[int, str]],
    source_names: Sequence[str],
) -> Vocabulary:
    """One vocabulary from the sources' classes (the rules: everyseg.data.sources)."""
    val = {class_key(name, aliases): (cat_id, name) for cat_id, name in val_categories}
    first: dict[str, tuple[int, str]] = {}  # key -> (category id, name) in the first source
    for names, cat_ids in zip(class_names, label_to_cat_id):
        for label, name in enumerate(names, start=1):
            first.setdefault(class_key(name, aliases), (cat_ids[label], aliases.get(name, name)))
    taken = {cat_id for cat_id, _ in val_categories}
    ids = {key: val[key][0] for key in first if key in val}
    for key, (cat_id, _) in first.items():
        if key not in ids:
            ids[key] = cat_id if cat_id not in taken else max(taken) + 1
            taken.add(ids[key])
    order = sorted(first, key=ids.__getitem__)
    merged_name = {key: val[key][1] if key in val else first[key][1] for key in order}
    label_of = {key: label for label, key in enumerate(order, start=1)}
    notes = []
    for names, source in zip(class_names, source_names):
        for name in names:
            final = merged_name[class_key(name, aliases)]
            if name != final:
                how = "data.class_aliases" if name in aliases else "VOC / COCO spelling"
                notes.append(f"{source}: {name!r} matched {final!r} ({how})")
    return Vocabulary(
        class_names=[merged_name[key] for key in order],
        label_to_cat_id={label_of[key]: ids[key] for key in order},
        source_labels=[
            {label: label_of[class_key(n, aliases)] for label, n in enumerate(names, start=1)}
            for names in class_names
        ],
        notes=notes,
    )
