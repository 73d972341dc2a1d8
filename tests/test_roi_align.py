"""RoIAlign with the dense CPU backward: torchvision's forward bit for bit, its gradients within
float rounding, and torchvision's own op wherever the dense one would be slower."""

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as torchvision_roi_align

from everyseg.modeling.poolers import MultiScaleRoIAlignDenseGrad, with_dense_grad
from everyseg.modeling.roi_align import roi_align


def _rois(num_images: int, count: int, image_size: float, seed: int) -> torch.Tensor:
    """(count, 5) RoIs in images `image_size` px: some poking out of the image, some beyond
    it altogether, some thinner than a feature pixel."""
    generator = torch.Generator().manual_seed(seed)
    corner = torch.rand(count, 2, generator=generator) * image_size * 1.3 - 0.15 * image_size
    size = torch.rand(count, 2, generator=generator) * image_size * 0.6 + 0.3
    size[::7] = 0.5  # thinner than a pixel: torchvision widens them to one
    image = torch.randint(0, num_images, (count, 1), generator=generator).float()
    return torch.cat([image, corner, corner + size], dim=1).to(torch.float64)


def _forward_and_grad(op, features, rois, grad_out, **settings):
    features = features.clone().requires_grad_()
    out = op(features, rois, **settings)
    out.backward(grad_out)
    return out.detach(), features.grad, out.grad_fn


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize(
    ("map_size", "output", "scale"), [((32, 32), 7, 0.25), ((18, 11), 14, 0.125), ((1, 5), 3, 1.0)]
)
def test_forward_equals_torchvision_and_gradients_match(map_size, output, scale, aligned):
    torch.manual_seed(0)
    features = torch.randn(3, 4, *map_size, dtype=torch.float64)
    rois = _rois(3, 40, max(map_size) / scale, seed=1)
    grad_out = torch.randn(40, 4, output, output, dtype=torch.float64)
    settings = dict(output_size=(output, output), spatial_scale=scale, sampling_ratio=2)
    ours, our_grad, grad_fn = _forward_and_grad(
        roi_align, features, rois, grad_out, aligned=aligned, **settings
    )
    theirs, their_grad, _ = _forward_and_grad(
        torchvision_roi_align, features, rois, grad_out, aligned=aligned, **settings
    )
    assert type(grad_fn).__name__ == "_RoIAlignDenseGradBackward"  # the dense backward ran
    assert torch.equal(ours, theirs)
    assert their_grad.abs().sum() > 0
    torch.testing.assert_close(our_grad, their_grad, rtol=0, atol=1e-12)


def test_float32_gradients_match_within_rounding():
    torch.manual_seed(0)
    features = torch.randn(2, 16, 24, 24)
    rois = _rois(2, 64, 96.0, seed=2).float()
    grad_out = torch.randn(64, 16, 7, 7)
    settings = dict(output_size=(7, 7), spatial_scale=0.25, sampling_ratio=2)
    ours, our_grad, _ = _forward_and_grad(roi_align, features, rois, grad_out, **settings)
    theirs, their_grad, _ = _forward_and_grad(
        torchvision_roi_align, features, rois, grad_out, **settings
    )
    assert torch.equal(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-5, atol=1e-5)


def test_large_maps_and_adaptive_sampling_keep_torchvision_backward():
    rois = _rois(1, 4, 800.0, seed=3).float()
    grad_out = torch.ones(4, 2, 7, 7)
    large = torch.randn(1, 2, 200, 200)  # the dense products would cost more than the kernel
    _, _, grad_fn = _forward_and_grad(
        roi_align, large, rois, grad_out, output_size=(7, 7), spatial_scale=0.25, sampling_ratio=2
    )
    assert type(grad_fn).__name__ != "_RoIAlignDenseGradBackward"
    small = torch.randn(1, 2, 16, 16)
    _, _, grad_fn = _forward_and_grad(
        roi_align, small, rois, grad_out, output_size=(7, 7), spatial_scale=0.02, sampling_ratio=0
    )
    assert type(grad_fn).__name__ != "_RoIAlignDenseGradBackward"


def test_multiscale_pooler_equals_torchvision_across_levels():
    torch.manual_seed(0)
    size = 128
    maps = {str(k): torch.randn(2, 3, size // 2 ** (k + 2), size // 2 ** (k + 2)) for k in range(4)}
    boxes = [
        torch.tensor([[0, 0, 20, 20], [0, 0, 100, 90], [10, 10, 127, 120.0]]),
        torch.tensor([[3, 3, 60, 40.0], [50, 60, 70, 64.0]]),
    ]
    theirs_pool = MultiScaleRoIAlign(list(maps), 7, sampling_ratio=2)
    ours_pool = with_dense_grad(theirs_pool)
    assert type(ours_pool) is MultiScaleRoIAlignDenseGrad
    results = []
    for pooler in (theirs_pool, ours_pool):
        leaves = {k: v.clone().requires_grad_() for k, v in maps.items()}
        out = pooler(leaves, boxes, [(size, size)] * 2)
        (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
        results.append((out.detach(), {k: v.grad for k, v in leaves.items()}))
    (theirs, their_grads), (ours, our_grads) = results
    assert len(set(theirs_pool.map_levels(boxes).tolist())) > 1  # several levels read
    assert torch.equal(ours, theirs)
    for level in maps:
        torch.testing.assert_close(our_grads[level], their_grads[level], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference: torchvision's path itself
        assert torch.equal(ours_pool(maps, boxes, [(size, size)] * 2), theirs)
