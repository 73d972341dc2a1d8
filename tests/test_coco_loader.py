"""CocoInstances on tiny hand-made COCO files: every annotation kind, partial masks, flips."""

import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from everyseg.data.coco import (
    CROWD,
    DEGENERATE,
    NO_VALID_POLYGON,
    CocoInstances,
    DataError,
    collate,
)
from everyseg.data.images import load_image
from everyseg.data.report import report

W, H = 40, 30
# Non-contiguous ids; cat and person are VOC classes, giraffe is not.
CATEGORIES = [{"id": 42, "name": "person"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "giraffe"}]
LABEL = {"cat": 1, "giraffe": 2, "person": 3}  # categories sorted by id: 3, 7, 42


def _block(y0, y1, x0, x1):
    mask = np.zeros((H, W), dtype=np.uint8, order="F")
    mask[y0:y1, x0:x1] = 1
    return mask


def _compressed_rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}  # as stored in JSON


def _uncompressed_rle(mask):
    flat = mask.flatten(order="F")  # COCO runs are column-major, starting with zeros
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": [H, W], "counts": counts}


def _ann(ann_id, cat_id, bbox, **extra):
    return {
        "id": ann_id,
        "image_id": 1,
        "category_id": cat_id,
        "bbox": bbox,
        "iscrowd": 0,
        "area": bbox[2] * bbox[3],
        **extra,
    }


ANNOTATIONS = [
    _ann(101, 3, [2, 3, 10, 8], segmentation=[[2, 3, 12, 3, 12, 11, 2, 11]]),
    # Two polygons plus a 2-point one that must be ignored.
    _ann(
        102,
        7,
        [14, 2, 20, 12],
        segmentation=[[14, 2, 20, 2, 17, 8], [25, 6, 34, 6, 34, 14], [30, 1, 31, 2]],
    ),
    _ann(103, 42, [5, 15, 10, 10], segmentation=_compressed_rle(_block(15, 25, 5, 15))),
    _ann(104, 3, [20, 18, 8, 6], segmentation=_uncompressed_rle(_block(18, 24, 20, 28))),
    _ann(105, 7, [30, 20, 6, 6]),  # no segmentation key
    _ann(106, 42, [1, 1, 4, 4], segmentation=[]),
    {
        **_ann(107, 42, [0, 0, 10, 10], segmentation=_compressed_rle(_block(0, 10, 0, 10))),
        "iscrowd": 1,
    },
    _ann(108, 3, [5, 5, 0.5, 10], segmentation=[[5, 5, 5.5, 5, 5.5, 15]]),  # degenerate
    _ann(109, 3, [35, -4, 10, 8], segmentation=[[35, 0, 39, 3]]),  # clipped; no valid polygon
]
KEPT = [101, 102, 103, 104, 105, 106, 109]


def _write(tmp_path, annotations=ANNOTATIONS, images=None, categories=CATEGORIES):
    """Write images (a gradient, so flips are visible) and the JSON; return its path."""
    images = images or [{"id": 1, "file_name": "a.png", "width": W, "height": H}]
    (tmp_path / "img").mkdir(exist_ok=True)
    for img in images:
        pixels = np.zeros((img["height"], img["width"], 3), dtype=np.uint8)
        pixels[..., 0] = np.arange(img["width"], dtype=np.uint8) * 5
        Image.fromarray(pixels).save(tmp_path / "img" / img["file_name"])
    path = tmp_path / "ann.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path


def _dataset(tmp_path, **kwargs):
    json_path = kwargs.pop("json_path", None) or _write(tmp_path)
    return CocoInstances(json_path=json_path, images_dir=tmp_path / "img", **kwargs)


def test_every_annotation_kind(tmp_path):
    json_path = _write(tmp_path)
    image, target = _dataset(tmp_path, json_path=json_path)[0]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert target["ann_ids"].tolist() == KEPT
    assert target["has_mask"].tolist() == [True, True, True, True, False, False, False]
    assert target["labels"].tolist() == [1, 2, 3, 1, 2, 3, 1]
    assert target["labels"].dtype == torch.int64 and target["image_id"].dtype == torch.int64
    assert target["image_id"].shape == () and target["image_id"].item() == 1
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"][0].tolist() == [2, 3, 12, 11]
    assert target["boxes"][6].tolist() == [35, 0, 40, 4]  # clipped to the image
    assert target["compact_masks"].to_dense().dtype == torch.uint8 and target[
        "compact_masks"
    ].to_dense().shape == (7, H, W)

    coco = COCO(str(json_path))
    for row, ann_id in enumerate(KEPT[:4]):
        ann = dict(coco.anns[ann_id])
        if ann_id == 102:
            ann["segmentation"] = ann["segmentation"][:2]  # without the ignored 2-point polygon
        expected = coco.annToMask(ann)
        assert expected.sum() > 0
        assert np.array_equal(target["compact_masks"].to_dense()[row].numpy(), expected), ann_id
    assert target["compact_masks"].to_dense()[4:].sum() == 0


