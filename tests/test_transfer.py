"""Mask^X R-CNN: weight transfer T, stop-gradient, fused FCN+MLP head, stage-wise training."""

import json

import pytest
import torch
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

from everyseg.config import ConfigError
from everyseg.data.build import build_dataset
from everyseg.data.coco import collate
from everyseg.engine.checkpoint import load_checkpoint
from everyseg.engine.evaluate_run import evaluate_run
from everyseg.engine.initialize import MASK_BRANCH, initialize_for_training
from everyseg.engine.optim import build_optimizer
from everyseg.engine.run_dir import RunDir
from everyseg.engine.train import train, train_one_step
from everyseg.modeling.mask_heads.transfer import build_transfer_predictor, word_vectors

NAMES = ["circle", "traffic light", "T-shape", "dining_table"]
K, REP, D, M = len(NAMES), 16, 8, 14


def _embedding_file(tmp_path, dim=5):
    rows = ["circle", "traffic_light", "t", "shape", "dining_table", "unused"]
    lines = [f"{w} " + " ".join(str(i + j / 10) for j in range(dim)) for i, w in enumerate(rows)]
    path = tmp_path / "vectors.txt"
    path.write_text("6 5\n" + "\n".join(lines) + "\n")  # with a word2vec-style header
    return path


def _transfer(*, input="cls+box", num_layers=2, stop_gradient=True, embedding_file=None):
    box_predictor = FastRCNNPredictor(REP, K + 1)
    predictor = build_transfer_predictor(
        input=input,
        num_layers=num_layers,
        hidden_dim=12,
        activation="leaky_relu",
        stop_gradient=stop_gradient,
        in_channels=D,
        num_classes=K + 1,
        box_predictor=box_predictor,
        class_names=NAMES,
        embedding_file=embedding_file,
        randn_dim=7,
    )
    return predictor, box_predictor


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("input", ["cls", "box", "cls+box", "randn", "embedding"])
def test_transfer_output_shapes(tmp_path, input, num_layers):
    predictor, _ = _transfer(
        input=input, num_layers=num_layers, embedding_file=_embedding_file(tmp_path)
    )
    in_dims = {"cls": REP, "box": 4 * REP, "cls+box": 5 * REP, "randn": 7, "embedding": 5}
    assert predictor.transfer[0].in_features == in_dims[input]
    assert len([m for m in predictor.transfer if isinstance(m, torch.nn.Linear)]) == num_layers
    assert predictor.class_weights(torch.tensor([1, 3])).shape == (2, D)
    labels = torch.tensor([1, 4, 4, 2, 1])
    assert predictor(torch.rand(5, D, M, M), labels).shape == (5, M, M)
    no_rois = torch.zeros(0, dtype=torch.int64)  # an image without detections
    assert predictor(torch.rand(0, D, M, M), no_rois).shape == (0, M, M)


def test_word_vectors_lookup_and_missing_classes(tmp_path):
    vectors = word_vectors(_embedding_file(tmp_path), NAMES)  # (K + 1, 5)
    assert vectors.shape == (K + 1, 5) and not vectors[0].any()
    assert vectors[1, 0] == 0 and vectors[2, 0] == 1  # as written; underscore-joined
    assert torch.allclose(vectors[3], torch.tensor([2.5, 2.6, 2.7, 2.8, 2.9]))  # mean of t, shape
    assert vectors[4, 0] == 4
    with pytest.raises(ConfigError, match="2 class.*zebra, fire hydrant"):
        word_vectors(_embedding_file(tmp_path), ["circle", "zebra", "fire hydrant"])


def test_transfer_reads_the_box_predictor_without_owning_it():
    predictor, box_predictor = _transfer()
    assert not [k for k in predictor.state_dict() if "cls_score" in k or "bbox_pred" in k]
    before = predictor.class_weights(torch.tensor([2]))
    with torch.no_grad():
        box_predictor.cls_score.weight[2] += 1.0  # what the box losses would do
    assert not torch.equal(before, predictor.class_weights(torch.tensor([2])))


def test_model_lists_the_box_predictor_once(make_config, make_model):
    cfg = make_config(preset="maskx-tiny")
    model = make_model(cfg, num_classes=K + 1)
    params = list(model.parameters())
    assert len(params) == len({id(p) for p in params})
    assert len(dict(model.named_parameters())) == len(params)
    assert not [k for k in model.state_dict() if "mask_head" in k and "box_predictor" in k]


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_stop_gradient(stop_gradient):
    predictor, box_predictor = _transfer(stop_gradient=stop_gradient)
    labels = torch.tensor([1, 3, 3])
    logits = predictor(torch.rand(3, D, M, M), labels)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.rand(3, M, M)).backward()
    assert all(p.grad is not None and p.grad.any() for p in predictor.transfer.parameters())
    box_grads = [box_predictor.cls_score.weight.grad, box_predictor.bbox_pred.weight.grad]
    if stop_gradient:
        assert all(g is None or not g.any() for g in box_grads)
    else:
        assert all(g is not None and g.any() for g in box_grads)
        assert box_grads[0][labels].any() and not box_grads[0][[0, 2, 4]].any()


