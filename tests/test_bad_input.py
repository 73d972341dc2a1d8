"""The bad-input catalogue (docs/bad_input.md), part 1: JSON files, entries, boxes, masks.

Each kind has its own test (or parametrised case) asserting the message or the repair: under
`skip` the bad sample is named in the report, under `error` the message names the file and the
annotation / image id. Image files, policies and the config are in test_check_data.py.
"""

import math

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from everyseg.cli import main
from everyseg.config import ConfigError, DataConfig, load_config
from everyseg.data.build import build_dataset
from everyseg.data.coco import DataError
from everyseg.engine.coco_results import ground_truth_for

from coco_json import SQUARE, H, W, ann, image_entry

# --- the file as a whole: always an error, whatever the policy -------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param('{"images": [', r"not valid JSON: .*line 1 column 13", id="malformed-json"),
        pytest.param("", r"not valid JSON: Expecting value", id="empty-file"),
        pytest.param("[]", r"expected a JSON object at the top, got list", id="top-level-list"),
        pytest.param(
            '{"images": [{"id": ' + "9" * 5000 + "}]}",
            r"not valid JSON: Exceeds the limit \(4300 digits\)",
            id="integer-of-5000-digits",
        ),
        pytest.param(
            '{"images": [], "categories": []}', r"no top-level 'annotations'", id="missing-key"
        ),
        pytest.param(
            '{"images": {}, "annotations": [], "categories": []}',
            r"'images' must be a list, got dict",
            id="key-wrong-type",
        ),
    ],
)
def test_unreadable_json_files(coco_files, tmp_path, text, message):
    path = tmp_path / "ann.json"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as err:
        coco_files.load(path)
    assert str(path) in str(err.value)


def test_json_not_utf8(coco_files, tmp_path):
    path = tmp_path / "ann.json"
    path.write_bytes(b'{"images": "\xff\xfe"}')
    with pytest.raises(DataError, match="not UTF-8 JSON text"):
        coco_files.load(path)


def test_json_file_not_found(coco_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file .*nope.json not found"):
        coco_files.load(tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("categories", "message"),
    [
        pytest.param([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}], r"category id\(s\): \[1\]"),
        pytest.param([{"id": 1, "name": "a"}, {"id": 2, "name": "a"}], r"name\(s\): \['a'\]"),
        pytest.param([{"id": 1}], "category #0 needs an integer 'id' and a 'name'"),
        pytest.param([{"id": "x", "name": "a"}], "category #0 needs an integer 'id'"),
        pytest.param([], "'categories' is empty"),
    ],
    ids=["duplicate-category-id", "duplicate-name", "no-name", "string-id", "no-categories"],
)
def test_bad_categories(coco_files, categories, message):
    with pytest.raises(DataError, match=message):
        coco_files.load(coco_files.write_dataset(categories=categories))


def test_duplicate_image_ids(coco_files):
    images = [image_entry(1, "a.png"), image_entry(1, "b.png")]
    with pytest.raises(DataError, match=r"duplicate image id\(s\) in 'images': \[1\]"):
        coco_files.load(coco_files.write_dataset(images=images))


def test_empty_dataset(coco_files):
    with pytest.raises(DataError, match=r"no usable images \('images' is empty\)"):
        coco_files.load(coco_files.write_dataset(images=[], annotations=[]))


def test_every_image_skipped_is_an_error_that_says_why(coco_files, tmp_path):
    json_path = coco_files.write_dataset()
    for name in ("a.png", "b.png"):
        (tmp_path / "img" / name).unlink()
    with pytest.raises(DataError, match=r"all 2 skipped: 2 image file not found; e.g. .*a.png"):
        coco_files.load(json_path)


# --- one bad annotation (id 99 on image 1): skipped, named, or raised --------------------------

