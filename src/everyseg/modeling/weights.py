"""Pretrained weights from torchvision's weights API (online or cached) or a local .pth."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.models import WeightsEnum


class WeightsUnavailable(OSError):
    """torchvision's weights could not be downloaded or read from its cache (offline)."""


def load_state_dict(
    source: str, *, builtin_name: str, builtin: WeightsEnum, config_key: str
) -> dict[str, torch.Tensor]:
    """`source` == `builtin_name` fetches `builtin`; anything else is a local .pth path.

    A .pth may hold a bare state dict or a checkpoint with a "model" entry.
    """
    if source == builtin_name:
        try:
            return builtin.get_state_dict(progress=True)
        except Exception as err:  # noqa: BLE001 - every download failure gets the same advice
            raise WeightsUnavailable(
                f"{config_key}={builtin_name}: could not load torchvision's weights ({err}); "
                f"set {config_key} to a local .pth (--set {config_key}=PATH), or to null to "
                "start from random weights, or go online once to cache them"
            ) from err
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{config_key}: no such file {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state)
