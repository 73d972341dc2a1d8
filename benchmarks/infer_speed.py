"""CPU inference time per image: everyseg's Mask R-CNN against torchvision's MaskRCNN.

Both are built from one everyseg config with the same random weights (everyseg's is
`from_torchvision(tv)`, then readied for inference as `load_run` readies a run's model).
torchvision's path is its eval forward (every mask pasted as an (H, W) float plane) and a
0.5 threshold; everyseg's is what `Predictor` runs: `detect`, the score filter and each kept
mask pasted into its region only (BoxMasks). Both keep what scores at least the box head's
score_thresh (0.05; the batch norms get trained-looking statistics, so that there are ~100
detections of spread scores, as a trained model gives). The outputs are checked equal
(boxes, labels, scores, thresholded masks) within float rounding; the runs alternate so
both see the same machine load; medians.

    python benchmarks/infer_speed.py                       # R-50-FPN, 800 px, 2 threads
    python benchmarks/infer_speed.py --profile             # and everyseg's top costs

The last line prints the ratio (everyseg time / torchvision time; below 1 is faster).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torchvision.ops import FrozenBatchNorm2d
from train_speed import torchvision_twin

from everyseg.config import load_config
from everyseg.data.images import load_image
from everyseg.data.synthetic import generate
from everyseg.engine.load import ready_for_inference
from everyseg.instances import BoxMasks
from everyseg.modeling.detector import from_torchvision

NUM_CLASSES = 81  # COCO's 80 and the background


def calibrate_frozen_bn(model: torch.nn.Module, image: torch.Tensor, seed: int) -> None:
    """Give every FrozenBatchNorm2d trained-looking statistics: the mean and variance of its
    input on `image` (so activations stay normalised through the random ResNet, as trained
    ones do) and a random affine map (random weights leave it the identity, which would hide
    what folding it changes)."""
    generator = torch.Generator().manual_seed(seed)

    def set_statistics(module, inputs) -> None:
        (x,) = inputs  # (B, C, H, W)
        n = module.weight.numel()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))
        module.weight.copy_(0.5 + torch.rand(n, generator=generator))
        module.bias.copy_(0.2 * torch.randn(n, generator=generator))

    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    hooks = [m.register_forward_pre_hook(set_statistics) for m in norms]
    with torch.no_grad():
        model.eval()([image])
    for hook in hooks:
        hook.remove()


def torchvision_run(model, image: torch.Tensor, mask_thresh: float) -> dict:
    (out,) = model([image])
    out["masks"] = out["masks"][:, 0] > mask_thresh  # (N, H, W) bool
    return out


def everyseg_run(model, image: torch.Tensor, mask_thresh: float, score_thresh: float) -> dict:
    (out,) = model.detect([image])
    keep = out["scores"] >= score_thresh
    boxes = out["boxes"][keep]
    masks = BoxMasks(
        out["box_masks"][keep], boxes, image_size=tuple(image.shape[1:]), threshold=mask_thresh
    )
    return {
        "boxes": boxes,
        "labels": out["labels"][keep],
        "scores": out["scores"][keep],
        "masks": masks,
    }


def check_same(tv: dict, ours: dict) -> None:
    """Equal outputs up to the float rounding that folding the batch norms and Winograd's
    products change: the same detections, where two whose scores tie within rounding may
    come in either order."""
    assert len(ours["scores"]) == len(tv["scores"]), "detection counts differ"
    order = _matching_order(tv, ours)
    assert torch.equal(ours["labels"][order], tv["labels"]), "labels differ"
    torch.testing.assert_close(ours["scores"][order], tv["scores"], rtol=0, atol=1e-4)
    torch.testing.assert_close(ours["boxes"][order], tv["boxes"], rtol=0, atol=1e-2)  # pixels
    full = torch.from_numpy(ours["masks"].full())[order]
    differing = (full != tv["masks"]).float().mean().item()
    # a probability within rounding of the threshold may flip a pixel, nothing more
    assert differing < 1e-4, f"masks differ on {differing:.2e} of the pixels"


def _matching_order(tv: dict, ours: dict) -> torch.Tensor:
    """(N,) index of each of torchvision's detections among ours: the first unused one with
    its label, its score within 1e-4 and its box within 1e-2 px (itself, unless two swapped)."""
    close = (
        (ours["labels"][None] == tv["labels"][:, None])
        & ((ours["scores"][None] - tv["scores"][:, None]).abs() <= 1e-4)
        & ((ours["boxes"][None] - tv["boxes"][:, None]).abs().amax(-1) <= 1e-2)
    )  # (N tv, N ours)
    order: list[int] = []
    for i, row in enumerate(close):
        candidates = [j for j in row.nonzero().flatten().tolist() if j not in order]
        assert candidates, f"torchvision's detection {i} has no equal among everyseg's"
        order.append(candidates[0])
    return torch.tensor(order, dtype=torch.long)


def measure(tv, ours, image, *, runs: int, warmup: int) -> tuple[float, float, int]:
    timed = {
        "torchvision": lambda: torchvision_run(tv, image, 0.5),
        "everyseg": lambda: everyseg_run(ours, image, 0.5, 0.05),
    }
    times: dict[str, list[float]] = {k: [] for k in timed}
    for run in range(warmup + runs):
        outputs = {}
        for name in timed if run % 2 else reversed(timed):
            tic = time.perf_counter()
            outputs[name] = timed[name]()
            if run >= warmup:
                times[name].append(time.perf_counter() - tic)
        check_same(outputs["torchvision"], outputs["everyseg"])
    count = len(outputs["everyseg"]["scores"])
    return statistics.median(times["everyseg"]), statistics.median(times["torchvision"]), count


def profile(ours, image) -> None:
    from torch.profiler import ProfilerActivity, profile

    everyseg_run(ours, image, 0.5, 0.05)  # warm-up: oneDNN builds its kernels on first use
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        everyseg_run(ours, image, 0.5, 0.05)
    # by input shape: the backbone's, the RPN's and the mask head's convolutions apart
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=20, max_shapes_column_width=60
    )
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="maskrcnn")
    parser.add_argument("--size", type=int, default=800, help="synthetic image side")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = generate(tmp, num_train=0, num_val=1, size=args.size, seed=0, progress=False)
        image = load_image(
            next(p for p in sorted(__import__("pathlib").Path(paths["val_images"]).iterdir()))
        )
    cfg = load_config(
        args.preset,
        [
            "model.backbone.weights=null",
            f"data.min_size=[{args.size}]",
            f"data.test_min_size={args.size}",
        ],
    )
    torch.manual_seed(0)
    tv = torchvision_twin(cfg, NUM_CLASSES)
    calibrate_frozen_bn(tv, image, seed=0)
    tv.eval()
    ours = ready_for_inference(from_torchvision(tv).eval())
    with torch.inference_mode():
        if args.profile:
            profile(ours, image)
        t_ours, t_tv, count = measure(tv, ours, image, runs=args.runs, warmup=args.warmup)
    print(f"{count} detections: everyseg {t_ours * 1e3:.0f} ms, torchvision {t_tv * 1e3:.0f} ms")
    print(
        f"infer_speed {args.preset} {args.size}px cpu {args.threads} threads: "
        f"everyseg/torchvision time ratio {t_ours / t_tv:.3f}"
    )


if __name__ == "__main__":
    main()