NAN, INF = float("nan"), float("inf")
# kind -> (annotation, report key, id it is reported under, part of the error message)
BAD_ANNOTATIONS = {
    "annotation-not-an-object": (["a list"], "malformed_entry", None, "annotations[2] is list"),
    "annotation-id-0": (ann(0), "bad_id", 0, "annotations[2] has id 0"),
    "annotation-id-negative": (ann(-4), "bad_id", -4, "annotations[2] has id -4"),
    "annotation-id-string": (ann("99"), "bad_id", "99", "annotations[2] has id '99'"),
    "annotation-id-missing": ({"image_id": 1}, "bad_id", None, "annotations[2] has id None"),
    "duplicate-annotation-id": (ann(10), "duplicate_id", 10, "annotation 10, image 1: duplicate"),
    "unknown-category-id": (ann(99, category_id=5), "unknown_category", 99, "category_id 5; "),
    "unknown-image-id": (ann(99, image_id=7), "unknown_image", 99, "annotation 99: image id not"),
    "iscrowd-not-0-or-1": (ann(99, iscrowd=2), "bad_iscrowd", 99, "image 1: iscrowd is not 0"),
    "bbox-missing": (ann(99, bbox=None), "bad_bbox", 99, "bbox None"),
    "bbox-3-numbers": (ann(99, bbox=[1, 2, 3]), "bad_bbox", 99, "bbox [1, 2, 3]"),
    "bbox-strings": (ann(99, bbox=["1", "2", "3", "4"]), "bad_bbox", 99, "bbox ['1', '2'"),
    "bbox-nan": (ann(99, bbox=[1, NAN, 5, 5]), "bad_bbox", 99, "bbox [1, nan, 5, 5]"),
    "bbox-inf": (ann(99, bbox=[1, 1, INF, 5]), "bad_bbox", 99, "bbox [1, 1, inf, 5]"),
    "bbox-negative-size": (ann(99, bbox=[5, 5, -3, 4]), "negative_bbox", 99, "[5, 5, -3, 4]"),
    "bbox-zero-size": (ann(99, bbox=[5, 5, 0, 4]), "degenerate_bbox", 99, "bbox [5, 5, 0, 4]"),
    "bbox-outside-image": (ann(99, bbox=[50, 40, 5, 5]), "degenerate_bbox", 99, "< 1 px after"),
    "annotation-id-beyond-int64": (ann(2**70), "bad_id", 2**70, f"has id {2**70}"),
    "annotation-id-bool": (ann(True), "bad_id", "True", "annotations[2] has id True"),
    "image-id-beyond-int64": (ann(99, image_id=2**64), "unknown_image", 99, f"image_id {2**64}"),
    "bbox-integer-beyond-float": (ann(99, bbox=[1, 1, 10**400, 5]), "bad_bbox", 99, "bbox [1, 1"),
    # x0, y0, x1, y1 written where COCO has x, y, w, h: the box runs far past the mask
    "bbox-xyxy-not-xywh": (
        ann(99, bbox=[20, 12, 30, 20], segmentation=[[20, 12, 30, 12, 30, 20, 20, 20]]),
        "bbox_mask_mismatch",
        99,
        "mask extent [20, 12, 30, 20], IoU 0.27",
    ),
    "polygon-in-0-1-coordinates": (
        ann(99, segmentation=[[0.1, 0.1, 0.3, 0.1, 0.3, 0.3]]),
        "bbox_mask_mismatch",
        99,
        "IoU 0.00: a bbox written as x0, y0, x1, y1, or polygons in 0..1 coordinates?",
    ),
    "rle-without-foreground": (
        ann(99, segmentation={"size": [H, W], "counts": [H * W]}),
        "bbox_mask_mismatch",
        99,
        "the mask is empty",
    ),
}


