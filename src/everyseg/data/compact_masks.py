"""Instance masks kept as COCO stores them (polygons or RLE), rasterised only where needed.

A full-image mask per instance costs H x W bytes per instance per sample (and four times that
once torchvision's transform resizes it as floats); yet the mask loss only reads M x M
targets in the training RoIs. So the loader never decodes a mask: a target carries
`CompactMasks`, and the mask branch asks it for each RoI's M x M target. The targets are
torchvision's (`project_masks_on_boxes`: soft RoIAlign values of the binary mask, resized with
the image by nearest neighbour), to float rounding: detectron2's way, a polygon rasterised
straight at M x M, gave binary targets half a resized pixel off torchvision's at the rescaled
training sizes and cost ~2 mask AP on the demo. Per instance only the pixels its RoIs read
are drawn (a polygon on that crop alone, an RLE decoded whole and cut), resized and cut with
RoIAlign; memory is one instance's crop at a time (tests/test_compact_masks.py). Small images
(a batch's RoIs x its largest image within DENSE_FLOATS) draw their masks whole and cut all
RoIs of the batch in one batched product instead (`batch_targets`): the same targets, without
a Python loop over instances.

Per instance the compact form (`Segm`) is a tuple of float64 polygon arrays (x0, y0, x1, y1,
... in image pixels; float64 so that `to_coco` gives back the JSON's numbers exactly) or the
`bytes` of a compressed RLE's counts at the image's size; None marks a box-only instance.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import cast

import numpy as np
import pycocotools.mask as mask_utils
import torch
from torch import Tensor
from torch.nn.functional import interpolate
from torchvision.ops import roi_align

from everyseg.data.segmentation import RLE, to_rle
from everyseg.modeling.roi_align import axis_weights

Polygons = tuple[np.ndarray, ...]  # each (2P,) float64: x0, y0, x1, y1, ...
Segm = Polygons | bytes  # bytes: compressed RLE counts of a mask the image's size
# Up to this many floats (16 MB) a batch's RoIs read their instances' masks drawn whole,
# all images at once (`batch_targets`): a maskrcnn-tiny step's targets (4 images of 128 px,
# ~40 RoIs, 2 threads) in 3.8 ms, 14.8 when taken image by image; a COCO-sized image (1M
# pixels) takes crops from 4 RoIs on
DENSE_FLOATS = 2**22


def compact(segm: list | dict, *, height: int, width: int) -> Segm:
    """A usable segmentation (`segmentation.check_segmentation`'s) in compact form."""
    if isinstance(segm, list):
        return tuple(np.asarray(p, dtype=np.float64) for p in segm)
    counts = to_rle(segm, height=height, width=width)["counts"]
    return counts.encode("ascii") if isinstance(counts, str) else counts


def to_coco(segm: Segm, *, height: int, width: int) -> list | dict:
    """The compact form back as COCO JSON: polygon lists or a compressed RLE with str counts."""
    if isinstance(segm, bytes):
        return {"size": [height, width], "counts": segm.decode("ascii")}
    return [p.tolist() for p in segm]


def decode(segms: Sequence[Segm], *, height: int, width: int) -> Tensor:
    """(K, H, W) uint8 masks of K compact segmentations of an image of that size."""
    if not segms:
        return torch.zeros(0, height, width, dtype=torch.uint8)
    rles = [_rle(s, height=height, width=width) for s in segms]
    return torch.from_numpy(mask_utils.decode(rles)).permute(2, 0, 1)  # (H, W, K) -> (K, H, W)


class CompactMasks:
    """One image's instance masks in compact form: `segms[i]` for instance i (None:
    box-only), on an image of `height` x `width` pixels, mirrored left-right if `flipped`.

    A flip is recorded, not applied: it is then exact and free for polygons and RLE alike.
    """

    __slots__ = ("segms", "height", "width", "flipped")

    def __init__(
        self, segms: Sequence[Segm | None], *, height: int, width: int, flipped: bool = False
    ) -> None:
        self.segms = tuple(segms)
        self.height = height
        self.width = width
        self.flipped = flipped

    def __len__(self) -> int:
        return len(self.segms)

    def __repr__(self) -> str:
        kept = sum(s is not None for s in self.segms)
        flip = ", flipped" if self.flipped else ""
        size = f"{self.height}x{self.width}"
        return f"CompactMasks({len(self)} instances, {kept} with a mask, {size}{flip})"

    def hflip(self) -> CompactMasks:
        return CompactMasks(
            self.segms, height=self.height, width=self.width, flipped=not self.flipped
        )

    def to_dense(self) -> Tensor:
        """(N, H, W) uint8 masks, all zero for box-only instances."""
        masks = torch.zeros((len(self), self.height, self.width), dtype=torch.uint8)
        rows = [i for i, s in enumerate(self.segms) if s is not None]
        masks[rows] = decode(self._masked(rows), height=self.height, width=self.width)
        return masks.flip(-1) if self.flipped else masks

    def crop_and_resize(
        self, boxes: Tensor, idxs: Tensor, *, resolution: int, image_size: tuple[int, int]
    ) -> Tensor:
        """(R, M, M) float mask targets: instance `idxs[r]`'s mask inside `boxes[r]`.

        boxes: (R, 4) xyxy in the pixels of this image resized to `image_size` (h, w), as the
        model's transform resizes it; idxs: (R,) instances, each with a mask. The result is on
        the boxes' device and equals, to float rounding, torchvision's targets from dense
        masks (`project_masks_on_boxes` on the masks its transform resized, nearest): per
        instance, only the pixels its RoIs read are rasterised, resized and cut with RoIAlign.
        """
        rows_of_pixel = _nearest_sources(self.height, image_size[0])  # (h,) source row per row
        cols_of_pixel = _nearest_sources(self.width, image_size[1])  # (w,)
        if self.flipped:  # the resized flipped mask reads the mirrored source column
            cols_of_pixel = self.width - 1 - cols_of_pixel
        device = boxes.device
        boxes = boxes.detach().float()
        boxes_cpu, idxs_cpu = boxes.cpu(), idxs.cpu()
        targets = torch.zeros(len(idxs), resolution, resolution, device=device)
        for instance in idxs_cpu.unique().tolist():
            (segm,) = self._masked([instance])
            rows_cpu = torch.where(idxs_cpu == instance)[0]
            resized, origin = self._resized_crop(
                segm, boxes_cpu[rows_cpu], source_rows=rows_of_pixel, source_cols=cols_of_pixel
            )
            rows = rows_cpu.to(device)
            index = torch.zeros(len(rows), 1, device=device)
            rois = torch.cat([index, boxes[rows] - origin.to(device)], dim=1)  # (r, 5)
            # torchvision's call (scale 1, adaptive sampling, aligned=False), on the boxes'
            # device as torchvision's is: the crop is small, RoIAlign is not
            crops = resized.to(device)[None, None]
            targets[rows] = roi_align(crops, rois, (resolution, resolution), 1.0)[:, 0]
        return targets

    def _resized_crop(
        self, segm: Segm, boxes: Tensor, *, source_rows: Tensor, source_cols: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The part of the instance's resized mask that RoIAlign reads for its (r, 4) boxes,
        as float (h', w'), and its origin (4,) x, y, x, y in the resized image's pixels.
        source_rows (h,) / source_cols (w,): the source pixel each row / column of the resized
        image reads."""
        x0, x1 = _read_span(boxes[:, 0], boxes[:, 2], len(source_cols))
        y0, y1 = _read_span(boxes[:, 1], boxes[:, 3], len(source_rows))
        rows, cols = source_rows[y0:y1], source_cols[x0:x1]
        top, left = int(rows.min()), int(cols.min())
        width, height = int(cols.max()) + 1 - left, int(rows.max()) + 1 - top
        source = self._crop(segm, left=left, top=top, width=width, height=height)
        resized = source[rows - top][:, cols - left].float()  # (y1 - y0, x1 - x0)
        return resized, torch.tensor([x0, y0, x0, y0], dtype=torch.float32)

    def _crop(self, segm: Segm, *, left: int, top: int, width: int, height: int) -> Tensor:
        """(height, width) uint8: the instance's mask as `decode` draws it at the image's size,
        cut at (left, top). Polygons are drawn on the crop alone; an RLE is decoded whole
        (one instance's H x W bytes) and cut."""
        if isinstance(segm, bytes):
            full = decode([segm], height=self.height, width=self.width)[0]
            return full[top : top + height, left : left + width]
        shifted = [_shift_polygon(p, left=left, top=top) for p in segm]
        rles = mask_utils.frPyObjects(cast(list, shifted), height, width)
        return torch.from_numpy(mask_utils.decode(mask_utils.merge(rles)))

    def _masked(self, rows: Sequence[int]) -> list[Segm]:
        segms = [self.segms[i] for i in rows]
        missing = [i for i, s in zip(rows, segms) if s is None]
        if missing:
            raise ValueError(f"instances {missing} are box-only: they have no mask to cut")
        return cast(list[Segm], segms)


def batch_targets(
    masks: Sequence[CompactMasks],
    boxes: Sequence[Tensor],
    idxs: Sequence[Tensor],
    *,
    resolution: int,
    image_sizes: Sequence[tuple[int, int]],
) -> Tensor:
    """(R, M, M): every image's `crop_and_resize` targets, concatenated in image order.

    When the batch's RoIs x its largest image fit DENSE_FLOATS, the masks are drawn whole
    and all RoIs cut at once: RoIAlign of a nearest-resized mask is a product of separable
    weights, (M, h) @ mask (h, w) @ (w, M), whose resize folds into the weights (the
    source pixel each resized one reads), so it runs on the masks as drawn, zero-padded to
    one size (padding has weight 0). Otherwise each image takes its crops."""
    device = boxes[0].device if boxes else torch.device("cpu")
    num_rois = sum(len(b) for b in boxes)
    height = max((m.height for m in masks), default=0)
    width = max((m.width for m in masks), default=0)
    if num_rois == 0:
        return torch.zeros(0, resolution, resolution, device=device)
    if num_rois * height * width > DENSE_FLOATS:
        crops = zip(masks, boxes, idxs, image_sizes)
        return torch.cat(
            [m.crop_and_resize(b, i, resolution=resolution, image_size=s) for m, b, i, s in crops]
        )
    counts = [len(b) for b in boxes]
    # image k's instances with RoIs, drawn as floats into one zero-padded (I, H, W) stack
    instances, positions = zip(*(i.cpu().unique(return_inverse=True) for i in idxs))
    firsts = np.cumsum([0, *(len(i) for i in instances)]).tolist()
    drawn = torch.zeros(firsts[-1], height, width)
    for m, chosen, first in zip(masks, instances, firsts):
        block = drawn[first : first + len(chosen), : m.height, : m.width]
        block.copy_(decode(m._masked(chosen.tolist()), height=m.height, width=m.width))
    image_of_roi = torch.repeat_interleave(torch.tensor(counts)).to(device)  # (R,)
    roi_instances = torch.cat([p + first for p, first in zip(positions, firsts)])  # (R,)
    rois = torch.cat(list(boxes)).detach().float()  # (R, 4)
    # y and x weights of all RoIs in one call: (2R,) starts along rows, then along columns
    sizes = torch.tensor(list(image_sizes), device=device).index_select(0, image_of_roi)
    table = _source_table(masks, image_sizes).to(device)
    sources = table.index_select(1, image_of_roi)  # (2, R, n)
    weights = axis_weights(
        torch.cat([rois[:, 1], rois[:, 0]]),
        torch.cat([rois[:, 3] - rois[:, 1], rois[:, 2] - rois[:, 0]]),
        bins=resolution,
        size=torch.cat([sizes[:, 0], sizes[:, 1]]),
        sources=sources.flatten(0, 1),
        pixels=max(height, width),
    )  # (2R, M, max(H, W)) on the pixels as drawn
    # contiguous, as separate calls would give them: the products then round the same way
    rows = weights[:num_rois, :, :height].contiguous()
    cols = weights[num_rois:, :, :width].contiguous()
    # index_select: ~7x faster than advanced indexing on a CPU
    read = drawn.to(device).index_select(0, roi_instances.to(device))  # (R, H, W)
    return rows @ read @ cols.transpose(1, 2)  # (R, M, M)


def _source_table(masks: Sequence[CompactMasks], image_sizes: Sequence[tuple[int, int]]) -> Tensor:
    """(2, K, n) int64: for each image k, the drawn row (then column) each row (column) of
    its resized image reads, zero-padded to the longest axis n."""
    longest = max(max(size) for size in image_sizes)
    table = torch.zeros(2, len(masks), longest, dtype=torch.int64)
    for k, (m, (h, w)) in enumerate(zip(masks, image_sizes)):
        table[0, k, :h] = _nearest_sources(m.height, h)
        cols = _nearest_sources(m.width, w)
        table[1, k, :w] = m.width - 1 - cols if m.flipped else cols
    return table


@functools.lru_cache(maxsize=64)
def _nearest_sources(size: int, resized: int) -> Tensor:
    """(resized,) int64: the source index each pixel of a nearest resize from `size` reads,
    computed by the very call torchvision's transform resizes dense masks with (cached:
    callers never write to it)."""
    index = torch.arange(size, dtype=torch.float32).view(1, 1, 1, size)
    return interpolate(index, size=(1, resized)).view(-1).long()


def _read_span(low: Tensor, high: Tensor, size: int) -> tuple[int, int]:
    """[start, end) of the pixels RoIAlign (aligned=False) reads for RoIs from `low` to `high`
    along an axis of `size` pixels, kept non-empty so that a crop always exists.

    It samples inside [low, max(high, low + 1)] and reads floor(x) and floor(x) + 1; one pixel
    more each side keeps its border rules (clamp at 0 and at size - 1) where the image has
    them, and nowhere else."""
    start = min(max(int(low.min().floor()) - 1, 0), size - 1)
    end = int(torch.maximum(high, low + 1).max().floor()) + 2
    return start, min(max(end, start + 1), size)


def _shift_polygon(polygon: np.ndarray, *, left: int, top: int) -> np.ndarray:
    """(2P,) polygon moved by (-left, -top) so that pycocotools draws on the crop exactly what
    it draws there on the whole image.

    pycocotools snaps each vertex to a fifth of a pixel with C's truncating cast,
    (int)(5 v + 0.5): snap in the image's frame, move by whole pixels, and hand it each fifth
    as a value its cast maps back to that integer (the cast rounds a negative value, left of
    or above the crop, up, hence the extra fifth there)."""
    fifths = np.trunc(5 * polygon + 0.5)
    fifths[0::2] -= 5 * left
    fifths[1::2] -= 5 * top
    return np.where(fifths >= 0, fifths, fifths - 1) / 5


def _rle(segm: Segm, *, height: int, width: int) -> RLE:
    if isinstance(segm, bytes):
        return {"size": [height, width], "counts": segm}
    return to_rle([p for p in segm], height=height, width=width)
