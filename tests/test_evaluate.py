"""COCO evaluation: metrics.json schema, AP edge cases, RLE results, backends, model loop."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from everyseg.engine import coco_results, evaluate
from everyseg.engine.evaluate import (
    STAT_NAMES,
    coco_metrics,
    evaluate_model,
    format_metrics_table,
    to_coco_results,
    write_metrics,
)

SIZE = 64
SEEN = {1, 2}  # "a", "b" had masks in training; "c" and "absent" did not
NAMES = {1: "a", 2: "b", 3: "c", 4: "absent"}  # "absent" has no annotation in the val set
BOX_ONLY_ID = 100


def _polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO crowd style RLE: run lengths over the column-major pixels, starting with 0s."""
    pixels = mask.flatten(order="F")
    run_starts = np.flatnonzero(np.diff(pixels)) + 1
    counts = np.diff(np.concatenate([[0], run_starts, [pixels.size]])).tolist()
    if pixels[0]:
        counts.insert(0, 0)
    return {"size": list(mask.shape), "counts": counts}


def _ann(aid, image_id, cat, box, *, crowd=0):
    x, y, w, h = box
    return {
        "id": aid,
        "image_id": image_id,
        "category_id": cat,
        "bbox": list(box),
        "area": w * h,
        "iscrowd": crowd,
        "segmentation": _polygon(*box),
    }


def _gt() -> dict:
    """3 images of 64 px; small and medium objects of classes a, b, c; one crowd region of b."""
    crowd_mask = np.zeros((SIZE, SIZE), np.uint8)
    crowd_mask[2:28, 36:62] = 1
    crowd = _ann(9, 3, 2, (36, 2, 26, 26), crowd=1)
    crowd["segmentation"] = _uncompressed_rle(crowd_mask)
    anns = [
        _ann(1, 1, 1, (2, 2, 40, 40)),
        _ann(2, 1, 2, (44, 44, 16, 16)),
        _ann(3, 2, 2, (4, 30, 36, 30)),
        _ann(4, 2, 3, (40, 4, 20, 20)),
        _ann(5, 2, 1, (10, 2, 12, 12)),
        _ann(6, 3, 3, (2, 2, 30, 50)),
        _ann(7, 3, 1, (36, 36, 24, 24)),
        crowd,
    ]
    return {
        "images": [
            {"id": i, "width": SIZE, "height": SIZE, "file_name": f"{i}.png"} for i in (1, 2, 3)
        ],
        "annotations": anns,
        "categories": [{"id": k, "name": v} for k, v in NAMES.items()],
    }


def _with_box_only(gt: dict, segmentation="missing") -> dict:
    """`gt` plus a box-only annotation of class c (missing, empty or None segmentation)."""
    gt = copy.deepcopy(gt)
    ann = _ann(BOX_ONLY_ID, 1, 3, (44, 4, 18, 18))
    del ann["segmentation"]
    if segmentation != "missing":
        ann["segmentation"] = segmentation
    gt["annotations"].append(ann)
    return gt


def _result(ann, *, score=0.9, category_id=None):
    """A prediction exactly on `ann` (its box; its mask, or its box as mask if box-only)."""
    x, y, w, h = ann["bbox"]
    polygon = ann.get("segmentation") or _polygon(x, y, w, h)
    rle = mask_util.merge(mask_util.frPyObjects(polygon, SIZE, SIZE))
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "image_id": ann["image_id"],
        "category_id": category_id or ann["category_id"],
        "score": score,
        "bbox": list(ann["bbox"]),
        "segmentation": rle,
    }


def _perfect(gt: dict) -> list[dict]:
    return [_result(a) for a in gt["annotations"] if not a["iscrowd"]]


def _assert_perfect(block: dict) -> None:
    for subset in ("all", "seen", "unseen"):
        for name in STAT_NAMES:
            assert block[subset][name] in (100.0, None), (subset, name)
        assert block[subset]["AP"] == 100.0
    assert block["per_class"] == {"a": 100.0, "b": 100.0, "c": 100.0, "absent": None}


def test_perfect_predictions_give_100():
    metrics = coco_metrics(_gt(), _perfect(_gt()), seen_cat_ids=SEEN)
    for iou_type in ("segm", "bbox"):
        _assert_perfect(metrics[iou_type])
    assert metrics["segm"]["all"]["APl"] is None  # no object is large in 64 px images
    assert metrics["seen_classes"] == ["a", "b"]
    assert metrics["unseen_classes"] == ["c", "absent"]
    assert metrics["images"] == 3


