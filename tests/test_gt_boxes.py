"""Mask quality apart from detection: mask AP and mean IoU of the masks a model draws for the
ground-truth boxes (metrics.json "gt_boxes")."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from everyseg.engine import distributed
from everyseg.engine import evaluate as evaluate_module
from everyseg.engine.coco_results import to_coco_results
from everyseg.engine.evaluate import evaluate_model, format_metrics_table, gt_box_metrics
from everyseg.engine.evaluate_run import evaluate_run
from everyseg.engine.gt_boxes import mask_confidence

SIZE = 64
NAMES = {1: "a", 2: "b", 3: "c", 4: "absent"}
SEEN = [1, 2]  # "a", "b" had masks in training; "c" and "absent" did not


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _square(x: int, y: int, w: int, h: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[y : y + h, x : x + w] = 1
    return mask


def _gt(masks: dict[int, tuple[int, np.ndarray, list[float]]]) -> dict:
    """One 64 px image: annotation id -> (category id, mask, xywh box); a mask of None is a
    box-only annotation."""
    anns = []
    for ann_id, (cat_id, mask, box) in masks.items():
        ann = {"id": ann_id, "image_id": 1, "category_id": cat_id, "bbox": box, "iscrowd": 0}
        ann["area"] = box[2] * box[3]
        if mask is not None:
            ann["segmentation"] = _rle(mask)
        anns.append(ann)
    return {
        "images": [{"id": 1, "width": SIZE, "height": SIZE, "file_name": "1.png"}],
        "annotations": anns,
        "categories": [{"id": k, "name": v} for k, v in NAMES.items()],
    }


def test_hand_made_case_gives_the_hand_computed_iou_and_ap():
    gt = _gt(
        {
            1: (1, _square(10, 10, 10, 10), [10, 10, 10, 10]),
            2: (1, _square(30, 10, 10, 10), [30, 10, 10, 10]),
            3: (3, _square(10, 40, 10, 10), [10, 40, 10, 10]),
            4: (2, None, [40, 40, 10, 10]),  # box-only: prompts nothing, scores nothing
        }
    )
    predicted = {  # ann id -> (mask, score)
        1: (_square(10, 10, 10, 10), 0.9),  # IoU 1
        2: (_square(30, 10, 8, 9), 0.8),  # 72 of its 100 pixels: IoU 0.72
        3: (_square(10, 40, 8, 8), 0.7),  # IoU 0.64
    }
    cat_of = {ann["id"]: ann["category_id"] for ann in gt["annotations"]}
    results = [
        {"image_id": 1, "category_id": cat_of[i], "score": s, "segmentation": _rle(m), "ann_id": i}
        for i, (m, s) in predicted.items()
    ]
    metrics = gt_box_metrics(gt, results, seen_cat_ids=SEEN)

    assert metrics["mean_iou"] == pytest.approx({"all": 2.36 / 3, "seen": 0.86, "unseen": 0.64})
    assert metrics["instances"] == {"all": 3, "seen": 2, "unseen": 1}
    assert metrics["per_class_iou"] == pytest.approx(
        {"a": 0.86, "b": None, "c": 0.64, "absent": None}
    )
    # class a: both masks match at IoU thresholds 0.50..0.70 (AP 100); at 0.75..0.95 only the
    # first-ranked one does: precision 1 up to recall 0.5, i.e. at 51 of COCO's 101 points
    ap_a = (5 * 100 + 5 * 100 * 51 / 101) / 10
    ap_c = 3 * 100 / 10  # IoU 0.64 passes 0.50, 0.55, 0.60 of the ten thresholds
    segm = metrics["segm"]
    assert segm["seen"]["AP"] == pytest.approx(ap_a)  # b has no mask to be scored on
    assert segm["unseen"]["AP"] == pytest.approx(ap_c)
    assert segm["all"]["AP"] == pytest.approx((ap_a + ap_c) / 2)
    assert segm["per_class"] == pytest.approx({"a": ap_a, "b": None, "c": ap_c, "absent": None})
    assert metrics["protocol"]["class"] == "ground truth"
    json.dumps(metrics, allow_nan=False)


def test_mask_confidence_is_the_mean_foreground_probability():
    masks = torch.tensor([[0.9, 0.7, 0.2, 0.1], [0.4, 0.3, 0.2, 0.0]]).reshape(2, 1, 2, 2)
    assert mask_confidence(masks).tolist() == pytest.approx([0.8, 0.0])


class _BoxFiller(torch.nn.Module):
    """A stub detector that detects nothing and, given boxes, fills each box (all
    probabilities 1): perfect on ground truth made of exactly those pasted masks."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, list[list[int]]]] = []

    def detect(self, images):
        empty = torch.zeros(0, 4)
        return [
            {"boxes": empty, "labels": torch.zeros(0, dtype=torch.int64), "scores": empty[:, 0]}
            for _ in images
        ]

    def masks_for_boxes(self, images, boxes, labels, *, paste=True):
        assert not paste
        self.calls.append((len(images), [lab.tolist() for lab in labels]))
        return [
            {
                "boxes": b,
                "labels": lab,
                "scores": torch.ones(len(b)),
                "box_masks": torch.ones(len(b), 1, 7, 7),
            }
            for b, lab in zip(boxes, labels)
        ]


