"""An exponential moving average of a model's weights (train.ema_decay), the weights a run
evaluates, predicts and exports with when it is on, as detectron2's d2go, mmdetection's
EMAHook and YOLO do. It smooths the last steps' noise at the cost of one more copy of the
weights and one pass over them per step.

The average starts from the weights of the first step and, as in TensorFlow's
ExponentialMovingAverage with num_updates, uses min(decay, (1 + n) / (10 + n)) at its n-th
update, so that its first steps are not dominated by the untrained start.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class WeightAverage:
    """The moving average of `model`'s state dict: floating-point tensors are averaged, the
    others (counters) copied. Keyed as `model.state_dict()`, so it loads into the model."""

    def __init__(self, model: torch.nn.Module, *, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = model.state_dict()
        names = [k for k, v in self.weights.items() if v.is_floating_point()]
        # one fused pass over every tensor: a step's cost is a few ms for ResNet-18
        torch._foreach_lerp_(
            [self.weights[k] for k in names], [current[k].detach() for k in names], 1 - decay
        )
        for name, value in self.weights.items():
            if not value.is_floating_point():
                value.copy_(current[name])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        for name, value in state["weights"].items():
            self.weights[name].copy_(value)

    @contextmanager
    def in_place_of(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """`model` holding the average inside the block, its own weights again after it."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.weights)
        try:
            yield model
        finally:
            model.load_state_dict(own)