def _with_wrong_class_duplicates(gt: dict) -> list[dict]:
    """A correct result per instance, and confident wrong-class duplicates of the first four
    above them: 0 < AP < 100."""
    swap = {1: 2, 2: 3, 3: 1}
    results = [_result(a, score=0.5) for a in gt["annotations"] if not a["iscrowd"]]
    results += [
        _result(a, score=0.9, category_id=swap[a["category_id"]]) for a in gt["annotations"][:4]
    ]
    return results


def test_wrong_classes_lower_ap_and_all_matches_pycocotools_summary():
    gt = _gt()
    results = _with_wrong_class_duplicates(gt)
    metrics = coco_metrics(gt, results, seen_cat_ids=SEEN)
    for iou_type in ("segm", "bbox"):
        assert 0.0 < metrics[iou_type]["all"]["AP"] < 100.0
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = copy.deepcopy(gt)
            coco_gt.createIndex()
            key = "segmentation" if iou_type == "segm" else "bbox"
            dt = [{k: r[k] for k in ("image_id", "category_id", "score", key)} for r in results]
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(dt), iouType=iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        for name, stat in zip(STAT_NAMES, evaluator.stats[:6], strict=True):
            ours = metrics[iou_type]["all"][name]
            assert (ours is None and stat == -1) or ours == pytest.approx(stat * 100, abs=1e-9)


def test_pr_curve_averages_to_ap50_per_subset():
    gt = _gt()
    results = _with_wrong_class_duplicates(gt)
    metrics = coco_metrics(gt, results, seen_cat_ids=SEEN)
    for iou_type in ("segm", "bbox"):
        curve = metrics[iou_type]["pr_curve"]
        assert curve["iou"] == 0.5 and curve["recall"] == [i / 100 for i in range(101)]
        for subset in ("all", "seen", "unseen"):
            assert len(curve[subset]) == 101 and all(0 <= p <= 1 for p in curve[subset])
            ap50 = metrics[iou_type][subset]["AP50"]
            assert 0 < ap50 < 100
            assert np.mean(curve[subset]) * 100 == pytest.approx(ap50, abs=0.01)
    perfect = coco_metrics(gt, _perfect(gt), seen_cat_ids={4})  # seen: only "absent"
    assert perfect["segm"]["pr_curve"]["all"] == [1.0] * 101
    assert perfect["segm"]["pr_curve"]["seen"] is None  # no ground truth to measure on