# image id -> [(ann id, category id, xyxy box, has mask)]
INSTANCES = {
    1: [(11, 1, [4, 4, 30, 20], True), (12, 3, [34, 30, 60, 62], True)],
    2: [(21, 2, [10, 10, 40, 40], True), (22, 3, [2, 40, 20, 60], False)],
    3: [(31, 1, [20, 2, 50, 30], True)],
}
# the model numbers its classes otherwise than the file: model label -> category id
LABEL_TO_CAT_ID = {1: 3, 2: 1, 3: 2, 4: 4}
TARGET_LABEL_TO_CAT_ID = {1: 1, 2: 2, 3: 3, 4: 4}


def _pasted_fill(box: list[int]) -> dict:
    """The RLE of a filled 7 x 7 box mask as evaluation pastes it."""
    output = {
        "boxes": torch.tensor([box], dtype=torch.float32),
        "labels": torch.tensor([1]),
        "scores": torch.ones(1),
        "box_masks": torch.ones(1, 1, 7, 7),
    }
    (result,) = to_coco_results(output, image_id=0, label_to_cat_id={1: 1}, image_size=(SIZE, SIZE))
    return result["segmentation"]


def _stub_data() -> tuple[list, dict]:
    dataset, anns = [], []
    for image_id, instances in INSTANCES.items():
        target = {
            "image_id": torch.tensor(image_id),
            "boxes": torch.tensor([box for _, _, box, _ in instances], dtype=torch.float32),
            "labels": torch.tensor([cat for _, cat, _, _ in instances]),  # labels = cat ids here
            "has_mask": torch.tensor([has for *_, has in instances]),
            "ann_ids": torch.tensor([ann_id for ann_id, *_ in instances]),
        }
        dataset.append((torch.rand(3, SIZE, SIZE), target))
        for ann_id, cat_id, (x0, y0, x1, y1), has_mask in instances:
            ann = {"id": ann_id, "image_id": image_id, "category_id": cat_id, "iscrowd": 0}
            ann |= {"bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)}
            if has_mask:
                ann["segmentation"] = _pasted_fill([x0, y0, x1, y1])
            anns.append(ann)
    # a crowd region, which the loader keeps out of the targets: an ignore region, no prompt
    crowd = {"id": 13, "image_id": 1, "category_id": 1, "iscrowd": 1, "bbox": [40, 2, 20, 20]}
    crowd |= {"area": 400, "segmentation": _rle(_square(40, 2, 20, 20))}
    anns.append(crowd)
    images = [{"id": i, "width": SIZE, "height": SIZE, "file_name": f"{i}.png"} for i in INSTANCES]
    categories = [{"id": k, "name": v} for k, v in NAMES.items()]
    return dataset, {"images": images, "annotations": anns, "categories": categories}


def _evaluate_stub(model, dataset, gt, **kwargs) -> dict:
    return evaluate_model(
        model,
        dataset,
        label_to_cat_id=LABEL_TO_CAT_ID,
        seen_cat_ids=SEEN,
        gt_json=gt,
        batch_size=2,
        progress=False,
        target_label_to_cat_id=TARGET_LABEL_TO_CAT_ID,
        **kwargs,
    )


def test_perfect_masks_on_ground_truth_boxes_give_iou_1_and_ap_100():
    dataset, gt = _stub_data()
    model = _BoxFiller()
    metrics = _evaluate_stub(model, dataset, gt)
    gt_boxes = metrics["gt_boxes"]
    assert gt_boxes["mean_iou"] == {"all": 1.0, "seen": 1.0, "unseen": 1.0}
    assert gt_boxes["instances"] == {"all": 4, "seen": 3, "unseen": 1}  # ann 22 is box-only
    for subset in ("all", "seen", "unseen"):
        assert gt_boxes["segm"][subset]["AP"] == pytest.approx(100.0)
    assert gt_boxes["per_class_iou"] == {"a": 1.0, "b": 1.0, "c": 1.0, "absent": None}
    # the detector found nothing: its AP is 0, the masks on the true boxes are perfect
    assert metrics["segm"]["all"]["AP"] == 0.0
    # one call per batch of 2 images, each box with its class in the model's numbering
    assert model.calls == [(2, [[2, 1], [3]]), (1, [[2]])]
    table = format_metrics_table(metrics)
    assert "gt-box segm unseen" in table
    assert "mask IoU on ground-truth boxes, class given (instances): all 1.000 (4)" in table


def test_ranks_share_the_prompts_and_rank_0_scores_them_all(monkeypatch):
    """Under torchrun each rank prompts its images; gathered, they score as one process's."""
    dataset, gt = _stub_data()
    one = _evaluate_stub(_BoxFiller(), dataset, gt)
    shares = []

    def keep_share(mine):
        shares.append(mine)
        return [mine]

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "on_main", lambda work: work())
    monkeypatch.setattr(distributed, "broadcast", lambda value: value)
    monkeypatch.setattr(distributed, "gather", keep_share)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    model = _BoxFiller()
    _evaluate_stub(model, dataset, gt)  # rank 1: the second image alone
    assert model.calls == [(1, [[3]])]  # its box of category 2 is the model's label 3
    (rank_1,) = shares
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "gather", lambda mine: [mine, rank_1])
    two = _evaluate_stub(_BoxFiller(), dataset, gt)
    assert two == one


