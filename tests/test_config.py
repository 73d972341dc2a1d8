import copy
import dataclasses
import typing
from typing import Literal

import pytest
import torch

from everyseg.config import Config, ConfigError, from_dict, load_config, preset_names
from everyseg.data.validate import POLICIES
from everyseg.engine.initialize import STAGES
from everyseg.engine.optim import OPTIMIZERS, FusedSGD, build_optimizer
from everyseg.modeling.backbone import NORMS, RESNETS
from everyseg.modeling.detector import DETECTORS
from everyseg.modeling.mask_heads import MASK_HEADS, PREDICTORS
from everyseg.modeling.mask_heads.transfer import ACTIVATIONS, TRANSFER_INPUTS
from everyseg.modeling.roi_heads import MASK_ROIS


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
def test_tiny_presets_build(make_model, preset):
    cfg = load_config(preset)
    model = make_model(cfg, num_classes=15)
    agnostic = cfg.model.mask_head.class_agnostic
    assert model.roi_heads.mask_head.predictor.conv.out_channels == (1 if agnostic else 15)


# --- choices: Literal-typed keys, checked at load ------------------------------------------

# every key whose value is one of a fixed list (issue 10 item 6)
CHOICE_KEYS = {
    "data.on_bad_sample",
    "model.detector",
    "model.backbone.name",
    "model.backbone.norm",
    "model.mask_head.name",
    "model.mask_head.predictor",
    "model.transfer.input",
    "model.transfer.activation",
    "train.optimizer",
    "train.schedule",
    "train.on_nonfinite_loss",
    "train.stage",
    "model.mask_head.train_rois",
    "train.amp",
    "train.tensorboard",
    "model.kind",
    "model.fcn.stride",
    "model.roi_pool",
    "model.mask_head.loss",
}


