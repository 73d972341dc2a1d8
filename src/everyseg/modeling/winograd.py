"""3 x 3 convolutions by Winograd's minimal filtering F(2x2, 3x3), for CPU inference.

On a CPU core oneDNN's direct convolutions already run near the core's peak (~110 GFLOP/s
for R-50-FPN's 256-channel 3 x 3 convolutions), so what remains is doing fewer
multiplications: Winograd's F(2x2, 3x3) computes each 2 x 2 output tile from a 4 x 4 input
tile with 16 channel products instead of 36 (Lavin & Gray 2016). Inputs and outputs are
transformed with additions only, in chunks that stay in cache; the 16 products are one
batched matrix product. Outputs equal the direct convolution's within float rounding
(~1e-6 relative; tests/test_winograd.py). Only the wide layers gain (256 channels and more:
1.2x on the 200 x 200 FPN level, 1.1x on the mask head), so only they are converted
(engine/load.py's ready_for_inference, CPU only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# F(2x2, 3x3)'s filter transform G (4, 3); the input (B^T) and output (A^T) transforms are
# written out as additions in _input_tiles and _output_tiles
_FILTER_TRANSFORM = torch.tensor(
    [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]]
)
# floats of transformed input per chunk: 4 MB keeps a chunk's tiles and products in cache
_CHUNK_FLOATS = 1 << 20
MIN_CHANNELS = 256
# below this many output tiles the transforms' fixed costs outweigh the saved products
_MIN_TILES = 32


def convert_convs(model: nn.Module) -> int:
    """Replace every convolution of `model` that `converts` with a WinogradConv2d; returns
    how many. For inference only: the copies do not train."""
    targets = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if converts(child)
    ]
    for parent, name in targets:
        setattr(parent, name, WinogradConv2d(getattr(parent, name)))
    return len(targets)


def converts(conv: nn.Module) -> bool:
    """Whether `conv` is a convolution WinogradConv2d computes faster: 3 x 3, stride 1,
    padding 1, no dilation or groups, MIN_CHANNELS channels or more in and out."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS
    )