def test_a_model_that_cannot_segment_boxes_is_refused_when_asked():
    dataset, gt = _stub_data()

    class DetectOnly(torch.nn.Module):
        def forward(self, images):
            return _BoxFiller().detect(images)

    with pytest.raises(TypeError, match="DetectOnly has no masks_for_boxes"):
        _evaluate_stub(DetectOnly(), dataset, gt)


def test_trained_run_metrics_have_mask_quality_on_ground_truth_boxes(trained_run):
    metrics = json.loads(trained_run.metrics.read_text())
    gt_boxes = metrics["gt_boxes"]
    assert set(gt_boxes) == {"segm", "mean_iou", "instances", "per_class_iou", "protocol"}
    assert gt_boxes["instances"]["all"] > 0
    for subset in ("all", "seen", "unseen"):
        assert set(gt_boxes["segm"][subset]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        iou = gt_boxes["mean_iou"][subset]
        assert 0.0 <= iou <= 1.0 if gt_boxes["instances"][subset] else iou is None
    assert set(gt_boxes["per_class_iou"]) == set(metrics["segm"]["per_class"])
    # the keys metrics.json had before stay as they were
    assert {"segm", "bbox", "seen_classes", "unseen_classes", "images"} <= set(metrics)


def test_an_fcos_run_is_measured_on_ground_truth_boxes_too(fcos_run, copy_run, capsys):
    run = copy_run(fcos_run)
    metrics = evaluate_run(run.root, progress=False)
    assert metrics["gt_boxes"]["instances"]["all"] > 0
    assert json.loads(run.metrics.read_text())["gt_boxes"] == metrics["gt_boxes"]
    assert "gt-box segm seen" in capsys.readouterr().out


def test_evaluate_prompts_only_instances_with_masks(monkeypatch):
    dataset, gt = _stub_data()
    seen = []
    scored = evaluate_module.gt_box_metrics

    def spy(gt_json, results, **kwargs):
        seen.extend(results)
        return scored(gt_json, results, **kwargs)

    monkeypatch.setattr(evaluate_module, "gt_box_metrics", spy)
    _evaluate_stub(_BoxFiller(), dataset, gt)
    assert sorted(r["ann_id"] for r in seen) == [11, 12, 21, 31]
    assert {r["ann_id"]: r["category_id"] for r in seen} == {11: 1, 12: 3, 21: 2, 31: 1}