def test_schema_keys_and_json(tmp_path):
    metrics = coco_metrics(_gt(), _perfect(_gt())[:3], seen_cat_ids=SEEN)
    assert set(metrics) == {"segm", "bbox", "seen_classes", "unseen_classes", "images"}
    for iou_type in ("segm", "bbox"):
        assert set(metrics[iou_type]) == {"all", "seen", "unseen", "per_class", "pr_curve"}
        for subset in ("all", "seen", "unseen"):
            assert set(metrics[iou_type][subset]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert set(metrics[iou_type]["per_class"]) == set(NAMES.values())
    path = tmp_path / "run" / "metrics.json"
    write_metrics(metrics, path)
    assert json.loads(path.read_text()) == metrics
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left
    table = format_metrics_table(metrics)
    assert "segm unseen" in table and "bbox seen" in table and "absent" in table


def test_empty_predictions_give_zero_not_crash():
    metrics = coco_metrics(_gt(), [], seen_cat_ids=SEEN)
    for iou_type in ("segm", "bbox"):
        for subset in ("all", "seen", "unseen"):
            assert metrics[iou_type][subset]["AP"] == 0.0
            assert metrics[iou_type][subset]["APl"] is None
        assert metrics[iou_type]["per_class"] == {"a": 0.0, "b": 0.0, "c": 0.0, "absent": None}


def test_subset_without_ground_truth_is_none():
    metrics = coco_metrics(_gt(), _perfect(_gt()), seen_cat_ids={4})  # only "absent" seen
    for iou_type in ("segm", "bbox"):
        assert set(metrics[iou_type]["seen"].values()) == {None}
        assert metrics[iou_type]["unseen"]["AP"] == 100.0
    everything_seen = coco_metrics(_gt(), _perfect(_gt()), seen_cat_ids=NAMES)
    assert set(everything_seen["bbox"]["unseen"].values()) == {None}
    assert everything_seen["unseen_classes"] == []
    with pytest.raises(ValueError, match="not categories"):
        coco_metrics(_gt(), [], seen_cat_ids={99})


def test_crowd_regions_follow_coco():
    gt = _gt()
    crowd = next(a for a in gt["annotations"] if a["iscrowd"])
    x, y, w, h = crowd["bbox"]
    # Detections inside the crowd region are ignored, not false positives; the crowd itself is
    # not a missed object, so perfect predictions on the other objects stay at 100.
    inside = [
        _result(_ann(0, 3, 2, (x + 1, y + 1, w / 2, h / 2)), score=1.0),
        _result(_ann(0, 3, 2, (x + 8, y + 8, w / 2, h / 2)), score=1.0),
    ]
    metrics = coco_metrics(gt, _perfect(gt) + inside, seen_cat_ids=SEEN)
    for iou_type in ("segm", "bbox"):
        _assert_perfect(metrics[iou_type])


@pytest.mark.parametrize(
    "segmentation",
    ["missing", [], None, [[1.0, 2.0]], [[1, 2, 3, 4, 5, 6, 7]], {"size": [8, 8], "counts": [64]}],
    ids=["missing", "empty", "none", "short-polygon", "odd-polygon", "rle-of-wrong-size"],
)
def test_box_only_ground_truth_is_ignored_in_segm(segmentation):
    gt = _with_box_only(_gt(), segmentation)
    before = copy.deepcopy(gt)
    box_only = gt["annotations"][-1]
    # A confident perfect prediction on the box-only object, mask = its box.
    results = _perfect(_gt()) + [_result({**box_only, "segmentation": None}, score=1.0)]
    metrics = coco_metrics(gt, results, seen_cat_ids=SEEN)
    assert gt == before  # the caller's dict is not modified
    reference = coco_metrics(_gt(), _perfect(_gt()), seen_cat_ids=SEEN)
    assert metrics["segm"] == reference["segm"]
    _assert_perfect(metrics["bbox"])
    # Without that prediction: not a missed mask, but a missed box.
    missed = coco_metrics(gt, _perfect(_gt()), seen_cat_ids=SEEN)
    assert missed["segm"] == reference["segm"]
    assert missed["bbox"]["per_class"]["c"] < 100.0


def test_box_only_results_score_zero_segm():
    results = [{k: v for k, v in r.items() if k != "segmentation"} for r in _perfect(_gt())]
    metrics = coco_metrics(_gt(), results, seen_cat_ids=SEEN)
    assert metrics["segm"]["all"]["AP"] == 0.0
    _assert_perfect(metrics["bbox"])


def test_to_coco_results_round_trips_masks():
    torch.manual_seed(0)
    masks = torch.rand(3, 1, 20, 30)
    outputs = {
        "boxes": torch.tensor([[1.0, 2.0, 11.0, 7.0], [0.0, 0.0, 30.0, 20.0], [5, 5, 6, 6]]),
        "labels": torch.tensor([1, 2, 1]),
        "scores": torch.tensor([0.9, 0.5, 0.1]),
        "masks": masks,
    }
    results = to_coco_results(outputs, image_id=7, label_to_cat_id={1: 10, 2: 20})
    json.dumps(results)
    assert [r["category_id"] for r in results] == [10, 20, 10]
    assert results[0]["bbox"] == [1.0, 2.0, 10.0, 5.0]
    assert results[1]["score"] == pytest.approx(0.5)
    assert all(r["image_id"] == 7 for r in results)
    for result, mask in zip(results, masks, strict=True):
        assert isinstance(result["segmentation"]["counts"], str)
        decoded = mask_util.decode(result["segmentation"])
        np.testing.assert_array_equal(decoded, (mask[0] > 0.5).numpy())
    box_only = {k: v for k, v in outputs.items() if k != "masks"}
    assert (
        "segmentation"
        not in to_coco_results(box_only, image_id=7, label_to_cat_id={1: 10, 2: 20})[0]
    )
    with pytest.raises(ValueError, match="label_to_cat_id"):
        to_coco_results(outputs, image_id=7, label_to_cat_id={1: 10})


def _random_case(seed: int, n_images: int = 15, n_cats: int = 4) -> tuple[dict, list[dict]]:
    """Random GT (boxes, masks, crowds, a box-only one) and noisy, partly wrong detections."""
    rng = np.random.default_rng(seed)
    gt = {
        "images": [],
        "annotations": [],
        "categories": [{"id": k, "name": f"k{k}"} for k in range(1, n_cats + 1)],
    }
    results = []
    for image_id in range(1, n_images + 1):
        gt["images"].append({"id": image_id, "width": SIZE, "height": SIZE})
        for _ in range(rng.integers(0, 5)):
            w, h = rng.uniform(4, 40, size=2)
            x, y = rng.uniform(0, SIZE - w), rng.uniform(0, SIZE - h)
            ann = _ann(
                len(gt["annotations"]) + 1,
                image_id,
                int(rng.integers(1, n_cats + 1)),
                (x, y, w, h),
                crowd=int(rng.random() < 0.1),
            )
            gt["annotations"].append(ann)
            jitter = _ann(0, image_id, ann["category_id"], (x, y, w, h) + rng.normal(0, 2, 4))
            jitter["bbox"] = [max(v, 0.5) for v in jitter["bbox"]]
            category = int(rng.integers(1, n_cats + 1)) if rng.random() < 0.3 else None
            results.append(_result(jitter, score=float(rng.random()), category_id=category))
    gt["annotations"][0].pop("segmentation")  # box-only
    return gt, results


def test_faster_coco_eval_matches_pycocotools(monkeypatch):
    faster = pytest.importorskip("faster_coco_eval")
    gt, results = _random_case(seed=0)
    for iou_type in ("segm", "bbox"):
        key = "segmentation" if iou_type == "segm" else "bbox"
        dts = [{k: r[k] for k in ("image_id", "category_id", "score", key)} for r in results]
        dataset = coco_results.ground_truth_for(gt, iou_type=iou_type)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = copy.deepcopy(dataset)
            coco_gt.createIndex()
            reference = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dts)), iouType=iou_type)
            reference.evaluate()
            reference.accumulate()
            reference.summarize()
        fast_gt = faster.COCO(copy.deepcopy(dataset))
        fast = faster.COCOeval_faster(
            fast_gt,
            fast_gt.loadRes(copy.deepcopy(dts)),
            iouType=iou_type,
            print_function=lambda *a: None,
        )
        fast.evaluate()
        fast.accumulate()
        fast.summarize()
        assert 0.05 < reference.stats[0] < 0.95  # a case where AP is neither 0 nor perfect
        np.testing.assert_allclose(fast.stats[:12], reference.stats, rtol=0, atol=1e-6)
    # The whole pipeline agrees too, with and without predictions.
    for case_results in (results, []):
        per_backend = []
        for backend in ("pycocotools", "faster_coco_eval"):
            monkeypatch.setattr(coco_results, "BACKEND", backend)
            per_backend.append(coco_metrics(gt, case_results, seen_cat_ids={1, 2}))
        flat = [_flatten(metrics) for metrics in per_backend]
        assert flat[0].keys() == flat[1].keys()
        for key, value in flat[0].items():
            other = flat[1][key]
            assert value == other or value == pytest.approx(other, rel=0, abs=1e-6), key


