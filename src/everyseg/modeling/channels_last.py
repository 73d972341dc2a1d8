"""Layers that train faster than torch's on a CPU's channels-last maps, swapped in by
`channels_last_layers` (engine/train.py's training_layout) with the same parameters, so the
state dict does not change; in eval mode, or anywhere else, they run torch's own code.

- 1 x 1 convolutions as matrix products: a channels-last (N, C, H, W) map already is the
  (N H W, C) matrix a 1 x 1 convolution multiplies by its (C_out, C) weight, and `F.linear`
  skips oneDNN's convolution, whose backward reorders the weight's gradient from its blocked
  layout twice (~2.7x its forward here). 13 of maskrcnn-tiny's 14 such calls a step (3 FPN
  laterals, the RPN's 2 outputs on 5 levels): 8.2 -> 4.9 ms forward + backward at 2 threads,
  measured one by one.
- GroupNorm's backward by matrix products where torch's channels-last kernel is slow, a few
  channels a group on a large map: the (4, 64, 64, 64) stem map of maskrcnn-tiny (GN(32, 64):
  2 channels a group) takes it 2.9 ms, against 0.6 ms in the default layout (and converting
  there and back costs more than that). The gradient needs only per-(image, channel) sums
  over pixels of dy and of dy * x, over the rows of the (H W, C) matrices a channels-last map
  already is: one batched product with a row of ones each, then one pass of
  dx = a dy + b x + c. 1.7 ms there (2 threads). From 4 channels a group, or on maps of
  fewer than 2,048 pixels, torch's kernel is as fast or faster (0.48 vs 0.51 ms on 32 x 32,
  0.30 vs 0.13 ms with 4 channels a group on 16 x 16), and runs.

Both equal torch's layers within float rounding (tests/test_channels_last.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_GROUP_CHANNELS = 2
MIN_PIXELS = 2048


def channels_last_layers(model: nn.Module) -> int:
    """Swap every plain nn.Conv2d of `model` that is pointwise (1 x 1 kernel, stride 1, no
    padding or dilation, one group) for a PointwiseConv2d and every affine nn.GroupNorm for a
    GroupNorm, each holding the same parameters; returns how many."""
    swaps = [
        (parent, name, swapped)
        for parent in model.modules()
        for name, child in parent.named_children()
        if (swapped := _swapped(child)) is not None
    ]
    for parent, name, swapped in swaps:
        setattr(parent, name, swapped)
    return len(swaps)


def _swapped(layer: nn.Module) -> nn.Module | None:
    """The faster layer for `layer`, holding its parameters; None for any other layer."""
    new: nn.Conv2d | nn.GroupNorm
    if isinstance(layer, nn.Conv2d) and _pointwise(layer):
        channels, bias = (layer.in_channels, layer.out_channels), layer.bias is not None
        new = PointwiseConv2d(*channels, 1, bias=bias, device="meta")
    elif type(layer) is nn.GroupNorm and layer.affine:
        new = GroupNorm(layer.num_groups, layer.num_channels, eps=layer.eps, device="meta")
    else:
        return None
    new.weight, new.bias = layer.weight, layer.bias
    return new.train(layer.training)


def _pointwise(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.padding == (0, 0)
        and module.dilation == (1, 1)
        and module.groups == 1
        and module.padding_mode == "zeros"
    )


class PointwiseConv2d(nn.Conv2d):
    """An nn.Conv2d with a 1 x 1 kernel, stride 1, no padding, one group: in training, on a
    CPU, a channels-last input goes through `F.linear` (the same values within float
    rounding); anything else through the convolution."""

    def forward(self, x: Tensor) -> Tensor:
        if not (
            self.training
            and x.device.type == "cpu"
            and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
        ):
            return super().forward(x)
        num_images, _, height, width = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, self.in_channels)  # (N H W, C): a view
        weight = self.weight.view(self.out_channels, self.in_channels)
        out = F.linear(rows, weight, self.bias)  # (N H W, C_out)
        return out.view(num_images, height, width, -1).permute(0, 3, 1, 2)  # channels-last


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same arguments and parameters) with the module docstring's backward
    where it pays: gradients on, a CPU's float32 channels-last map of MIN_PIXELS pixels or
    more, affine, at most MAX_GROUP_CHANNELS channels a group."""

    def forward(self, x: Tensor) -> Tensor:
        if not (
            torch.is_grad_enabled()
            and self.affine
            and x.device.type == "cpu"
            and x.dtype == torch.float32  # under bfloat16 autocast, torch's kernel
            and x.dim() == 4
            and self.num_channels // self.num_groups <= MAX_GROUP_CHANNELS
            and x.shape[2] * x.shape[3] >= MIN_PIXELS
            and x.is_contiguous(memory_format=torch.channels_last)
        ):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return _ChannelsLastGroupNorm.apply(x, self.weight, self.bias, self.num_groups, self.eps)


class _ChannelsLastGroupNorm(torch.autograd.Function):
    """(N, C, H, W) channels-last x, (C,) weight and bias -> torch's group_norm; backward by
    per-channel sums (module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float):
        n, c, h, w = x.shape
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, h * w, groups, eps)
        ctx.save_for_backward(x, weight, mean, rstd)  # mean, rstd: (N, G)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        n, c, h, w = x.shape
        per_group = c // mean.shape[1]
        rows = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # (N, HW, C): views
        grad_rows = dy.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        grad_rows = grad_rows.reshape(n, h * w, c)
        ones = x.new_ones(n, 1, h * w)
        sum_dy = torch.bmm(ones, grad_rows)[:, 0]  # (N, C)
        sum_dy_x = torch.bmm(ones, grad_rows * rows)[:, 0]  # (N, C)

        def per_channel(t: Tensor) -> Tensor:  # (N, G) -> (N, C), each group's channels
            return t.repeat_interleave(per_group, 1)

        def group_sum(t: Tensor) -> Tensor:  # (N, C) -> (N, G)
            return t.view(n, -1, per_group).sum(2)

        # d loss / d x = scale * dy + slope * x + shift, per image and channel
        count = h * w * per_group
        dy_gamma, dy_x_gamma = group_sum(sum_dy * weight), group_sum(sum_dy_x * weight)
        slope = (dy_gamma * mean - dy_x_gamma) * rstd**3 / count  # (N, G)
        shift = -slope * mean - dy_gamma * rstd / count
        scale = per_channel(rstd) * weight  # (N, C)
        dx = torch.addcmul(per_channel(shift)[:, None], rows, per_channel(slope)[:, None])
        dx.addcmul_(grad_rows, scale[:, None])  # (N, HW, C)
        dweight = ((sum_dy_x - per_channel(mean) * sum_dy) * per_channel(rstd)).sum(0)
        dx = dx.view(n, h, w, c).permute(0, 3, 1, 2)  # channels-last
        return dx, dweight, sum_dy.sum(0), None, None
