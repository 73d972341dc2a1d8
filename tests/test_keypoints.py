"""Keypoints (issue 14): COCO keypoint data with `has_keypoints`, Mask R-CNN's keypoint head
(torchvision's parts), keypoint AP (OKS), overlays, the synthetic shapes' corners."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from torchvision.models.detection.roi_heads import keypointrcnn_loss

from everyseg.cli import main
from everyseg.config import ConfigError
from everyseg.data.coco import CocoInstances
from everyseg.data.keypoints import KeypointLayout, build_layout, mirrored_name
from everyseg.data.synthetic_keypoints import KEYPOINTS
from everyseg.data.validate import DataError
from everyseg.engine.keypoint_eval import COCO_SIGMAS, UNIFORM_SIGMA, keypoint_metrics
from everyseg.modeling.keypoint_head import KeypointBranch, keypoint_loss

from coco_json import ann

TINY_HEAD = ["model.keypoint_head.num_convs=2", "model.keypoint_head.channels=8"]
K = 5


def _branch(num_keypoints: int = K) -> KeypointBranch:
    torch.manual_seed(0)
    return KeypointBranch(
        in_channels=4,
        num_keypoints=num_keypoints,
        num_convs=1,
        channels=8,
        pooler_resolution=7,
        featmap_names=["0"],
    )


def _features() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {"0": torch.randn(1, 4, 16, 16, requires_grad=True)}  # a 64 px image, stride 4


def _keypoints(box, num: int = K) -> torch.Tensor:
    """(K, 3) keypoints spread inside an xyxy box, all visible."""
    x0, y0, x1, y1 = box
    t = torch.linspace(0.2, 0.8, num)
    return torch.stack([x0 + t * (x1 - x0), y0 + t * (y1 - y0), torch.full((num,), 2.0)], 1)


def _target(has: list[bool]) -> dict[str, torch.Tensor]:
    boxes = torch.tensor([[4.0, 4.0, 30.0, 30.0], [34.0, 20.0, 60.0, 60.0]])
    return {
        "boxes": boxes,
        "labels": torch.tensor([1, 2]),
        "keypoints": torch.stack([_keypoints(b) for b in boxes]),
        "has_keypoints": torch.tensor(has),
    }


def _branch_loss(branch, target, features=None):
    """The branch's training loss with the ground-truth boxes (twice each) as positive
    proposals."""
    proposals = [torch.cat([target["boxes"], target["boxes"] + 1.0])]
    matched = [torch.tensor([0, 1, 0, 1])]
    labels = [torch.tensor([1, 2, 1, 2])]
    return branch.training_loss(
        features or _features(), proposals, matched, labels, [target], [(64, 64)]
    )


# --- head and loss --------------------------------------------------------------------------


def test_branch_predicts_k_heatmaps_of_four_times_the_pooled_side():
    branch = _branch()
    logits = branch(_features(), [torch.tensor([[4.0, 4.0, 30.0, 30.0]] * 3)], [(64, 64)])
    assert logits.shape == (3, K, 28, 28)  # the paper's m = 56 at pooler 14; here 7 -> 28
    branch.eval()
    with torch.no_grad():
        points, scores = branch.predict(
            _features(), [torch.tensor([[4.0, 4.0, 30.0, 30.0]]), torch.zeros(0, 4)], [(64, 64)]
        )
    assert [p.shape for p in points] == [(1, K, 3), (0, K, 3)]
    assert [s.shape for s in scores] == [(1, K), (0, K)]
    inside = (points[0][..., 0] >= 4) & (points[0][..., 0] <= 30)
    assert inside.all()  # a keypoint is a position in its box's heatmap


def test_loss_equals_torchvisions_on_the_instances_with_keypoints():
    branch, features = _branch(), _features()
    target = _target([True, False])
    ours = _branch_loss(branch, target, features)
    # torchvision's loss on the proposals matched to instance 0 only
    rois = torch.cat([target["boxes"][:1], target["boxes"][:1] + 1.0])
    expected = keypointrcnn_loss(
        branch(features, [rois], [(64, 64)]), [rois], [target["keypoints"]], [torch.tensor([0, 0])]
    )
    torch.testing.assert_close(ours, expected)
    assert keypoint_loss(
        branch(features, [rois], [(64, 64)]), rois, target["keypoints"][[0, 0]]
    ).item() == pytest.approx(expected.item())


def test_instances_without_keypoints_send_no_gradient():
    branch = _branch()
    target = _target([True, False])
    loss = _branch_loss(branch, target)
    loss.backward()
    grads = [p.grad.clone() for p in branch.parameters()]
    # instance 1 has no keypoints: whatever its (unused) keypoint values, nothing changes
    branch.zero_grad()
    target["keypoints"][1] = torch.tensor([50.0, 50.0, 2.0])
    again = _branch_loss(branch, target)
    again.backward()
    assert again.item() == loss.item()
    for before, after in zip(grads, (p.grad for p in branch.parameters())):
        torch.testing.assert_close(before, after)
    assert any(g.abs().sum() > 0 for g in grads)


def test_no_instance_with_keypoints_gives_a_zero_loss_that_keeps_the_graph():
    branch = _branch()
    features = _features()
    loss = _branch_loss(branch, _target([False, False]), features)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in branch.parameters())
    empty = keypoint_loss(
        branch(features, [torch.zeros(0, 4)], [(64, 64)]), torch.zeros(0, 4), torch.zeros(0, K, 3)
    )
    assert empty.item() == 0.0 and empty.requires_grad


# --- data -----------------------------------------------------------------------------------


def test_flip_swaps_left_and_right_names():
    assert mirrored_name("left_eye") == "right_eye"
    assert mirrored_name("top_right") == "top_left"
    assert mirrored_name("Left-Hand") == "Right-Hand"
    assert mirrored_name("nose") == "nose"
    assert mirrored_name("leftover") == "leftover"  # a word, not a part of one
    layout = KeypointLayout(
        ("nose", "left_eye", "right_eye", "top"), (), ("person",), ((0, 1, 2, 3),), ((),)
    )
    assert layout.flip_index() == [0, 2, 1, 3]


def test_flipped_images_swap_keypoints_and_mirror_x(synth_paths):
    kwargs = dict(
        json_path=synth_paths["train_json"],
        images_dir=synth_paths["train_images"],
        keypoint_classes="all",
        train=True,
        seed=0,
    )
    plain, flipped = (
        CocoInstances(hflip_prob=0.0, **kwargs),
        CocoInstances(hflip_prob=1.0, **kwargs),
    )
    names = plain.index.keypoint_layout.names
    checked = 0
    for i in range(len(plain)):
        image, a = plain[(i, 0)]
        _, b = flipped[(i, 0)]
        width = image.shape[-1]
        assert torch.equal(a["has_keypoints"], b["has_keypoints"])
        for k, name in enumerate(names):
            m = names.index(mirrored_name(name))
            labelled = a["keypoints"][:, k, 2] > 0
            torch.testing.assert_close(
                b["keypoints"][labelled, m, 0], width - a["keypoints"][labelled, k, 0]
            )
            torch.testing.assert_close(
                b["keypoints"][labelled, m, 1:], a["keypoints"][labelled, k, 1:]
            )
            checked += int(labelled.sum())
    assert checked > 0


def test_synthetic_keypoints_are_vertices_of_the_written_polygons(synth_paths):
    data = json.loads(open(synth_paths["train_json"]).read())
    names = {c["id"]: c["name"] for c in data["categories"]}
    assert {c["name"] for c in data["categories"] if "keypoints" in c} == set(KEYPOINTS)
    with_points = [a for a in data["annotations"] if "keypoints" in a]
    assert with_points and all(names[a["category_id"]] in KEYPOINTS for a in with_points)
    for a in with_points:
        triples = [a["keypoints"][i : i + 3] for i in range(0, len(a["keypoints"]), 3)]
        assert a["num_keypoints"] == len(KEYPOINTS[names[a["category_id"]]][0]) == len(triples)
        if isinstance(a["segmentation"], list):  # polygons: the keypoints are its vertices
            polygon = a["segmentation"][0]
            vertices = {(polygon[i], polygon[i + 1]) for i in range(0, len(polygon), 2)}
            assert {(x, y) for x, y, _ in triples} <= vertices


def test_shared_keypoint_list_and_partial_keypoint_classes(synth_paths):
    data = json.loads(open(synth_paths["train_json"]).read())
    names = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    layout = build_layout(data["categories"], class_names=names, spec="all", source="x")
    assert layout.classes == ("triangle", "square", "pentagon", "star")
    assert layout.names[:3] == ("top", "bottom_right", "bottom_left")  # "top" shared, once
    assert len(layout.names) == 9
    dataset = CocoInstances(
        json_path=synth_paths["train_json"],
        images_dir=synth_paths["train_images"],
        keypoint_classes=["square"],
    )
    square = names.index("square") + 1
    for i in range(len(dataset)):
        _, target = dataset[i]
        assert torch.equal(target["has_keypoints"], target["labels"] == square)
        assert (target["keypoints"][~target["has_keypoints"]] == 0).all()
    with pytest.raises(ConfigError, match="data.keypoint_classes.*circle"):
        build_layout(data["categories"], class_names=names, spec="circle", source="x")


CATEGORY = {"id": 1, "name": "cat", "keypoints": ["left_ear", "right_ear"], "skeleton": [[1, 2]]}


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"keypoints": [5, 5, 2], "num_keypoints": 1}, "\\[x, y, v\\] \\* 2"),
        ({"keypoints": [5, 5, 3, 6, 6, 2], "num_keypoints": 2}, "visibility"),
        ({"keypoints": [5, 5, 2, 6, 6, 2], "num_keypoints": 1}, "num_keypoints 1 but 2"),
        ({"keypoints": [5, 5, 2, 60, 6, 2], "num_keypoints": 2}, "outside the 40x30 image"),
        ({"keypoints": [5, 5, 2, "x", 6, 2], "num_keypoints": 2}, "not a finite number"),
    ],
)
def test_bad_keypoints_name_the_annotation_and_keep_the_box(coco_files, fields, why):
    coco_files.write_dataset(
        annotations=[ann(10, **fields), ann(11, category_id=2)],
        categories=[CATEGORY, {"id": 2, "name": "dog"}],
    )
    with pytest.raises(DataError, match=f"annotation 10.*{why}"):
        coco_files.load(keypoint_classes="all", on_bad_sample="error")
    dataset = coco_files.load(keypoint_classes="all")
    assert coco_files.found(dataset, "dropped_keypoints") == {"bad_keypoints": [10]}
    _, target = dataset[0]
    assert target["labels"].tolist() == [1, 2] and not target["has_keypoints"].any()


def test_keypoints_with_none_labelled_are_no_keypoints(coco_files):
    coco_files.write_dataset(
        annotations=[
            ann(10, keypoints=[0, 0, 0, 0, 0, 0], num_keypoints=0),
            ann(11, keypoints=[5, 5, 2, 0, 0, 0], num_keypoints=1),
        ],
        categories=[CATEGORY, {"id": 2, "name": "dog"}],
    )
    _, target = coco_files.load(keypoint_classes="all", on_bad_sample="error")[0]
    assert target["has_keypoints"].tolist() == [False, True]
    assert target["keypoints"][1].tolist() == [[5.0, 5.0, 2.0], [0.0, 0.0, 0.0]]


def test_a_bad_skeleton_names_the_category(coco_files):
    coco_files.write_dataset(categories=[{**CATEGORY, "skeleton": [[1, 3]]}])
    with pytest.raises(DataError, match="category 1: skeleton entry \\[1, 3\\]"):
        coco_files.load(keypoint_classes="all")


# --- evaluation -----------------------------------------------------------------------------


def _gt(names) -> dict:
    points = [10.0, 10.0, 2, 20.0, 12.0, 2, 15.0, 25.0, 1]
    return {
        "images": [{"id": 1, "width": 64, "height": 64}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "area": 400.0,
             "iscrowd": 0, "keypoints": points, "num_keypoints": 3}
        ],
        "categories": [{"id": 1, "name": "shape", "keypoints": list(names), "skeleton": []}],
    }  # fmt: skip


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_keypoint_ap_of_perfect_and_shifted_predictions(backend):
    names = ["a", "b", "c"]
    gt = _gt(names)
    points = gt["annotations"][0]["keypoints"]
    perfect = [{"image_id": 1, "category_id": 1, "score": 0.9, "keypoints": points}]
    block = keypoint_metrics(gt, perfect, names=names, backend=backend)
    assert block["all"]["AP"] == pytest.approx(100.0)
    assert block["sigmas"] == {n: UNIFORM_SIGMA for n in names}
    # OKS = exp(-d^2 / (2 area (2 sigma)^2)) = 0.72 for every keypoint: matched at the OKS
    # thresholds 0.50..0.70 (5 of 10), so AP = 50, AP50 = 100, AP75 = 0
    d = math.sqrt(-2 * 400.0 * (2 * UNIFORM_SIGMA) ** 2 * math.log(0.72))
    shifted = [p + d if i % 3 == 0 else p for i, p in enumerate(points)]
    block = keypoint_metrics(
        gt, [{**perfect[0], "keypoints": shifted}], names=names, backend=backend
    )
    assert block["all"]["AP"] == pytest.approx(50.0)
    assert (block["all"]["AP50"], block["all"]["AP75"]) == (pytest.approx(100.0), 0.0)
    assert block["per_class"] == {"shape": pytest.approx(50.0)}


def test_person_keypoints_get_cocos_sigmas():
    names = ["nose", "left_eye", "tail"]
    block = keypoint_metrics(_gt(names), [], names=names)
    assert block["sigmas"] == {"nose": 0.026, "left_eye": 0.025, "tail": UNIFORM_SIGMA}
    assert block["all"]["AP"] == 0.0 and COCO_SIGMAS["left_hip"] == 0.107


# --- a small training, and the CLI ----------------------------------------------------------


def test_keypoint_loss_falls_on_synthetic_shapes(make_config, make_model, synth_paths):
    cfg = make_config(*TINY_HEAD, preset="keypoints-tiny")
    dataset = CocoInstances(
        json_path=synth_paths["train_json"], images_dir=synth_paths["train_images"],
        keypoint_classes="all",
    )  # fmt: skip
    batch = [dataset[i] for i in range(len(dataset))]
    batch = [(image, target) for image, target in batch if target["has_keypoints"].any()][:2]
    torch.manual_seed(0)
    names = dataset.index.keypoint_layout.names
    model = make_model(cfg, num_classes=15, keypoint_names=names).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    losses = []
    for _ in range(25):
        out = model([image for image, _ in batch], [target for _, target in batch])
        optimizer.zero_grad()
        sum(out.values()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)  # as keypoints-tiny trains
        optimizer.step()
        losses.append(out["loss_keypoint"].item())
    # medians: a step whose few keypoint RoIs include a confidently wrong one spikes (to ~5-8
    # against ~0.5 around it, with or without stage 5; a mean of five would follow the spike)
    assert statistics.median(losses[-5:]) < 0.5 * statistics.median(losses[:5])


def test_a_model_without_keypoint_head_has_no_keypoint_parts(make_config, make_model):
    model = make_model(make_config(), num_classes=15)
    assert model.roi_heads.keypoint_branch is None
    assert not any("keypoint" in key for key in model.state_dict())


def test_train_evaluate_predict_through_the_cli(make_config, synth_paths, tmp_path, capsys):
    config = tmp_path / "keypoints.yaml"
    config.write_text(make_config(*TINY_HEAD, "train.steps=2", preset="keypoints-tiny").to_yaml())
    run, out = tmp_path / "run", tmp_path / "pred"
    assert main(["train", str(config), "--out", str(run)]) == 0
    assert main(["evaluate", str(run)]) == 0
    assert "keypoints (OKS) over triangle, square, pentagon, star" in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["keypoints"]["all"]) == {"AP", "AP50", "AP75", "APm", "APl"}
    assert metrics["keypoints"]["classes"] == ["triangle", "square", "pentagon", "star"]
    val = sorted(Path(synth_paths["val_images"]).iterdir())
    argv = ["predict", str(run), *map(str, val), "--out", str(out), "--score-thresh", "0"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    categories = json.loads(Path(synth_paths["val_json"]).read_text())["categories"]
    names = {c["id"]: c["name"] for c in categories}
    with_points = [r for r in results if "keypoints" in r]
    assert with_points and {names[r["category_id"]] for r in with_points} <= set(KEYPOINTS)
    assert all(len(r["keypoints"]) == 3 * 9 for r in with_points)
    assert len(list((out / "overlays").iterdir())) == len(val)


def test_a_val_set_is_read_into_the_models_keypoint_list_by_name(synth_paths):
    layout = KeypointLayout(("extra", "top"), (), ("triangle", "square"), ((1,), ()), ((), ()))
    dataset = CocoInstances(
        json_path=synth_paths["val_json"], images_dir=synth_paths["val_images"],
        keypoint_layout=layout,
    )  # fmt: skip
    data = json.loads(Path(synth_paths["val_json"]).read_text())
    tops = {
        a["id"]: a["keypoints"][:2]
        for a in data["annotations"]
        if a["category_id"] == next(c["id"] for c in data["categories"] if c["name"] == "triangle")
    }
    assert tops
    for i in range(len(dataset)):
        _, target = dataset[i]
        for ann_id, has, points in zip(
            target["ann_ids"], target["has_keypoints"], target["keypoints"]
        ):
            # a triangle's "top" lands in channel 1; a square's names are not in the list
            assert bool(has) == (int(ann_id) in tops)
            if has:
                assert points[1, :2].tolist() == pytest.approx(tops[int(ann_id)])
                assert points[0].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("extra", "names", "message"),
    [
        ((), None, "the training data has no keypoints"),
        (
            (
                "model.detector=fcos",
                "model.mask_head.train_rois=gt",
                "model.backbone.fpn_channels=64",
            ),
            ("a",),
            "needs model.detector=rcnn",
        ),
        (
            ("model.backbone.fpn=false", "model.backbone.stage5=true"),
            ("a",),
            "keypoint_head reads the FPN levels",
        ),
    ],
)
def test_a_keypoint_head_needs_keypoints_and_rcnn(make_config, make_model, extra, names, message):
    cfg = make_config(*TINY_HEAD, *extra, preset="keypoints-tiny")
    with pytest.raises(ConfigError, match=message):
        make_model(cfg, num_classes=15, keypoint_names=names)


def test_an_image_without_detections_gives_no_keypoint_results():
    from everyseg.engine.coco_results import to_coco_results  # noqa: PLC0415

    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "scores": torch.zeros(0),
        "keypoints": torch.zeros(0, K, 3),
    }
    assert to_coco_results(empty, image_id=1, label_to_cat_id={1: 1}) == []
    one = {k: torch.cat([v, v.new_ones(1, *v.shape[1:])]) for k, v in empty.items()}
    (result,) = to_coco_results(one, image_id=1, label_to_cat_id={1: 1})
    assert result["keypoints"] == [1.0] * 3 * K
