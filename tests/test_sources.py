"""data.train_sources: merged vocabulary, shared images, duplicates, sizes, val images left
out, sampling weights, check-data, VOC / COCO spellings and a background category."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from everyseg.commands.check_data import check_data
from everyseg.config import ConfigError, DataConfig, SourceConfig, load_config
from everyseg.data.build import build_dataset, build_merged_index
from everyseg.data.index import CocoIndex
from everyseg.data.splits import resolve_mask_classes, voc_spelling_note
from everyseg.data.validate import DataError
from everyseg.data.vocabulary import read_class_aliases
from everyseg.engine.load import load_run
from everyseg.engine.sampler import StepBatchSampler

from coco_json import ann, image_entry


def write_source(root: Path, name: str, *, images, annotations, categories) -> Path:
    """`root/name.json` and its images in `root/name/`, as conftest's CocoFiles writes them."""
    from conftest import CocoFiles

    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for img in images:
        CocoFiles.write_image(folder / img["file_name"], img["width"], img["height"])
    path = root / f"{name}.json"
    data = {"images": images, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(data))
    return path


def box_only(ann_id: int, image_id: int = 1, **fields) -> dict:
    entry = ann(ann_id, image_id, **fields)
    del entry["segmentation"]
    return entry


COUCH = [[20, 5, 30, 5, 30, 15, 20, 15]]
COCO_CATS = [{"id": 1, "name": "cat"}, {"id": 3, "name": "couch"}]
VG_CATS = [{"id": 1, "name": "sofa"}, {"id": 2, "name": "kitty"}, {"id": 3, "name": "lamp"}]


@pytest.fixture
def two_sources(tmp_path):
    """A COCO-like source (images 1, 2; masks) and a VG-like one (boxes only) whose image 7
    is COCO image 1 (coco_id) and image 8 a picture of its own."""
    coco = write_source(
        tmp_path,
        "coco",
        images=[image_entry(1, "a.png"), image_entry(2, "b.png")],
        annotations=[
            ann(10),
            ann(
                11,
                category_id=3,
                bbox=[20, 5, 10, 10],
                segmentation=[[20, 5, 30, 5, 30, 15, 20, 15]],
            ),
            ann(20, 2),
        ],
        categories=COCO_CATS,
    )
    vg_images = [dict(image_entry(7, "g.png"), coco_id=1), image_entry(8, "h.png")]
    vg = write_source(
        tmp_path,
        "vg",
        images=vg_images,
        annotations=[
            box_only(70, 7, category_id=2, bbox=[2, 3, 10, 9]),  # COCO's ann 10, again
            box_only(71, 7, category_id=3, bbox=[25, 15, 10, 10]),  # a lamp only VG has
            box_only(80, 8, category_id=1, bbox=[5, 5, 20, 20]),
        ],
        categories=VG_CATS,
    )
    aliases = tmp_path / "aliases.yaml"
    aliases.write_text("kitty: cat\n")
    return tmp_path, coco, vg, aliases


def sources_config(coco, vg, aliases=None, **data) -> DataConfig:
    return DataConfig(
        train_sources=[
            SourceConfig(json=str(coco), images=str(coco.with_suffix(""))),
            SourceConfig(json=str(vg), images=str(vg.with_suffix("")), mask_classes="none"),
        ],
        class_aliases=None if aliases is None else str(aliases),
        min_size=[30],
        max_size=100,
        **data,
    )


def test_train_sources_exclusive_with_the_one_source_keys():
    with pytest.raises(ConfigError, match="data.train_sources and data.train_json"):
        load_config("maskrcnn-tiny", ["data.train_sources=[{json: a.json, images: img}]"])
    with pytest.raises(ConfigError, match=r"train_sources\[0\].images must be set"):
        DataConfig(train_sources=[SourceConfig(json="a.json")])


