import pytest

from everyseg.config import ConfigError, load_config, preset_names
from tests.conftest import model_of


def test_bundled_presets_exist_and_load():
    names = set(preset_names())
    assert {"maskrcnn", "baseline", "maskrcnn-tiny", "baseline-tiny"} <= names
    for name in names:
        cfg = load_config(name)
        assert cfg.train.steps > 0


def test_baseline_is_class_agnostic_and_maskrcnn_is_not():
    assert load_config("baseline").model.mask_head.class_agnostic
    assert not load_config("maskrcnn").model.mask_head.class_agnostic
    assert load_config("baseline").data.mask_classes == "voc"
    full = load_config("maskrcnn")
    assert full.model.backbone.name == "resnet50" and full.data.min_size == [800]
    assert full.train.steps == 90000 and full.train.batch_size == 16


def test_overrides_are_typed():
    cfg = load_config("maskrcnn-tiny", ["train.steps=7", "train.lr=1", "data.min_size=[96,128]"])
    assert cfg.train.steps == 7
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.min_size == [96, 128]
    assert load_config("maskrcnn-tiny", ["train.clip_grad_norm=null"]).train.clip_grad_norm is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "train.stepz"),
        ("train.steps=many", "train.steps"),
        ("model.backbone.fpn_channels=1.5", "model.backbone.fpn_channels"),
        ("model.mask_head.class_agnostic=maybe", "model.mask_head.class_agnostic"),
        ("nonsense", "key.subkey=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config("maskrcnn-tiny", [override])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="maskrcnn-tiny"):
        load_config("no-such-preset")


def test_yaml_file_with_base_round_trips(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("_base_: baseline-tiny\ntrain: {steps: 11}\n")
    cfg = load_config(path)
    assert cfg.train.steps == 11 and cfg.model.mask_head.class_agnostic
    again = tmp_path / "resolved.yaml"
    again.write_text(cfg.to_yaml())
    assert load_config(again) == cfg


@pytest.mark.parametrize("preset", ["maskrcnn-tiny", "baseline-tiny"])
def test_tiny_presets_build(preset):
    cfg = load_config(preset)
    model = model_of(cfg, num_classes=15)
    agnostic = cfg.model.mask_head.class_agnostic
    assert model.roi_heads.mask_head.predictor.conv.out_channels == (1 if agnostic else 15)
