"""ResNet + FPN (or C4) backbones built from torchvision parts, with every width a config knob."""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter
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
    *, name: str, trainable_layers: int, norm: str, fpn_channels: int, stage5: bool = True
) -> BackboneWithFPN:
    """A randomly initialised ResNet trunk whose C2..C5 feed an FPN with `fpn_channels`
    outputs (P2..P6); `load_trunk_weights` puts pretrained weights in the trunk. Without
    `stage5`, C5 is C4 subsampled by 2: the same five levels, no stage-5 weights."""
    trunk = resnet_trunk(name=name, trainable_layers=trainable_layers, norm=norm)
    in_channels = [trunk.inplanes // 8 * 2 ** (k - 1) for k in range(1, 5)]
    if not stage5:
        trunk.layer4 = nn.MaxPool2d(kernel_size=1, stride=2)
        in_channels[3] = in_channels[2]
    return BackboneWithFPN(
        trunk,
        return_layers={f"layer{k}": str(k - 1) for k in range(1, 5)},
        in_channels_list=in_channels,
        out_channels=fpn_channels,
    )


def resnet_trunk(*, name: str, trainable_layers: int, norm: str) -> resnet.ResNet:
    """torchvision's ResNet `name`, randomly initialised, with `norm` layers and all but the
    last `trainable_layers` stages frozen."""
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
    pool_before_relu(trunk)
    _freeze(trunk, trainable_layers)
    return trunk


def pool_before_relu(stem: nn.Module) -> None:
    """A ResNet (or the IntermediateLayerGetter over one) whose stem runs its ReLU after its
    max pool instead of before: the same values and gradients bit for bit (both are
    monotone, and a pooled maximum <= 0 gets no gradient either way), with the ReLU and its
    backward on a quarter of the pixels (the stem's 64 x 64 maps of maskrcnn-tiny: ~2 ms of
    a 250 ms training step). Parameter names do not change; a stem already swapped, or not
    torchvision's, is left as it is."""
    relu, pool = getattr(stem, "relu", None), getattr(stem, "maxpool", None)
    if isinstance(relu, nn.ReLU) and isinstance(pool, nn.MaxPool2d):
        stem.maxpool = nn.Sequential(pool, relu)
        stem.relu = nn.Identity()


class C4Backbone(nn.Module):
    """Mask R-CNN's C4 backbone: ResNet stages 1-4 give one stride-16 map {"0": C4}; stage 5
    (`res5`) is kept here, as part of the trunk (trainable_layers, pretrained weights), but
    runs per RoI in the RoI heads, which share this very module (modeling/c4.py)."""

    def __init__(self, *, body: nn.Module, res5: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.res5 = res5
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """(B, 3, H, W) -> {"0": (B, out_channels, H / 16, W / 16)}."""
        return self.body(x)


def resnet_c4(*, name: str, trainable_layers: int, norm: str) -> C4Backbone:
    """A randomly initialised ResNet split at stage 5, as `C4Backbone` says."""
    trunk = resnet_trunk(name=name, trainable_layers=trainable_layers, norm=norm)
    return C4Backbone(
        body=IntermediateLayerGetter(trunk, return_layers={"layer3": "0"}),
        res5=trunk.layer4,
        out_channels=trunk.inplanes // 2,  # inplanes: stage 5's output channels
    )


def load_trunk_weights(backbone: BackboneWithFPN | C4Backbone, *, name: str, source: str) -> None:
    """Load ResNet `name`'s weights ("imagenet": torchvision's, else a local .pth) into the
    backbone's trunk; the classifier (fc) has no place in it. A C4 backbone's stage 5
    (`res5`, modeling/c4.py) takes the weights of `layer4`."""
    _, imagenet = RESNETS[name]
    state = load_state_dict(
        source, builtin_name="imagenet", builtin=imagenet, config_key="model.backbone.weights"
    )
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if isinstance(backbone, C4Backbone):
        backbone.res5.load_state_dict(_strip(state, "layer4."))
    if isinstance(backbone, C4Backbone) or not _has_stage5(backbone.body):
        state = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    backbone.body.load_state_dict(state)


def _has_stage5(body: nn.Module) -> bool:
    layer4 = getattr(body, "layer4", None)
    return layer4 is not None and any(True for _ in layer4.parameters())


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _freeze(trunk: nn.Module, trainable_layers: int) -> None:
    trainable = _TRAINABLE_ORDER[:trainable_layers] + (["bn1"] if trainable_layers == 5 else [])
    for name, parameter in trunk.named_parameters():
        if not any(name.startswith(layer) for layer in trainable):
            parameter.requires_grad_(False)