@pytest.mark.parametrize("kind", list(BAD_ANNOTATIONS))
def test_bad_annotation_is_skipped_and_named(coco_files, kind):
    bad, key, reported_id, _ = BAD_ANNOTATIONS[kind]
    dataset = coco_files.load(coco_files.write_dataset(annotations=[ann(10), ann(20, 2), bad]))
    assert coco_files.found(dataset, "skipped_annotations") == {key: [reported_id]}
    assert [dataset[i][1]["ann_ids"].tolist() for i in (0, 1)] == [[10], [20]]
    assert dataset.index.findings.num_bad == 1


@pytest.mark.parametrize("kind", list(BAD_ANNOTATIONS))
def test_bad_annotation_under_error_policy_names_it(coco_files, kind):
    bad, _, _, message = BAD_ANNOTATIONS[kind]
    json_path = coco_files.write_dataset(annotations=[ann(10), ann(20, 2), bad])
    with pytest.raises(DataError) as err:
        coco_files.load(json_path, on_bad_sample="error")
    assert message in str(err.value) and str(json_path) in str(err.value)


# --- one bad segmentation (annotation 99): the mask is dropped, the box kept -------------------


def _rle(height=H, width=W) -> dict:
    mask = np.zeros((height, width), dtype=np.uint8, order="F")
    mask[3:11, 2:12] = 1
    return {"size": [height, width], "counts": mask_utils.encode(mask)["counts"].decode()}


PAIRS = [[2, 3], [12, 3], [12, 11], [2, 11]]
# kind -> (segmentation, report key, what the error message says of its form)
BAD_MASKS = {
    "polygon-under-3-points": ([[1, 1, 5, 5]], "no_valid_polygon", "polygon with 2 points"),
    "polygon-odd-coordinate-count": (
        [[1, 1, 5, 5, 9, 1, 3]],
        "bad_polygon",
        "polygon 0: an odd number of coordinates (7)",
    ),
    "polygon-nan": ([[1, 1, NAN, 5, 9, 1]], "bad_polygon", "not finite (NaN or Infinity)"),
    "polygon-strings": ([["1", "1", "5", "5", "9", "1"]], "bad_polygon", "is a str: '1'"),
    "polygon-far-outside-image": ([[0, 0, 1e9, 0, 0, 1e9]], "bad_polygon", "outside the image"),
    "polygon-as-xy-pairs": ([PAIRS], "polygon_pairs", "list of [x, y] pairs"),
    "polygon-as-flat-list-of-xy-pairs": (PAIRS, "polygon_pairs", "list of [x, y] pairs"),
    "rle-size-differs-from-image": (
        _rle(H + 1, W),
        "rle_size",
        f"RLE of size {H + 1}x{W} for a {H}x{W} image",
    ),
    "rle-size-not-two-numbers": ({"size": [H], "counts": "x"}, "bad_rle", "'size' is [30]"),
    "rle-runs-short-of-the-image": (
        {"size": [H, W], "counts": [5, 10]},
        "bad_rle",
        f"runs add up to 15 pixels, the image has {H * W}",
    ),
    "rle-negative-run": (
        {"size": [H, W], "counts": [5, -10, W * H + 5]},
        "bad_rle",
        "negative or non-integer run",
    ),
    "rle-compressed-truncated": (
        {"size": [H, W], "counts": _rle()["counts"][:-2]},
        "bad_rle",
        "not a valid compressed RLE string",
    ),
    "rle-compressed-bad-characters": (
        {"size": [H, W], "counts": "~~~\x7f"},
        "bad_rle",
        "not a valid compressed RLE string",
    ),
    "rle-without-counts": ({"size": [H, W]}, "bad_rle", "'counts' is a NoneType"),
    "segmentation-a-string": ("polygon", "bad_segmentation", "segmentation is a str"),
    "segmentation-a-number": (7, "bad_segmentation", "segmentation is a int"),
}