def _existing_cases() -> dict[str, tuple[dict, list[dict]]]:
    """The ground truths and results the tests above score, by name."""
    gt = _gt()
    swap = {1: 2, 2: 3, 3: 1}
    wrong = [_result(a, score=0.5) for a in gt["annotations"] if not a["iscrowd"]]
    wrong += [
        _result(a, score=0.9, category_id=swap[a["category_id"]]) for a in gt["annotations"][:4]
    ]
    crowd = next(a for a in gt["annotations"] if a["iscrowd"])
    x, y, w, h = crowd["bbox"]
    inside = [_result(_ann(0, 3, 2, (x + 1, y + 1, w / 2, h / 2)), score=1.0)]
    box_only = _with_box_only(gt)
    box_only_hit = _result({**box_only["annotations"][-1], "segmentation": None}, score=1.0)
    no_masks = [{k: v for k, v in r.items() if k != "segmentation"} for r in _perfect(gt)]
    return {
        "perfect": (gt, _perfect(gt)),
        "wrong-classes": (gt, wrong),
        "partial": (gt, _perfect(gt)[:3]),
        "empty": (gt, []),
        "crowd": (gt, _perfect(gt) + inside),
        "box-only-gt": (box_only, _perfect(gt) + [box_only_hit]),
        "box-only-results": (gt, no_masks),
        "random": _random_case(seed=1),
    }