def test_merged_vocabulary_by_name_aliases_and_voc_spellings(two_sources):
    _, coco, vg, aliases = two_sources
    merged = build_merged_index(sources_config(coco, vg, aliases), decode_images=False)
    assert merged.class_names == ["cat", "couch", "lamp"]
    # COCO's category ids kept; the lamp takes the next id above every id taken
    assert merged.label_to_cat_id == {1: 1, 2: 3, 3: 4}
    assert merged.mask_class_names == ["cat", "couch"]
    notes = merged.vocabulary.notes
    assert "vg.json: 'sofa' matched 'couch' (VOC / COCO spelling)" in notes
    assert "vg.json: 'kitty' matched 'cat' (data.class_aliases)" in notes


def test_shared_image_merged_without_duplicate_boxes(two_sources):
    _, coco, vg, aliases = two_sources
    dataset = build_dataset(sources_config(coco, vg, aliases), split="train")
    merged = dataset.index
    assert len(dataset) == 3  # COCO 1 (= VG 7), COCO 2, VG 8
    _, target = dataset[0]
    # COCO's cat and couch, VG's lamp; VG's kitty box (IoU 0.9 with COCO's cat) dropped
    assert target["ann_ids"].tolist() == [10, 11, 71]
    assert target["labels"].tolist() == [1, 2, 3]
    assert target["has_mask"].tolist() == [True, True, False]
    assert merged.counts[1].shared == 1 and merged.counts[1].duplicates == 1
    assert "merged into an earlier source's copy" in dataset.summary()
    # merged instances are read-only columns (no Python object per instance for workers to
    # copy), ann ids and masks read from the source that gave each row
    assert not merged.instances.labels.flags.writeable
    assert merged.instances.has_mask.tolist()[:3] == [True, True, False]


def test_duplicate_with_a_mask_replaces_a_box_only_one(tmp_path):
    boxes = write_source(
        tmp_path, "boxes", images=[image_entry(1, "a.png")], annotations=[box_only(1)],
        categories=COCO_CATS,
    )  # fmt: skip
    masks = write_source(
        tmp_path, "masks", images=[dict(image_entry(5, "a.png"), coco_id=1)],
        annotations=[ann(9, 5)], categories=COCO_CATS,
    )  # fmt: skip
    cfg = DataConfig(
        train_sources=[
            SourceConfig(json=str(boxes), images=str(tmp_path / "boxes"), mask_classes="none"),
            SourceConfig(json=str(masks), images=str(tmp_path / "masks")),
        ],
        min_size=[30],
    )
    _, target = build_dataset(cfg, split="train")[0]
    assert target["ann_ids"].tolist() == [9]
    assert target["has_mask"].tolist() == [True]


def test_other_size_scaled_and_other_aspect_kept_apart(tmp_path):
    coco = write_source(
        tmp_path, "coco", images=[image_entry(1, "a.png"), image_entry(2, "b.png")],
        annotations=[ann(1), ann(2, 2)], categories=COCO_CATS,
    )  # fmt: skip
    big = dict(image_entry(7, "g.png", width=80, height=60), coco_id=1)  # twice the size
    wide = dict(image_entry(8, "h.png", width=60, height=30), coco_id=2)  # another aspect
    vg = write_source(
        tmp_path, "vg", images=[big, wide],
        annotations=[ann(70, 7, bbox=[40, 30, 20, 20], segmentation=[[40, 30, 60, 30, 60, 50]]),
                     ann(80, 8)],
        categories=COCO_CATS,
    )  # fmt: skip
    cfg = sources_config(coco, vg)
    cfg.train_sources[1].mask_classes = "all"  # type: ignore[index]
    dataset = build_dataset(cfg, split="train")
    counts = dataset.index.counts[1]
    assert len(dataset) == 3 and counts.rescaled == 1 and counts.masks_dropped == 1
    assert counts.kept_apart[0].startswith("image 8 (60x30) kept apart from coco.json image 2")
    _, target = dataset[0]
    assert target["boxes"][1].tolist() == [20.0, 15.0, 30.0, 25.0]  # halved
    assert target["has_mask"].tolist() == [True, False]


