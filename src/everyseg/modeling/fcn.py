"""FCN for semantic segmentation (Long, Shelhamer, Darrell; shared/papers/002): FCN-32s,
FCN-16s and FCN-8s on a ResNet trunk without FPN.

A 1x1 conv scores the K + 1 classes (background first) on C5 (stride 32); FCN-16s adds the
scores of C4 (stride 16) to C5's upsampled x2, FCN-8s then those of C3 (stride 8) to that
sum upsampled x2 (the skip architecture: coarse, semantic scores refined by fine ones); a
last x`stride` upsampling reaches the image. As in the paper, the scoring convs start at
zero, the x2 upsamplings are transposed convs initialised to bilinear interpolation and then
learned, and the last one stays fixed bilinear. Each upsampling has one kernel per class (a
depthwise transposed conv): the paper's C x C kernels start diagonal, this keeps C k^2
weights instead of C^2 k^2. A transposed conv of kernel 2f, stride f, padding f / 2 with the
bilinear kernel is F.interpolate(scale_factor=f, mode="bilinear", align_corners=False) away
from the border, so a feature at stride s lands where the resize convention puts it.

Same contract as the detectors: model(images, targets) -> {"loss_semantic": ...} in
training; model(images) -> [{"sem_seg": (K + 1, H, W) logits}] per image in eval.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from everyseg.config import ModelConfig
from everyseg.data.semantic import IGNORE, target_labels
from everyseg.modeling.backbone import resnet_fpn

STRIDES = {32: (32,), 16: (32, 16), 8: (32, 16, 8)}  # model.fcn.stride -> the scored strides


def bilinear_kernel(size: int) -> Tensor:
    """(size, size) weights of bilinear upsampling by (size + 1) // 2 (Caffe's filler)."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    ramp = 1 - (torch.arange(size, dtype=torch.float32) - center).abs() / factor
    return ramp[:, None] * ramp[None, :]


def bilinear_upsampler(channels: int, *, factor: int, learnable: bool) -> nn.ConvTranspose2d:
    """x`factor` upsampling of each channel on its own: (B, C, h, w) -> (B, C, fh, fw)."""
    up = nn.ConvTranspose2d(
        channels,
        channels,
        kernel_size=2 * factor,
        stride=factor,
        padding=factor // 2,
        groups=channels,
        bias=False,
    )
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(2 * factor).expand_as(up.weight))
    up.weight.requires_grad_(learnable)
    return up


class ResNetStages(nn.Module):
    """A ResNet trunk (`body`: torchvision's IntermediateLayerGetter of layer1..layer4, whose
    pretrained weights engine/initialize.py loads) giving C3, C4, C5 by stride."""

    def __init__(self, *, body: nn.Module, channels: dict[int, int]) -> None:
        super().__init__()
        self.body = body
        self.channels = channels  # stride -> channels of that stage's output

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        c = self.body(x)  # {"0": C2, "1": C3, "2": C4, "3": C5}
        return {8: c["1"], 16: c["2"], 32: c["3"]}  # (B, C_s, H / s, W / s)


class FCN(nn.Module):
    """FCN-`stride`s (32, 16 or 8) scoring `num_classes` (K + 1, background first);
    `transform` normalises, resizes and pads images to a multiple of 32 (as the detectors')."""

    def __init__(
        self, *, backbone: ResNetStages, num_classes: int, stride: int, transform: nn.Module
    ) -> None:
        super().__init__()
        if stride not in STRIDES:
            raise ValueError(f"model.fcn.stride {stride}: choose one of 32, 16, 8")
        self.backbone = backbone
        self.transform = transform
        self.strides = STRIDES[stride]
        scores = {str(s): nn.Conv2d(backbone.channels[s], num_classes, 1) for s in self.strides}
        for conv in scores.values():
            for parameter in conv.parameters():  # weight and bias
                nn.init.zeros_(parameter)
        self.score = nn.ModuleDict(scores)
        self.up2 = nn.ModuleDict(
            {
                str(s): bilinear_upsampler(num_classes, factor=2, learnable=True)
                for s in self.strides[1:]
            }
        )
        self.upsample = bilinear_upsampler(num_classes, factor=stride, learnable=False)

    def logits(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) normalised images, H and W multiples of 32 -> (B, K + 1, H, W)."""
        features = self.backbone(x)
        score = self.score["32"](features[32])  # (B, K + 1, H / 32, W / 32)
        for s in self.strides[1:]:
            skip = self.score[str(s)](features[s])  # (B, K + 1, H / s, W / s)
            score = _crop(self.up2[str(s)](score), skip.shape[-2:]) + skip
        return _crop(self.upsample(score), x.shape[-2:])

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        """Training: (3, H, W) images in [0, 1] and their CocoInstances targets -> the loss
        dict. Eval: images -> per image {"sem_seg": (K + 1, H, W) logits at its own size}."""
        if self.training and targets is None:
            raise ValueError("in training mode the FCN needs targets")
        sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        batch, _ = self.transform(images)
        logits = self.logits(batch.tensors)
        if self.training:
            assert targets is not None
            labels = _label_batch(targets, sizes, batch.image_sizes, logits.shape[-2:])
            return {"loss_semantic": semantic_loss(logits, labels.to(logits.device))}
        return [
            {"sem_seg": _resize(logits[i, :, :h, :w], size)}
            for i, ((h, w), size) in enumerate(zip(batch.image_sizes, sizes))
        ]


def semantic_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean per-pixel softmax cross-entropy of (B, C, H, W) logits against (B, H, W) labels
    over the pixels that are not IGNORE; zero (keeping the graph) when every one is."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
    return total / (labels != IGNORE).sum().clamp(min=1)


def _label_batch(targets, sizes, resized, padded) -> Tensor:
    """(B, H_pad, W_pad) labels: each image's map at its own size, resized nearest to the
    transform's size, IGNORE over the padding."""
    out = torch.full((len(targets), *padded), IGNORE, dtype=torch.int64)
    for i, (target, (h, w), (rh, rw)) in enumerate(zip(targets, sizes, resized)):
        labels = target_labels(target, height=h, width=w)
        out[i, :rh, :rw] = F.interpolate(labels[None, None].float(), size=(rh, rw))[0, 0]
    return out


def _crop(x: Tensor, size) -> Tensor:
    return x[..., : size[0], : size[1]]


def _resize(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """(C, h, w) -> (C, H, W), bilinear."""
    return F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]


def build_fcn(cfg: ModelConfig, *, num_classes: int, transform: nn.Module) -> FCN:
    """FCN-`model.fcn.stride`s on `model.backbone` (its FPN settings unused)."""
    b = cfg.backbone
    # resnet_fpn checks and freezes the trunk; its FPN is not used here
    with_fpn = resnet_fpn(
        name=b.name,
        trainable_layers=b.trainable_layers,
        norm=b.norm,
        fpn_channels=8,
        stage5=b.stage5,
    )
    _, c3, c4, c5 = (block[0].in_channels for block in with_fpn.fpn.inner_blocks)
    backbone = ResNetStages(body=with_fpn.body, channels={8: c3, 16: c4, 32: c5})
    return FCN(
        backbone=backbone, num_classes=num_classes, stride=cfg.fcn.stride, transform=transform
    )