class WinogradConv2d(nn.Module):
    """An inference-only copy of a 3 x 3, stride 1, padding 1 nn.Conv2d (see `converts`)."""

    tile_weights: Tensor  # (16, C_in, C_out), a buffer

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        weight = conv.weight.detach()  # (C_out, C_in, 3, 3)
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        bias = conv.bias.detach().clone() if conv.bias is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        g = _FILTER_TRANSFORM.to(weight)
        transformed = g @ weight @ g.t()  # (C_out, C_in, 4, 4)
        self.register_buffer(  # (16, C_in, C_out): one product matrix per tile position
            "tile_weights",
            transformed.permute(2, 3, 1, 0).reshape(16, *weight.shape[1::-1]).contiguous(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W) in channels-last layout."""
        n, _, height, width = x.shape
        rows, cols = (height + 1) // 2, (width + 1) // 2  # 2 x 2 output tiles
        exporting = torch.jit.is_tracing() or torch.jit.is_scripting()
        if exporting or x.requires_grad or n * rows * cols < _MIN_TILES:
            return F.conv2d(x, self.weight, self.bias, padding=1)
        pixels = x.permute(0, 2, 3, 1)  # (N, H, W, C_in), a view of a channels-last x
        out = x.new_empty(n, 2 * rows, 2 * cols, self.tile_weights.shape[2])
        per_image_row = 16 * cols * max(self.tile_weights.shape[1:])
        if n > 1:  # many small maps (a mask head's RoIs): chunks of whole images
            step = max(1, _CHUNK_FLOATS // (per_image_row * rows))
            for i in range(0, n, step):
                out[i : i + step] = self._tiles(_padded_rows(pixels[i : i + step], 0, rows))
        else:  # one large map: chunks of tile rows
            step = max(1, _CHUNK_FLOATS // per_image_row)
            for r in range(0, rows, step):
                chunk = _padded_rows(pixels, r, min(r + step, rows))
                out[:, 2 * r : 2 * (r + step)] = self._tiles(chunk)
        return out[:, :height, :width].permute(0, 3, 1, 2)

    def _tiles(self, padded: Tensor) -> Tensor:
        """(n, 2 r + 2, 2 c + 2, C_in) padded input rows -> (n, 2 r, 2 c, C_out) output."""
        tiles = _input_tiles(padded)  # (16, n * r * c, C_in)
        products = torch.bmm(tiles, self.tile_weights)  # (16, n * r * c, C_out)
        n, rows, cols = padded.shape[0], (padded.shape[1] - 2) // 2, (padded.shape[2] - 2) // 2
        return _output_tiles(products.view(4, 4, n, rows, cols, -1), self.bias)


def _padded_rows(pixels: Tensor, first: int, last: int) -> Tensor:
    """Tile rows first..last - 1 of (n, H, W, C) pixels with the convolution's zero padding
    around them: (n, 2 (last - first) + 2, 2 ceil(W / 2) + 2, C), padded rows and columns
    also filling out the last tile of an odd H or W."""
    height, width = pixels.shape[1:3]
    top, bottom = 2 * first - 1, 2 * last + 1  # the pixel rows the tiles read
    rows = pixels[:, max(top, 0) : min(bottom, height)]
    pad_x = (1, 2 * ((width + 1) // 2) + 1 - width)
    pad_y = (max(-top, 0), max(bottom - height, 0))
    return F.pad(rows, (0, 0, *pad_x, *pad_y)).contiguous()


def _input_tiles(padded: Tensor) -> Tensor:
    """B^T d B of every overlapping 4 x 4 tile d (stride 2) of (n, 2 r + 2, 2 c + 2, C)
    -> (16, n * r * c, C)."""
    n, height, width, channels = padded.shape
    rows, cols = (height - 2) // 2, (width - 2) // 2
    s = padded.stride()
    # (n, r, c, 4, 4, C) view: tile (i, j) starts at pixel (2 i, 2 j)
    d = padded.as_strided(
        (n, rows, cols, 4, 4, channels), (s[0], 2 * s[1], 2 * s[2], s[1], s[2], s[3])
    )
    # B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], along tile rows...
    by_row = (
        d[:, :, :, 0] - d[:, :, :, 2],
        d[:, :, :, 1] + d[:, :, :, 2],
        d[:, :, :, 2] - d[:, :, :, 1],
        d[:, :, :, 1] - d[:, :, :, 3],
    )
    tiles = padded.new_empty(4, 4, n, rows, cols, channels)
    for a, t in enumerate(by_row):  # ... then along tile columns; t: (n, r, c, 4, C)
        torch.sub(t[..., 0, :], t[..., 2, :], out=tiles[a, 0])
        torch.add(t[..., 1, :], t[..., 2, :], out=tiles[a, 1])
        torch.sub(t[..., 2, :], t[..., 1, :], out=tiles[a, 2])
        torch.sub(t[..., 1, :], t[..., 3, :], out=tiles[a, 3])
    return tiles.view(16, n * rows * cols, channels)


def _output_tiles(m: Tensor, bias: Tensor | None) -> Tensor:
    """A^T m A of the (4, 4, n, r, c, C) products, plus the bias -> (n, 2 r, 2 c, C)."""
    # A^T = [[1, 1, 1, 0], [0, 1, -1, -1]], along tile rows, then columns
    top, bottom = m[0] + m[1] + m[2], m[1] - m[2] - m[3]  # (4, n, r, c, C) each
    _, n, rows, cols, channels = top.shape
    out = m.new_empty(n, rows, 2, cols, 2, channels)
    for i, t in enumerate((top, bottom)):
        torch.add(t[0] + t[1], t[2], out=out[:, :, i, :, 0])
        torch.sub(t[1] - t[2], t[3], out=out[:, :, i, :, 1])
    if bias is not None:
        out += bias
    return out.view(n, 2 * rows, 2 * cols, channels)
