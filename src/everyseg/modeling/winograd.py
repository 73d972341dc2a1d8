"""3 x 3 convolutions by Winograd's minimal filtering F(4x4, 3x3), for CPU inference.

On a CPU core oneDNN's direct convolutions already run near the core's peak (~110 GFLOP/s
for R-50-FPN's 256-channel 3 x 3 convolutions), so what remains is doing fewer
multiplications: Winograd's F(4x4, 3x3) computes each 4 x 4 output tile from a 6 x 6 input
tile with 36 channel products instead of 144 (Lavin & Gray 2016). Inputs and outputs are
transformed with scaled additions, in chunks that stay in cache; the 36 products are one
batched matrix product. Outputs equal the direct convolution's within float rounding
(float64 ~1e-14, float32 ~5e-6 relative; tests/test_winograd.py). At one thread, R-50-FPN's
256-channel 3 x 3 convolution on its 200 x 264 FPN level took 649 ms direct, 607 ms by
F(2x2, 3x3) (16 products for 4 outputs, this module before) and 499 ms by F(4x4, 3x3); on
100 x 132: 174 / 171 / 130 ms. Only the wide layers gain (256 channels and more), so only
they are converted (engine/load.py's ready_for_inference, CPU only), and only maps of 32 tiles
or more (a 24 x 24 map has 36) take Winograd's path: on a mask head's 100 RoIs of 14 x 14 the
direct convolution is the fastest (222 ms, F(2x2) 251, F(4x4) 253).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# F(4x4, 3x3)'s filter transform G (6, 3), from the points 0, +-1, +-2 and infinity; the
# input (B^T) and output (A^T) transforms are written out as scaled additions in _input_rows
# and _output_rows
_FILTER_TRANSFORM = torch.tensor(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    dtype=torch.float64,
)
TILE = 4  # output pixels per tile side; a tile reads TILE + 2 input pixels
# floats of transformed input per chunk and thread: 4 MB a core keeps a chunk's tiles and
# products in cache, and with more threads a chunk's additions are long enough to be split
# among them (at 2 threads, 8 MB chunks took R-50-FPN's inference from 0.64 to 0.57-0.60 of
# torchvision's time; 16 MB 0.59-0.60, 32 MB 0.59, 64 MB 0.71: out of cache). Past
# _CHUNK_THREADS threads a chunk stops growing: 16 MB is the largest measured to pay.
_CHUNK_FLOATS = 1 << 20
_CHUNK_THREADS = 4
MIN_CHANNELS = 256
# a map of fewer output tiles goes to the direct convolution: on a mask head's 14 x 14 RoIs
# (16 tiles, 31 % of them padding) the transforms cost more than the products save
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

    tile_weights: Tensor  # (36, C_in, C_out), a buffer

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        weight = conv.weight.detach()  # (C_out, C_in, 3, 3)
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        bias = conv.bias.detach().clone() if conv.bias is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        g = _FILTER_TRANSFORM
        transformed = (g @ weight.double() @ g.t()).to(weight.dtype)  # (C_out, C_in, 6, 6)
        self.register_buffer(  # (36, C_in, C_out): one product matrix per tile position
            "tile_weights",
            transformed.permute(2, 3, 1, 0).reshape(36, *weight.shape[1::-1]).contiguous(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W) in channels-last layout."""
        n, _, height, width = x.shape
        rows, cols = -(-height // TILE), -(-width // TILE)  # output tiles
        exporting = torch.jit.is_tracing() or torch.jit.is_scripting()
        if exporting or x.requires_grad or rows * cols < _MIN_TILES:
            return F.conv2d(x, self.weight, self.bias, padding=1)
        pixels = x.permute(0, 2, 3, 1)  # (N, H, W, C_in), a view of a channels-last x
        out = x.new_empty(n, TILE * rows, TILE * cols, self.tile_weights.shape[2])
        chunk_floats = _CHUNK_FLOATS * min(torch.get_num_threads(), _CHUNK_THREADS)
        step = max(1, chunk_floats // (36 * cols * max(self.tile_weights.shape[1:])))
        for i in range(n):  # chunks of tile rows
            for r in range(0, rows, step):
                chunk = _padded_rows(pixels[i : i + 1], r, min(r + step, rows))
                out[i : i + 1, TILE * r : TILE * (r + step)] = self._tiles(chunk)
        return out[:, :height, :width].permute(0, 3, 1, 2)

    def _tiles(self, padded: Tensor) -> Tensor:
        """(n, 4 r + 2, 4 c + 2, C_in) padded input rows -> (n, 4 r, 4 c, C_out) output."""
        tiles = _input_tiles(padded)  # (36, n * r * c, C_in)
        products = torch.bmm(tiles, self.tile_weights)  # (36, n * r * c, C_out)
        n, rows, cols = padded.shape[0], (padded.shape[1] - 2) // 4, (padded.shape[2] - 2) // 4
        return _output_tiles(products.view(6, 6, n, rows, cols, -1), self.bias)


def _padded_rows(pixels: Tensor, first: int, last: int) -> Tensor:
    """Tile rows first..last - 1 of (n, H, W, C) pixels with the convolution's zero padding
    around them: (n, 4 (last - first) + 2, 4 ceil(W / 4) + 2, C), padded rows and columns
    also filling out the last tile where H or W is not a multiple of 4."""
    height, width = pixels.shape[1:3]
    top, bottom = TILE * first - 1, TILE * last + 1  # the pixel rows the tiles read
    rows = pixels[:, max(top, 0) : min(bottom, height)]
    pad_x = (1, TILE * -(-width // TILE) + 1 - width)
    pad_y = (max(-top, 0), max(bottom - height, 0))
    return F.pad(rows, (0, 0, *pad_x, *pad_y)).contiguous()


def _input_tiles(padded: Tensor) -> Tensor:
    """B^T d B of every overlapping 6 x 6 tile d (stride 4) of (n, 4 r + 2, 4 c + 2, C)
    -> (36, n * r * c, C)."""
    n, height, width, channels = padded.shape
    rows, cols = (height - 2) // TILE, (width - 2) // TILE
    s = padded.stride()
    # (n, r, c, 6, 6, C) view: tile (i, j) starts at pixel (4 i, 4 j)
    d = padded.as_strided(
        (n, rows, cols, 6, 6, channels), (s[0], 4 * s[1], 4 * s[2], s[1], s[2], s[3])
    )
    tiles = padded.new_empty(6, 6, n, rows, cols, channels)
    by_row = _input_rows([d[:, :, :, i] for i in range(6)])  # along tile rows, then columns
    for a, t in enumerate(by_row):  # t: (n, r, c, 6, C)
        _input_rows([t[..., j, :] for j in range(6)], out=list(tiles[a]))
    return tiles.view(36, n * rows * cols, channels)


def _input_rows(d: list[Tensor], out: list[Tensor] | None = None) -> list[Tensor]:
    """B^T d along one axis of a tile: six tensors -> six (written into `out` if given).

    B^T = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
           [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
    """
    o: list[Tensor | None] = list(out) if out is not None else [None] * 6
    even_4, odd_4 = torch.add(d[4], d[2], alpha=-4), torch.add(d[3], d[1], alpha=-4)
    even_1, odd_2 = d[4] - d[2], d[1] - d[3]
    return [
        torch.add(torch.add(d[4], d[2], alpha=-5), d[0], alpha=4, out=o[0]),
        torch.add(even_4, odd_4, out=o[1]),
        torch.sub(even_4, odd_4, out=o[2]),
        torch.add(even_1, odd_2, alpha=-2, out=o[3]),
        torch.add(even_1, odd_2, alpha=2, out=o[4]),
        torch.add(torch.add(d[5], d[3], alpha=-5), d[1], alpha=4, out=o[5]),
    ]


def _output_tiles(m: Tensor, bias: Tensor | None) -> Tensor:
    """A^T m A of the (6, 6, n, r, c, C) products, plus the bias -> (n, 4 r, 4 c, C)."""
    _, _, n, rows, cols, channels = m.shape
    out = m.new_empty(n, rows, TILE, cols, TILE, channels)
    for i, t in enumerate(_output_rows(list(m))):  # along tile rows, then columns
        _output_rows(list(t), out=[out[:, :, i, :, j] for j in range(TILE)])
    if bias is not None:
        out += bias
    return out.view(n, TILE * rows, TILE * cols, channels)


def _output_rows(m: list[Tensor], out: list[Tensor] | None = None) -> list[Tensor]:
    """A^T m along one axis of a tile: six tensors -> four (written into `out` if given).

    A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
    """
    o: list[Tensor | None] = list(out) if out is not None else [None] * 4
    sum_1, diff_1, sum_2, diff_2 = m[1] + m[2], m[1] - m[2], m[3] + m[4], m[3] - m[4]
    return [
        torch.add(m[0] + sum_1, sum_2, out=o[0]),
        torch.add(diff_1, diff_2, alpha=2, out=o[1]),
        torch.add(sum_1, sum_2, alpha=4, out=o[2]),
        torch.add(torch.add(diff_1, diff_2, alpha=8), m[5], out=o[3]),
    ]
