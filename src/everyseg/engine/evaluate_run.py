"""Evaluate a trained run: the glue between run directories and COCO evaluation."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

from everyseg.config import Config
from everyseg.data.build import build_dataset
from everyseg.data.keypoints import KeypointLayout
from everyseg.engine import distributed
from everyseg.engine.eval_data import map_classes, metrics_file_name
from everyseg.engine.evaluate import evaluate_model, format_metrics_table, write_metrics
from everyseg.engine.keypoint_eval import format_keypoint_lines
from everyseg.engine.load import load_run
from everyseg.engine.precision import inference_precision
from everyseg.engine.run_dir import RunDir, RunRecord
from everyseg.engine.semantic_eval import evaluate_loaded_semantic, format_semantic_table


def evaluate_loaded(
    model,
    cfg: Config,
    record: RunRecord,
    *,
    device,
    data_json=None,
    images=None,
    precision: str | None = None,
    progress=True,
) -> dict:
    """COCO metrics of `model` on the config's val set (or on `data_json` + `images`), in
    `precision` (fp32 | fp16 | bf16; None: the run's train.amp where `device` runs it, see
    everyseg.engine.precision).

    Classes are matched by name (see `map_classes`); run classes the file lacks are listed
    under the added key "unscored_classes" and their detections dropped.
    "gt_boxes" holds the mask AP and mean IoU of the masks the model draws for the ground-
    truth boxes with their classes (see everyseg.engine.gt_boxes).
    """
    precision = inference_precision(precision, trained=cfg.train.amp, device=torch.device(device))
    if cfg.model.kind == "fcn":  # semantic segmentation: the FCN paper's metrics
        return evaluate_loaded_semantic(
            model,
            cfg,
            record,
            device=device,
            data_json=data_json,
            images=images,
            precision=precision,
            progress=progress,
        )
    data = cfg.data
    if data_json is not None:
        data = replace(data, val_json=str(data_json), val_images=str(images))
    layout = KeypointLayout.from_plain(record.keypoints) if record.keypoints else None
    # every class keeps its masks; a keypoint model's val set is read into its keypoint list
    dataset = build_dataset(data, split="val", keypoint_layout=layout)
    assert data.val_json is not None  # build_dataset refuses a val split without one
    if dataset.index.findings.num_bad and distributed.is_main():
        print(dataset.summary())
    mapping = map_classes(
        run_classes=record.class_names,
        mask_classes=record.mask_classes,
        data_cat_ids={
            name: dataset.label_to_cat_id[i + 1] for i, name in enumerate(dataset.class_names)
        },
        source=data.val_json,
    )
    if mapping.unscored and distributed.is_main():
        print(
            f"everyseg: {data.val_json} has no class(es) {mapping.unscored}: the run's "
            "detections of them are dropped, not scored",
            file=sys.stderr,
        )
    model.eval()
    metrics = evaluate_model(
        model,
        dataset,
        label_to_cat_id=mapping.label_to_cat_id,
        seen_cat_ids=mapping.seen_cat_ids,
        ignore_labels=mapping.unscored_labels,
        # only what the loader kept: skipped images and annotations are not scored
        gt_json=dataset.ground_truth(),
        device=device,
        precision=precision,
        progress=progress,
        train_counts=record.train_instances or None,
        # mask quality on ground-truth boxes, the detector held out (metrics["gt_boxes"]):
        # a run's model always segments given boxes; a foreign torchvision-style one cannot
        target_label_to_cat_id=(
            dataset.label_to_cat_id if callable(getattr(model, "masks_for_boxes", None)) else None
        ),
        keypoint_names=list(layout.names) if layout else None,
    )
    if mapping.unscored:
        metrics["unscored_classes"] = mapping.unscored
    return metrics


def evaluate_run(
    run_dir, *, data_json=None, images=None, checkpoint="last", precision=None, progress=True
):
    """Evaluate a run, print the table and write it beside the run's other results.

    On the run's own val set that is DIR/metrics.json; on another file (`data_json`) it is
    DIR/metrics-<its stem>.json, with the file named inside, so metrics.json is never replaced
    by numbers on other data. The table is printed first: a failed write loses nothing.
    Under torchrun the ranks share the images and rank 0 alone prints and writes.
    """
    loaded = load_run(run_dir, checkpoint=checkpoint)
    device = next(loaded.model.parameters()).device
    with torch.inference_mode():
        metrics = evaluate_loaded(
            loaded.model,
            loaded.config,
            loaded.record,
            device=device,
            data_json=data_json,
            images=images,
            precision=precision,
            progress=progress,
        )
    run = RunDir(Path(run_dir))
    path = run.metrics
    if data_json is not None:
        metrics["data"] = {"json": str(data_json), "images": str(images)}
        path = run.root / metrics_file_name(data_json)
    distributed.on_main(lambda: _print_and_write(metrics, path))
    return metrics


def _print_and_write(metrics: dict, path: Path) -> None:
    print(
        format_semantic_table(metrics)
        if "semantic" in metrics
        else "\n".join(
            [format_metrics_table(metrics), *format_keypoint_lines(metrics.get("keypoints"))]
        )
    )
    try:
        write_metrics(metrics, path)
    except OSError as err:
        # atomic_write_bytes' message names the file and the reason
        raise OSError(err.errno, f"{err.strerror}; the table above has the metrics") from err
