"""modeling/channels_last.py: the layers swapped in for training on a CPU's channels-last maps
compute torch's layers' values and gradients, and leave the state dict as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from everyseg.modeling.channels_last import GroupNorm, PointwiseConv2d, channels_last_layers


def _channels_last(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).contiguous(memory_format=torch.channels_last)


def _graph(t: torch.Tensor) -> set[str]:
    """The names of the autograd nodes `t` was computed by."""
    names, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None:
            names.add(type(node).__name__)
            todo += [next_node for next_node, _ in node.next_functions]
    return names


def _values_and_grads(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    x = x.detach().requires_grad_()
    out = layer(x)
    out.backward(upstream)
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    for p in layer.parameters():
        p.grad = None
    return out, grads


def test_pointwise_conv_trains_as_a_matrix_product_equal_to_the_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 12, 1).to(memory_format=torch.channels_last)
    pointwise = copy.deepcopy(conv)
    assert channels_last_layers(pointwise) == 0  # a bare layer has no parent to swap it in
    pointwise = nn.Sequential(pointwise)
    assert channels_last_layers(pointwise) == 1
    assert type(pointwise[0]) is PointwiseConv2d
    x, upstream = _channels_last(2, 16, 7, 5), _channels_last(2, 12, 7, 5)
    expected, expected_grads = _values_and_grads(conv, x, upstream)
    out, grads = _values_and_grads(pointwise, x, upstream)
    assert out.is_contiguous(memory_format=torch.channels_last)
    ops = _graph(out)
    assert "AddmmBackward0" in ops and "ConvolutionBackward0" not in ops
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for grad, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-5)
    # in eval mode, or on a default-layout map, the convolution itself runs: its exact values
    pointwise.eval()
    with torch.no_grad():
        assert torch.equal(pointwise(x), conv(x))
    pointwise.train()
    assert torch.equal(pointwise(x.contiguous()), conv(x.contiguous()))


@pytest.mark.parametrize("channels, groups", [(64, 32), (32, 32)])
def test_group_norm_backward_by_sums_equals_torch_s(channels, groups):
    torch.manual_seed(0)
    norm = nn.GroupNorm(groups, channels)
    with torch.no_grad():  # not the initial 1 and 0, so that both parameters matter
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    ours = nn.Sequential(copy.deepcopy(norm))
    assert channels_last_layers(ours) == 1 and type(ours[0]) is GroupNorm
    x = _channels_last(2, channels, 48, 48) * 3 + 1  # 2,304 pixels: the sums' path
    upstream = _channels_last(2, channels, 48, 48)
    expected, _ = _values_and_grads(norm, x, upstream)
    _, exact_grads = _values_and_grads(norm.double(), x.double(), upstream.double())
    out, grads = _values_and_grads(ours, x, upstream)
    assert type(out.grad_fn).__name__ == "_ChannelsLastGroupNormBackward"
    assert torch.equal(out, expected)  # torch's own forward
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    # float32 rounding of sums over 4,608 pixels: torch's own kernel is 1.2e-6 of the
    # largest gradient off, these ~0.8e-6
    for grad, exact in zip(grads, exact_grads, strict=True):
        torch.testing.assert_close(grad.double(), exact, rtol=0, atol=3e-6 * exact.abs().max())


@pytest.mark.parametrize(
    "groups, side, layout",
    [
        (16, 48, torch.channels_last),
        (32, 40, torch.channels_last),
        (32, 48, torch.contiguous_format),
    ],
)
def test_group_norm_leaves_to_torch_what_its_kernel_does_as_fast(groups, side, layout):
    # 4 channels a group, 1,600 pixels, or a default-layout map: torch's kernel
    ours = nn.Sequential(GroupNorm(groups, 64))
    x = torch.randn(2, 64, side, side, requires_grad=True).contiguous(memory_format=layout)
    assert type(ours(x).grad_fn).__name__ == "NativeGroupNormBackward0"


def test_group_norm_under_bfloat16_autocast_is_torch_s():
    ours = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), GroupNorm(32, 64))
    ours = ours.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x)
    assert "_ChannelsLastGroupNormBackward" not in _graph(out)
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in ours.parameters())


def test_swapped_layers_keep_the_parameters_and_the_state_dict(make_model, tiny_cfg):
    model = make_model(tiny_cfg, num_classes=3)
    state = model.state_dict()
    params = dict(model.named_parameters())
    pointwise = sum(type(m) is nn.Conv2d and _pointwise(m) for m in model.modules())
    norms = sum(type(m) is nn.GroupNorm for m in model.modules())
    assert pointwise > 0 and norms > 0
    assert channels_last_layers(model) == pointwise + norms
    left = [m for m in model.modules() if type(m) is nn.GroupNorm or type(m) is nn.Conv2d]
    assert left and not any(isinstance(m, nn.GroupNorm) or _pointwise(m) for m in left)
    assert dict(model.named_parameters()) == params  # the very same tensors
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model.state_dict().keys() == state.keys()


def _pointwise(conv: nn.Conv2d) -> bool:
    return conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)
