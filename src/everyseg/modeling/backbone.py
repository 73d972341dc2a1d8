"""ResNet + FPN backbones built from torchvision parts, with every width a config knob."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d

RESNETS = {
    "resnet18": (resnet.resnet18, resnet.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (resnet.resnet34, resnet.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (resnet.resnet50, resnet.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (resnet.resnet101, resnet.ResNet101_Weights.IMAGENET1K_V1),
}
_TRAINABLE_ORDER = ["layer4", "layer3", "layer2", "layer1", "conv1"]


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32 if channels % 32 == 0 else 8, channels)


NORMS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d, "gn": _group_norm}


def resnet_fpn(
    *, name: str, weights: str | None, trainable_layers: int, norm: str, fpn_channels: int
) -> BackboneWithFPN:
    """A ResNet trunk whose C2..C5 feed an FPN with `fpn_channels` outputs (P2..P6)."""
    if name not in RESNETS:
        raise ValueError(f"model.backbone.name {name!r}: choose one of {', '.join(RESNETS)}")
    if norm not in NORMS:
        raise ValueError(f"model.backbone.norm {norm!r}: choose one of {', '.join(NORMS)}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(
            f"model.backbone.trainable_layers must be in [0, 5], got {trainable_layers}"
        )
    constructor, imagenet = RESNETS[name]
    trunk = constructor(weights=None, norm_layer=NORMS[norm])
    if weights is not None:
        trunk.load_state_dict(_trunk_state_dict(weights, imagenet))
    _freeze(trunk, trainable_layers)
    in_channels_stage2 = trunk.inplanes // 8
    return BackboneWithFPN(
        trunk,
        return_layers={f"layer{k}": str(k - 1) for k in range(1, 5)},
        in_channels_list=[in_channels_stage2 * 2 ** (k - 1) for k in range(1, 5)],
        out_channels=fpn_channels,
    )


def _trunk_state_dict(weights: str, imagenet) -> dict[str, torch.Tensor]:
    if weights == "imagenet":
        try:
            return imagenet.get_state_dict(progress=True)
        except Exception as err:  # noqa: BLE001 - any download failure gets the same advice
            raise RuntimeError(
                f"could not load torchvision's ImageNet weights ({err}); go online once to cache "
                "them, or set model.backbone.weights to a local .pth or to null"
            ) from err
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"model.backbone.weights: no such file {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state)


def _freeze(trunk: nn.Module, trainable_layers: int) -> None:
    trainable = _TRAINABLE_ORDER[:trainable_layers] + (["bn1"] if trainable_layers == 5 else [])
    for name, parameter in trunk.named_parameters():
        if not any(name.startswith(layer) for layer in trainable):
            parameter.requires_grad_(False)