@pytest.mark.parametrize("kind", list(BAD_MASKS))
def test_bad_segmentation_keeps_the_box_without_a_mask(coco_files, tmp_path, kind):
    segm, key, form = BAD_MASKS[kind]
    annotations = [ann(10), ann(20, 2), ann(99, segmentation=segm)]
    dataset = coco_files.load(coco_files.write_dataset(annotations=annotations))
    assert coco_files.found(dataset, "dropped_masks") == {key: [99]}
    _, target = dataset[0]
    assert target["ann_ids"].tolist() == [10, 99]
    assert (
        target["has_mask"].tolist() == [True, False]
        and target["compact_masks"].to_dense()[1].sum() == 0
    )
    with pytest.raises(DataError, match="annotation 99, image 1: ") as err:
        coco_files.load(tmp_path / "ann.json", on_bad_sample="error")
    assert form in str(err.value)


def test_valid_rle_forms_are_accepted(coco_files):
    uncompressed = mask_utils.decode(_rle()).flatten(order="F")
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, uncompressed, 1 - uncompressed[-1]])))
    counts = [int(np.flatnonzero(uncompressed)[0])] + runs.tolist()
    counts[-1] = W * H - sum(counts[:-1])
    annotations = [
        ann(10, segmentation=_rle()),
        ann(20, 2, segmentation={"size": [H, W], "counts": counts}),
    ]
    dataset = coco_files.load(coco_files.write_dataset(annotations=annotations))
    assert dataset.index.findings.num_bad == 0
    for i in (0, 1):
        assert dataset[i][1]["compact_masks"].to_dense()[0].sum() == 80


@pytest.mark.parametrize(
    ("segm", "usable"),
    [
        pytest.param(SQUARE[0], SQUARE, id="flat-polygon-read-as-one"),
        pytest.param({"size": [H, W], "counts": [5, 10]}, None, id="rle-runs-short"),
        pytest.param([[1, 1, 5, 5, 9, 1, 3], SQUARE[0]], None, id="one-polygon-malformed"),
        pytest.param([PAIRS], None, id="xy-pairs"),
    ],
)
def test_evaluation_reads_segmentations_by_the_loaders_rule(coco_files, segm, usable):
    """Ground truth given to COCOeval keeps a mask exactly when the loader would."""
    dataset = {
        "images": [image_entry(1, "a.png")],
        "annotations": [ann(10, segmentation=segm)],
        "categories": [{"id": 1, "name": "cat"}],
    }
    (gt,) = ground_truth_for(dataset, iou_type="segm")["annotations"]
    loaded = coco_files.load(coco_files.write_dataset(annotations=[ann(10, segmentation=segm)]))
    assert loaded[0][1]["has_mask"].tolist() == [usable is not None]
    if usable is None:  # box-only: an ignore region
        assert gt["iscrowd"] == 1 and gt["segmentation"] == [[2, 3, 12, 3, 12, 11, 2, 11]]
    else:
        assert gt["iscrowd"] == 0 and gt["segmentation"] == usable


# --- documented repairs and normal cases: never errors ----------------------------------------


def test_box_partly_outside_is_clipped(coco_files):
    annotations = [ann(10, bbox=[35, -4, 10, 8], segmentation=[]), ann(20, 2)]
    dataset = coco_files.load(
        coco_files.write_dataset(annotations=annotations), on_bad_sample="error"
    )
    assert dataset[0][1]["boxes"].tolist() == [[35, 0, 40, 4]]
    assert coco_files.found(dataset, "repaired") == {"clipped_bbox": [10]}


def test_short_polygon_beside_a_good_one_is_dropped(coco_files):
    annotations = [ann(10, segmentation=[SQUARE[0], [30, 1, 31, 2]]), ann(20, 2)]
    dataset = coco_files.load(
        coco_files.write_dataset(annotations=annotations), on_bad_sample="error"
    )
    assert (
        dataset[0][1]["compact_masks"].to_dense()[0].sum()
        == coco_files.load()[1][1]["compact_masks"].to_dense()[0].sum()
        > 0
    )
    assert coco_files.found(dataset, "repaired") == {"short_polygon": [10]}


