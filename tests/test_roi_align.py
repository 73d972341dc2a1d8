"""RoIAlign as a gather (modeling/roi_align.py): torchvision's roi_align within float rounding,
outputs and gradients, and the pooler that uses it only where it should."""

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as torchvision_roi_align

from everyseg.modeling.poolers import MultiScaleRoIAlignGather, with_gather
from everyseg.modeling.roi_align import multilevel_roi_align_gather, roi_align_gather


def _rois(num_images: int, count: int, image_size: float, seed: int) -> torch.Tensor:
    """(count, 5) RoIs in images `image_size` px: some poking out of the image, some beyond
    it altogether, some thinner than a feature pixel."""
    generator = torch.Generator().manual_seed(seed)
    corner = torch.rand(count, 2, generator=generator) * image_size * 1.3 - 0.15 * image_size
    size = torch.rand(count, 2, generator=generator) * image_size * 0.6 + 0.3
    size[::7] = 0.5  # thinner than a pixel: torchvision widens them to one
    image = torch.randint(0, num_images, (count, 1), generator=generator).float()
    return torch.cat([image, corner, corner + size], dim=1)


def _forward_and_grad(op, features, rois, grad_out, **settings):
    features = features.clone().requires_grad_()
    out = op(features, rois, **settings)
    out.backward(grad_out)
    return out.detach(), features.grad


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize(
    ("map_size", "output", "scale"), [((32, 32), 7, 0.25), ((18, 11), 14, 0.125), ((1, 5), 3, 1.0)]
)
def test_equals_torchvision_forward_and_backward(map_size, output, scale, aligned):
    torch.manual_seed(0)
    features = torch.randn(3, 4, *map_size, dtype=torch.float64)
    rois = _rois(3, 40, max(map_size) / scale, seed=1).double()
    grad_out = torch.randn(40, 4, output, output, dtype=torch.float64)
    settings = dict(output_size=(output, output), spatial_scale=scale, sampling_ratio=2)
    ours, our_grad = _forward_and_grad(
        roi_align_gather, features, rois, grad_out, aligned=aligned, **settings
    )
    theirs, their_grad = _forward_and_grad(
        torchvision_roi_align, features, rois, grad_out, aligned=aligned, **settings
    )
    assert theirs.abs().sum() > 0 and their_grad.abs().sum() > 0
    assert (theirs == 0).any()  # some RoIs lie beyond the map: their samples read nothing
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    torch.testing.assert_close(our_grad, their_grad, rtol=0, atol=1e-12)


def test_float32_channels_last_within_rounding():
    torch.manual_seed(0)
    features = torch.randn(2, 16, 24, 24).contiguous(memory_format=torch.channels_last)
    rois = _rois(2, 64, 96.0, seed=2)
    grad_out = torch.randn(64, 16, 7, 7)
    settings = dict(output_size=(7, 7), spatial_scale=0.25, sampling_ratio=3)
    ours, our_grad = _forward_and_grad(roi_align_gather, features, rois, grad_out, **settings)
    theirs, their_grad = _forward_and_grad(
        torchvision_roi_align, features, rois, grad_out, **settings
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-5, atol=1e-5)


def test_several_maps_in_one_gather_equal_torchvision_map_by_map():
    """Each RoI read from its own level: forward and every map's gradient as torchvision's
    roi_align of that RoI on that map alone."""
    torch.manual_seed(0)
    sizes, scales = [(20, 13), (10, 7), (5, 4)], [0.25, 0.125, 0.0625]
    maps = [torch.randn(2, 3, *size, dtype=torch.float64) for size in sizes]
    rois = _rois(2, 30, 80.0, seed=3).double()
    levels = torch.arange(30) % 3
    grad_out = torch.randn(30, 3, 5, 5, dtype=torch.float64)
    leaves = [m.clone().requires_grad_() for m in maps]
    ours = multilevel_roi_align_gather(leaves, rois, levels, scales, (5, 5), 2)
    ours.backward(grad_out)
    for level, (features, scale) in enumerate(zip(maps, scales)):
        rows = torch.where(levels == level)[0]
        theirs, their_grad = _forward_and_grad(
            torchvision_roi_align,
            features,
            rois[rows],
            grad_out[rows],
            output_size=(5, 5),
            spatial_scale=scale,
            sampling_ratio=2,
        )
        assert their_grad.abs().sum() > 0
        torch.testing.assert_close(ours[rows].detach(), theirs, rtol=0, atol=1e-12)
        torch.testing.assert_close(leaves[level].grad, their_grad, rtol=0, atol=1e-12)


def test_no_rois_and_adaptive_sampling():
    features = torch.randn(1, 3, 8, 8)
    empty = roi_align_gather(features, torch.zeros(0, 5), (7, 7), 1.0, 2)
    assert empty.shape == (0, 3, 7, 7)
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align_gather(features, torch.zeros(1, 5), (7, 7), 1.0, 0)


def _pool_with_grad(pooler, maps, boxes, size):
    leaves = {k: v.clone().requires_grad_() for k, v in maps.items()}
    out = pooler(leaves, boxes, [(size, size)] * 2)
    (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items()}


def test_pooler_gathers_in_training_and_is_torchvision_in_eval_until_readied():
    torch.manual_seed(0)
    size = 128
    maps = {str(k): torch.randn(2, 3, size // 2 ** (k + 2), size // 2 ** (k + 2)) for k in range(4)}
    boxes = [
        torch.tensor([[0, 0, 20, 20], [0, 0, 100, 90], [10, 10, 127, 120.0]]),
        torch.tensor([[3, 3, 60, 40.0], [50, 60, 70, 64.0]]),
    ]
    theirs_pool = MultiScaleRoIAlign(list(maps), 7, sampling_ratio=2)
    ours_pool = with_gather(theirs_pool)
    assert type(ours_pool) is MultiScaleRoIAlignGather and ours_pool.sampling_ratio == 2
    theirs, their_grads = _pool_with_grad(theirs_pool, maps, boxes, size)
    assert len(set(theirs_pool.map_levels(boxes).tolist())) > 1  # several levels read
    ours, our_grads = _pool_with_grad(ours_pool.train(), maps, boxes, size)
    assert not torch.equal(ours, theirs)  # the gather ran: equal only within rounding
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for level in maps:
        torch.testing.assert_close(our_grads[level], their_grads[level], rtol=1e-5, atol=1e-5)
    # eval: torchvision's own op, bit for bit, until ready_for_inference asks for the gather
    assert torch.equal(ours_pool.eval()(maps, boxes, [(size, size)] * 2), theirs)
    ours_pool.gather_in_inference = True
    gathered = ours_pool(maps, boxes, [(size, size)] * 2)
    assert not torch.equal(gathered, theirs)
    torch.testing.assert_close(gathered, theirs, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # level by level, without one table of all maps: the same sums
        assert torch.equal(ours_pool(maps, boxes, [(size, size)] * 2), gathered)
