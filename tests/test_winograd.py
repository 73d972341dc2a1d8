"""Winograd F(2x2, 3x3) convolutions for CPU inference: the direct convolution's outputs within
float rounding, only where they are faster, and the direct one where they cannot run."""

import copy

import pytest
import torch
from torch import nn

from everyseg.engine.load import ready_for_inference
from everyseg.modeling import winograd
from everyseg.modeling.winograd import WinogradConv2d, convert_convs


def _conv(channels: int = 256, *, bias: bool = True, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(channels, channels, 3, padding=1, bias=bias).double()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 256, 20, 30), (1, 256, 9, 13), (7, 256, 14, 14)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_equals_the_direct_convolution(monkeypatch, shape, bias, layout):
    # small chunks, so that several row chunks (one map) or image chunks (many) are stitched
    monkeypatch.setattr(winograd, "_CHUNK_FLOATS", 16 * 3 * 256 * 8)
    conv = _conv(bias=bias)
    x = torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=layout)
    with torch.no_grad():
        expected, actual = conv(x), WinogradConv2d(conv)(x)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_float32_within_rounding():
    conv = _conv().float()
    x = torch.randn(2, 256, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(WinogradConv2d(conv)(x), conv(x), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_tiny_maps_gradients_and_tracing_take_the_direct_convolution():
    conv = _conv().float()
    fast = WinogradConv2d(conv)
    tiny = torch.randn(1, 256, 3, 3)
    with torch.no_grad():
        assert torch.equal(fast(tiny), conv(tiny))
    x = torch.randn(1, 256, 16, 16, requires_grad=True)
    assert torch.equal(fast(x), conv(x))  # a gradient wanted: the direct one, which trains
    traced = torch.jit.trace(fast, (torch.randn(1, 256, 16, 16),))
    with torch.no_grad():
        assert torch.equal(traced(x), conv(x))


def test_only_wide_stride_one_3x3_convolutions_are_converted():
    model = nn.Sequential(
        nn.Conv2d(256, 256, 3, padding=1),  # converted
        nn.Conv2d(256, 256, 3, padding=1, stride=2),
        nn.Conv2d(256, 256, 1),
        nn.Conv2d(128, 256, 3, padding=1),  # too narrow to gain
        nn.Sequential(nn.Conv2d(256, 512, 3, padding=1)),  # converted, nested
        nn.Conv2d(512, 512, 3, padding=2, dilation=2),
    )
    assert convert_convs(model) == 2
    kinds = [type(m) for m in model]
    assert kinds[0] is WinogradConv2d and type(model[4][0]) is WinogradConv2d
    assert all(kind is nn.Conv2d for kind in kinds[1:4] + kinds[5:])


def test_ready_wide_model_detects_as_the_unready_one(make_config, make_model):
    cfg = make_config(
        "model.backbone.fpn_channels=256",
        "model.mask_head.channels=256",
        "model.box_head.score_thresh=0.0",
    )
    torch.manual_seed(0)
    model = make_model(cfg, num_classes=4).eval()
    ready = ready_for_inference(copy.deepcopy(model))
    converted = [m for m in ready.modules() if isinstance(m, WinogradConv2d)]
    assert len(converted) >= 5  # the FPN's output convs, the RPN's, the mask head's
    images = [torch.rand(3, 64, 80)]
    with torch.inference_mode():
        (want,), (got,) = model.detect(images), ready.detect(images)
    assert len(want["scores"]) > 0
    assert torch.equal(got["labels"], want["labels"])
    for key in ("boxes", "scores", "box_masks"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)
