"""SGD with momentum or AdamW, with weight decay; linear warm-up, then step or cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from everyseg.config import TrainConfig

# layers whose parameters scale and shift activations: decaying them towards 0 only hurts
NORM_LAYERS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """`cfg.optimizer` over the parameters that train (requires_grad)."""
    return OPTIMIZERS[cfg.optimizer](model, cfg)


def _sgd(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    # Mask R-CNN's recipe: one group, every parameter decays
    params = [p for p in model.parameters() if p.requires_grad]
    fused = fusable(params)
    return (FusedSGD if fused else torch.optim.SGD)(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        fused=fused,
    )


class FusedSGD(torch.optim.SGD):
    """torch.optim.SGD(fused=True) whose CPU kernel gets every tensor in its own memory order.

    torch's CPU kernel copies each gradient that is not contiguous in the default layout (a
    channels-last convolution weight's: engine/train.py's training_layout) and then updates
    from the original all the same: 23 wasted copies in a maskrcnn-tiny step, whose SGD step
    takes 1.6 ms instead of 2.6 without them. The update is elementwise and a parameter, its
    gradient and its momentum share one layout, so the kernel gets the views of them that are
    contiguous. The same updates, bit for bit (tests/test_config.py)."""

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None or not self._kernel_takes_views():
            return super().step(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            momentum = group["momentum"]
            first = momentum != 0 and not any("momentum_buffer" in self.state[p] for p in params)
            tensors = []  # (param, grad[, momentum buffer]) each, as contiguous views
            for param in params:
                if first:
                    self.state[param]["momentum_buffer"] = torch.empty_like(param.grad)
                buffer = [self.state[param]["momentum_buffer"]] if momentum != 0 else []
                tensors.append(_contiguous_views([param, param.grad, *buffer]))
            if not tensors:
                continue
            torch._fused_sgd_(
                [t[0] for t in tensors],
                [t[1] for t in tensors],
                [t[2] for t in tensors if len(t) == 3],
                weight_decay=group["weight_decay"],
                momentum=momentum,
                lr=group["lr"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
                is_first_step=first,
            )
        return None

    def _kernel_takes_views(self) -> bool:
        """Fused groups on a CPU without a grad scaler, each group's momentum buffers all
        there or all not yet (torch's own step decides the rest)."""
        if getattr(self, "grad_scale", None) is not None:
            return False
        for group in self.param_groups:
            if not group["fused"]:
                return False
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.device.type != "cpu" for p in params):
                return False
            kept = ["momentum_buffer" in self.state[p] for p in params]
            if group["momentum"] != 0 and any(kept) and not all(kept):
                return False
        return True


def _contiguous_views(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors of one layout -> views of them that are contiguous (N, H, W, C) when they are
    all channels-last, else the tensors themselves."""
    channels_last = torch.channels_last
    if all(
        t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=channels_last)
        for t in tensors
    ):
        return [t.permute(0, 2, 3, 1) for t in tensors]
    return tensors


def _adamw(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = decay_groups(model, weight_decay=cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999), fused=fusable(params))


def fusable(params: list[nn.Parameter]) -> bool:
    """Whether torch's fused optimizer kernels take `params`: one pass over each parameter
    instead of a few ops per tensor. On a CPU, maskrcnn-tiny's 4M parameters (2 threads):
    an SGD step in 7.3 ms instead of 9.6, AdamW in 9.4 instead of 21.9."""
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params
    )


OPTIMIZERS = {"sgd": _sgd, "adamw": _adamw}


def decay_groups(model: nn.Module, *, weight_decay: float) -> list[dict]:
    """Parameter groups without weight decay on norm layers' parameters and on biases (as
    detectron2 and timm do for AdamW): conv/linear weights at `weight_decay`, the rest at 0.

    Only parameters that train are included, each once, in the model's order; empty groups
    are left out.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[nn.Parameter] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            no_decay_param = isinstance(module, NORM_LAYERS) or name == "bias"
            (no_decay if no_decay_param else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at `step` (0-based)."""
    if step < cfg.warmup_steps:
        alpha = step / cfg.warmup_steps
        warmup = cfg.warmup_factor * (1 - alpha) + alpha
    else:
        warmup = 1.0
    if cfg.schedule == "step":
        decay = cfg.gamma ** sum(step >= m for m in cfg.milestones)
    else:
        decay = 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / max(cfg.steps, 1)))
    return warmup * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