@pytest.mark.parametrize("case", sorted(_existing_cases()))
def test_default_backend_is_faster_coco_eval_with_pycocotools_numbers(monkeypatch, case):
    assert coco_results.BACKEND == "faster_coco_eval"
    gt, results = _existing_cases()[case]
    default = coco_metrics(gt, results, seen_cat_ids=SEEN)
    monkeypatch.setattr(coco_results, "BACKEND", "pycocotools")
    reference = coco_metrics(gt, results, seen_cat_ids=SEEN)
    flat, flat_reference = _flatten(default), _flatten(reference)
    assert flat.keys() == flat_reference.keys()
    for key, value in flat_reference.items():
        assert flat[key] == value or flat[key] == pytest.approx(value, rel=0, abs=1e-9), key


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_categories_scored_a_few_per_pass_give_the_same_precision(backend):
    gt, results = _random_case(seed=2)
    arrays = []
    for per_pass in (1, 3, 500):
        precision, _ = coco_results.precision_array(
            coco_results.ground_truth_for(gt, iou_type="segm"),
            [
                {k: r[k] for k in ("image_id", "category_id", "score", "segmentation")}
                for r in results
            ],
            iou_type="segm",
            img_ids=[img["id"] for img in gt["images"]],
            backend=backend,
            categories_per_pass=per_pass,
        )
        arrays.append(precision)
    assert arrays[0].shape[2] == len(gt["categories"])
    assert (arrays[0] > 0).any()
    np.testing.assert_array_equal(arrays[0], arrays[2])
    np.testing.assert_array_equal(arrays[1], arrays[2])


def test_lvis_rules_are_refused_by_pycocotools():
    dataset = coco_results.ground_truth_for(_gt(), iou_type="bbox")
    with pytest.raises(ValueError, match="federated rules need faster-coco-eval"):
        coco_results.precision_array(
            dataset, [], iou_type="bbox", img_ids=[1], federated=True, backend="pycocotools"
        )


def _flatten(tree, prefix=""):
    """Nested dicts -> {"a/b/c": leaf}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}/{key}").items()}


class _ImageList(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_evaluate_model_runs_tiny_maskrcnn(monkeypatch):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    seen_results = []

    def spy(gt, results, **kwargs):
        seen_results.extend(results)
        return coco_metrics(gt, results, **kwargs)

    monkeypatch.setattr(evaluate, "coco_metrics", spy)
    torch.manual_seed(0)
    # Few proposals and detections: the 256-channel mask head on 100 detections dominates on CPU.
    model = maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=3,
        min_size=64,
        max_size=64,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50,
        box_detections_per_img=5,
    )
    model.train()
    dataset = _ImageList(
        [(torch.rand(3, SIZE, SIZE), {"image_id": torch.tensor(i)}) for i in (1, 3)]
    )
    metrics = evaluate_model(
        model,
        dataset,
        label_to_cat_id={1: 1, 2: 3},
        seen_cat_ids=SEEN,
        gt_json=_gt(),
        batch_size=2,
        progress=False,
    )
    assert model.training  # mode restored
    assert metrics["images"] == 2
    assert set(metrics["segm"]) == {"all", "seen", "unseen", "per_class", "pr_curve"}
    json.dumps(metrics, allow_nan=False)
    assert seen_results  # the untrained model still detects something at score > 0.05
    assert {r["image_id"] for r in seen_results} <= {1, 3}
    assert {r["category_id"] for r in seen_results} <= {1, 3}
    assert all("segmentation" in r for r in seen_results)


def test_written_metrics_never_hold_nan_or_infinity(tmp_path):
    metrics = coco_metrics(_gt(), _perfect(_gt()), seen_cat_ids=SEEN)
    metrics["segm"]["all"]["AP"] = float("nan")
    metrics["bbox"]["per_class"]["a"] = float("inf")
    metrics["extra"] = [float("-inf"), 1.5]
    path = tmp_path / "metrics.json"
    write_metrics(metrics, path)

    def refuse(token):
        raise AssertionError(f"{token} in the JSON")

    written = json.loads(path.read_text(), parse_constant=refuse)
    assert written["segm"]["all"]["AP"] is None and written["bbox"]["per_class"]["a"] is None
    assert written["extra"] == [None, 1.5]
    assert written["segm"]["seen"] == metrics["segm"]["seen"]
