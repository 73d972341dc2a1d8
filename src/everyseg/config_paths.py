"""A config's file and folder paths: made absolute before a run saves its config (so the
run evaluates from any folder), and checked to exist before training starts, with the command
that writes the bundled tiny presets' data when theirs is missing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from everyseg.config import Config, from_dict

# keys holding a path, unless they hold one of the named non-path values
_PATH_KEYS = {
    ("data", "train_json"): (),
    ("data", "train_images"): (),
    ("data", "val_json"): (),
    ("data", "val_images"): (),
    ("data", "class_aliases"): (),
    ("model", "init"): ("torchvision-coco",),
    ("model", "init_from_run"): (),
    ("model", "backbone", "weights"): ("imagenet",),
    ("model", "transfer", "embedding_file"): (),
}
VOCAB_CONVERT = (
    "everyseg convert vg --objects everyseg-vocab/vg/objects.json --image-data "
    "everyseg-vocab/vg/image_data.json --classes 1000 --out everyseg-vocab/vg/vg.json"
)


def with_absolute_paths(cfg: Config, *, base: Path | None = None) -> Config:
    """`cfg` with every relative path (data files and folders, train_sources' json / images,
    a mask_classes names file, weight and embedding files) made absolute against `base`
    (default: the working directory, which relative paths are read from)."""
    base = Path.cwd() if base is None else base
    raw = cfg.to_dict()
    for keys, not_paths in _PATH_KEYS.items():
        *sections, leaf = keys
        node = raw
        for section in sections:
            node = node[section]
        if isinstance(node[leaf], str) and node[leaf] not in not_paths:
            node[leaf] = _absolute(node[leaf], base)
    data = raw["data"]
    data["mask_classes"] = _absolute_names_file(data["mask_classes"], base)
    for source in data["train_sources"] or []:
        for key in ("json", "images"):
            source[key] = _absolute(source[key], base)
        source["mask_classes"] = _absolute_names_file(source["mask_classes"], base)
    return from_dict(raw)


def _absolute(path: str, base: Path) -> str:
    return str(base / os.path.expanduser(path))  # an absolute path stays as it is


def _absolute_names_file(spec: Any, base: Path) -> Any:
    """A mask_classes spec that names a file (data/splits.py's rule), made absolute."""
    if isinstance(spec, str) and (os.path.isfile(base / spec) or spec.strip().endswith(".txt")):
        return _absolute(spec.strip(), base)
    return spec


def check_data_exists(cfg: Config) -> None:
    """FileNotFoundError naming the key of the first data file or folder `cfg` trains or
    evaluates on that does not exist; for the tiny presets' default folders it also says
    which command writes them."""
    d = cfg.data
    places = [
        ("data.train_json", d.train_json),
        ("data.train_images", d.train_images),
        *(
            (f"data.train_sources[{i}].{key}", getattr(source, key))
            for i, source in enumerate(d.train_sources or [])
            for key in ("json", "images")
        ),
        ("data.val_json", d.val_json),
        ("data.val_images", d.val_images),
    ]
    for key, path in places:
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{key}: {path} does not exist{_how_to_make(path)}")


def _how_to_make(path: str) -> str:
    top = Path(path).parts[0] if Path(path).parts else ""
    if top == "everyseg-synth":
        return "; write the tiny presets' data with `everyseg synth everyseg-synth`"
    if top == "everyseg-vocab":
        if Path("everyseg-vocab/vg/objects.json").is_file():
            return f"; convert the stand-in's VG files with `{VOCAB_CONVERT}`"
        return (
            "; write the stand-in with `everyseg synth everyseg-vocab --vocab 1000`, then "
            f"`{VOCAB_CONVERT}`"
        )
    if not Path(path).is_absolute():
        return f" (relative paths are read from the working directory, {Path.cwd()})"
    return ""
