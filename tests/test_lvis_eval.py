"""LVIS v1 files read as they are and scored with LVIS's federated rules; frequency buckets."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from everyseg.data.index import CocoIndex
from everyseg.data.validate import DataError
from everyseg.engine import lvis_rules
from everyseg.engine.evaluate import coco_metrics, format_metrics_table

SIZE = 64
APPLE, BIRD, CAT = 1, 2, 3
A1, B1, C1, A2 = (2, 2, 20, 20), (30, 30, 20, 20), (2, 30, 20, 20), (30, 2, 20, 20)
ELSEWHERE = (40, 40, 20, 20)


def _lvis_category(cat_id: int, name: str, frequency: str) -> dict:
    """A category as LVIS v1 writes it."""
    return {
        "id": cat_id,
        "name": name,
        "synset": f"{name}.n.01",
        "synonyms": [name],
        "def": f"a {name}",
        "image_count": 3,
        "instance_count": 4,
        "frequency": frequency,
    }


def _lvis_image(image_id: int, *, neg: list[int], not_exhaustive: list[int]) -> dict:
    """An image as LVIS v1 writes it: no file_name, a coco_url, and the federated lists."""
    return {
        "id": image_id,
        "width": SIZE,
        "height": SIZE,
        "coco_url": f"http://images.cocodataset.org/val2017/{image_id:012d}.jpg",
        "flickr_url": "http://farm.example/x.jpg",
        "license": 1,
        "date_captured": "2013-11-14 16:28:13",
        "neg_category_ids": neg,
        "not_exhaustive_category_ids": not_exhaustive,
    }


def _lvis_ann(ann_id: int, image_id: int, cat: int, box) -> dict:
    """An annotation as LVIS v1 writes it (no iscrowd)."""
    x, y, w, h = box
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat,
        "bbox": list(box),
        "area": w * h,
        "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
    }


def _lvis_gt() -> dict:
    """Image 1: an apple, bird verified absent. Image 2: a bird, apple verified absent.
    Image 3: a cat and an apple, apples not exhaustively annotated."""
    return {
        "info": {"description": "LVIS v1 (tiny)"},
        "licenses": [{"id": 1, "name": "cc"}],
        "images": [
            _lvis_image(1, neg=[BIRD], not_exhaustive=[]),
            _lvis_image(2, neg=[APPLE], not_exhaustive=[]),
            _lvis_image(3, neg=[], not_exhaustive=[APPLE]),
        ],
        "annotations": [
            _lvis_ann(1, 1, APPLE, A1),
            _lvis_ann(2, 2, BIRD, B1),
            _lvis_ann(3, 3, CAT, C1),
            _lvis_ann(4, 3, APPLE, A2),
        ],
        "categories": [
            _lvis_category(APPLE, "apple", "f"),
            _lvis_category(BIRD, "bird", "c"),
            _lvis_category(CAT, "cat", "r"),
        ],
    }


def _det(image_id: int, cat: int, box, score: float) -> dict:
    x, y, w, h = box
    rle = mask_util.merge(mask_util.frPyObjects([[x, y, x + w, y, x + w, y + h, x, y + h]], 64, 64))
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "image_id": image_id,
        "category_id": cat,
        "score": score,
        "bbox": list(box),
        "segmentation": rle,
    }


def _detections() -> list[dict]:
    return [
        _det(1, APPLE, A1, 0.9),  # true positive
        _det(2, APPLE, A1, 0.8),  # apple verified absent in image 2: false positive
        _det(3, APPLE, A2, 0.7),  # true positive
        _det(3, APPLE, ELSEWHERE, 0.95),  # apple not exhaustive in image 3: ignored
        _det(1, BIRD, B1, 0.6),  # bird verified absent in image 1: false positive
        _det(2, BIRD, B1, 0.5),  # true positive
        _det(3, BIRD, B1, 0.99),  # bird neither present nor verified absent in 3: ignored
        _det(1, CAT, C1, 0.99),  # cat not annotated in image 1 either way: ignored
        _det(3, CAT, C1, 0.5),  # true positive
    ]


# By hand, at every IoU threshold (detections sit exactly on their objects), COCO's 101-point
# interpolated AP. apple: ranked TP (r .5, p 1), FP, TP (r 1, p 2/3) -> recall points 0..0.5
# at precision 1, 0.51..1 at 2/3. bird: FP then TP (r 1, p 1/2). cat: one TP.
APPLE_AP = (51 * 1.0 + 50 * 2 / 3) / 101 * 100
BIRD_AP, CAT_AP = 50.0, 100.0


def test_federated_rules_match_the_hand_computed_case():
    metrics = coco_metrics(_lvis_gt(), _detections(), seen_cat_ids={APPLE})
    assert metrics["lvis"] == {"federated": True, "max_detections_per_image": 300}
    for iou_type in ("segm", "bbox"):
        block = metrics[iou_type]
        assert block["per_class"] == pytest.approx(
            {"apple": APPLE_AP, "bird": BIRD_AP, "cat": CAT_AP}, abs=1e-9
        )
        assert block["AP_f"] == pytest.approx(APPLE_AP)
        assert block["AP_c"] == pytest.approx(BIRD_AP)
        assert block["AP_r"] == pytest.approx(CAT_AP)
        assert block["by_frequency"]["r"]["AP"] == pytest.approx(CAT_AP)
        assert block["all"]["AP"] == pytest.approx((APPLE_AP + BIRD_AP + CAT_AP) / 3)
        assert block["seen"]["AP"] == pytest.approx(APPLE_AP)  # seen/unseen as for COCO
        assert block["unseen"]["AP"] == pytest.approx((BIRD_AP + CAT_AP) / 2)
    assert metrics["class_frequency"] == {"apple": "f", "bird": "c", "cat": "r"}
    assert metrics["frequency_buckets"]["by"] == "lvis_frequency"
    assert metrics["frequency_buckets"]["classes"] == {"r": 1, "c": 1, "f": 1}
    json.dumps(metrics, allow_nan=False)


def test_without_the_lvis_lists_the_same_detections_score_by_coco_rules():
    gt = _lvis_gt()
    for img in gt["images"]:
        del img["neg_category_ids"], img["not_exhaustive_category_ids"]
    metrics = coco_metrics(gt, _detections(), seen_cat_ids={APPLE})
    assert "lvis" not in metrics
    # every detection counts: apple FP .95 first (AP 1/2), bird FP .99 first (1/3), cat FP first
    expected = {"apple": 50.0, "bird": 100 / 3, "cat": 50.0}
    assert metrics["bbox"]["per_class"] == pytest.approx(expected)
    assert metrics["bbox"]["AP_r"] == pytest.approx(50.0)  # frequencies still bucket


def test_at_most_300_detections_per_image_count():
    gt = _lvis_gt()
    crowd = [_det(1, BIRD, (1 + i % 40, 1 + i // 40, 10, 10), 0.9) for i in range(299)]
    late_hit = _det(1, APPLE, A1, 0.1)
    kept = coco_metrics(gt, [*crowd, late_hit], seen_cat_ids={APPLE})
    # image 1's apple found, image 3's missed: recall points 0..0.5 at precision 1
    assert kept["bbox"]["per_class"]["apple"] == pytest.approx(51 / 101 * 100)
    one_more = _det(1, BIRD, ELSEWHERE, 0.9)
    dropped = coco_metrics(gt, [*crowd, one_more, late_hit], seen_cat_ids={APPLE})
    assert dropped["bbox"]["per_class"]["apple"] == 0.0  # the 301st of image 1 is dropped


def test_an_image_whose_detections_are_all_ignored_is_scored(tmp_path):
    gt = _lvis_gt()
    gt["images"].append(_lvis_image(4, neg=[], not_exhaustive=[]))  # nothing annotated
    metrics = coco_metrics(gt, [*_detections(), _det(4, CAT, C1, 0.9)], seen_cat_ids={APPLE})
    assert metrics["segm"]["per_class"]["cat"] == pytest.approx(CAT_AP)
    assert metrics["images"] == 4


def test_top_per_image_keeps_the_best_of_each_image_in_order():
    results = [{"image_id": i % 2, "score": s} for i, s in enumerate([0.1, 0.9, 0.5, 0.2, 0.7])]
    assert lvis_rules.top_per_image(results, limit=2) == [results[i] for i in (1, 2, 3, 4)]


def _write_lvis(tmp_path, gt: dict):
    """The LVIS JSON and its images where LVIS's coco_url puts them (val2017/<file>)."""
    images = tmp_path / "coco"
    (images / "val2017").mkdir(parents=True)
    for img in gt["images"]:
        name = img["coco_url"].split("/")[-1]
        Image.new("RGB", (SIZE, SIZE)).save(images / "val2017" / name)
    path = tmp_path / "lvis_v1_val.json"
    path.write_text(json.dumps(gt))
    return path, images


