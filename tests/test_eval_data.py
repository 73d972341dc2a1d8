"""Evaluating a run on any COCO file: classes matched by name, never by category id."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from everyseg.data.synthetic import CATEGORY_IDS, CLASS_NAMES
from everyseg.engine.eval_data import map_classes, metrics_file_name
from everyseg.engine.evaluate_run import evaluate_loaded
from everyseg.engine.run_dir import RunRecord

MASK_CLASSES = ["circle", "star", "ring"]
# the run's record of its training file: labels 1..K in CLASS_NAMES order, odd category ids
META = RunRecord(
    config={},
    class_names=list(CLASS_NAMES),
    label_to_cat_id={label: cid for label, cid in enumerate(CATEGORY_IDS, start=1)},
    mask_classes=MASK_CLASSES,
)


class _Replay(torch.nn.Module):
    """A "model" that returns given detections, one image after the other."""

    def __init__(self, outputs: list[dict]):
        super().__init__()
        self.outputs = iter(outputs)

    def forward(self, images):
        return [next(self.outputs) for _ in images]


def _perfect_outputs(val_json: str) -> list[dict]:
    """Exactly the ground truth of each image (sorted by id) as detections in run labels."""
    coco = COCO(val_json)
    label_of = {
        cat["id"]: META.class_names.index(cat["name"]) + 1 for cat in coco.dataset["categories"]
    }
    outputs = []
    for image_id in sorted(coco.imgs):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        masks = np.stack([coco.annToMask(a) for a in anns]).astype(np.float32)
        outputs.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor([label_of[a["category_id"]] for a in anns]),
                "scores": torch.ones(len(anns)),
                "masks": torch.from_numpy(masks)[:, None],
            }
        )
    return outputs


def _renumbered(val_json: str, out: Path, new_id, *, reverse=False, drop=()) -> Path:
    """The val file with category ids new_id(old id), optionally listed backwards or without
    some classes (and their annotations)."""
    data = json.loads(Path(val_json).read_text())
    dropped = {c["id"] for c in data["categories"] if c["name"] in drop}
    data["annotations"] = [
        {**a, "category_id": new_id(a["category_id"])}
        for a in data["annotations"]
        if a["category_id"] not in dropped
    ]
    data["categories"] = [
        {**c, "id": new_id(c["id"])} for c in data["categories"] if c["id"] not in dropped
    ]
    if reverse:
        data["categories"].reverse()
    out.write_text(json.dumps(data))
    return out


def _evaluate(cfg, val_json, data_json=None) -> dict:
    outputs = _perfect_outputs(str(val_json))
    return evaluate_loaded(
        _Replay(outputs),
        cfg,
        META,
        device="cpu",
        data_json=data_json,
        images=cfg.data.val_images if data_json else None,
        progress=False,
    )


@pytest.fixture
def cfg(make_config):
    return make_config()


def _assert_perfect(metrics: dict) -> None:
    for iou_type in ("segm", "bbox"):
        assert metrics[iou_type]["all"]["AP"] == pytest.approx(100.0)
        for name, ap in metrics[iou_type]["per_class"].items():
            assert ap in (None, pytest.approx(100.0)), name


def test_category_ids_do_not_matter_only_names(cfg, tmp_path):
    # The same perfect detections on the same images, with the categories numbered as in the
    # training file (odd ids), 1-based, 0-based, and 0-based listed backwards with ids reversed.
    # Matching by id used to score 100 on one and about 0 on another.
    val = cfg.data.val_json
    n = len(CATEGORY_IDS)
    index = {cid: i for i, cid in enumerate(CATEGORY_IDS)}
    variants = {
        "one_based": _renumbered(val, tmp_path / "one.json", lambda c: index[c] + 1),
        "zero_based": _renumbered(val, tmp_path / "zero.json", lambda c: index[c]),
        "reordered": _renumbered(
            val, tmp_path / "rev.json", lambda c: n - 1 - index[c], reverse=True
        ),
    }
    reference = _evaluate(cfg, val)
    _assert_perfect(reference)
    assert reference["seen_classes"] == MASK_CLASSES
    for name, path in variants.items():
        metrics = _evaluate(cfg, path, data_json=path)
        _assert_perfect(metrics)
        assert metrics["segm"]["per_class"].keys() == reference["segm"]["per_class"].keys()
        for subset in ("all", "seen", "unseen"):
            assert metrics["segm"][subset] == pytest.approx(reference["segm"][subset]), name
        assert sorted(metrics["seen_classes"]) == sorted(MASK_CLASSES), name
        assert sorted(metrics["unseen_classes"]) == sorted(reference["unseen_classes"]), name


def test_a_class_the_run_never_learned_is_refused_by_name(cfg, tmp_path):
    data = json.loads(Path(cfg.data.val_json).read_text())
    data["categories"].append({"id": 99, "name": "hexagon"})
    path = tmp_path / "extra.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="hexagon"):
        _evaluate(cfg, cfg.data.val_json, data_json=path)


def test_run_classes_missing_from_the_file_are_dropped_and_listed(cfg, tmp_path, capsys):
    path = _renumbered(cfg.data.val_json, tmp_path / "no_star.json", lambda c: c, drop={"star"})
    metrics = _evaluate(cfg, cfg.data.val_json, data_json=path)  # star detections included
    assert metrics["unscored_classes"] == ["star"]
    assert "star" in capsys.readouterr().err
    assert "star" not in metrics["segm"]["per_class"]
    assert metrics["seen_classes"] == ["circle", "ring"]
    _assert_perfect(metrics)  # the star detections were dropped, not false positives


def test_map_classes_is_by_name():
    mapping = map_classes(
        run_classes=["a", "b", "c"],
        mask_classes=["a", "c"],
        data_cat_ids={"c": 0, "a": 7},
        source="x.json",
    )
    assert mapping.label_to_cat_id == {1: 7, 3: 0}
    assert mapping.seen_cat_ids == [7, 0]
    assert mapping.unscored == ["b"] and mapping.unscored_labels == [2]
    with pytest.raises(ValueError, match=r"x.json: class\(es\) \['d'\]"):
        map_classes(
            run_classes=["a"], mask_classes=[], data_cat_ids={"a": 1, "d": 2}, source="x.json"
        )


@pytest.mark.parametrize(
    ("data", "name"),
    [
        ("data/val.json", "metrics-val.json"),
        ("/x/instances val 2017.json", "metrics-instances_val_2017.json"),
        ("../..json", "metrics-data.json"),
        ("a/ü;rm -rf.json", "metrics-rm_-rf.json"),
        ("", "metrics-data.json"),
    ],
)
def test_metrics_file_name_is_safe(data, name):
    assert metrics_file_name(data) == name