def test_summary_reports_every_skip_with_ids(tmp_path):
    dataset = _dataset(tmp_path)
    rep = report(dataset.index)
    assert rep["skipped_annotations"] == {
        "degenerate_bbox": {
            "reason": DEGENERATE.text,
            "items": [{"image_id": 1, "ann_id": 108, "detail": "bbox [5, 5, 0.5, 10]"}],
        }
    }
    for section, key, ids in [
        ("dropped_masks", "no_valid_polygon", [109]),
        ("notes", "crowd", [107]),
        ("repaired", "clipped_bbox", [109]),
    ]:
        assert [f["ann_id"] for f in rep[section][key]["items"]] == ids
    text = dataset.summary()
    assert "1 images" in text and "9 annotations -> 7 instances (4 with masks)" in text
    for reason, ann_id in [(CROWD, 107), (DEGENERATE, 108), (NO_VALID_POLYGON, 109)]:
        assert f"{reason.text}: 1 (annotation ids: {ann_id})" in text
    assert "* cat" in text


def test_non_contiguous_category_ids_map_and_round_trip(tmp_path):
    dataset = _dataset(tmp_path)
    assert dataset.class_names == ["cat", "giraffe", "person"]
    assert dataset.cat_id_to_label == {3: 1, 7: 2, 42: 3}
    for cat_id, label in dataset.cat_id_to_label.items():
        assert dataset.label_to_cat_id[label] == cat_id


def test_has_mask_is_per_instance(tmp_path):
    dataset = _dataset(tmp_path, mask_classes=["cat"])
    _, target = dataset[0]
    has_mask = dict(zip(target["ann_ids"].tolist(), target["has_mask"].tolist(), strict=True))
    assert has_mask[101] and has_mask[104]  # cat, with segmentation
    assert not has_mask[102] and not has_mask[103]  # giraffe, person: masks dropped at load
    rows = ~target["has_mask"]
    assert target["compact_masks"].to_dense()[rows].sum() == 0
    assert "* cat" in dataset.summary() and "  person" in dataset.summary()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", ["cat", "giraffe", "person"]),
        ("none", []),
        ("voc", ["cat", "person"]),
        ("nonvoc", ["giraffe"]),
        ("person,giraffe", ["giraffe", "person"]),
        (["person"], ["person"]),
    ],
)
def test_mask_class_specs(tmp_path, spec, expected):
    dataset = _dataset(tmp_path, mask_classes=spec)
    assert dataset.mask_class_names == expected
    _, target = dataset[0]
    for label, has_mask in zip(target["labels"], target["has_mask"], strict=True):
        if dataset.class_names[label - 1] not in expected:
            assert not has_mask


def test_mask_classes_from_file_and_random(tmp_path):
    names_file = tmp_path / "seen.txt"
    names_file.write_text("# seen\ngiraffe\n")
    assert _dataset(tmp_path, mask_classes=str(names_file)).mask_class_names == ["giraffe"]
    drawn = _dataset(tmp_path, mask_classes="random:2:5").mask_class_names
    assert len(drawn) == 2
    assert drawn == _dataset(tmp_path, mask_classes="random:2:5").mask_class_names


def test_unknown_mask_class_is_named(tmp_path):
    with pytest.raises(ValueError, match="'zebra'"):
        _dataset(tmp_path, mask_classes="cat,zebra")


def test_hflip_mirrors_image_boxes_and_masks(tmp_path):
    plain = _dataset(tmp_path)
    flipping = _dataset(tmp_path, train=True, hflip_prob=1.0)
    image, target = plain[0]
    f_image, f_target = flipping[(0, 123)]
    assert torch.equal(f_image, image.flip(-1))
    assert torch.equal(
        f_target["compact_masks"].to_dense(), target["compact_masks"].to_dense().flip(-1)
    )
    x0, y0, x1, y1 = target["boxes"].unbind(1)
    assert torch.equal(f_target["boxes"], torch.stack([W - x1, y0, W - x0, y1], dim=1))
    assert f_target["boxes"][0].tolist() == [W - 12, 3, W - 2, 11]
    for key in ("labels", "has_mask", "ann_ids", "image_id"):
        assert torch.equal(f_target[key], target[key])
    assert torch.equal(flipping[0][0], image)  # an int key never flips