def test_an_lvis_file_is_read_as_it_is_and_scored_federated(tmp_path):
    path, images = _write_lvis(tmp_path, _lvis_gt())
    index = CocoIndex(json_path=path, images_dir=images)
    gt = index.ground_truth()
    assert [img["neg_category_ids"] for img in gt["images"]] == [[BIRD], [APPLE], []]
    assert [img["not_exhaustive_category_ids"] for img in gt["images"]] == [[], [], [APPLE]]
    assert [c["frequency"] for c in gt["categories"]] == ["f", "c", "r"]
    from_index = coco_metrics(gt, _detections(), seen_cat_ids={APPLE})
    from_file = coco_metrics(path, _detections(), seen_cat_ids={APPLE})
    assert from_index["segm"]["per_class"] == pytest.approx(from_file["segm"]["per_class"])
    assert from_index["segm"]["AP_f"] == pytest.approx(APPLE_AP)


def test_an_lvis_frequency_other_than_r_c_f_stops_naming_the_category(tmp_path):
    gt = _lvis_gt()
    gt["categories"][1]["frequency"] = "common"
    path, images = _write_lvis(tmp_path, gt)
    with pytest.raises(DataError, match=r"lvis_v1_val.json: category id 2 \('bird'\).*'common'"):
        CocoIndex(json_path=path, images_dir=images)
    with pytest.raises(ValueError, match="category id 2"):
        coco_metrics(gt, [], seen_cat_ids=set())