def test_only_the_needed_classes_are_transferred():
    predictor, _ = _transfer()
    x, labels = torch.rand(6, D, M, M), torch.tensor([4, 1, 4, 4, 1, 2])
    seen = []
    predictor.transfer.register_forward_hook(lambda _m, inputs, _o: seen.append(len(inputs[0])))
    logits = predictor(x, labels)
    assert seen == [3]  # T ran for the 3 distinct labels, never for all K + 1 classes
    every = predictor.class_weights(torch.arange(K + 1))  # (K + 1, D)
    all_logits = torch.nn.functional.conv2d(x, every[:, :, None, None])  # (R, K + 1, M, M)
    assert torch.allclose(logits, all_logits[torch.arange(6), labels], atol=1e-6)


@pytest.mark.parametrize(
    "predictor",
    [
        ["model.mask_head.predictor=conv", "model.mask_head.class_agnostic=true"],
        ["model.mask_head.predictor=conv"],
        ["model.mask_head.predictor=transfer"],
    ],
)
def test_mlp_fusion_adds_the_same_logits_to_every_class(make_config, make_model, predictor):
    overrides = ["model.mask_head.mlp_fusion=true", *predictor]
    cfg = make_config(*overrides, preset="maskx-tiny")
    fused = make_model(cfg, num_classes=K + 1).roi_heads.mask_head.predictor
    x = torch.rand(3, cfg.model.mask_head.channels, M, M)
    mlp = fused.mlp(x)  # (R, M, M)
    assert mlp.shape == (3, M, M) and mlp.any()
    for c in range(1, K + 1):
        labels = torch.full((3,), c)
        assert torch.allclose(fused(x, labels) - fused.per_class(x, labels), mlp, atol=1e-6)
    assert fused(x[:0], labels[:0]).shape == (0, M, M)


def test_transfer_needs_class_specific_masks(make_config, make_model):
    cfg = make_config("model.mask_head.class_agnostic=true", preset="maskx-tiny")
    with pytest.raises(ConfigError, match="class_agnostic=false"):
        make_model(cfg, num_classes=K + 1)


def test_stage_errors(make_config, make_model, tmp_path):
    with pytest.raises(ConfigError, match="init_from_run"):
        train(make_config("train.stage=mask"), out_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="train.stage"):
        cfg = make_config("train.stage=stage2")
        initialize_for_training(make_model(cfg, num_classes=K + 1), cfg)


@pytest.fixture(scope="module")
def stage1_run(train_tiny, tmp_path_factory):
    """A stage-1 run (detector on boxes only) with a BatchNorm backbone, so that stage 2 has
    running statistics to keep."""
    out = tmp_path_factory.mktemp("stage1")
    return train_tiny(out, "train.steps=2", "train.stage=detector", "model.backbone.norm=bn")


def test_stage1_trains_the_detector_without_masks(stage1_run):
    state = load_checkpoint(stage1_run.last)
    assert state["mask_classes"] == []
    records = [json.loads(line) for line in stage1_run.log.read_text().splitlines()]
    assert records and all(r["loss_mask"] == 0.0 and r["loss_classifier"] > 0 for r in records)


def test_stage2_changes_only_the_mask_branch(make_config, make_model, stage1_run):
    cfg = make_config(
        "train.stage=mask",
        f"model.init_from_run={stage1_run.root}",
        "model.backbone.norm=bn",
        "train.lr=0.05",
        preset="maskx-tiny",
    )
    dataset = build_dataset(cfg.data, split="train")
    names = dataset.class_names
    model = make_model(cfg, num_classes=len(names) + 1, class_names=names)
    initialize_for_training(model, cfg, class_names=names)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage1 = load_checkpoint(stage1_run.last)["model"]
    assert all(
        torch.equal(v, stage1[k]) for k, v in before.items() if not k.startswith(MASK_BRANCH)
    )
    optimizer = build_optimizer(model, cfg.train)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(3):
        images, targets = collate([dataset[2 * step], dataset[2 * step + 1]])
        train_one_step(
            model, images, targets, optimizer=optimizer, scaler=scaler,
            clip_grad_norm=None, step=step,
        )  # fmt: skip
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(MASK_BRANCH) for k in changed), sorted(changed)[:5]
    assert "roi_heads.mask_head.predictor.per_class.transfer.0.weight" in changed


def test_stage2_run_trains_and_evaluates(train_tiny, stage1_run, tmp_path):
    run = train_tiny(
        tmp_path / "stage2",
        "train.steps=2",
        "train.stage=mask",
        f"model.init_from_run={stage1_run.root}",
        "model.backbone.norm=bn",
        preset="maskx-tiny",
    )
    metrics = evaluate_run(run.root, progress=False)
    assert set(metrics["segm"]) >= {"all", "seen", "unseen"}


def test_maskx_tiny_trains_and_evaluates(train_tiny, tmp_path):
    run = train_tiny(tmp_path / "maskx", "train.steps=3", preset="maskx-tiny")
    records = [json.loads(line) for line in run.log.read_text().splitlines()]
    assert len(records) == 3 and any(r["loss_mask"] > 0 for r in records)
    metrics = evaluate_run(run.root, progress=False)
    assert len(metrics["seen_classes"]) == 7 and len(metrics["unseen_classes"]) == 7
    assert RunDir(run.root).metrics.is_file()