def test_flat_polygon_list_is_read_as_one_polygon(coco_files):
    annotations = [ann(10, segmentation=SQUARE[0]), ann(20, 2)]
    dataset = coco_files.load(
        coco_files.write_dataset(annotations=annotations), on_bad_sample="error"
    )
    assert dataset[0][1]["has_mask"].tolist() == [True]
    assert (
        dataset[0][1]["compact_masks"].to_dense()[0].sum()
        == dataset[1][1]["compact_masks"].to_dense()[0].sum()
    )
    assert coco_files.found(dataset, "repaired") == {"flat_polygon": [10]}


@pytest.mark.parametrize("area", ["big", 10**400], ids=["string", "integer-beyond-float"])
def test_invalid_area_becomes_the_box_area(coco_files, area):
    annotations = [ann(10, area=area), ann(20, 2)]
    dataset = coco_files.load(
        coco_files.write_dataset(annotations=annotations), on_bad_sample="error"
    )
    assert dataset.ground_truth()["annotations"][0]["area"] == 80.0
    assert coco_files.found(dataset, "repaired") == {"bad_area": [10]}


@pytest.mark.parametrize("segm", [[], None, {}], ids=["empty-list", "null", "empty-object"])
def test_empty_segmentation_is_box_only(coco_files, segm):
    annotations = [ann(10, segmentation=segm), ann(20, 2)]
    dataset = coco_files.load(
        coco_files.write_dataset(annotations=annotations), on_bad_sample="error"
    )
    assert dataset[0][1]["has_mask"].tolist() == [False]
    assert coco_files.found(dataset, "notes")["no_segmentation"] == [10]


def test_crowd_rle_is_an_ignore_region_not_an_instance(coco_files):
    crowd = ann(30, iscrowd=1, segmentation=_rle(), bbox=[2, 3, 10, 8])
    dataset = coco_files.load(
        coco_files.write_dataset(annotations=[ann(10), ann(20, 2), crowd]),
        on_bad_sample="error",
    )
    assert dataset[0][1]["ann_ids"].tolist() == [10]
    assert coco_files.found(dataset, "notes")["crowd"] == [30]
    gt = {a["id"]: a for a in dataset.ground_truth()["annotations"]}
    assert gt[30]["iscrowd"] == 1 and gt[30]["segmentation"] == _rle()


def test_image_without_annotations_is_a_negative(coco_files):
    dataset = coco_files.load(
        coco_files.write_dataset(annotations=[ann(10)]), on_bad_sample="error"
    )
    _, target = dataset[1]
    assert target["boxes"].shape == (0, 4) and target["compact_masks"].to_dense().shape == (0, H, W)
    assert coco_files.found(dataset, "notes") == {"without_annotations": [2]}
    assert "(1 without instances)" in dataset.summary()


def test_ground_truth_keeps_only_what_the_loader_kept(coco_files):
    annotations = [ann(10), ann(20, 2), ann(99, category_id=9), ann(98, bbox=[1, 1, NAN, 1])]
    gt = coco_files.load(coco_files.write_dataset(annotations=annotations)).ground_truth()
    assert [a["id"] for a in gt["annotations"]] == [10, 20]
    assert gt["annotations"][0]["bbox"] == [2.0, 3.0, 10.0, 8.0]
    assert all(math.isfinite(v) for a in gt["annotations"] for v in a["bbox"])


# --- a train set with nothing to train: an error, not a run with mask loss 0 -----------------


def _train_config(json_path, **fields) -> DataConfig:
    images = str(json_path.parent / "img")
    return DataConfig(train_json=str(json_path), train_images=images, **fields)


