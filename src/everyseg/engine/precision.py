"""Floating-point precision: which autocast dtype a run trains and predicts in, and where.

    train.amp   off    float32 everywhere
                fp16   autocast to float16 with a GradScaler (CUDA only: CPU kernels gain
                       nothing in float16 and some have none)
                bf16   autocast to bfloat16, no scaler (its exponent range is float32's);
                       CUDA (Ampere or newer) and CPU

Inference names the same choices "fp32", "fp16" and "bf16". By default it runs in the
precision the run trained in where the device supports it, else in fp32, so a run trained in
fp16 on a GPU still predicts on a laptop; a precision asked for explicitly is checked strictly.
Outputs are float32 whatever the precision.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

from everyseg.config_types import ConfigError

InferencePrecision = Literal["fp32", "fp16", "bf16"]
INFERENCE_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def unsupported(precision: str, device: torch.device) -> str | None:
    """Why `precision` (train.amp's or inference's name) cannot run on `device`, or None."""
    if precision in ("off", "fp32"):
        return None
    if precision == "fp16" and device.type != "cuda":
        return f"fp16 needs a CUDA device, and this one is {device.type}: use bf16 or off"
    if precision == "bf16" and device.type not in ("cuda", "cpu"):
        return f"bf16 runs on CUDA and CPU devices, not on {device.type}: use off"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bfloat16 support (it needs Ampere or newer): use fp16"
    return None


def check_training_precision(amp: str, device: torch.device) -> None:
    """ConfigError naming train.amp if the run's device cannot train in that precision."""
    reason = unsupported(amp, device)
    if reason:
        raise ConfigError(f"train.amp={amp}: {reason}")


def inference_precision(
    requested: str | None, *, trained: str, device: torch.device
) -> InferencePrecision:
    """The precision to predict in: `requested` (fp32 | fp16 | bf16, ValueError if the device
    cannot run it), or with None the run's train.amp `trained` where `device` runs it, else
    fp32."""
    if requested is None:
        name = "fp32" if trained == "off" else trained
        return "fp32" if unsupported(name, device) else name  # type: ignore[return-value]
    if requested not in INFERENCE_PRECISIONS:
        raise ValueError(f"precision must be fp32, fp16 or bf16, got {requested!r}")
    reason = unsupported(requested, device)
    if reason:
        raise ValueError(f"precision {requested}: {reason.replace(' or off', ' or fp32')}")
    return requested  # type: ignore[return-value]


@contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """torch.autocast in `precision` (train.amp's or inference's name) on `device`'s type;
    float32 (autocast disabled) for off / fp32."""
    dtype = _DTYPES.get(precision)
    with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None):
        yield


def outputs_to_float32(outputs: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Detector outputs with every floating-point tensor (boxes, scores, masks) as float32."""
    return [
        {k: v.float() if v.is_floating_point() else v for k, v in output.items()}
        for output in outputs
    ]