def test_val_images_left_out_of_every_source(two_sources):
    root, coco, vg, aliases = two_sources
    # val image 2 is COCO's b.png (same file); val image 9 is VG 8's picture by coco_id
    val = write_source(
        root, "val", images=[image_entry(2, "b.png"), image_entry(9, "v.png")],
        annotations=[ann(1, 2)], categories=COCO_CATS,
    )  # fmt: skip
    (root / "val" / "b.png").unlink()
    vg_data = json.loads(vg.read_text())
    vg_data["images"][1]["coco_id"] = 9
    vg.write_text(json.dumps(vg_data))
    cfg = sources_config(coco, vg, aliases, val_json=str(val), val_images=str(coco.with_suffix("")))
    merged = build_dataset(cfg, split="train").index
    assert [c.val_excluded for c in merged.counts] == [[2], [8]]
    assert len(merged.image_ids) == 1
    # a coco_id of a COCO-source training image is that image, whatever val numbers
    vg_data["images"][1]["coco_id"] = 1
    vg.write_text(json.dumps(vg_data))
    assert build_merged_index(cfg, decode_images=False).counts[1].val_excluded == []


def test_weights_sample_in_proportion_and_resume_and_ranks_agree():
    weights = [1.0, 1.0, 3.0, 0.5]
    sampler = StepBatchSampler(num_items=4, batch_size=4, seed=1, weights=weights)
    stream = iter(sampler)
    drawn = np.bincount([i for _ in range(2000) for i, _ in next(stream)], minlength=4)
    assert np.allclose(drawn / drawn.sum(), np.array(weights) / sum(weights), atol=0.02)
    whole = [b for b, _ in zip(StepBatchSampler(num_items=4, batch_size=4, seed=1,
             weights=weights), range(40))]  # fmt: skip
    resumed = iter(StepBatchSampler(num_items=4, batch_size=4, seed=1, weights=weights,
                                    start_step=23))  # fmt: skip
    assert [next(resumed) for _ in range(17)] == whole[23:]
    ranks = [
        iter(StepBatchSampler(num_items=4, batch_size=4, seed=1, weights=weights, start_step=5,
                              rank=r, world_size=2))
        for r in range(2)
    ]  # fmt: skip
    assert [next(ranks[0]) + next(ranks[1]) for _ in range(10)] == whole[5:15]
    plain = StepBatchSampler(num_items=4, batch_size=4, seed=1)
    ones = StepBatchSampler(num_items=4, batch_size=4, seed=1, weights=[1.0] * 4)
    assert [b for b, _ in zip(ones, range(9))] == [b for b, _ in zip(plain, range(9))]


def test_merged_image_drawn_at_its_sources_highest_weight(two_sources):
    _, coco, vg, aliases = two_sources
    cfg = sources_config(coco, vg, aliases)
    cfg.train_sources[1].weight = 2.0  # type: ignore[index]
    assert build_dataset(cfg, split="train").sample_weights == [2.0, 1.0, 2.0]


def test_check_data_reports_each_source_and_the_merge(two_sources, tmp_path):
    _, coco, vg, aliases = two_sources
    config = tmp_path / "sources.yaml"
    cfg = sources_config(coco, vg, aliases)
    sources = [vars(s) for s in cfg.train_sources or []]
    config.write_text(json.dumps({"data": {"train_sources": sources,
                                           "class_aliases": str(aliases)}}))  # fmt: skip
    config = config.rename(tmp_path / "sources.yml")
    reports = check_data(source=str(config))
    assert [r["split"] for r in reports] == [
        "train_sources[0]", "train_sources[1]", "train (merged)",
    ]  # fmt: skip
    merged = reports[-1]
    assert merged["images"] == 3 and merged["sources"][1]["duplicates"] == 1
    assert [c["name"] for c in merged["classes"]] == ["cat", "couch", "lamp"]
    assert any("'sofa' matched 'couch'" in note for note in merged["name_matches"])


def test_one_source_gives_the_one_source_shorthand_dataset(synth_paths):
    short = DataConfig(
        train_json=synth_paths["train_json"], train_images=synth_paths["train_images"],
        mask_classes="voc", min_size=[64],
    )  # fmt: skip
    listed = DataConfig(
        train_sources=[SourceConfig(json=synth_paths["train_json"],
                                    images=synth_paths["train_images"], mask_classes="voc")],
        min_size=[64],
    )  # fmt: skip
    a = build_dataset(short, split="train", mask_classes="circle,star")
    b = build_dataset(listed, split="train", mask_classes="circle,star")
    assert (b.class_names, b.label_to_cat_id) == (a.class_names, a.label_to_cat_id)
    assert b.mask_class_names == a.mask_class_names == ["circle", "star"]
    for i in range(len(a)):
        for key in ("boxes", "labels", "has_mask", "ann_ids"):
            assert a[i][1][key].tolist() == b[i][1][key].tolist()