def test_train_set_whose_masks_are_all_dropped_stops_and_says_why(coco_files):
    annotations = [ann(10, segmentation=[PAIRS]), ann(20, 2, segmentation=[PAIRS]), ann(30, 2)]
    annotations[2]["segmentation"] = [[1, 1, 5, 5]]
    cfg = _train_config(coco_files.write_dataset(annotations=annotations))
    with pytest.raises(DataError) as err:
        build_dataset(cfg, split="train")
    message = str(err.value)
    assert "none of the 3 instances of the mask classes (cat, dog) has a usable mask" in message
    assert "polygon given as a list of [x, y] pairs (COCO wants flat" in message
    assert "[x0, y0, x1, y1, ...]): 2 (e.g. [[[2, 3], [12, 3]" in message
    assert "no valid polygon (all have < 3 points): 1 (e.g. polygon with 2 points)" in message
    assert "set data.mask_classes=none to train boxes only" in message
    # the same set for evaluation, or deliberately without masks, is fine
    assert len(build_dataset(cfg, split="train", mask_classes="none")) == 2  # detector stage
    cfg.mask_classes = "none"
    assert len(build_dataset(cfg, split="train")) == 2
    cfg.val_json, cfg.val_images = cfg.train_json, cfg.train_images
    assert len(build_dataset(cfg, split="val")) == 2


def test_box_only_train_set_needs_mask_classes_none(coco_files):
    annotations = [ann(10, segmentation=[]), ann(20, 2, segmentation=None)]
    cfg = _train_config(coco_files.write_dataset(annotations=annotations))
    with pytest.raises(DataError, match=r"no segmentation \(box-only\): 2"):
        build_dataset(cfg, split="train")


def test_mask_classes_without_instances_stop_training(coco_files):
    cfg = _train_config(coco_files.write_dataset(), mask_classes="dog")  # every instance is a cat
    with pytest.raises(DataError, match=r"none of the 0 instances .* \(dog\).*no instances"):
        build_dataset(cfg, split="train")


def test_train_set_without_a_usable_instance_stops(coco_files):
    annotations = [ann(10, bbox=None), ann(20, 2, category_id=9)]
    cfg = _train_config(coco_files.write_dataset(annotations=annotations), mask_classes="none")
    with pytest.raises(DataError, match="no usable instance in 2 annotations") as err:
        build_dataset(cfg, split="train")
    assert "bbox missing or not 4 finite numbers: 1" in str(err.value)
    assert "category id not in 'categories': 1" in str(err.value)


def test_everyseg_train_on_a_set_without_masks_exits_with_the_reason(coco_files, tmp_path, capsys):
    json_path = coco_files.write_dataset(annotations=[ann(10, segmentation=[PAIRS])])
    argv = ["train", "maskrcnn-tiny", "--out", str(tmp_path / "run")]
    for key, value in (("json", json_path), ("images", tmp_path / "img")):
        argv += ["--set", f"data.train_{key}={value}"]
    argv += ["--set", "data.val_json=null", "--set", "data.val_images=null"]  # checked at start
    assert main(argv) == 2
    assert "has a usable mask, so the mask loss would be 0" in capsys.readouterr().err


# --- the config --------------------------------------------------------------------------------


def test_mask_classes_name_not_a_category(coco_files):
    with pytest.raises(ConfigError, match=r"'dgo' \(did you mean 'dog'\?\); valid names: cat, dog"):
        coco_files.load(coco_files.write_dataset(), mask_classes="cat,dgo")


def test_config_key_that_does_not_exist():
    with pytest.raises(ConfigError, match="unknown config key.*data.on_bad_samples"):
        load_config("maskrcnn-tiny", ["data.on_bad_samples=skip"])


def test_config_value_of_the_wrong_type():
    with pytest.raises(ConfigError, match="train.steps: expected int, got 'many'"):
        load_config("maskrcnn-tiny", ["train.steps=many"])


def test_unknown_bad_sample_policy(coco_files):
    with pytest.raises(ConfigError, match="data.on_bad_sample must be one of"):
        coco_files.load(coco_files.write_dataset(), on_bad_sample="ignore")
