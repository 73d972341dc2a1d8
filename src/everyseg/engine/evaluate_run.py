"""Evaluate a trained run: the glue between run directories and COCO evaluation."""

from __future__ import annotations

from pathlib import Path

import torch

from everyseg.config import Config
from everyseg.data.build import build_dataset
from everyseg.engine.evaluate import evaluate_model, format_metrics_table, write_metrics
from everyseg.engine.load import load_run
from everyseg.engine.run_dir import RunDir, RunRecord


def evaluate_loaded(
    model, cfg: Config, record: RunRecord, *, device, data_json=None, images=None, progress=True
) -> dict:
    """COCO metrics of `model` on the config's val set (or on `data_json` + `images`)."""
    data = cfg.data
    if data_json is not None:
        data.val_json, data.val_images = str(data_json), str(images)
    dataset = build_dataset(data, split="val", mask_classes="all")
    if dataset.index.findings.num_bad:
        print(dataset.summary())
    if list(dataset.class_names) != list(record.class_names):
        raise ValueError(
            f"{data.val_json}: its categories {dataset.class_names} differ from the ones the "
            f"model was trained on {record.class_names}"
        )
    model.eval()
    return evaluate_model(
        model,
        dataset,
        label_to_cat_id=record.label_to_cat_id,
        seen_cat_ids=record.mask_cat_ids,
        # only what the loader kept: skipped images and annotations are not scored
        gt_json=dataset.ground_truth(),
        device=device,
        progress=progress,
    )


def evaluate_run(run_dir, *, data_json=None, images=None, checkpoint="last", progress=True):
    """Evaluate a run, write DIR/metrics.json, print the table; returns the metrics."""
    run = load_run(run_dir, checkpoint=checkpoint)
    device = next(run.model.parameters()).device
    with torch.inference_mode():
        metrics = evaluate_loaded(
            run.model,
            run.config,
            run.record,
            device=device,
            data_json=data_json,
            images=images,
            progress=progress,
        )
    write_metrics(metrics, RunDir(Path(run_dir)).metrics)
    print(format_metrics_table(metrics))
    return metrics
