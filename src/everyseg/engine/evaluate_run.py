"""Load a trained run and evaluate it: the glue between run directories and COCO evaluation."""

from __future__ import annotations

from pathlib import Path

import torch

from everyseg.config import Config, from_dict
from everyseg.data.build import build_dataset
from everyseg.engine.checkpoint import RunDir, load_checkpoint
from everyseg.engine.evaluate import evaluate_model, format_metrics_table, write_metrics
from everyseg.engine.initialize import freeze_for_stage
from everyseg.engine.train import resolve_device
from everyseg.modeling.detector import build_model


def load_run(run_dir, *, checkpoint: str = "last", device: str = "auto"):
    """(model in eval mode on `device`, Config, metadata) from a run directory.

    `checkpoint` is "last", "best", or a path to a .pt file.
    """
    run = RunDir(Path(run_dir))
    path = Path(checkpoint) if checkpoint.endswith(".pt") else run.checkpoints / f"{checkpoint}.pt"
    state = load_checkpoint(path)
    cfg = from_dict(state["config"])
    classes, d = state["class_names"], cfg.data
    # the architecture alone: every weight, pretrained or trained, is in the checkpoint
    model = build_model(
        cfg.model,
        num_classes=len(classes) + 1,
        class_names=classes,
        min_size=d.min_size,
        max_size=d.max_size,
        test_min_size=d.test_min_size,
    )
    freeze_for_stage(model, stage=cfg.train.stage)
    model.load_state_dict(state["model"])
    meta = {k: state[k] for k in ("class_names", "label_to_cat_id", "mask_classes")}
    meta["step"] = state["step"]
    return model.to(resolve_device(device)).eval(), cfg, meta


def evaluate_loaded(
    model, cfg: Config, meta: dict, *, device, data_json=None, images=None, progress=True
) -> dict:
    """COCO metrics of `model` on the config's val set (or on `data_json` + `images`)."""
    data = cfg.data
    if data_json is not None:
        data.val_json, data.val_images = str(data_json), str(images)
    dataset = build_dataset(data, split="val", mask_classes="all")
    if dataset.index.findings.num_bad:
        print(dataset.summary())
    if list(dataset.class_names) != list(meta["class_names"]):
        raise ValueError(
            f"{data.val_json}: its categories {dataset.class_names} differ from the ones the "
            f"model was trained on {meta['class_names']}"
        )
    name_to_cat = {n: meta["label_to_cat_id"][i + 1] for i, n in enumerate(meta["class_names"])}
    model.eval()
    return evaluate_model(
        model,
        dataset,
        label_to_cat_id=meta["label_to_cat_id"],
        seen_cat_ids=[name_to_cat[n] for n in meta["mask_classes"]],
        # only what the loader kept: skipped images and annotations are not scored
        gt_json=dataset.ground_truth(),
        device=device,
        progress=progress,
    )


def evaluate_run(run_dir, *, data_json=None, images=None, checkpoint="last", progress=True):
    """Evaluate a run, write DIR/metrics.json, print the table; returns the metrics."""
    model, cfg, meta = load_run(run_dir, checkpoint=checkpoint)
    device = next(model.parameters()).device
    with torch.inference_mode():
        metrics = evaluate_loaded(
            model, cfg, meta, device=device, data_json=data_json, images=images, progress=progress
        )
    write_metrics(metrics, RunDir(Path(run_dir)).metrics)
    print(format_metrics_table(metrics))
    return metrics
