"""Mask^X R-CNN's weight transfer: each class's mask weights predicted from its box weights.

`TransferPredictor` keeps ClassConvPredictor's interface, but the final 1x1 conv's weights are
w_seg[c] = T(w_det[c]; theta) with T a small class-agnostic MLP. Classes that only ever had
boxes still get class-specific masks, since their w_det is trained by the box losses.

The transferred conv has no bias, as in the authors' code: a per-class constant offset would
have to be learnt by T from the mask classes alone and shifts whole masks on or off; the
features and the fused MLP branch (mlp.py) carry any shared offset.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

from everyseg.config import ConfigError
from everyseg.modeling.mask_heads.mlp import fc_stack

BOX_PARTS = {"cls": ("cls",), "box": ("box",), "cls+box": ("cls", "box")}
TRANSFER_INPUTS = (*BOX_PARTS, "randn", "embedding")
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    # slope 0.1, the authors' choice (PyTorch's default is 0.01)
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "relu": nn.ReLU,
}


class BoxWeights:
    """w_det rows read from the box predictor on every call: its current values, never a copy.

    A plain object, not an nn.Module: assigned to a module attribute it stays outside the
    module tree, so the box predictor's parameters are listed once (under
    roi_heads.box_predictor) in state_dict(), parameters() and therefore the optimizer.
    """

    def __init__(self, *, box_predictor: FastRCNNPredictor, parts: Sequence[str]) -> None:
        self.box_predictor = box_predictor
        self.parts = tuple(parts)

    @property
    def dim(self) -> int:
        rep = self.box_predictor.cls_score.in_features
        return sum(rep if part == "cls" else 4 * rep for part in self.parts)

    def __call__(self, classes: Tensor) -> Tensor:
        """(U,) class indices -> (U, E) rows [cls_score row c | bbox_pred rows 4c..4c+3]."""
        rows = []
        for part in self.parts:
            if part == "cls":
                rows.append(self.box_predictor.cls_score.weight[classes])  # (U, rep)
            else:
                # bbox_pred's weight is (4 (K+1), rep); rows 4c..4c+3 regress class c's box
                weight = self.box_predictor.bbox_pred.weight
                rows.append(weight.view(-1, 4 * weight.shape[1])[classes])  # (U, 4 rep)
        return torch.cat(rows, dim=1)


class FixedEmbedding(nn.Module):
    """Per-class vectors that never train (random or word embeddings); row c is class c's.

    A persistent buffer, so a checkpoint keeps the exact vectors the model was trained with.
    """

    vectors: Tensor  # (K + 1, E), row 0 the background

    def __init__(self, *, vectors: Tensor) -> None:
        super().__init__()
        self.register_buffer("vectors", vectors)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def forward(self, classes: Tensor) -> Tensor:
        return self.vectors[classes]  # (U, E)


class TransferPredictor(nn.Module):
    """(R, D, M, M) features, (R,) labels -> (R, M, M) logits with transferred 1x1-conv weights.

    `source` maps class indices to their inputs for T: BoxWeights (w_det) or FixedEmbedding.
    With `stop_gradient` the mask loss trains T but never the weights it reads.
    """

    def __init__(
        self, *, source: BoxWeights | FixedEmbedding, transfer: nn.Module, stop_gradient: bool
    ) -> None:
        super().__init__()
        self.source = source
        self.transfer = transfer
        self.stop_gradient = stop_gradient

    def class_weights(self, classes: Tensor) -> Tensor:
        """(U,) class indices -> (U, D) mask weights w_seg."""
        inputs = self.source(classes)
        if self.stop_gradient:
            inputs = inputs.detach()
        return self.transfer(inputs)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        # T runs once per distinct label and each RoI is dotted with its own class's weights
        # only, so time and memory per RoI do not grow with the number of classes
        classes, index = torch.unique(labels, return_inverse=True)  # (U,), (R,)
        weights = self.class_weights(classes)[index]  # (R, D)
        return torch.einsum("rd,rdhw->rhw", weights.to(x.dtype), x)


def random_vectors(*, num_classes: int, dim: int) -> Tensor:
    """(K + 1, dim) standard normal rows from a private generator: the same on every build,
    and drawing them leaves the global RNG (hence every other initialisation) untouched."""
    return torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0))


def word_vectors(path: str | Path, class_names: Sequence[str]) -> Tensor:
    """(K + 1, E) rows for `class_names` from a text file of `word v1 v2 ...` lines (GloVe's
    format; a word2vec header line is ignored). Row 0, the background, is zero.

    A name is looked up as written, lower-cased, then with its spaces as underscores (e.g.
    "traffic_light"); failing those, its words (split at spaces, '_' and '-') are averaged.
    Raises ConfigError naming every class that has no vector.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.transfer.embedding_file not found: {path}")
    candidates = {name: _lookup_keys(name) for name in class_names}
    wanted = {key for keys, words in candidates.values() for key in (*keys, *words)}
    table = _read_rows(path, wanted)
    rows, missing = [], []
    for name, (keys, words) in candidates.items():
        found = next((table[k] for k in keys if k in table), None)
        if found is None and words and all(w in table for w in words):
            found = torch.stack([table[w] for w in words]).mean(0)
        if found is None:
            missing.append(name)
        else:
            rows.append(found)
    if missing:
        raise ConfigError(
            f"model.transfer.embedding_file {path}: no vector for {len(missing)} class(es): "
            f"{', '.join(missing)} (tried each name as written, lower-cased, underscore-joined, "
            "and the mean of its words)"
        )
    return torch.cat([torch.zeros(1, rows[0].numel()), torch.stack(rows)])


