"""The region proposal network: torchvision's, with its proposals filtered and its anchors
matched in less time on a CPU.

torchvision's RPN suppresses every candidate (pre_nms_top_n a level and image) with a
non-maximum suppression per level, then keeps the best post_nms_top_n survivors. Greedy NMS
decides each box from the higher-scoring boxes alone, so the survivors among the best
candidates are the same whatever comes below them: when the best N already leave
post_nms_top_n survivors, the rest need no suppression. N starts a fifth above what the last
image's survival rate says is needed (doubling when short): from random weights, when ~90 %
survive, that is ~1.3 x post_nms_top_n, a fraction of torchvision's quadratic CPU kernel's
work on all of them; a trained RPN's clustered boxes (~55 % survive) take ~2.2 x or the whole
set, where suppression is fast (a maskrcnn-tiny step's NMS 7.7 -> 5.1 ms from random weights
and 8.8 -> 6.8 trained, against starting at 2 x). The proposals equal torchvision's,
but for the order of boxes of equal score (tests/test_rpn.py). The anchors are torchvision's,
drawn once a size, and their training targets too, every image's from one IoU and one
matching. On CUDA and under tracing (export) torchvision's own code runs.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import batched_nms, nms

# torchvision's batched_nms suppresses level by level on a CPU above this many box
# coordinates; below, all levels at once, with each level's boxes moved apart (which rounds
# their coordinates differently): a subset then gives other results than the whole set
_PER_LEVEL_ABOVE = 4000


class CachedAnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator (same arguments, same anchors) that keeps the anchors of
    the last `cache_size` (padded image size, feature map sizes) it was asked for: they depend
    on nothing else, and a batch's images share them (one tensor for all of them). Training at
    a few sizes then draws its anchors once a size instead of in ~60 small operations a step.
    Under tracing (export) torchvision's computation runs, so that the graph keeps it."""

    def __init__(self, sizes, aspect_ratios, *, cache_size: int = 8) -> None:
        super().__init__(sizes, aspect_ratios)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, Tensor] = OrderedDict()

    @classmethod
    def like(cls, generator: AnchorGenerator) -> CachedAnchorGenerator:
        return cls(generator.sizes, generator.aspect_ratios)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        if torch.jit.is_tracing() or torch.jit.is_scripting():
            return super().forward(image_list, feature_maps)
        grid = tuple(tuple(level.shape[-2:]) for level in feature_maps)
        first = feature_maps[0]
        key = (tuple(image_list.tensors.shape[-2:]), grid, first.dtype, first.device)
        anchors = self._cache.get(key)
        if anchors is None:
            one_image = ImageList(image_list.tensors, image_list.image_sizes[:1])
            anchors = super().forward(one_image, feature_maps)[0]  # (A, 4)
            self._cache[key] = anchors
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return [anchors] * len(image_list.image_sizes)


