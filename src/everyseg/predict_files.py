"""Predict a list of image files: COCO results and overlays; nothing lost, nothing overwritten.

Used by `everyseg predict` and the demo. A file that cannot be read is reported and skipped;
anything else that stops the loop still leaves the results of the images done on disk.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from everyseg.engine.files import write_json
from everyseg.predictor import ImageLike, Instances, Predictor, draw_overlay


def overlay_names(paths: list[Path]) -> list[str]:
    """One file name per input: `<stem>.png`, or `<stem>-<n>.png` (n = its 1-based position,
    the image_id of its results unless a data set gave the ids) when another input has the
    same stem (case-insensitively, as some file systems compare), so two folders' `img.png`
    never overwrite each other."""
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
    predictor: Predictor,
    paths: Sequence[Path],
    *,
    overlays: Path,
    results: Path | None = None,
    batch_size: int = 1,
    image_ids: Sequence[int | None] | None = None,
) -> list[str]:
    """Predict the files `batch_size` at a time, draw each one's overlay into `overlays` and,
    if `results` is given, write every detection there as COCO results (file_name = the input
    path) even when the loop stops early. A file's image_id is its `image_ids` entry (default:
    its position from 1); a file whose entry is None gets an overlay but no results. Returns
    one line per file that failed."""
    paths = [Path(p) for p in paths]
    ids = list(range(1, len(paths) + 1)) if image_ids is None else list(image_ids)
    names = overlay_names(paths)
    _refuse_overwriting_inputs(paths, [*(overlays / name for name in names), results])
    overlays.mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    failures: list[str] = []
    start = 0
    try:
        with tqdm(total=len(paths), desc="predict") as bar:
            for start in range(0, len(paths), batch_size):
                batch = paths[start : start + batch_size]
                for i, found in enumerate(_predict_batch(predictor, batch), start):
                    try:
                        if isinstance(found, Exception):
                            raise found
                        draw_overlay(paths[i], found).save(overlays / names[i])
                    except (OSError, ValueError) as err:
                        failures.append(f"{paths[i]}: {err}")
                        continue
                    image_id = ids[i]
                    if image_id is not None:
                        image_results = predictor.coco_results(found, image_id=image_id)
                        entries.extend({**r, "file_name": str(paths[i])} for r in image_results)
                bar.update(len(batch))
    except BaseException as err:
        where = f"{paths[start]} ({start + 1} of {len(paths)})" if paths else "start"
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


def _predict_batch(predictor: Predictor, paths: list[Path]) -> Sequence[Instances | Exception]:
    """Each file's instances, as one batch; or, when a file cannot be read, as many batches of
    one, so that only the bad file fails (its entry is the OSError or ValueError)."""
    if len(paths) > 1:
        try:
            return predictor(list[ImageLike](paths))
        except (OSError, ValueError):
            pass  # one bad file spoils the batch: find it below
    found: list[Instances | Exception] = []
    for path in paths:
        try:
            found.append(predictor(path))
        except (OSError, ValueError) as err:
            found.append(err)
    return found


def _refuse_overwriting_inputs(paths: list[Path], outputs: list[Path | None]) -> None:
    inputs = {path.resolve() for path in paths}
    for output in outputs:
        if output is not None and output.resolve() in inputs:
            raise ValueError(f"{output} is an input: writing there would overwrite it")
