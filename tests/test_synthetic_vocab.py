import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from everyseg.cli import main
from everyseg.data.synthetic import _full_mask, _raster
from everyseg.data.synthetic_vg import generate_vocab, mask_box, render
from everyseg.data.synthetic_vocab import all_classes, unit_outline, vocabulary
from everyseg.data.synthetic_vocab_plan import MIN_VG_BOXES, VAL_PER_CLASS

VOCAB, SIZE, SEED = 60, 64, 3  # 60 classes include a single-outline one: polygons occur


def vg_normal_form(name: str) -> str:
    """Visual Genome's name normalisation as `convert vg` applies it."""
    return " ".join(name.lower().split())


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """The default image counts for 60 classes at 64 px: 160 VG, 20 COCO, 40 val images."""
    paths = generate_vocab(
        tmp_path_factory.mktemp("vocab"), vocab=VOCAB, size=SIZE, seed=SEED, progress=False
    )
    files = {key: json.loads(Path(paths[key]).read_text()) for key in paths if key.endswith(
        ("_json", "_objects", "_image_data")
    )}  # fmt: skip
    return paths, files


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _iou(a, b) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_vg_files_have_exactly_visual_genomes_schema(standin):
    paths, files = standin
    image_data, objects = files["vg_image_data"], files["vg_objects"]
    assert isinstance(image_data, list) and isinstance(objects, list)
    assert [e["image_id"] for e in image_data] == [e["image_id"] for e in objects]
    for entry in image_data:
        assert set(entry) == {"image_id", "width", "height", "coco_id", "url"}
        assert entry["coco_id"] is None or isinstance(entry["coco_id"], int)
        file = Path(paths["vg_images"]) / entry["url"].rsplit("/", 1)[1]
        assert Image.open(file).size == (entry["width"], entry["height"]) == (SIZE, SIZE)
    object_ids = []
    for entry in objects:
        assert set(entry) == {"image_id", "objects"} and entry["objects"]
        for obj in entry["objects"]:
            assert set(obj) == {"object_id", "x", "y", "w", "h", "names", "synsets"}
            assert all(type(obj[k]) is int for k in ("object_id", "x", "y", "w", "h"))
            assert obj["w"] > 0 and obj["h"] > 0
            assert obj["x"] >= 0 and obj["y"] >= 0
            assert obj["x"] + obj["w"] <= SIZE and obj["y"] + obj["h"] <= SIZE
            assert len(obj["names"]) == 1 and isinstance(obj["names"][0], str)
            assert obj["synsets"] == []
            object_ids.append(obj["object_id"])
    assert len(set(object_ids)) == len(object_ids)


def test_coco_sources_have_cocos_schema_and_the_expected_classes(standin):
    paths, files = standin
    names = [c.name for c in vocabulary(VOCAB)]
    for key in ("coco_json", "val_json"):
        data = files[key]
        assert set(data) == {"info", "licenses", "images", "annotations", "categories"}
        for img in data["images"]:
            assert set(img) == {"id", "file_name", "width", "height"}
        for ann in data["annotations"]:
            assert set(ann) == {"id", "image_id", "category_id", "segmentation", "bbox"} | {
                "area",
                "iscrowd",
            }
        assert [a["id"] for a in data["annotations"]] == list(
            range(1, len(data["annotations"]) + 1)
        )
        COCO(paths[key])  # pycocotools indexes it
    val_cats = {c["id"]: c["name"] for c in files["val_json"]["categories"]}
    assert list(val_cats.values()) == names and list(val_cats) == list(range(1, VOCAB + 1))
    coco_cats = {c["id"]: c["name"] for c in files["coco_json"]["categories"]}
    assert 2 <= len(coco_cats) < VOCAB / 4  # a small subset, with the val set's ids
    assert all(val_cats[i] == name for i, name in coco_cats.items())
    assert {a["category_id"] for a in files["coco_json"]["annotations"]} == set(coco_cats)
    per_class = Counter(a["category_id"] for a in files["val_json"]["annotations"])
    assert set(per_class) == set(val_cats) and min(per_class.values()) >= VAL_PER_CLASS