def test_hflip_is_decided_by_the_aug_seed(tmp_path):
    dataset = _dataset(tmp_path, train=True, hflip_prob=0.5)
    image, _ = dataset[0]
    flipped = [not torch.equal(dataset[(0, s)][0], image) for s in range(40)]
    assert 0 < sum(flipped) < 40
    assert flipped == [not torch.equal(dataset[(0, s)][0], image) for s in range(40)]
    again = _dataset(tmp_path, train=True, hflip_prob=0.5)
    assert flipped == [not torch.equal(again[(0, s)][0], image) for s in range(40)]


def test_no_flip_outside_training(tmp_path):
    dataset = _dataset(tmp_path, train=False, hflip_prob=1.0)
    assert torch.equal(dataset[(0, 1)][0], dataset[0][0])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_image_modes_load_as_three_channels(tmp_path, mode):
    gray = np.tile(np.arange(W, dtype=np.uint8) * 6, (H, 1))
    if mode == "I;16":
        image = Image.fromarray(gray.astype(np.uint16) * 257)
        assert image.mode == "I;16"
    else:
        image = Image.fromarray(gray).convert(mode)
    image.save(tmp_path / "x.png")
    tensor = load_image(tmp_path / "x.png")
    assert tensor.shape == (3, H, W) and tensor.dtype == torch.float32
    expected = torch.from_numpy(gray).float() / 255
    for channel in tensor:
        torch.testing.assert_close(channel, expected, atol=1 / 255, rtol=0)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    Image.new("RGB", (W, H), (200, 10, 10)).save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").shape == (3, W, H)


def test_grayscale_image_through_the_dataset(tmp_path):
    json_path = _write(tmp_path)
    Image.new("L", (W, H), 128).save(tmp_path / "img" / "a.png")
    image, _ = _dataset(tmp_path, json_path=json_path)[0]
    assert image.shape == (3, H, W)
    torch.testing.assert_close(image, torch.full((3, H, W), 128 / 255))


def test_unknown_category_id_names_annotation_and_category(tmp_path):
    json_path = _write(tmp_path, annotations=[_ann(5, 99, [1, 1, 5, 5])])
    with pytest.raises(DataError, match="annotation 5, image 1: category id not in .* 99"):
        _dataset(tmp_path, json_path=json_path, on_bad_sample="error")


def test_missing_image_names_path_and_id(tmp_path):
    json_path = _write(tmp_path)
    (tmp_path / "img" / "a.png").unlink()
    with pytest.raises(DataError) as err:
        _dataset(tmp_path, json_path=json_path, on_bad_sample="error")
    assert str(tmp_path / "img" / "a.png") in str(err.value) and "image 1" in str(err.value)


def test_image_size_disagreeing_with_json_is_an_error(tmp_path):
    json_path = _write(tmp_path)
    Image.new("RGB", (W + 1, H)).save(tmp_path / "img" / "a.png")
    with pytest.raises(DataError, match="JSON says 40x30"):
        _dataset(tmp_path, json_path=json_path, on_bad_sample="error")


def test_images_without_instances_and_collate(tmp_path):
    images = [
        {"id": 9, "file_name": "b.png", "width": 20, "height": 10},
        {"id": 1, "file_name": "a.png", "width": W, "height": H},
    ]
    dataset = _dataset(tmp_path, json_path=_write(tmp_path, images=images))
    assert dataset.image_ids == [1, 9] and len(dataset) == 2
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate)
    images_out, targets = next(iter(loader))
    assert [tuple(i.shape) for i in images_out] == [(3, H, W), (3, 10, 20)]
    empty = targets[1]
    assert empty["boxes"].shape == (0, 4) and empty["compact_masks"].to_dense().shape == (0, 10, 20)
    assert empty["labels"].shape == empty["has_mask"].shape == empty["ann_ids"].shape == (0,)
    assert "(1 without instances)" in dataset.summary()


def test_lvis_coco_url_gives_split_folder(tmp_path):
    images = [
        {
            "id": 1,
            "coco_url": "http://images.cocodataset.org/val2017/a.png",
            "width": W,
            "height": H,
        }
    ]
    json_path = _write(tmp_path, images=[{"id": 1, "file_name": "a.png", "width": W, "height": H}])
    data = json.loads(json_path.read_text())
    data["images"] = images
    json_path.write_text(json.dumps(data))
    (tmp_path / "img" / "val2017").mkdir()
    (tmp_path / "img" / "a.png").rename(tmp_path / "img" / "val2017" / "a.png")
    assert _dataset(tmp_path, json_path=json_path)[0][0].shape == (3, H, W)
