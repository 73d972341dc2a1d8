"""Mask^X's fused FCN+MLP mask head: a class-agnostic MLP mask added to every class's logits.

The FCN predicts local detail; the MLP (DeepMask-style, one FC layer by default as in the
authors' code) sees the whole RoI at once. Both read the same mask features, so the fusion is a
predictor wrapper: it works with the class-specific, class-agnostic and transfer predictors.
"""

from __future__ import annotations

from torch import Tensor, nn

from everyseg.config import ConfigError


class MLPMaskBranch(nn.Module):
    """(R, D, M, M) features -> (R, M, M) class-agnostic logits from the flattened features."""

    def __init__(self, *, in_features: int, resolution: int, num_layers: int, hidden_dim: int):
        super().__init__()
        if num_layers < 1:
            raise ConfigError(f"model.mask_head.mlp_layers must be at least 1, got {num_layers}")
        self.resolution = resolution
        dims = [in_features] + [hidden_dim] * (num_layers - 1) + [resolution**2]
        layers = []
        for i in range(num_layers):
            if i > 0:
                layers.append(nn.ReLU(inplace=True))
            linear = nn.Linear(dims[i], dims[i + 1])
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
            layers.append(linear)
        # small logits at the start, like the per-class predictors: the fused sum must not
        # begin far from zero
        nn.init.normal_(layers[-1].weight, std=0.001)
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        m = self.resolution
        return self.mlp(x.flatten(1)).view(x.shape[0], m, m)


class FusedPredictor(nn.Module):
    """(R, D, M, M), (R,) labels -> (R, M, M): `per_class` logits plus the MLP's, the same MLP
    map for whichever class is selected."""

    def __init__(self, *, per_class: nn.Module, mlp: MLPMaskBranch) -> None:
        super().__init__()
        self.per_class = per_class
        self.mlp = mlp

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        return self.per_class(x, labels) + self.mlp(x)