@pytest.mark.parametrize("value", ["1,2", [1, "x"], [1.5], None])
def test_a_malformed_lvis_list_skips_its_image_naming_the_key(tmp_path, value):
    gt = _lvis_gt()
    gt["images"][1]["not_exhaustive_category_ids"] = value
    path, images = _write_lvis(tmp_path, gt)
    index = CocoIndex(json_path=path, images_dir=images)
    assert index.image_ids == [1, 3]
    (finding,) = [f for f in index.findings.items if f.reason.key == "malformed_entry"]
    assert "not_exhaustive_category_ids must be a list of integer category ids" in finding.detail
    with pytest.raises(ValueError, match="image id 2: not_exhaustive_category_ids must be"):
        coco_metrics(gt, [], seen_cat_ids=set())


def test_training_instance_buckets_when_the_file_has_no_frequencies():
    gt = copy.deepcopy(_lvis_gt())
    for cat in gt["categories"]:
        del cat["frequency"]
    counts = {"apple": 500, "bird": 11}  # cat: none in training
    metrics = coco_metrics(gt, _detections(), seen_cat_ids={APPLE}, train_counts=counts)
    assert metrics["class_frequency"] == {"apple": "f", "bird": "c", "cat": "r"}
    assert metrics["frequency_buckets"]["by"] == "train_instances"
    assert metrics["segm"]["by_frequency"]["f"]["AP"] == pytest.approx(APPLE_AP)
    assert "AP_f" not in metrics["segm"]  # AP_r / AP_c / AP_f are LVIS's own buckets
    without = coco_metrics(gt, _detections(), seen_cat_ids={APPLE})
    assert "by_frequency" not in without["segm"] and "frequency_buckets" not in without


def _many_class_metrics(num_classes: int) -> dict:
    names = [f"class{k:04d}" for k in range(num_classes)]
    rng = np.random.default_rng(0)
    aps = [None if k % 10 == 0 else float(rng.uniform(0, 100)) for k in range(num_classes)]
    stats = dict.fromkeys(("AP", "AP50", "AP75", "APs", "APm", "APl"), 1.0)
    block = {"all": stats, "seen": stats, "unseen": stats, "per_class": dict(zip(names, aps))}
    return {
        "segm": block,
        "bbox": copy.deepcopy(block),
        "seen_classes": names[:80],
        "unseen_classes": names[80:],
        "images": 500,
    }


def test_per_class_table_at_3000_classes_is_sorted_and_truncated():
    metrics = _many_class_metrics(3000)
    table = format_metrics_table(metrics, max_classes=20)
    class_lines = table.split("(AP; * = seen)\n")[1].splitlines()
    assert len(class_lines) == 21  # 10 best, the "more" line, 10 worst
    assert class_lines[10] == (
        "... 2980 more classes (300 without ground truth in these images); "
        "every class's AP: per_class in metrics.json"
    )
    shown = [line.split()[0] for line in class_lines[:10] + class_lines[11:]]
    aps = [metrics["segm"]["per_class"][name] for name in shown]
    measured = sorted(ap for ap in metrics["segm"]["per_class"].values() if ap is not None)
    assert aps == measured[::-1][:10] + measured[:10][::-1]  # best first, then the worst
    small = format_metrics_table(_many_class_metrics(12), max_classes=20)
    assert "more classes" not in small and small.count("class00") == 12
