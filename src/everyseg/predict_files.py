"""Predict a list of image files: COCO results and overlays; nothing lost, nothing overwritten.

Used by `everyseg predict` and the demo. A file that cannot be read is reported and skipped;
anything else that stops the loop still leaves the results of the images done on disk.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from everyseg.engine.files import write_json
from everyseg.predictor import Predictor, draw_overlay


def overlay_names(paths: list[Path]) -> list[str]:
    """One file name per input: `<stem>.png`, or `<stem>-<n>.png` (n = its 1-based position,
    the image_id of its results) when another input has the same stem (case-insensitively, as
    some file systems compare), so two folders' `img.png` never overwrite each other."""
    counts = Counter(path.stem.casefold() for path in paths)
    names = [
        path.stem if counts[path.stem.casefold()] == 1 else f"{path.stem}-{n}"
        for n, path in enumerate(paths, start=1)
    ]
    if len({name.casefold() for name in names}) < len(names):
        # a renamed one met another input's stem (`a-2`): a position prefix is always unique
        names = [f"{n}-{path.stem}" for n, path in enumerate(paths, start=1)]
    return [f"{name}.png" for name in names]


def predict_files(
    predictor: Predictor, paths: list[Path], *, overlays: Path, results: Path | None = None
) -> list[str]:
    """Predict each file, draw its overlay into `overlays` and, if `results` is given, write
    every detection there as COCO results (image_id = position from 1, file_name = the input
    path) even when the loop stops early. Returns one line per file that failed."""
    paths = [Path(p) for p in paths]
    names = overlay_names(paths)
    _refuse_overwriting_inputs(paths, [*(overlays / name for name in names), results])
    overlays.mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    failures: list[str] = []
    image_id = 0
    try:
        for image_id, (path, name) in enumerate(zip(tqdm(paths, desc="predict"), names), 1):
            try:
                instances = predictor(path)
                draw_overlay(path, instances).save(overlays / name)
            except (OSError, ValueError) as err:
                failures.append(f"{path}: {err}")
                continue
            image_results = predictor.coco_results(instances, image_id=image_id)
            entries.extend({**entry, "file_name": str(path)} for entry in image_results)
    except BaseException as err:
        where = f"{paths[image_id - 1]} ({image_id} of {len(paths)})" if image_id else "start"
        print(
            f"everyseg: stopped at {where} by {type(err).__name__}: {err}; the outputs of the "
            f"images before it are in {results or overlays}",
            file=sys.stderr,
        )
        raise
    finally:
        if results is not None:
            write_json(entries, results, indent=None)
    for line in failures:
        print(f"skipped {line}", file=sys.stderr)
    return failures


def _refuse_overwriting_inputs(paths: list[Path], outputs: list[Path | None]) -> None:
    inputs = {path.resolve() for path in paths}
    for output in outputs:
        if output is not None and output.resolve() in inputs:
            raise ValueError(f"{output} is an input: writing there would overwrite it")
