"""ResNet + FPN backbones built from torchvision parts, with every width a config knob."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d

from everyseg.modeling.weights import load_state_dict

RESNETS = {
    "resnet18": (resnet.resnet18, resnet.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (resnet.resnet34, resnet.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (resnet.resnet50, resnet.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (resnet.resnet101, resnet.ResNet101_Weights.IMAGENET1K_V1),
}
# the FPN maps RoI poolers read (P2..P5); "pool" (P6) only feeds the RPN or FCOS
FPN_LEVELS = ["0", "1", "2", "3"]
_TRAINABLE_ORDER = ["layer4", "layer3", "layer2", "layer1", "conv1"]


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32 if channels % 32 == 0 else 8, channels)


NORMS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d, "gn": _group_norm}


def resnet_fpn(
    *, name: str, trainable_layers: int, norm: str, fpn_channels: int
) -> BackboneWithFPN:
    """A randomly initialised ResNet trunk whose C2..C5 feed an FPN with `fpn_channels`
    outputs (P2..P6); `load_trunk_weights` puts pretrained weights in the trunk."""
    if name not in RESNETS:
        raise ValueError(f"model.backbone.name {name!r}: choose one of {', '.join(RESNETS)}")
    if norm not in NORMS:
        raise ValueError(f"model.backbone.norm {norm!r}: choose one of {', '.join(NORMS)}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(
            f"model.backbone.trainable_layers must be in [0, 5], got {trainable_layers}"
        )
    constructor, _ = RESNETS[name]
    trunk = constructor(weights=None, norm_layer=NORMS[norm])
    _freeze(trunk, trainable_layers)
    in_channels_stage2 = trunk.inplanes // 8
    return BackboneWithFPN(
        trunk,
        return_layers={f"layer{k}": str(k - 1) for k in range(1, 5)},
        in_channels_list=[in_channels_stage2 * 2 ** (k - 1) for k in range(1, 5)],
        out_channels=fpn_channels,
    )


def load_trunk_weights(backbone: BackboneWithFPN, *, name: str, source: str) -> None:
    """Load ResNet `name`'s weights ("imagenet": torchvision's, else a local .pth) into the
    backbone's trunk; the classifier (fc) has no place in it."""
    _, imagenet = RESNETS[name]
    state = load_state_dict(
        source, builtin_name="imagenet", builtin=imagenet, config_key="model.backbone.weights"
    )
    backbone.body.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})


def _freeze(trunk: nn.Module, trainable_layers: int) -> None:
    trainable = _TRAINABLE_ORDER[:trainable_layers] + (["bn1"] if trainable_layers == 5 else [])
    for name, parameter in trunk.named_parameters():
        if not any(name.startswith(layer) for layer in trainable):
            parameter.requires_grad_(False)
