"""Mask^X's fused FCN+MLP mask head: a class-agnostic MLP mask added to every class's logits.

The FCN predicts local detail; the MLP (DeepMask-style, one FC layer by default as in the
authors' code) sees the whole RoI at once. Both read the same mask features, so the fusion is a
predictor wrapper: it works with the class-specific, class-agnostic and transfer predictors.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import Tensor, nn


def fc_stack(
    *,
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int,
    activation: Callable[[], nn.Module],
) -> nn.Sequential:
    """`num_layers` (>= 1) Linear layers, `activation()` between them, MSRA-initialised as in
    the Mask^X authors' code: (N, in_dim) -> (N, out_dim)."""
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(num_layers):
        if i > 0:
            layers.append(activation())
        linear = nn.Linear(dims[i], dims[i + 1])
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers.append(linear)
    return nn.Sequential(*layers)


class MLPMaskBranch(nn.Module):
    """(R, D, M, M) features -> (R, M, M) class-agnostic logits from the flattened features."""

    def __init__(self, *, in_features: int, resolution: int, num_layers: int, hidden_dim: int):
        super().__init__()
        self.resolution = resolution
        self.mlp = fc_stack(
            in_dim=in_features,
            hidden_dim=hidden_dim,
            out_dim=resolution**2,
            num_layers=num_layers,
            activation=partial(nn.ReLU, inplace=True),
        )
        # small logits at the start, like the per-class predictors: the fused sum must not
        # begin far from zero
        last = self.mlp[-1]
        assert isinstance(last, nn.Linear)  # fc_stack ends in a Linear
        nn.init.normal_(last.weight, std=0.001)

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
