"""The hard synthetic benchmark: deterministic, COCO-valid, masks = visible parts under
occlusion, cut-outs in the mask only for window classes, colours independent of the class."""

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from everyseg.cli import main
from everyseg.data.splits import resolve_mask_classes
from everyseg.data.synthetic import generate
from everyseg.data.synthetic_hard import (
    CLASS_NAMES,
    CUTS,
    OUTLINES,
    SEEN_CLASSES,
    WINDOW_CLASSES,
    generate_hard,
    render_hard,
)

SIZE = 64


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    paths = generate_hard(
        tmp_path_factory.mktemp("hard"), num_train=40, num_val=4, size=SIZE, seed=2, progress=False
    )
    return paths, COCO(paths["train_json"])


def _renders(seed: int, num: int):
    return [render_hard(np.random.default_rng([seed, 0, i]), SIZE) for i in range(1, num + 1)]


def test_same_arguments_give_identical_bytes_and_seed_changes_them(tmp_path):
    kwargs = dict(num_train=4, num_val=2, size=SIZE, progress=False)
    generate_hard(tmp_path / "a", seed=7, **kwargs)
    generate_hard(tmp_path / "b", seed=7, **kwargs)
    generate_hard(tmp_path / "c", seed=8, **kwargs)
    a, b, c = (_tree_bytes(tmp_path / name) for name in "abc")
    assert len(a) == 2 + 4 + 2 + 1  # two JSONs, the images, seen_classes.txt
    assert a == b
    assert all(a[k] != c[k] for k in a if k.endswith(".png"))
    assert a["annotations/train.json"] != c["annotations/train.json"]


def test_check_data_passes_and_boxes_areas_are_the_masks(hard, capsys):
    paths, coco = hard
    for split in ("train", "val"):
        argv = ["check-data", paths[f"{split}_json"], "--images", paths[f"{split}_images"]]
        assert main([*argv, "--decode"]) == 0, capsys.readouterr()
    assert [c["name"] for c in coco.dataset["categories"]] == list(CLASS_NAMES)
    assert len(coco.anns) > 40
    for ann in coco.anns.values():
        mask = coco.annToMask(ann).astype(bool)
        ys, xs = np.nonzero(mask)
        x0, y0 = xs.min(), ys.min()
        assert ann["bbox"] == [x0, y0, xs.max() + 1 - x0, ys.max() + 1 - y0]
        assert ann["area"] == mask.sum() and ann["iscrowd"] == 0


def test_json_masks_are_the_rendered_visible_masks(hard):
    paths, coco = hard
    for image_id, (_, objects) in enumerate(_renders(2, 40), start=1):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert [CLASS_NAMES.index(coco.cats[a["category_id"]]["name"]) for a in anns] == [
            o["label"] for o in objects
        ]
        for ann, obj in zip(anns, objects, strict=True):
            assert np.array_equal(coco.annToMask(ann).astype(bool), obj["visible"])


def test_visible_mask_is_the_class_region_minus_the_solids_above():
    occluded = windows_over_objects = 0
    for _, objects in _renders(4, 60):
        for k, obj in enumerate(objects):
            above = np.zeros((SIZE, SIZE), dtype=bool)
            for upper in objects[k + 1 :]:
                above |= upper["solid"]
            assert np.array_equal(obj["visible"], obj["region"] & ~above)
            occluded += bool((obj["region"] & above).any())
            # A window hides nothing: what shows through it stays in the lower object's mask.
            windows_over_objects += any(
                (upper["region"] & ~upper["solid"] & obj["visible"]).any()
                for upper in objects[k + 1 :]
            )
    assert occluded >= 10 and windows_over_objects >= 1


def test_cut_out_is_in_the_mask_of_window_classes_only():
    counts = defaultdict(int)
    for _, objects in _renders(5, 60):
        for obj in objects:
            name = CLASS_NAMES[obj["label"]]
            cut = obj["region"] ^ obj["solid"]
            assert not (obj["solid"] & ~obj["region"]).any()
            if name in WINDOW_CLASSES:
                assert cut.sum() > 0.15 * obj["region"].sum(), name  # a sizeable window
            else:
                assert not cut.any(), name
            counts[name in WINDOW_CLASSES] += 1
    assert counts[True] > 20 and counts[False] > 20


def test_seen_split_says_nothing_of_an_unseen_class_rule(hard):
    unseen = [n for n in CLASS_NAMES if n not in SEEN_CLASSES]
    for group in (SEEN_CLASSES, unseen):
        for part, index in ((OUTLINES, 0), (CUTS, 1)):
            for name in part:
                members = [n for n in group if n.split("-")[index] == name]
                assert sorted(n in WINDOW_CLASSES for n in members) == [False, True], members
    paths, _ = hard
    seen_file = Path(paths["train_json"]).parent.parent / "seen_classes.txt"
    assert resolve_mask_classes(str(seen_file), CLASS_NAMES) == list(SEEN_CLASSES)


def test_classes_share_one_colour_distribution():
    """Each class's mean fill colour is within sampling error of every class's."""
    colours = defaultdict(list)  # label -> (mean RGB of the painted visible part) per object
    for image, objects in _renders(6, 150):
        for obj in objects:
            colours[obj["label"]].append(image[obj["solid"] & obj["visible"]].mean(0))
    everything = np.concatenate([np.asarray(c) for c in colours.values()])
    mean, std = everything.mean(0), everything.std(0)
    assert len(colours) == len(CLASS_NAMES)
    groups = {CLASS_NAMES[k]: np.asarray(c) for k, c in colours.items()}
    groups["window"] = np.concatenate([c for n, c in groups.items() if n in WINDOW_CLASSES])
    groups["seen"] = np.concatenate([c for n, c in groups.items() if n in SEEN_CLASSES])
    for name, group in groups.items():
        z = np.abs(group.mean(0) - mean) / (std / np.sqrt(len(group)))
        assert z.max() < 4, (name, z)


def test_synth_preset_hard_via_the_cli_and_easy_stays_the_default(tmp_path, capsys):
    small = ["--train", "3", "--val", "2", "--size", str(SIZE), "--seed", "1"]
    assert main(["synth", str(tmp_path / "hard"), "--preset", "hard", *small]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"train_json", "train_images", "val_json", "val_images"}
    generate_hard(tmp_path / "api", num_train=3, num_val=2, size=SIZE, seed=1, progress=False)
    assert _tree_bytes(tmp_path / "hard") == _tree_bytes(tmp_path / "api")

    assert main(["synth", str(tmp_path / "easy"), *small]) == 0
    generate(tmp_path / "ref", num_train=3, num_val=2, size=SIZE, seed=1, progress=False)
    assert _tree_bytes(tmp_path / "easy") == _tree_bytes(tmp_path / "ref")

    assert main(["synth", str(tmp_path / "v"), "--vocab", "50", "--preset", "hard"]) == 2
    assert "--vocab has no --preset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", str(tmp_path / "m"), "--preset", "medium", *small])
    assert exit_info.value.code == 2
    assert "argument --preset: invalid choice: 'medium'" in capsys.readouterr().err
    assert not (tmp_path / "v").exists() and not (tmp_path / "m").exists()
