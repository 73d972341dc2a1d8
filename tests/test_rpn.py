"""everyseg's RPN filters its proposals to exactly torchvision's, suppressing fewer boxes when
the best ones already give enough."""

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import boxes as box_ops

from everyseg.modeling import rpn as everyseg_rpn
from everyseg.modeling.rpn import ProposalNetwork, like_torchvision

LEVELS = [3072, 768, 192, 48]  # a 128 px image's anchors on 4 FPN levels, 3 ratios each
SIZE = 128


def _torchvision_rpn(pre: int, post: int) -> RegionProposalNetwork:
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,), (128,)), aspect_ratios=((0.5, 1, 2),) * 4)
    return RegionProposalNetwork(
        anchors, RPNHead(8, 3), 0.7, 0.3, 256, 0.5, dict(training=pre, testing=pre),
        dict(training=post, testing=post), 0.7,
    )  # fmt: skip


def _candidates(kind: str, images: int = 3, seed: int = 0):
    """(B, A, 4) proposals and (B * A, 1) objectness logits: boxes spread over the image
    (as from random weights, few suppress each other) or around 3 objects (as from a
    trained RPN, most suppressed); scores continuous or on a few values (ties)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(LEVELS)
    if kind.startswith("clustered"):
        objects = torch.rand(images, 3, 2, generator=g) * 80 + 24
        pick = torch.randint(0, 3, (images, total), generator=g)
        centres = (
            objects[torch.arange(images)[:, None], pick]
            + torch.randn(images, total, 2, generator=g) * 3
        )
        sizes = 30 + torch.randn(images, total, 2, generator=g) * 3
    else:
        centres = torch.rand(images, total, 2, generator=g) * SIZE
        sizes = torch.rand(images, total, 2, generator=g) * 40 + 4
    proposals = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=2)
    logits = torch.randn(images * total, 1, generator=g) * 2
    if kind.endswith("ties"):
        logits = logits.round()
    return proposals, logits


@pytest.mark.parametrize("kind", ["spread", "spread ties", "clustered", "clustered ties"])
@pytest.mark.parametrize("pre,post", [(600, 300), (300, 100), (200, 150)])
def test_proposals_equal_torchvision(kind, pre, post, monkeypatch):
    torchvision_rpn = _torchvision_rpn(pre, post)
    ours = like_torchvision(torchvision_rpn)
    assert isinstance(ours, ProposalNetwork)
    proposals, logits = _candidates(kind)
    shapes = [(SIZE, SIZE), (SIZE - 20, SIZE), (SIZE, SIZE - 9)]
    if kind.endswith("ties"):
        monkeypatch.setattr(box_ops, "batched_nms", _ties_in_index_order(box_ops.batched_nms))
    expected = torchvision_rpn.filter_proposals(proposals, logits, shapes, LEVELS)
    suppressed = []
    nms = everyseg_rpn.nms

    def recording(boxes, scores, threshold):
        suppressed.append(len(boxes))
        return nms(boxes, scores, threshold)

    monkeypatch.setattr(everyseg_rpn, "nms", recording)
    got = ours.filter_proposals(proposals, logits, shapes, LEVELS)
    for got_part, expected_part in zip(got, expected):
        for g, e in zip(got_part, expected_part):
            assert torch.equal(g, e)
    if kind.startswith("spread"):  # few suppressed: `post` survive
        assert [len(b) for b in got[0]] == [post] * 3
    if kind == "spread" and pre == 600:  # 1,440 boxes, level by level: fewer
        assert 0 < sum(suppressed) < 3 * 1440 / 2


def _ties_in_index_order(batched_nms):
    """torchvision's batched_nms with boxes of equal score in index order: its own final
    sort is unstable, so their order, and which of them a count keeps, is chance."""

    def ordered(boxes, scores, idxs, threshold):
        keep = batched_nms(boxes, scores, idxs, threshold).sort().values
        return keep[scores[keep].sort(descending=True, stable=True)[1]]

    return ordered


def test_small_candidate_sets_take_torchvision_s_batched_nms(monkeypatch):
    """Up to 1,000 boxes torchvision suppresses all levels at once (its coordinate trick,
    with its own rounding): everyseg then calls that very function."""
    calls = []
    batched = everyseg_rpn.batched_nms

    def recording(*args):
        calls.append(len(args[0]))
        return batched(*args)

    monkeypatch.setattr(everyseg_rpn, "batched_nms", recording)
    torchvision_rpn = _torchvision_rpn(200, 100)
    proposals, logits = _candidates("spread", images=1)
    levels = [100, 400, 300, 3072 + 768 + 192 + 48 - 800]
    expected = torchvision_rpn.filter_proposals(proposals, logits, [(SIZE, SIZE)], levels)
    got = like_torchvision(torchvision_rpn).filter_proposals(
        proposals, logits, [(SIZE, SIZE)], levels
    )
    assert calls and calls[0] <= 1000
    assert torch.equal(got[0][0], expected[0][0]) and torch.equal(got[1][0], expected[1][0])


def test_under_tracing_torchvision_s_code_runs(monkeypatch):
    torchvision_rpn = _torchvision_rpn(600, 300)
    ours = like_torchvision(torchvision_rpn)
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    monkeypatch.setattr(
        everyseg_rpn, "nms_prefix", lambda *a, **k: pytest.fail("everyseg's NMS under tracing")
    )
    proposals, logits = _candidates("spread", images=1)
    got = ours.filter_proposals(proposals, logits, [(SIZE, SIZE)], LEVELS)
    expected = torchvision_rpn.filter_proposals(proposals, logits, [(SIZE, SIZE)], LEVELS)
    assert torch.equal(got[0][0], expected[0][0])
    assert box_ops.box_area(got[0][0]).min() > 0


def test_anchor_targets_of_a_batch_at_once_equal_torchvision_image_by_image(monkeypatch):
    """Labels and matched boxes as torchvision's per-image matching: images with several,
    one and no objects, a duplicate object (tied IoU) and one smaller than every anchor
    (matched only as its best anchors' low-quality match), all in one IoU computation."""
    torchvision_rpn = _torchvision_rpn(600, 300)
    ours = like_torchvision(torchvision_rpn)
    image_list = ImageList(torch.zeros(4, 3, SIZE, SIZE), [(SIZE, SIZE)] * 4)
    maps = [torch.zeros(4, 8, SIZE // 2**k, SIZE // 2**k) for k in range(2, 6)]
    anchors = torchvision_rpn.anchor_generator(image_list, maps)
    g = torch.Generator().manual_seed(0)
    corners = torch.rand(9, 2, generator=g) * 90
    boxes = torch.cat([corners, corners + 8 + torch.rand(9, 2, generator=g) * 30], 1)
    boxes[1] = boxes[0]  # a duplicate: the same IoU with every anchor
    boxes[3] = torch.tensor([60.0, 60.0, 61.5, 61.0])  # smaller than any anchor
    targets = [{"boxes": b} for b in (boxes[:3], boxes[:0], boxes[3:4], boxes[4:])]
    calls = []
    similarity = ours.box_similarity
    monkeypatch.setattr(ours, "box_similarity", lambda *a: calls.append(1) or similarity(*a))
    labels, matched = ours.assign_targets_to_anchors(anchors, targets)
    expected_labels, expected_matched = torchvision_rpn.assign_targets_to_anchors(anchors, targets)
    assert len(calls) == 1
    for got, expected in zip(labels + matched, expected_labels + expected_matched):
        assert torch.equal(got, expected)
    assert (expected_labels[2] == 1).sum() >= 1  # the tiny box kept its best anchors
    assert set(expected_labels[0].tolist()) == {-1.0, 0.0, 1.0}
    assert not expected_labels[1].any() and not expected_matched[1].any()


@pytest.mark.parametrize("shuffled", [False, True])
def test_nms_prefix_equals_batched_nms_whatever_the_order_of_levels(shuffled):
    """Levels in runs (as the RPN's candidates come) are suppressed slice by slice; levels in
    any other order are grouped first: the same boxes as torchvision's batched_nms."""
    proposals, logits = _candidates("clustered", images=1, seed=2)
    boxes, scores = proposals[0][:1500], logits[:1500, 0].sigmoid()
    levels = torch.arange(1500) // 400  # 4 runs
    if shuffled:
        order = torch.randperm(1500, generator=torch.Generator().manual_seed(0))
        boxes, scores, levels = boxes[order], scores[order], levels[order]
    expected = box_ops.batched_nms(boxes, scores, levels, 0.7)[:300]
    got, _ = everyseg_rpn.nms_prefix(boxes, scores, levels, 0.7, count=300, first=600)
    assert len(got) > 100 and torch.equal(got, expected)


def test_cached_anchors_equal_torchvision_s_at_every_size():
    """The cached generator hands back torchvision's anchors for each (padded size, maps)
    key, however often sizes alternate, one tensor for all of a batch's images; at most
    cache_size keys are kept, and a dtype is a key of its own."""
    sizes, ratios = ((16,), (32,), (64,)), ((0.5, 1.0, 2.0),) * 3
    reference = AnchorGenerator(sizes=sizes, aspect_ratios=ratios)
    cached = everyseg_rpn.CachedAnchorGenerator(sizes, ratios, cache_size=2)
    for height, width, dtype in [(96, 128, torch.float32), (128, 64, torch.float32),
                                 (96, 128, torch.float32), (96, 128, torch.float64),
                                 (64, 64, torch.float32), (128, 64, torch.float32)]:  # fmt: skip
        images = ImageList(torch.zeros(2, 3, height, width), [(height - 5, width), (height, 7)])
        maps = [torch.zeros(2, 8, height // s, width // s, dtype=dtype) for s in (4, 8, 16)]
        got = cached(images, maps)
        expected = reference(images, maps)
        assert len(got) == 2 and got[0] is got[1]
        for a, b in zip(got, expected):
            assert a.dtype == dtype
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert len(cached._cache) <= 2
    assert [key[:3:2] for key in cached._cache] == [
        ((64, 64), torch.float32),
        ((128, 64), torch.float32),
    ]


@pytest.mark.parametrize("kind", ["spread", "clustered ties"])
def test_nms_prefix_gives_the_same_boxes_whatever_the_first_guess(kind):
    """The first prefix suppressed is a guess (ProposalNetwork.survival): too small, it
    doubles; too large, it suppresses more than needed; the kept boxes never change. The
    share it reports is that of the last prefix's survivors."""
    proposals, logits = _candidates(kind, images=1, seed=3)
    boxes, scores = proposals[0], logits[:, 0].sigmoid()
    levels = torch.repeat_interleave(torch.arange(len(LEVELS)), torch.tensor(LEVELS))
    expected = _ties_in_index_order(box_ops.batched_nms)(boxes, scores, levels, 0.7)[:300]
    shares = []
    for first in (1, 300, 390, 600, 10_000):
        got, share = everyseg_rpn.nms_prefix(boxes, scores, levels, 0.7, count=300, first=first)
        assert torch.equal(got, expected)
        shares.append(share)
    assert all(0 < share <= 1 for share in shares)
    if kind == "spread":  # few suppressed: ~90 % of any prefix survive
        assert min(shares) > 0.8
