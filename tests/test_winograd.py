"""Winograd F(4x4, 3x3) convolutions for CPU inference: the direct convolution's outputs within
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


def _count_tiled_chunks(monkeypatch) -> list[int]:
    """Counts the chunks WinogradConv2d computes by Winograd's products (not the direct path)."""
    calls: list[int] = []
    tiles = WinogradConv2d._tiles

    def counted(self, padded):
        calls.append(padded.shape[0])
        return tiles(self, padded)

    monkeypatch.setattr(WinogradConv2d, "_tiles", counted)
    return calls


@pytest.mark.parametrize("bias", [True, False])
# (shape, chunks): 10 x 12 tiles, 3 tile rows a chunk; two maps of 9 x 9 tiles, 4 rows a chunk
@pytest.mark.parametrize("shape, expected_chunks", [((1, 256, 37, 45), 4), ((2, 256, 33, 34), 6)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_equals_the_direct_convolution(monkeypatch, shape, expected_chunks, bias, layout):
    # a small chunk, so that several chunks of each map are stitched together
    monkeypatch.setattr(winograd, "_CHUNK_FLOATS", 36 * 12 * 256 * 3)
    chunks = _count_tiled_chunks(monkeypatch)
    conv = _conv(bias=bias)
    x = torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=layout)
    with torch.no_grad():
        expected, actual = conv(x), WinogradConv2d(conv)(x)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    assert len(chunks) == expected_chunks


def test_chunks_grow_with_the_threads(monkeypatch):
    """Each thread gets a chunk's worth of tiles (up to _CHUNK_THREADS threads): with 2
    threads a 10 x 12-tile map is cut into 2 chunks of 6 tile rows, not 4 of 3, and the
    output is the same."""
    monkeypatch.setattr(winograd, "_CHUNK_FLOATS", 36 * 12 * 256 * 3)
    chunks = _count_tiled_chunks(monkeypatch)
    conv = _conv()
    x = torch.randn(1, 256, 37, 45, dtype=torch.float64)
    with torch.no_grad():
        one_thread = WinogradConv2d(conv)(x)
        assert len(chunks) == 4
        torch.set_num_threads(2)  # conftest's fixture sets 1 again for the next test
        two_threads = WinogradConv2d(conv)(x)
        assert len(chunks) == 4 + 2
        monkeypatch.setattr(winograd, "_CHUNK_THREADS", 1)  # chunks stop growing past it
        WinogradConv2d(conv)(x)
    assert len(chunks) == 4 + 2 + 4
    torch.testing.assert_close(two_threads, one_thread, rtol=1e-12, atol=1e-12)


def test_float32_within_rounding(monkeypatch):
    chunks = _count_tiled_chunks(monkeypatch)
    conv = _conv().float()
    x = torch.randn(2, 256, 36, 36)
    with torch.inference_mode():
        torch.testing.assert_close(WinogradConv2d(conv)(x), conv(x), rtol=1e-4, atol=1e-4)
    assert chunks


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_small_maps_gradients_and_tracing_take_the_direct_convolution(monkeypatch):
    chunks = _count_tiled_chunks(monkeypatch)
    conv = _conv().float()
    fast = WinogradConv2d(conv)
    small = torch.randn(100, 256, 14, 14)  # a mask head's RoIs: 16 tiles each
    with torch.no_grad():
        assert torch.equal(fast(small), conv(small))
    x = torch.randn(1, 256, 40, 40, requires_grad=True)
    assert torch.equal(fast(x), conv(x))  # a gradient wanted: the direct one, which trains
    traced = torch.jit.trace(fast, (torch.randn(1, 256, 40, 40),), check_trace=False)
    with torch.no_grad():
        assert torch.equal(traced(x), conv(x))
    assert not chunks


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


def test_ready_wide_model_detects_as_the_unready_one(monkeypatch, make_config, make_model):
    chunks = _count_tiled_chunks(monkeypatch)
    cfg = make_config(
        "model.backbone.fpn_channels=256",
        "model.mask_head.channels=256",
        "model.box_head.score_thresh=0.0",
        "data.test_min_size=160",
        "data.max_size=192",
    )
    torch.manual_seed(0)
    model = make_model(cfg, num_classes=4).eval()
    ready = ready_for_inference(copy.deepcopy(model))
    converted = [m for m in ready.modules() if isinstance(m, WinogradConv2d)]
    assert len(converted) >= 5  # the FPN's output convs, the RPN's, the mask head's
    images = [torch.rand(3, 160, 192)]  # the FPN's finest level: 40 x 48, 120 tiles
    with torch.inference_mode():
        (want,), (got,) = model.detect(images), ready.detect(images)
    assert len(want["scores"]) > 0 and chunks
    assert torch.equal(got["labels"], want["labels"])
    for key in ("boxes", "scores", "box_masks"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)
