"""The studies `everyseg study NAME` runs: plain data, one per table of the papers.

A study is a reference row and the rows compared with it. A row is a preset and `--set`
overrides, trained under one of two protocols:

  mask        the detector stays fixed within a seed: the study trains its detector once per
              seed (`train.stage=detector`: backbone, RPN and box head on the boxes of every
              class, no mask loss), and the row trains only its mask branch on top of it
              (`train.stage=mask`, `model.init_from_run`), as docs/results.md did by hand
              (there on an end-to-end baseline run; a box-only detector is the paper's
              stage 1 and depends on no mask split, so oracle and partial rows share it). Box
              AP is then the same for every such row of a seed, and a difference between rows
              is the mask branch's alone. A row whose change also concerns the detector
              (RoIPool) names it in `detector`: it gets a detector of its own, trained once per
              seed with those overrides.
  end_to_end  the whole model trains from scratch on every loss, as a preset does.

A data folder with a `seen_classes.txt` (the hard benchmark writes one) gives the seen split
of every row that does not set data.mask_classes itself (the oracles set `all`); otherwise the
presets' own split holds. `{out}` in an override is the study's folder:
`{out}/name_embedding.txt` is written by the study before its runs
(everyseg.engine.name_embedding), a GloVe-format file with one vector per class made from the
class's name alone, the honest stand-in for GloVe on synthetic shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PROTOCOLS = ("mask", "end_to_end")
Protocol = Literal["mask", "end_to_end"]


@dataclass(frozen=True)
class Row:
    name: str
    preset: str
    overrides: tuple[str, ...] = ()
    protocol: Protocol = "mask"
    # overrides of the detector this row's mask branch trains on (protocol mask)
    detector: tuple[str, ...] = ()


@dataclass(frozen=True)
class Study:
    title: str
    # which tables of shared/papers/ it follows, and how it departs from them
    paper: str
    reference: str  # the name of the row every other row is paired with
    rows: tuple[Row, ...]
    detector_preset: str = "baseline-tiny"

    def __post_init__(self) -> None:
        names = [row.name for row in self.rows]
        if len(set(names)) != len(names):
            raise ValueError(f"study {self.title!r}: row names repeat: {names}")
        if self.reference not in names:
            raise ValueError(f"study {self.title!r}: reference {self.reference!r} is not a row")
        for row in self.rows:
            if row.protocol not in PROTOCOLS:
                raise ValueError(f"row {row.name!r}: protocol must be one of {PROTOCOLS}")

    def row(self, name: str) -> Row:
        return next(row for row in self.rows if row.name == name)


ORACLE = "data.mask_classes=all"
TRANSFER = "model.transfer"
NO_MLP = "model.mask_head.mlp_fusion=false"


def _transfer(name: str, *overrides: str, protocol: Protocol = "mask") -> Row:
    return Row(name, "maskx-tiny", overrides, protocol)


MASKX = Study(
    title="Mask^X R-CNN ablations",
    paper="Learning to Segment Every Thing (papers 000, 001), the ablation tables: T's input, "
    "T's structure, the MLP branch, the training strategy; baseline (class-agnostic FCN) and "
    "oracle (masks for every class). T reads the box head's weights (cls, box, cls+box), a "
    "fixed random vector (randn) or a name embedding in place of GloVe (see "
    "everyseg.engine.name_embedding). Transfer rows keep maskx-tiny's MLP branch except "
    "'transfer, no MLP'.",
    reference="baseline (class-agnostic)",
    rows=(
        Row("baseline (class-agnostic)", "baseline-tiny"),
        Row("baseline + MLP", "baseline-tiny", ("model.mask_head.mlp_fusion=true",)),
        Row("oracle (all masks)", "maskrcnn-tiny", (ORACLE,)),
        _transfer("transfer cls+box, 2 FC LeakyReLU + MLP (maskx-tiny)"),
        _transfer("transfer, no MLP", NO_MLP),
        _transfer("T input: cls", f"{TRANSFER}.input=cls"),
        _transfer("T input: box", f"{TRANSFER}.input=box"),
        _transfer("T input: randn", f"{TRANSFER}.input=randn"),
        _transfer(
            "T input: name embedding",
            f"{TRANSFER}.input=embedding",
            f"{TRANSFER}.embedding_file={{out}}/name_embedding.txt",
        ),
        _transfer("T: 1 FC (linear)", f"{TRANSFER}.num_layers=1"),
        _transfer("T: 2 FC ReLU", f"{TRANSFER}.activation=relu"),
        _transfer("T: 3 FC ReLU", f"{TRANSFER}.num_layers=3", f"{TRANSFER}.activation=relu"),
        _transfer("T: 3 FC LeakyReLU", f"{TRANSFER}.num_layers=3"),
        Row("baseline, end to end", "baseline-tiny", protocol="end_to_end"),
        _transfer("transfer, end to end", f"{TRANSFER}.stop_gradient=false", protocol="end_to_end"),
        _transfer("transfer, end to end + stop-gradient", protocol="end_to_end"),
    ),
)

GT = "model.mask_head.train_rois=gt"


def _deep(name: str, head: str, depth: int, *overrides: str) -> Row:
    return Row(
        name,
        "baseline-tiny",
        (GT, f"model.mask_head.name={head}", f"model.mask_head.depth={depth}", *overrides),
    )


DEEPMAC = Study(
    title="Deep-MARC mask heads",
    paper="The surprising impact of mask-head architecture on novel class segmentation "
    "(paper 003): crops of proposals vs ground-truth boxes, ResNet and Hourglass mask heads "
    "of increasing depth, mask resolution. Every head is class-agnostic and trains on the "
    "same frozen detector of its seed; its width is baseline-tiny's (32 channels).",
    reference="(a) proposal crops, FCN-4",
    rows=(
        Row("(a) proposal crops, FCN-4", "baseline-tiny"),
        Row("(b) GT crops, FCN-4", "baseline-tiny", (GT,)),
        _deep("(c) GT crops, ResNet-4", "resnet", 4),
        _deep("(c) GT crops, ResNet-12", "resnet", 12),
        _deep("(c) GT crops, ResNet-20", "resnet", 20),
        _deep("(c) GT crops, Hourglass-10", "hourglass", 10),
        _deep("(c) GT crops, Hourglass-20", "hourglass", 20),
        _deep("(c) GT crops, Hourglass-52", "hourglass", 52),
        _deep("(d) Hourglass-10, 16 x 16 masks", "hourglass", 10, "model.mask_head.resolution=16"),
        _deep("(d) Hourglass-10, 56 x 56 masks", "hourglass", 10, "model.mask_head.resolution=56"),
    ),
)

POOL = "model.roi_pool=pool"

MASKRCNN = Study(
    title="Mask R-CNN ablations",
    paper="Mask R-CNN (paper 004), its ablation table: class-specific vs class-agnostic "
    "masks, independent (sigmoid) vs multinomial (softmax) mask loss, RoIAlign vs RoIPool. "
    "Fully supervised as in the paper (masks for every class: no unseen classes). RoIPool "
    "changes the box head's features too, so its row trains a detector of its own.",
    reference="class-specific, sigmoid, RoIAlign (maskrcnn-tiny)",
    detector_preset="maskrcnn-tiny",
    rows=(
        Row("class-specific, sigmoid, RoIAlign (maskrcnn-tiny)", "maskrcnn-tiny", (ORACLE,)),
        Row(
            "class-agnostic masks", "maskrcnn-tiny", (ORACLE, "model.mask_head.class_agnostic=true")
        ),
        Row(
            "softmax (multinomial) mask loss",
            "maskrcnn-tiny",
            (ORACLE, "model.mask_head.loss=softmax"),
        ),
        Row("RoIPool", "maskrcnn-tiny", (ORACLE, POOL), detector=(POOL,)),
    ),
)

STUDIES: dict[str, Study] = {"maskx": MASKX, "deepmac": DEEPMAC, "maskrcnn": MASKRCNN}
