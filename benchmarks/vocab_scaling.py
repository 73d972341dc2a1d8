"""Mask-branch time at 80 and at 3,000 classes: weight transfer must not grow with the vocabulary.

Mask^X's transfer predictor computes mask weights only for the classes present (the
ground-truth class of each RoI in training, the predicted one at inference), so the mask
branch's time per RoI should not depend on the number of classes K. Timed per K, alternating
80 and 3,000 so both see the same machine load:

  train      forward + backward of the mask branch (mask head, predictor, loss) on `--rois`
             RoIs with random labels in 1..K (the box predictor it reads has K + 1 rows)
  inference  mask probabilities of `--detections` RoIs with random predicted labels

For contrast, Mask R-CNN's class-specific 1x1 conv (all K logit maps, then one selected) is
timed the same way. Targets: both transfer ratios (3000 / 80) under 1.2.

    python benchmarks/vocab_scaling.py                         # maskx-tiny sizes, CPU
    python benchmarks/vocab_scaling.py --preset maskx --device cuda

The last line prints the transfer ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from everyseg.config import load_config
from everyseg.modeling.detector import build_model

VOCABULARIES = (80, 3000)


def mask_branch(preset: str, *, num_classes: int, predictor: str, device):
    """The mask head of `preset` with `predictor`, and the config it was built from."""
    overrides = ["model.backbone.weights=null", f"model.mask_head.predictor={predictor}"]
    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    sizes = dict(
        min_size=cfg.data.min_size, max_size=cfg.data.max_size, test_min_size=cfg.data.test_min_size
    )
    heads = build_model(cfg.model, num_classes=num_classes + 1, **sizes).roi_heads.to(device)
    return heads.mask_head, cfg


def inputs(cfg, *, rois: int, num_classes: int, device):
    """(R, C, S, S) RoI features, (R,) labels in 1..K and (R, M, M) mask targets."""
    channels, size = cfg.model.backbone.fpn_channels, cfg.model.mask_head.pooler_resolution
    features = torch.randn(rois, channels, size, size, device=device)
    labels = torch.randint(1, num_classes + 1, (rois,), device=device)
    targets = (torch.rand(rois, 2 * size, 2 * size, device=device) > 0.5).float()
    return features, labels, targets


def train_step(head, features, labels, targets) -> None:
    head.zero_grad(set_to_none=True)
    head.loss(head(features, labels), targets).backward()


@torch.inference_mode()
def inference(head, features, labels, _targets) -> None:
    head.predict(features, labels)


def timed(fn, *args, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tic


def measure(args, predictor: str, *, repeats: int, device) -> dict[str, dict[int, float]]:
    """Median seconds of each pass at each vocabulary size."""
    setups = {}
    for k in VOCABULARIES:
        head, cfg = mask_branch(args.preset, num_classes=k, predictor=predictor, device=device)
        setups[k] = (
            head.train(),
            inputs(cfg, rois=args.rois, num_classes=k, device=device),
            inputs(cfg, rois=args.detections, num_classes=k, device=device),
        )
    times = {"train": {k: [] for k in VOCABULARIES}, "inference": {k: [] for k in VOCABULARIES}}
    for rep in range(args.warmup + repeats):
        for k in VOCABULARIES if rep % 2 else reversed(VOCABULARIES):
            head, train_inputs, test_inputs = setups[k]
            elapsed = {
                "train": timed(train_step, head, *train_inputs, device=device),
                "inference": timed(inference, head, *test_inputs, device=device),
            }
            if rep >= args.warmup:
                for name, seconds in elapsed.items():
                    times[name][k].append(seconds)
    return {name: {k: statistics.median(t) for k, t in ts.items()} for name, ts in times.items()}


def summary(label: str, medians: dict[str, dict[int, float]]) -> tuple[str, list[float]]:
    small, large = VOCABULARIES
    parts, ratios = [], []
    for name, per_k in medians.items():
        ratio = per_k[large] / per_k[small]
        ratios.append(ratio)
        parts.append(
            f"{name} {per_k[small] * 1e3:.2f} -> {per_k[large] * 1e3:.2f} ms ({ratio:.2f}x)"
        )
    return f"{label}: " + ", ".join(parts), ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="maskx-tiny", help="sizes of the mask branch")
    parser.add_argument("--rois", type=int, default=64, help="RoIs per training step")
    parser.add_argument("--detections", type=int, default=100, help="RoIs per inference pass")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    # the conv reference at 3,000 classes takes seconds and ~1 GB per pass on a CPU
    parser.add_argument("--reference-repeats", type=int, default=5, help="0: skip it")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.reference_repeats:
        reference = measure(args, "conv", repeats=args.reference_repeats, device=device)
        print(summary("conv (Mask R-CNN, reference)", reference)[0])
    transfer = measure(args, "transfer", repeats=args.repeats, device=device)
    line, (train_ratio, test_ratio) = summary("transfer", transfer)
    print(line)
    verdict = "ok" if max(train_ratio, test_ratio) < 1.2 else "ABOVE TARGET"
    print(
        f"vocab_scaling {args.preset} {device.type}, {VOCABULARIES[1]}/{VOCABULARIES[0]} classes "
        f"transfer time ratio: train {train_ratio:.3f}, inference {test_ratio:.3f} "
        f"(target < 1.2: {verdict})"
    )


if __name__ == "__main__":
    main()
