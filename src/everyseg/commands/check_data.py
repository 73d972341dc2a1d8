"""`everyseg check-data`: the start-up checks of a config's train and val sets, or of one JSON
file, with every problem reported (policy skip) and an exit status for scripts.

The report itself is built data-side (`everyseg.data.report`); this module loads the config,
prints, and decides the exit status.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from everyseg.config import ConfigError, DataConfig, load_config
from everyseg.data.build import SPLITS, build_index, build_merged_index, build_source_indexes
from everyseg.data.index import CocoIndex
from everyseg.data.report import format_report, report, training_problem
from everyseg.data.source_report import format_merged_report, merged_report
from everyseg.data.validate import DataError

_UNREADABLE = (DataError, ConfigError, FileNotFoundError)


def check_data(
    *, source: str, images: str | None = None, overrides=(), decode: bool = False
) -> list[dict]:
    """One report per dataset: a JSON file with its image folder, or a config's train and val.

    A config's sets are read as training and evaluation read them: the train set with
    `data.mask_classes` (and "cannot_train" saying why it could not train, if so), the val set
    with every class's masks, each checked against the model's resize. With data.train_sources,
    each source is reported on its own ("train_sources[i]"), then what merging them did
    ("train (merged)"). A dataset that cannot be read at all gets {"error": ...}.
    """
    if Path(source).suffix == ".json":
        if images is None:
            raise ValueError(f"{source}: give its image folder with --images DIR")
        where = {"split": "json", "json": source, "images_dir": images}
        try:
            index = CocoIndex(json_path=source, images_dir=images, decode_images=decode)
        except _UNREADABLE as err:
            return [{**where, "error": str(err)}]
        return [{"split": "json", **report(index)}]
    if images is not None:
        raise ValueError("--images goes with a JSON file; a config has data.*_images")
    data = load_config(source, list(overrides)).data
    splits = [s for s in SPLITS if getattr(data, f"{s}_json")]
    if not splits and data.train_sources is None:
        raise ConfigError(f"{source}: neither data.train_json nor data.val_json is set")
    reports = _source_reports(data, decode) if data.train_sources is not None else []
    for split in splits:
        where = {"split": split, "json": getattr(data, f"{split}_json")}
        where["images_dir"] = str(getattr(data, f"{split}_images"))
        try:
            index = build_index(data, split=split, decode_images=decode)
        except _UNREADABLE as err:
            reports.append({**where, "error": str(err)})
            continue
        rep = {"split": split, **report(index)}
        if split == "train":
            rep["cannot_train"] = training_problem(index)
        reports.append(rep)
    return reports


def _source_reports(data: DataConfig, decode: bool) -> list[dict]:
    """Each of data.train_sources as its own set, then (when all could be read) merged."""
    assert data.train_sources is not None
    reports, indexes = [], []
    for i, source in enumerate(data.train_sources):
        one = replace(data, train_sources=[source])
        where = {"split": f"train_sources[{i}]", "json": source.json, "images_dir": source.images}
        try:
            (index,) = build_source_indexes(one, decode_images=decode, on_bad_sample="skip")
        except _UNREADABLE as err:
            reports.append({**where, "error": str(err)})
            continue
        indexes.append(index)
        reports.append({**where, **report(index)})
    if len(indexes) < len(data.train_sources):
        return reports
    where = {"split": "train (merged)", "json": "data.train_sources", "images_dir": ""}
    try:
        merged = build_merged_index(data, decode_images=decode, sources=indexes)
    except _UNREADABLE as err:
        return [*reports, {**where, "error": str(err)}]
    return [*reports, {"split": "train (merged)", "merged": True, **merged_report(merged)}]


def run_check_data(*, as_json: bool = False, **kwargs) -> int:
    """Print the reports; exit status 0 when every dataset is clean, else 1."""
    reports = check_data(**kwargs)
    ok = all(_clean(r) for r in reports)
    if as_json:
        print(json.dumps({"ok": ok, "datasets": reports}, indent=2))
        return 0 if ok else 1
    for rep in reports:
        print(f"== {rep['split']}: {rep['json']} (images: {rep['images_dir']})")
        if "error" in rep:
            print(f"error: {rep['error']}")
        else:
            print(format_merged_report(rep) if rep.get("merged") else format_report(rep))
        if rep.get("cannot_train"):
            print(f"cannot train: {rep['cannot_train']}")
    if not ok:
        print("PROBLEMS FOUND (see above)")
    elif all(r["pixels_decoded"] for r in reports):
        print("OK: no bad samples (every image decoded)")
    else:
        print(
            "OK: no bad samples (image headers and PNG / JPEG end markers checked; pixels not "
            "decoded; run --decode to decode every image)"
        )
    return 0 if ok else 1


def _clean(rep: dict) -> bool:
    return "error" not in rep and rep["num_bad"] == 0 and not rep.get("cannot_train")
