import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from everyseg.data.synthetic import CLASS_NAMES, generate

SIZE = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """~100 images, a few hundred instances: enough for every class and both encodings."""
    paths = generate(
        tmp_path_factory.mktemp("shapes"),
        num_train=100,
        num_val=8,
        size=SIZE,
        seed=3,
        progress=False,
    )
    coco = COCO(paths["train_json"])
    return paths, coco


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_arguments_give_identical_bytes_and_seed_changes_them(tmp_path):
    kwargs = dict(num_train=5, num_val=3, size=SIZE, progress=False)
    generate(tmp_path / "a", seed=7, **kwargs)
    generate(tmp_path / "b", seed=7, **kwargs)
    generate(tmp_path / "c", seed=8, **kwargs)
    a, b, c = (_tree_bytes(tmp_path / name) for name in "abc")
    assert len(a) == 2 + 5 + 3
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(".png"))
    assert a["annotations/train.json"] != c["annotations/train.json"]


def test_layout_and_split_streams(dataset):
    paths, _ = dataset
    root = Path(paths["train_json"]).parent.parent
    assert Path(paths["train_json"]) == root / "annotations" / "train.json"
    assert Path(paths["val_json"]) == root / "annotations" / "val.json"
    val = json.loads(Path(paths["val_json"]).read_text())
    assert len(val["images"]) == 8
    for img in val["images"]:
        assert (Path(paths["val_images"]) / img["file_name"]).is_file()
    # Train and val draw from different seed streams: image 1 differs.
    train1 = (Path(paths["train_images"]) / "000001.png").read_bytes()
    assert train1 != (Path(paths["val_images"]) / "000001.png").read_bytes()
    assert val["info"]["args"] == {"split": "val", "num_images": 8, "size": SIZE, "seed": 3}


def test_schema(dataset):
    paths, coco = dataset
    cats = coco.dataset["categories"]
    ids = [c["id"] for c in cats]
    assert len(cats) == len(CLASS_NAMES) >= 12
    assert [c["name"] for c in cats] == list(CLASS_NAMES)
    assert {c["supercategory"] for c in cats} == {"shape"}
    assert ids != list(range(1, len(ids) + 1)) and len(set(ids)) == len(ids)

    images = coco.dataset["images"]
    assert [img["id"] for img in images] == list(range(1, 101))
    for img in images:
        pixels = Image.open(Path(paths["train_images"]) / img["file_name"])
        assert pixels.mode == "RGB" and pixels.size == (img["width"], img["height"]) == (SIZE, SIZE)

    anns = coco.dataset["annotations"]
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))
    per_image = Counter(a["image_id"] for a in anns)
    assert set(per_image) == set(coco.imgs) and max(per_image.values()) <= 6
    for a in anns:
        x, y, w, h = a["bbox"]
        assert all(isinstance(v, float) for v in a["bbox"])
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
        assert a["area"] >= 20 and a["iscrowd"] == 0 and a["category_id"] in ids


def test_both_encodings_present(dataset):
    _, coco = dataset
    anns = coco.dataset["annotations"]
    polygons = [a for a in anns if isinstance(a["segmentation"], list)]
    rles = [a for a in anns if isinstance(a["segmentation"], dict)]
    assert len(polygons) > 20 and len(rles) > 20
    for a in rles:
        assert a["segmentation"]["size"] == [SIZE, SIZE]
        assert isinstance(a["segmentation"]["counts"], str)
    ring = CLASS_NAMES.index("ring") * 2 + 1
    assert all(isinstance(a["segmentation"], dict) for a in anns if a["category_id"] == ring)


def test_decoded_masks_match_bbox_and_area_and_do_not_overlap(dataset):
    _, coco = dataset
    for image_id in coco.imgs:
        union = np.zeros((SIZE, SIZE), dtype=np.int32)
        for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            mask = coco.annToMask(a).astype(bool)
            ys, xs = np.nonzero(mask)
            tight = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert np.allclose(tight, a["bbox"], atol=1)
            assert abs(mask.sum() - a["area"]) <= 0.03 * a["area"]
            union += mask
        # Annotations are visible regions: occluded pixels belong to the object in front only.
        assert union.max() == 1


def test_fill_colour_is_independent_of_class(dataset):
    paths, coco = dataset
    colours = defaultdict(list)
    for image_id, img in coco.imgs.items():
        pixels = np.asarray(Image.open(Path(paths["train_images"]) / img["file_name"]), float)
        for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            colours[a["category_id"]].append(pixels[coco.annToMask(a).astype(bool)].mean(0))
    assert len(colours) == len(CLASS_NAMES)
    assert min(len(v) for v in colours.values()) >= 10
    class_means = np.stack([np.mean(v, 0) for v in colours.values()])
    within = np.mean([np.std(v, 0).mean() for v in colours.values()])
    between = class_means.std(0).mean()
    # Independent colours: class means scatter like sample means, ~within/sqrt(n) (~0.2x).
    # A colour that tied to the class would push this ratio towards 1.
    assert within > 40
    assert between < 0.5 * within


def test_rejects_images_too_small_for_the_objects(tmp_path):
    with pytest.raises(ValueError, match="size"):
        generate(tmp_path, num_train=1, num_val=1, size=32, progress=False)