def _lookup_keys(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(whole-name keys in order of preference, the lower-cased words to average)."""
    joined = "_".join(name.split())
    keys = tuple(dict.fromkeys([name, name.lower(), joined, joined.lower()]))
    words = tuple(w.lower() for w in re.split(r"[\s_\-]+", name) if w)
    return keys, words


def _read_rows(path: Path, wanted: set[str]) -> dict[str, Tensor]:
    """Parse only the wanted rows: GloVe files hold hundreds of thousands of words."""
    table, dim = {}, None
    with path.open(encoding="utf-8", errors="replace") as f:
        for line_number, line in enumerate(f, start=1):
            word, _, rest = line.rstrip().partition(" ")
            if word not in wanted or word in table:
                continue
            values = torch.tensor([float(v) for v in rest.split()])
            if dim is not None and values.numel() != dim:
                raise ConfigError(
                    f"model.transfer.embedding_file {path}:{line_number}: {word!r} has "
                    f"{values.numel()} values, earlier rows {dim}"
                )
            dim = values.numel()
            table[word] = values
    return table


def build_transfer_predictor(
    *,
    input: str,
    num_layers: int,
    hidden_dim: int,
    activation: str,
    stop_gradient: bool,
    in_channels: int,
    num_classes: int,
    box_predictor: FastRCNNPredictor | None,
    class_names: Sequence[str] | None,
    embedding_file: str | None,
    randn_dim: int,
) -> TransferPredictor:
    """T maps each class's `input` vector to the `in_channels` weights of its mask conv."""
    source: BoxWeights | FixedEmbedding
    if input in BOX_PARTS:
        if box_predictor is None:
            raise ConfigError(f"model.transfer.input={input} reads a box predictor: none given")
        source = BoxWeights(box_predictor=box_predictor, parts=BOX_PARTS[input])
    elif input == "randn":
        source = FixedEmbedding(vectors=random_vectors(num_classes=num_classes, dim=randn_dim))
    else:  # "embedding"; the config admits no other input
        if embedding_file is None or class_names is None:
            raise ConfigError(
                "model.transfer.input=embedding needs model.transfer.embedding_file and the "
                "dataset's class names"
            )
        if len(class_names) + 1 != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes - 1} classes")
        source = FixedEmbedding(vectors=word_vectors(embedding_file, class_names))
    transfer = fc_stack(
        in_dim=source.dim,
        hidden_dim=hidden_dim,
        out_dim=in_channels,
        num_layers=num_layers,
        activation=ACTIVATIONS[activation],
    )
    return TransferPredictor(source=source, transfer=transfer, stop_gradient=stop_gradient)