def test_vg_class_frequency_is_long_tailed_with_every_class_learnable(standin):
    _, files = standin
    counts = Counter(
        vg_normal_form(o["names"][0]) for e in files["vg_objects"] for o in e["objects"]
    )
    assert set(counts) == {c.name for c in vocabulary(VOCAB)}
    ranked = sorted(counts.values(), reverse=True)
    assert ranked[-1] >= MIN_VG_BOXES
    assert ranked[0] >= 4 * ranked[len(ranked) // 2]


def test_masks_decode_to_the_painted_pixels(standin):
    paths, files = standin
    vocab = vocabulary(VOCAB)
    coco = COCO(paths["val_json"])
    kinds = Counter()
    for image_id in coco.getImgIds():
        # the val stream's image seed; rendering again gives the objects as painted
        rng = np.random.default_rng([SEED, 3, image_id])
        anns = coco.imgToAnns[image_id]
        pixels, objects = render(rng, [a["category_id"] - 1 for a in anns], vocab, SIZE)
        file = Path(paths["val_images"]) / coco.imgs[image_id]["file_name"]
        assert np.array_equal(np.asarray(Image.open(file)), pixels)
        for ann, obj in zip(anns, objects, strict=True):
            decoded = coco.annToMask(ann).astype(bool)
            assert np.array_equal(decoded, obj["full"]) and decoded.any()
            assert ann["bbox"] == [float(v) for v in mask_box(decoded)]
            assert ann["area"] == int(decoded.sum())
            kinds[type(ann["segmentation"]).__name__] += 1
    assert kinds["list"] > 0 and kinds["dict"] > 0  # polygons and RLE both occur


def test_shared_images_are_the_same_file_and_their_boxes_overlap(standin):
    paths, files = standin
    coco = COCO(paths["coco_json"])
    shared = [e for e in files["vg_image_data"] if e["coco_id"] is not None]
    assert 0 < len(shared) < len(files["vg_image_data"])
    assert any(e["coco_id"] != e["image_id"] for e in shared)  # ids live in two spaces
    objects = {e["image_id"]: e["objects"] for e in files["vg_objects"]}
    extra = 0
    for entry in shared:
        image = coco.imgs[entry["coco_id"]]
        assert (image["width"], image["height"]) == (entry["width"], entry["height"])
        vg_file = Path(paths["vg_images"]) / entry["url"].rsplit("/", 1)[1]
        coco_file = Path(paths["coco_images"]) / image["file_name"]
        assert vg_file.read_bytes() == coco_file.read_bytes()
        vg_boxes = [
            (vg_normal_form(o["names"][0]), [o["x"], o["y"], o["w"], o["h"]])
            for o in objects[entry["image_id"]]
        ]
        anns = coco.imgToAnns[entry["coco_id"]]
        assert anns
        for ann in anns:
            name = coco.cats[ann["category_id"]]["name"]
            best = max(_iou(ann["bbox"], box) for n, box in vg_boxes if n == name)
            assert 0.7 <= best  # the same object, boxed again by VG's annotators
        extra += len(vg_boxes) - len(anns)
    assert extra > 0  # VG also boxes the classes COCO does not annotate


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    kwargs = dict(vocab=10, num_vg=15, num_coco=6, num_val=4, size=SIZE, progress=False)
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        generate_vocab(tmp_path / name, seed=seed, **kwargs)
    a, b, c = (_tree_bytes(tmp_path / name) for name in "abc")
    assert len(a) == 4 + 15 + 6 + 4  # JSON files, VG, COCO (3 of them shared) and val images
    assert a == b
    assert a.keys() == c.keys()
    assert a["vg/objects.json"] != c["vg/objects.json"]
    assert a["vg/images/1.png"] != c["vg/images/1.png"]


def test_class_names_are_stable_under_vg_normalisation():
    names = [c.name for c in all_classes()]
    assert len(names) > 3000 and len(set(names)) == len(names)
    assert all(vg_normal_form(n) == n for n in names)
    small = vocabulary(50)
    assert small == vocabulary(50) and set(small) <= set(vocabulary(200))
    assert len({c.family for c in small}) < len(small)  # members share a family's base


def test_vg_names_are_spelled_as_people_type_them_but_normalise_to_classes(standin):
    _, files = standin
    raw = [o["names"][0] for e in files["vg_objects"] for o in e["objects"]]
    assert any(vg_normal_form(n) != n for n in raw)
    assert {vg_normal_form(n) for n in raw} == {c.name for c in vocabulary(VOCAB)}


def test_every_members_holes_and_notches_are_cut_from_its_outline():
    for shape in all_classes():
        polys = [np.round(p * 60 + 32, 2) for p in unit_outline(shape)]
        outer = _raster(polys[0], 64)
        if shape.holes:  # a hole lies inside the outline, or it would not be one
            for hole in polys[1 : 1 + (2 if shape.holes == "double holed" else 1)]:
                assert not (_raster(hole, 64) & ~outer).any(), shape.name
        cut = outer.sum() - _full_mask(polys, 64).sum()
        assert (cut > 0) == bool(shape.holes or shape.notches), shape.name


def test_too_few_vg_images_for_the_vocabulary_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="classes need .* use --train"):
        generate_vocab(tmp_path, vocab=VOCAB, num_vg=5, size=SIZE, progress=False)


def test_cli_synth_vocab_prints_the_files_and_the_commands(tmp_path, capsys):
    argv = ["synth", str(tmp_path), "--vocab", "6", "--size", "64", "--train", "12"]
    assert main([*argv, "--coco", "4", "--val", "3", "--mask-classes", "2"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "vg" / "objects.json") in out
    assert "everyseg convert vg --objects" in out and "data.train_sources=" in out
    assert (
        len(json.loads((tmp_path / "coco/annotations/train.json").read_text())["categories"]) == 2
    )
    assert main(["synth", str(tmp_path / "x"), "--coco", "4"]) == 2
    assert "--coco and --mask-classes go with --vocab" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--vocab", "0"], "--vocab"),
        (["--vocab", "3337"], "--vocab"),  # more classes than the families make
        (["--vocab", "10", "--coco", "0"], "--coco"),
        (["--vocab", "10", "--mask-classes", "x"], "--mask-classes"),
    ],
)
def test_cli_refuses_bad_vocab_numbers_naming_the_option(argv, option, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_more_mask_classes_than_classes_is_a_clear_error(tmp_path, capsys):
    assert main(["synth", str(tmp_path), "--vocab", "4", "--mask-classes", "5"]) == 2
    assert "mask classes must be in [1, 4], got 5" in capsys.readouterr().err