def test_run_record_of_several_sources_evaluates_on_val(synth_paths, train_tiny, tmp_path):
    # the synth train set, and a box-only copy of it naming each image by coco_id
    data = json.loads(Path(synth_paths["train_json"]).read_text())
    for img in data["images"]:
        img["coco_id"], img["id"] = img["id"], img["id"] + 100
    for entry in data["annotations"]:
        entry["image_id"] += 100
        entry.pop("segmentation")
    copy = tmp_path / "boxes.json"
    copy.write_text(json.dumps(data))
    sources = (
        f"[{{json: {synth_paths['train_json']}, images: {synth_paths['train_images']}, "
        f"mask_classes: [circle, star]}}, {{json: {copy}, images: {synth_paths['train_images']}, "
        "mask_classes: none, weight: 2}]"
    )
    val = {k: v for k, v in synth_paths.items() if k.startswith("val")}
    run = train_tiny(tmp_path / "run", "train.steps=2", "train.eval_every=2",
                     "data.train_json=null", "data.train_images=null",
                     f"data.train_sources={sources}", paths=val)  # fmt: skip
    record = load_run(run.root, device="cpu").record
    single = CocoIndex(json_path=synth_paths["val_json"], images_dir=synth_paths["val_images"])
    assert record.class_names == single.class_names
    assert record.label_to_cat_id == single.label_to_cat_id
    assert record.mask_classes == ["circle", "star"]
    assert (run.checkpoints / "best.pt").is_file()  # evaluated on val during training


def test_voc_split_accepts_voc_spellings_and_says_which_matched():
    names = ["aeroplane", "person", "diningtable", "zebra"]
    assert resolve_mask_classes("voc", names) == ["aeroplane", "person", "diningtable"]
    assert resolve_mask_classes("nonvoc", names) == ["zebra"]
    note = voc_spelling_note("voc", names)
    assert note == (
        "data.mask_classes=voc: VOC spellings matched: 'aeroplane' as 'airplane', "
        "'diningtable' as 'dining table'"
    )
    assert voc_spelling_note("voc", ["airplane"]) is None


def test_start_up_summary_says_which_voc_spellings_matched(coco_files):
    coco_files.write_dataset(categories=[{"id": 1, "name": "sofa"}, {"id": 2, "name": "dog"}])
    summary = coco_files.load(mask_classes="voc").summary()
    assert summary.endswith("data.mask_classes=voc: VOC spellings matched: 'sofa' as 'couch'")


def test_background_category_0_is_not_a_class(coco_files):
    categories = [{"id": 0, "name": "background"}, *COCO_CATS]
    coco_files.write_dataset(categories=categories, annotations=[ann(10), ann(11, category_id=0)])
    dataset = coco_files.load()
    assert dataset.class_names == ["cat", "couch"]
    assert coco_files.found(dataset, "skipped_annotations") == {"unknown_category": [11]}


def test_class_aliases_file_must_be_a_flat_mapping_without_chains(tmp_path):
    chained = tmp_path / "aliases.yaml"
    chained.write_text("kitty: cat\ncat: feline\n")
    chain = "'kitty' -> 'cat', but 'cat' is itself an alias of 'feline'"
    with pytest.raises(ConfigError, match=chain):
        read_class_aliases(chained)
    with pytest.raises(ConfigError, match="file not found"):
        read_class_aliases(tmp_path / "missing.yaml")


def test_box_only_source_with_mask_classes_all_names_its_key(two_sources):
    _, coco, vg, aliases = two_sources
    cfg = sources_config(coco, vg, aliases)
    cfg.train_sources[1].mask_classes = "all"  # type: ignore[index]
    with pytest.raises(DataError, match=r"set data.train_sources\[1\].mask_classes=none"):
        build_dataset(cfg, split="train")
