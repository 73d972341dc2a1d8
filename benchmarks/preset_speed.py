"""Time per training step of two configs on the same batches, alternating step by step.

A preset's CPU budget is its steps times its time per step; under a shared, loaded machine
only a ratio measured in one process means anything. Both configs train (their own model,
optimizer and schedule, train_one_step as `everyseg train` does) on the same synthetic
batches of 128 px shapes, each step timed for one then the other in alternating order.

    python benchmarks/preset_speed.py OLD.yaml baseline-tiny [--set-a k=v ...] [--set-b k=v ...]

The last line prints both medians and the ratio B / A (below 1: B's step is cheaper).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from everyseg.config import load_config
from everyseg.data.build import build_dataset
from everyseg.data.coco import collate
from everyseg.data.synthetic import generate
from everyseg.engine.initialize import initialize_for_training
from everyseg.engine.optim import build_optimizer
from everyseg.engine.train import train_one_step
from everyseg.modeling.detector import build_model


def trainer(cfg, dataset):
    """A closure that takes one training step of `cfg`'s model on a batch."""
    torch.manual_seed(0)
    d = cfg.data
    model = build_model(
        cfg.model,
        num_classes=len(dataset.class_names) + 1,
        class_names=dataset.class_names,
        min_size=d.min_size,
        max_size=d.max_size,
        test_min_size=d.test_min_size,
    )
    initialize_for_training(model, cfg, class_names=dataset.class_names)
    model.train()
    optimizer = build_optimizer(model, cfg.train)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def step(images, targets, index: int) -> None:
        train_one_step(
            model,
            images,
            targets,
            optimizer=optimizer,
            scaler=scaler,
            precision=cfg.train.amp,
            accumulate=cfg.train.accumulate,
            clip_grad_norm=cfg.train.clip_grad_norm,
            step=index,
        )

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="preset name or YAML file")
    parser.add_argument("b", help="preset name or YAML file")
    parser.add_argument("--set-a", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--set-b", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = generate(tmp, num_train=64, num_val=1, size=128, seed=0, progress=False)
        data = [f"data.{k}={v}" for k, v in paths.items()] + ["data.num_workers=0"]
        configs = {
            "A": load_config(args.a, [*data, *args.set_a]),
            "B": load_config(args.b, [*data, *args.set_b]),
        }
        if configs["A"].train.batch_size != configs["B"].train.batch_size:
            print("note: the batch sizes differ; the ratio is per step, not per image")
        dataset = build_dataset(configs["A"].data, split="train")
        steps = {name: trainer(cfg, dataset) for name, cfg in configs.items()}
        times = {name: [] for name in configs}
        for index in range(args.warmup + args.steps):
            for name, cfg in configs.items() if index % 2 else reversed(configs.items()):
                batch = cfg.train.batch_size
                items = [dataset[((index * batch + i) % len(dataset), index)] for i in range(batch)]
                images, targets = collate(items)
                torch.manual_seed(index)
                tic = time.perf_counter()
                steps[name](images, targets, index)
                if index >= args.warmup:
                    times[name].append(time.perf_counter() - tic)
    a, b = (statistics.median(times[name]) for name in ("A", "B"))
    print(
        f"preset_speed: A {args.a} {a * 1e3:.0f} ms/step, B {args.b} {b * 1e3:.0f} ms/step, "
        f"B/A {b / a:.3f} ({args.steps} steps each, alternating, 1 thread)"
    )


if __name__ == "__main__":
    main()
