"""Property: any `--set key=value` gives a Config or a ConfigError, never another exception,
and a config that loads builds its optimizer and schedule, whose learning rates are finite.

Keys are every config key and section (plus junk); values are the near misses a user types:
choices and typos, numbers at and past every edge (NaN, inf, 1e999, 2**64), exponent floats,
strings, lists, nested mappings and broken YAML.
"""

import dataclasses
import math
import typing

import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from everyseg.config import Config, ConfigError, load_config
from everyseg.engine.optim import build_optimizer, build_scheduler, lr_factor


def _keys(cls=Config, prefix=""):
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        yield prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _keys(hints[f.name], f"{prefix}{f.name}.")


def _hints(cls=Config, prefix=""):
    hints = typing.get_type_hints(cls, include_extras=True)
    for name, hint in hints.items():
        if dataclasses.is_dataclass(hint):
            yield from _hints(hint, f"{prefix}{name}.")
        else:
            yield prefix + name, hint


def _near_misses(hint) -> tuple[str, ...]:
    """Values a user might type for a key of this type, valid or just not."""
    if typing.get_origin(hint) is typing.Literal:
        return (*map(str, typing.get_args(hint)), "bogus", "1")  # as typed after --set
    text = str(hint)
    if "list" in text:
        return ("[]", "[0]", "[10, 100]", "[5, -1]", "[1e-3, 2]", "[8, 16, 32, 64, 128]", "7")
    if "bool" in text:
        return ("true", "false", "1", "null")
    if "str" in text:
        return ("cpu", "cuda", "cuda:3", "mps", "gpu", "null", "3")
    return ("0", "1", "3", "0.5", "0.999", "1e-3", "2.5E-4", "1e5", "-1", "nan", "1e999", "null")


HINTS = dict(_hints())
KEYS = sorted(_keys())
EDGES = [
    *sorted({v for hint in HINTS.values() for v in _near_misses(hint)}),
    *("0", "1", "-1", "0.5", "1.0", "2", "1e-3", "-1e-3", "1E5", "1e999", "-1e999", "1_000"),
    *("nan", ".nan", "inf", ".inf", "-.inf", "2**64", str(2**63), str(2**64), str(10**400)),
    *("null", "~", "", "[]", "{}", "[1, 2, 3, 4, 5]", "[0.5, 1, 2]", "yes", "0x10", "auto"),
    *("cuda:0", "cuda:-1", "{a: [", "'", '"\\x"', "&a [*a]", "!!python/object:os.system"),
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
structures = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
).map(lambda value: yaml.safe_dump(value, default_flow_style=True))
values = st.one_of(
    st.sampled_from(EDGES),
    scalars.map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    structures,
    st.text(max_size=20),
)


def near_miss(keys: list[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(keys).flatmap(
        lambda key: st.sampled_from(_near_misses(HINTS[key])).map(f"{key}={{}}".format)
    )


overrides = st.lists(
    st.one_of(
        near_miss(sorted(HINTS)),
        st.builds("{}={}".format, st.sampled_from(KEYS), values),
        st.builds("{}={}".format, st.text(max_size=10), values),
        st.text(max_size=20),
    ),
    max_size=4,
)
train_overrides = st.lists(near_miss([k for k in HINTS if k.startswith("train.")]), max_size=4)


@settings(max_examples=400, derandomize=True, deadline=None)
@given(overrides)
def test_any_override_loads_or_is_a_config_error(items):
    try:
        cfg = load_config("maskrcnn-tiny", items)
    except ConfigError:
        return
    assert isinstance(cfg, Config)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(train_overrides)
def test_a_loaded_train_config_builds_its_optimizer_and_finite_schedule(items):
    try:
        cfg = load_config("maskrcnn-tiny", items)
    except ConfigError:
        return
    tc = cfg.train
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc)
    model(torch.ones(1, 3, 5, 5)).square().mean().backward()
    if tc.clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_grad_norm)
    optimizer.step()
    scheduler.step()
    steps = {0, 1, tc.warmup_steps - 1, tc.warmup_steps, tc.steps - 1, tc.steps, *tc.milestones}
    for step in sorted(s for s in steps if 0 <= s <= tc.steps):
        factor = lr_factor(step, tc)
        assert 0.0 <= factor <= 1.0 and math.isfinite(tc.lr * factor)
    assert all(math.isfinite(g["lr"]) for g in optimizer.param_groups)
