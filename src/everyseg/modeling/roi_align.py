"""RoIAlign whose CPU backward is matrix products: torchvision's op forward, bit for bit, and
the input's gradient computed from RoIAlign's separable bilinear weights.

torchvision's CPU `roi_align` backward walks every (RoI, channel, bin, sample) one scalar at
a time and recomputes the bilinear weights for each channel: on maskrcnn-tiny it is ~16 % of
a training step at one thread (benchmarks/train_speed.py --profile). RoIAlign's weights are a
product of a row and a column weight, so for one image

    out[r, c] = Ay[r] @ F[c] @ Ax[r]^T / count     Ay[r]: (PH, H), Ax[r]: (PW, W)

and F's gradient is sum_r Ay[r]^T @ G[r, c] @ Ax[r] / count: two dense matrix products per
image, which beat the scalar kernel wherever the feature map is small against the RoIs' bins
(`_dense_pays`); elsewhere, on CUDA, or for sampling_ratio <= 0 (a sample count that varies
per RoI) torchvision's own backward runs. Gradients equal torchvision's within float
rounding (tests/test_roi_align.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision.ops import roi_align as torchvision_roi_align

# the dense gradient's multiply-adds per bilinear sample below which it beats torchvision's
# scalar kernel at one thread (measured with 7 x 7 bins: 45 on a 32 x 32 map, a third of
# torchvision's time; 100 on 50 x 50, 1.15x its time)
_DENSE_MACS_PER_SAMPLE = 64


def roi_align(
    features: Tensor,
    rois: Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = False,
) -> Tensor:
    """torchvision.ops.roi_align on (B, C, H, W) features and (R, 5) rois (image index,
    x0, y0, x1, y1) -> (R, C, PH, PW), with the dense backward where it pays."""
    if (
        torch.is_grad_enabled()
        and features.requires_grad
        and features.device.type == "cpu"
        and features.dtype in (torch.float32, torch.float64)
        and sampling_ratio > 0
        and _dense_pays(features.shape[-2:], output_size, sampling_ratio)
    ):
        return _RoIAlignDenseGrad.apply(
            features, rois, output_size, spatial_scale, sampling_ratio, aligned
        )
    return torchvision_roi_align(
        features, rois, output_size, spatial_scale, sampling_ratio, aligned
    )


def _dense_pays(map_size: torch.Size, output_size: tuple[int, int], sampling_ratio: int) -> bool:
    """Whether the dense gradient's work per bilinear sample (W * (PW + H) / (PW * count)
    multiply-adds) stays under what torchvision's kernel spends on one."""
    height, width = map_size
    samples_per_row = output_size[1] * sampling_ratio**2
    return width * (output_size[1] + height) <= _DENSE_MACS_PER_SAMPLE * samples_per_row


class _RoIAlignDenseGrad(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        features: Tensor,
        rois: Tensor,
        output_size: tuple[int, int],
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool,
    ) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.settings = (features.shape, output_size, spatial_scale, sampling_ratio, aligned)
        return torchvision_roi_align(
            features, rois, output_size, spatial_scale, sampling_ratio, aligned
        )

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (rois,) = ctx.saved_tensors
        shape, _, spatial_scale, sampling_ratio, aligned = ctx.settings
        grad = roi_align_input_grad(
            grad_out,
            rois,
            features_shape=shape,
            spatial_scale=spatial_scale,
            sampling_ratio=sampling_ratio,
            aligned=aligned,
        )
        return grad, None, None, None, None, None


def roi_align_input_grad(
    grad_out: Tensor,
    rois: Tensor,
    *,
    features_shape: torch.Size,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """(R, C, PH, PW) gradient of roi_align's output -> (B, C, H, W) gradient of its
    features, as sums of products with the per-axis weights (see the module's docstring)."""
    batch, channels, height, width = features_shape
    pooled_h, pooled_w = grad_out.shape[-2:]
    offset = 0.5 if aligned else 0.0
    start = rois[:, 1:3] * spatial_scale - offset  # (R, 2) x, y
    length = rois[:, 3:5] * spatial_scale - offset - start
    if not aligned:  # torchvision's rule: a RoI is at least one pixel a side
        length = length.clamp(min=1.0)
    count = sampling_ratio**2
    weights_x = axis_weights(
        start[:, 0], length[:, 0], bins=pooled_w, samples=sampling_ratio, size=width
    )  # (R, PW, W)
    weights_y = (
        axis_weights(start[:, 1], length[:, 1], bins=pooled_h, samples=sampling_ratio, size=height)
        / count
    )  # (R, PH, H)
    grad = grad_out.new_zeros(batch, channels, height, width)
    image_of_roi = rois[:, 0].to(torch.int64)
    for image in image_of_roi.unique().tolist():
        rows = torch.where(image_of_roi == image)[0]
        n = len(rows)
        # (n, C * PH, PW) @ (n, PW, W) -> the columns spread: (n, C, PH, W)
        spread = grad_out[rows].reshape(n, channels * pooled_h, pooled_w).bmm(weights_x[rows])
        spread = spread.view(n, channels, pooled_h, width).transpose(1, 2)  # (n, PH, C, W)
        # every RoI's rows spread at once: (H, n * PH) @ (n * PH, C * W)
        grad_image = weights_y[rows].reshape(n * pooled_h, height).t() @ spread.reshape(
            n * pooled_h, channels * width
        )
        grad[image] = grad_image.view(height, channels, width).transpose(0, 1)
    return grad


def axis_weights(start: Tensor, length: Tensor, *, bins: int, samples: int, size: int) -> Tensor:
    """(R,) RoI starts and lengths along one axis of a map `size` pixels long -> (R, bins,
    size): each bin's bilinear weights on the axis' pixels, summed over its samples, by
    torchvision's rules (a sample beyond [-1, size] reads nothing, one in [-1, 0] reads
    pixel 0, one at or past size - 1 reads pixel size - 1)."""
    bin_size = (length / bins)[:, None, None]  # (R, 1, 1)
    first = start[:, None, None] + torch.arange(bins, dtype=start.dtype) * bin_size
    steps = (torch.arange(samples, dtype=start.dtype) + 0.5)[None, None, :]
    positions = first.view(-1, bins, 1) + steps * bin_size / samples  # (R, bins, samples)
    inside = (positions >= -1.0) & (positions <= size)
    positions = positions.clamp(min=0.0)
    low = positions.floor()
    at_edge = low >= size - 1
    low = torch.where(at_edge, float(size - 1), low)
    high_weight = torch.where(at_edge, 0.0, positions - low) * inside
    low_weight = (1.0 - high_weight) * inside
    low_index = low.to(torch.int64)
    high_index = torch.where(at_edge, low_index, low_index + 1)
    weights = start.new_zeros(len(start), bins, size)
    weights.scatter_add_(2, low_index, low_weight)
    return weights.scatter_add_(2, high_index, high_weight)