class ProposalNetwork(RegionProposalNetwork):
    """torchvision's RegionProposalNetwork (same arguments, same proposals and losses)."""

    # the share of the best candidates the last image's NMS kept: how many of them the next
    # one suppresses first (a guess that decides speed only, never which proposals come out)
    survival: float = 0.5

    def filter_proposals(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """(B, A, 4) decoded proposals and (B * A, 1) objectness logits of all A anchors ->
        per image the kept (P_i, 4) boxes and (P_i,) probabilities, best first."""
        if torch.jit.is_tracing() or proposals.device.type != "cpu":
            return super().filter_proposals(
                proposals, objectness, image_shapes, num_anchors_per_level
            )
        num_images = len(proposals)
        objectness = objectness.detach().reshape(num_images, -1)  # (B, A)
        top = self._get_top_n_idx(objectness, num_anchors_per_level)  # (B, T), level by level
        per_level = [min(self.pre_nms_top_n(), count) for count in num_anchors_per_level]
        levels = torch.repeat_interleave(torch.arange(len(per_level)), torch.tensor(per_level))
        scores = objectness.gather(1, top).sigmoid()  # (B, T)
        candidates = proposals.gather(1, top[..., None].expand(-1, -1, 4))  # (B, T, 4)
        # torchvision's clip_boxes_to_image, remove_small_boxes and score threshold, every
        # image at once
        limits = torch.tensor([[w, h, w, h] for h, w in image_shapes], dtype=candidates.dtype)
        candidates = candidates.clamp(min=0).minimum(limits[:, None])
        sizes = candidates[..., 2:] - candidates[..., :2]  # (B, T, 2)
        valid = (sizes >= self.min_size).all(2) & (scores >= self.score_thresh)  # (B, T)
        final_boxes, final_scores = [], []
        count = self.post_nms_top_n()
        for boxes, probs, keep in zip(candidates, scores, valid):
            keep = torch.where(keep)[0]
            boxes, probs = boxes[keep], probs[keep]
            # a fifth more than the last image's survival says is needed: from random
            # weights ~90 % survive (the best ~1.3 x count suffice), from trained ones ~55 %
            first = math.ceil(1.2 * count / self.survival)
            kept, self.survival = nms_prefix(
                boxes, probs, levels[keep], self.nms_thresh, count=count, first=first
            )
            final_boxes.append(boxes[kept])
            final_scores.append(probs[kept])
        return final_boxes, final_scores

    def assign_targets_to_anchors(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image (A, 4) anchors and targets -> per image (A,) labels (1 object, 0
        background, -1 ignored) and (A, 4) matched ground-truth boxes: torchvision's, with
        every image matched at once (a batch's images share their anchors) instead of ~150
        small operations an image."""
        counts = [len(t["boxes"]) for t in targets]
        if (
            anchors[0].device.type != "cpu"
            or max(counts, default=0) == 0
            or any(a is not anchors[0] and not torch.equal(a, anchors[0]) for a in anchors[1:])
        ):
            return super().assign_targets_to_anchors(anchors, targets)
        num_images, most = len(targets), max(counts)
        image = torch.repeat_interleave(torch.arange(num_images), torch.tensor(counts))
        slot = torch.cat([torch.arange(count) for count in counts])
        gt_boxes = torch.cat([t["boxes"] for t in targets])  # (G, 4)
        iou = self.box_similarity(gt_boxes, anchors[0])  # (G, A)
        quality = iou.new_full((num_images, most, iou.shape[1]), -1.0)
        quality[image, slot] = iou  # (B, most, A)
        padded_boxes = gt_boxes.new_zeros((num_images, most, 4))
        padded_boxes[image, slot] = gt_boxes
        matches = match(self.proposal_matcher, quality, torch.tensor(counts))  # (B, A)
        labels = (matches >= 0).to(torch.float32)
        labels[matches == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1.0
        matched = padded_boxes[torch.arange(num_images)[:, None], matches.clamp(min=0)]
        return list(labels), list(matched)


def match(matcher: Matcher, quality: Tensor, counts: Tensor) -> Tensor:
    """torchvision's `matcher` on every image at once: (B, G, A) IoU of each image's ground
    truth with the A anchors (rows past an image's (B,) `counts` filled with -1) -> (B, A)
    matched ground-truth index, or the matcher's BELOW_LOW_THRESHOLD / BETWEEN_THRESHOLDS."""
    best, matches = quality.max(dim=1)  # (B, A): the first best row, as torchvision's
    all_matches = matches.clone()
    matches[best < matcher.low_threshold] = matcher.BELOW_LOW_THRESHOLD
    between = (best >= matcher.low_threshold) & (best < matcher.high_threshold)
    matches[between] = matcher.BETWEEN_THRESHOLDS
    if matcher.allow_low_quality_matches:
        # each ground truth's best anchors (ties included) keep it, however low
        real = torch.arange(quality.shape[1]) < counts[:, None]  # (B, G)
        highest = quality.max(dim=2, keepdim=True).values  # (B, G, 1)
        images, _, rows = torch.where((quality == highest) & real[:, :, None])
        matches[images, rows] = all_matches[images, rows]
    return matches


def nms_prefix(
    boxes: Tensor, scores: Tensor, levels: Tensor, threshold: float, *, count: int, first: int
) -> tuple[Tensor, float]:
    """`torchvision.ops.batched_nms(boxes, scores, levels, threshold)[:count]` on a CPU:
    (N, 4), (N,), (N,) -> indices of the kept boxes, best first, at most `count`, and the
    share of the last boxes suppressed that survived.

    Suppresses the best `first` boxes (all boxes tied with the last of them included), then
    twice as many, ..., until `count` survive: greedy NMS keeps a box or not by the boxes
    above it, so those survivors are exactly the whole set's best."""
    if boxes.numel() <= _PER_LEVEL_ABOVE:
        return batched_nms(boxes, scores, levels, threshold)[:count], 0.5
    size = max(first, count)
    while size < len(scores):
        lowest = scores.topk(size).values[-1]
        best = torch.where(scores >= lowest)[0]  # in index order, as torchvision's NMS breaks ties
        kept = best[_nms_per_level(boxes[best], scores[best], levels[best], threshold)]
        if len(kept) >= count:
            return _best_first(kept, scores)[:count], len(kept) / len(best)
        size *= 2
    kept = _nms_per_level(boxes, scores, levels, threshold)
    return _best_first(kept, scores)[:count], max(len(kept), 1) / len(scores)


def _nms_per_level(boxes: Tensor, scores: Tensor, levels: Tensor, threshold: float) -> Tensor:
    """Indices of the boxes NMS keeps within each level, in index order."""
    order = None
    if len(levels) and not bool((levels[1:] >= levels[:-1]).all()):
        order = levels.argsort(stable=True)
        boxes, scores, levels = boxes[order], scores[order], levels[order]
    # levels in runs (as the RPN's candidates come, level by level): each level a slice
    kept, start = [levels.new_zeros(0)], 0
    for count in torch.unique_consecutive(levels, return_counts=True)[1].tolist():
        end = start + count
        kept.append(nms(boxes[start:end], scores[start:end], threshold) + start)
        start = end
    keep = torch.cat(kept).sort().values
    return keep if order is None else order[keep].sort().values


def _best_first(kept: Tensor, scores: Tensor) -> Tensor:
    """Kept indices (in index order) sorted by score, as torchvision's batched_nms sorts
    them; equal scores stay in index order (torchvision's unstable sort leaves theirs to
    chance, and so which of them the count cuts)."""
    return kept[scores[kept].sort(descending=True, stable=True)[1]]


def like_torchvision(rpn: RegionProposalNetwork) -> ProposalNetwork:
    """A ProposalNetwork with torchvision RPN `rpn`'s modules and settings."""
    matcher, sampler = rpn.proposal_matcher, rpn.fg_bg_sampler
    network = ProposalNetwork(
        CachedAnchorGenerator.like(rpn.anchor_generator),
        rpn.head,
        matcher.high_threshold,
        matcher.low_threshold,
        sampler.batch_size_per_image,
        sampler.positive_fraction,
        rpn._pre_nms_top_n,
        rpn._post_nms_top_n,
        rpn.nms_thresh,
        rpn.score_thresh,
    )
    network.box_coder = rpn.box_coder
    network.min_size = rpn.min_size
    return network.train(rpn.training)