def _fields(cls=Config, prefix=""):
    """(dotted key, type hint) of every leaf key."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, hints[f.name]


def _choices() -> dict[str, tuple[str, ...]]:
    return {k: typing.get_args(h) for k, h in _fields() if typing.get_origin(h) is Literal}


def test_every_choice_key_is_a_checked_literal():
    assert set(_choices()) == CHOICE_KEYS


@pytest.mark.parametrize("key", sorted(CHOICE_KEYS))
def test_a_value_outside_the_choices_is_refused_at_load_naming_key_value_and_choices(key):
    choices = _choices()[key]
    with pytest.raises(ConfigError) as err:
        load_config("maskrcnn-tiny", [f"{key}=bogus"])
    message = str(err.value)
    assert message.startswith(f"{key}: expected ") and "'bogus'" in message
    assert all(str(choice) in message for choice in choices)
    for choice in choices:  # and each choice loads
        assert _get(load_config("maskrcnn-tiny", [f"{key}={choice}"]), key) == choice


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_choices_match_what_the_code_builds():
    assert _choices()["model.backbone.name"] == tuple(RESNETS)
    assert _choices()["model.backbone.norm"] == tuple(NORMS)
    assert _choices()["model.mask_head.name"] == tuple(MASK_HEADS)
    assert _choices()["model.mask_head.predictor"] == tuple(PREDICTORS)
    assert _choices()["model.transfer.input"] == TRANSFER_INPUTS
    assert _choices()["model.transfer.activation"] == tuple(ACTIVATIONS)
    assert _choices()["train.optimizer"] == tuple(OPTIMIZERS)
    assert _choices()["train.stage"] == STAGES
    assert _choices()["model.mask_head.train_rois"] == MASK_ROIS
    assert _choices()["data.on_bad_sample"] == POLICIES
    assert _choices()["model.detector"] == tuple(DETECTORS)


# --- the optimizer -------------------------------------------------------------------------


def test_adamw_is_what_trains_when_the_config_says_adamw(make_model):
    # issue 9 item 3: train.optimizer was never read, adamw trained with SGD
    cfg = load_config("maskrcnn-tiny", ["train.optimizer=adamw", "train.lr=1e-4"])
    model = make_model(cfg, num_classes=15)
    optimizer = build_optimizer(model, cfg.train)
    assert type(optimizer) is torch.optim.AdamW
    assert all(
        g["lr"] == 1e-4 and g["betas"][0] == cfg.train.momentum for g in optimizer.param_groups
    )
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    norms = biases = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                assert id(param) not in decay_of
            elif isinstance(module, (torch.nn.GroupNorm, torch.nn.BatchNorm2d)):
                norms += 1
                assert decay_of.pop(id(param)) == 0.0
            elif name == "bias":
                biases += 1
                assert decay_of.pop(id(param)) == 0.0
            else:
                assert isinstance(
                    module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)
                )
                assert decay_of.pop(id(param)) == cfg.train.weight_decay == 1e-4
    assert decay_of == {} and norms > 0 and biases > 0  # every trained parameter, once


def test_adamw_groups_on_a_small_module():
    conv, norm, linear = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2)
    frozen = torch.nn.Linear(2, 2)
    frozen.requires_grad_(False)
    model = torch.nn.Sequential(conv, norm, linear, frozen, linear)  # linear shared
    cfg = load_config("maskrcnn-tiny", ["train.optimizer=adamw", "train.weight_decay=0.05"])
    decay, no_decay = build_optimizer(model, cfg.train).param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decay["params"] == [conv.weight, linear.weight]
    assert no_decay["params"] == [conv.bias, norm.weight, norm.bias, linear.bias]


def test_sgd_is_unchanged_one_group_all_parameters_decay():
    cfg = load_config("maskrcnn-tiny")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    (group,) = build_optimizer(model, cfg.train).param_groups
    assert isinstance(build_optimizer(model, cfg.train), torch.optim.SGD)
    assert group["params"] == list(model.parameters())
    assert group["weight_decay"] == cfg.train.weight_decay and group["momentum"] == 0.9


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizers_take_torch_s_fused_kernels_to_the_same_steps(name):
    cfg = load_config("maskrcnn-tiny", [f"train.optimizer={name}", "train.lr=0.01"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    twin = copy.deepcopy(model)
    fused = build_optimizer(model, cfg.train)
    assert all(group["fused"] for group in fused.param_groups)
    twin_of = dict(zip(model.parameters(), twin.parameters()))
    loop = type(fused)(
        [
            {**g, "params": [twin_of[p] for p in g["params"]], "fused": None, "foreach": False}
            for g in fused.param_groups
        ]
    )
    for _ in range(3):
        for p, q in twin_of.items():
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    for p, q in twin_of.items():
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p, q.new_zeros(q.shape))


@pytest.mark.parametrize(
    "settings",
    [
        {"momentum": 0.9, "weight_decay": 1e-4},
        {"momentum": 0.9, "nesterov": True},
        {"momentum": 0.0, "weight_decay": 0.1},
        {"momentum": 0.9, "dampening": 0.5, "maximize": True},
    ],
)
def test_fused_sgd_steps_channels_last_weights_as_torch_does_without_copying_them(settings):
    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        convs = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1))
        return convs.to(memory_format=torch.channels_last)

    ours, theirs = model(), model()
    assert ours[0].weight.is_contiguous(memory_format=torch.channels_last)
    fused = FusedSGD(ours.parameters(), lr=0.1, fused=True, **settings)
    torch_s = torch.optim.SGD(theirs.parameters(), lr=0.1, fused=True, **settings)
    x = torch.randn(2, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        for convs, optimizer in ((ours, fused), (theirs, torch_s)):
            optimizer.zero_grad()
            convs(x).square().sum().backward()
        with torch.profiler.profile() as prof:
            fused.step()
        torch_s.step()
        assert not [e for e in prof.events() if e.name == "aten::copy_"]
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q) and p.stride() == q.stride()
        if settings["momentum"]:
            buffers = fused.state[p]["momentum_buffer"], torch_s.state[q]["momentum_buffer"]
            assert torch.equal(*buffers)
        else:
            assert fused.state[p] == {}


def test_bogus_optimizer_is_a_config_error_at_load():
    with pytest.raises(ConfigError, match=r"train\.optimizer: expected sgd or adamw, got 'adam'"):
        load_config("maskrcnn-tiny", ["train.optimizer=adam"])


# --- numbers: finite and in range, checked at load -----------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=-1e-3", r"train\.lr: expected a number >= 0, got -0\.001"),
        ("train.lr=nan", r"train\.lr: expected a finite number, got nan"),
        ("train.lr=.nan", r"train\.lr: expected a finite number, got nan"),
        ("train.weight_decay=.inf", r"train\.weight_decay: expected a finite number, got inf"),
        ("train.gamma=-.inf", r"train\.gamma: expected a finite number"),
        ("train.lr=1e999", r"train\.lr: expected a finite number"),
        ("train.weight_decay=-1", r"train\.weight_decay: expected a number >= 0"),
        ("train.momentum=1", r"train\.momentum: expected a number in \[0, 1\), got 1"),
        ("train.gamma=0", r"train\.gamma: expected a number in \(0, 1\]"),
        ("train.warmup_factor=2", r"train\.warmup_factor: expected a number in \[0, 1\]"),
        ("train.clip_grad_norm=0", r"train\.clip_grad_norm: expected a number > 0"),
        ("train.steps=0", r"train\.steps: expected a number >= 1, got 0"),
        ("train.steps=1e5", r"train\.steps: expected int, got '1e5'"),
        ("train.steps=99999999999999999999", r"train\.steps: expected an integer that fits"),
        ("train.batch_size=-2", r"train\.batch_size: expected a number >= 1"),
        ("train.checkpoint_every=0", r"train\.checkpoint_every: expected a number >= 1"),
        ("train.log_every=0", r"train\.log_every"),
        ("train.eval_every=-1", r"train\.eval_every: expected a number >= 0"),
        ("train.keep_every=-1", r"train\.keep_every"),
        ("train.warmup_steps=-1", r"train\.warmup_steps"),
        ("train.milestones=[100, -1]", r"train\.milestones\[1\]: expected a number >= 0"),
        ("train.seed=-1", r"train\.seed: expected a number in \[0, 4294967295\]"),
        (
            "model.mask_head.roi_jitter=2",
            r"model\.mask_head\.roi_jitter: expected a number in \[0, 1\]",
        ),
        ("train.device=gpu", r"train\.device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        ("train.device=cuda:x", r"train\.device"),
        ("data.hflip_prob=1.5", r"data\.hflip_prob: expected a number in \[0, 1\]"),
        ("data.min_size=[]", r"data\.min_size: expected a list of at least 1 item"),
        ("data.min_size=[0]", r"data\.min_size\[0\]: expected a number >= 1"),
        ("data.max_size=0", r"data\.max_size"),
        ("data.test_min_size=-5", r"data\.test_min_size"),
        ("data.num_workers=-1", r"data\.num_workers: expected a number >= 0"),
        ("model.rpn.anchor_sizes=[32, 64]", r"model\.rpn\.anchor_sizes: expected a list of 5"),
        ("model.rpn.anchor_sizes=[0, 1, 2, 3, 4]", r"model\.rpn\.anchor_sizes\[0\]"),
        (
            "model.rpn.aspect_ratios=[0.5, 0]",
            r"model\.rpn\.aspect_ratios\[1\]: expected a number > 0",
        ),
        ("model.rpn.nms_thresh=1.5", r"model\.rpn\.nms_thresh"),
        ("model.rpn.positive_fraction=-0.1", r"model\.rpn\.positive_fraction"),
        (
            "model.rpn.bg_iou_thresh=0.8",
            r"model\.rpn\.bg_iou_thresh: must be <= model\.rpn\.fg_iou_thresh \(0\.7\), got 0\.8",
        ),
        ("model.box_head.fg_iou_thresh=0.2", r"model\.box_head\.bg_iou_thresh: must be <="),
        ("model.box_head.score_thresh=-0.1", r"model\.box_head\.score_thresh"),
        ("model.box_head.detections_per_img=0", r"model\.box_head\.detections_per_img"),
        ("model.backbone.trainable_layers=6", r"model\.backbone\.trainable_layers: .* \[0, 5\]"),
        ("model.backbone.fpn_channels=0", r"model\.backbone\.fpn_channels"),
        ("model.mask_head.channels=0", r"model\.mask_head\.channels"),
        ("model.mask_head.resolution=-28", r"model\.mask_head\.resolution"),
        ("model.mask_head.mlp_layers=0", r"model\.mask_head\.mlp_layers"),
        ("model.transfer.num_layers=4", r"model\.transfer\.num_layers: .* \[1, 3\]"),
        ("model.transfer.hidden_dim=0", r"model\.transfer\.hidden_dim"),
    ],
)
def test_numbers_out_of_range_or_not_finite_are_refused_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("maskrcnn-tiny", [override])


def test_edges_of_the_ranges_load():
    cfg = load_config(
        "maskrcnn-tiny",
        [
            "data.hflip_prob=0",
            "train.momentum=0",
            "train.weight_decay=0",
            "train.gamma=1",
            "train.warmup_steps=0",
            "model.mask_head.roi_jitter=1",
            "model.rpn.bg_iou_thresh=0.7",
            "model.backbone.trainable_layers=0",
        ],
    )
    assert cfg.data.hflip_prob == 0.0 and cfg.model.rpn.bg_iou_thresh == 0.7
    for device in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert load_config("maskrcnn-tiny", [f"train.device={device}"]).train.device == device


def test_defaults_satisfy_their_own_declarations():
    assert from_dict(Config().to_dict()) == Config()


def test_exponent_floats_are_floats_in_overrides_and_files(tmp_path):
    # YAML 1.1 reads 1e-3 (no dot) as a string; a float key takes it as the number it is
    cfg = load_config("maskrcnn-tiny", ["train.lr=1e-3", "train.weight_decay=5E-5"])
    assert cfg.train.lr == 0.001 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == 5e-5
    path = tmp_path / "adamw.yaml"
    path.write_text("_base_: maskrcnn-tiny\ntrain: {lr: 1e-4, clip_grad_norm: 1e1}\n")
    cfg = load_config(path)
    assert cfg.train.lr == 1e-4 and cfg.train.clip_grad_norm == 10.0
    assert load_config(
        "maskrcnn-tiny", ["model.rpn.aspect_ratios=[5e-1, 1, 2e0]"]
    ).model.rpn.aspect_ratios == [0.5, 1.0, 2.0]


# --- malformed files and overrides ---------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=[1,", r"override 'train\.lr=\[1,': not valid YAML"),
        ("train..lr=1", "key.subkey=value"),
        ("=1", "key.subkey=value"),
        ("train={1: 2}", r"unknown config key\(s\) train\.1"),
        ("train=3", "train: expected a mapping, got 3"),
        ("train.steps.x=1", "'steps' is not a section"),
        ("train.lr=!!python/object/apply:os.system [ls]", "not valid YAML"),
        ("train.milestones=" + "[" * 5000 + "]" * 5000, "nested too deeply"),
    ],
)
def test_malformed_overrides_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("maskrcnn-tiny", [override])


def test_base_loops_and_bad_base_are_config_errors(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"_base_: {b}\n")
    b.write_text(f"_base_: {a}\n")
    with pytest.raises(ConfigError, match="_base_ chain loops"):
        load_config(a)
    a.write_text("_base_: [maskrcnn]\n")
    with pytest.raises(ConfigError, match="_base_ must be a preset name or a YAML path"):
        load_config(a)
    a.write_bytes(b"train: {steps: \xff}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(a)
