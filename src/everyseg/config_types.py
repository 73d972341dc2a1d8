"""What a config value may be, declared in the field's type, and the one function checking it.

A field's annotation says everything about its values:

    optimizer: Literal["sgd", "adamw"]             the choices
    lr: Annotated[float, Range(gt=0)]              a number's bounds (a float is always finite,
                                                   an int always fits in 64 bits)
    device: Annotated[str, Pattern(r"...", "...")] a string's syntax
    min_size: Annotated[list[PositiveInt], Length(min=1)]   a list's length, bounds per item

`check_value` applies all of it when a config is loaded, so the code using a value never
re-checks it. A Range bound given as a string names a sibling field of the same section
(`Range(le="fg_iou_thresh")`); `check_relations` checks those once the section is built.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union


class ConfigError(ValueError):
    """A config file, preset name or override that cannot be used; the message names the key."""


_BOUNDS = {
    "ge": (operator.ge, ">="),
    "gt": (operator.gt, ">"),
    "le": (operator.le, "<="),
    "lt": (operator.lt, "<"),
}


@dataclass(frozen=True)
class Range:
    """Bounds of a number: each one a number, or the name of a sibling field."""

    ge: float | str | None = None
    gt: float | str | None = None
    le: float | str | None = None
    lt: float | str | None = None

    def check(self, value: float, key: str) -> None:
        numeric = [(k, bound) for k, bound in self._bounds() if not isinstance(bound, str)]
        if not all(_BOUNDS[k][0](value, bound) for k, bound in numeric):
            raise ConfigError(f"{key}: expected a number {self.describe()}, got {value!r}")

    def check_siblings(self, value: float, key: str, section: Any, prefix: str) -> None:
        for kind, name in self._bounds():
            if not isinstance(name, str):
                continue
            test, symbol = _BOUNDS[kind]
            other = getattr(section, name)
            if not test(value, other):
                raise ConfigError(
                    f"{key}: must be {symbol} {prefix}{name} ({other!r}), got {value!r}"
                )

    def describe(self) -> str:
        low = "[" if self.ge is not None else "(" if self.gt is not None else None
        high = "]" if self.le is not None else ")" if self.lt is not None else None
        lo = self.ge if self.ge is not None else self.gt
        hi = self.le if self.le is not None else self.lt
        if low and high:
            return f"in {low}{lo}, {hi}{high}"
        if low:
            return f"{'>=' if low == '[' else '>'} {lo}"
        return f"{'<=' if high == ']' else '<'} {hi}"

    def _bounds(self) -> list[tuple[str, float | str]]:
        return [(k, getattr(self, k)) for k in _BOUNDS if getattr(self, k) is not None]


@dataclass(frozen=True)
class Pattern:
    """The whole string must match `regex`; `shown` is what the error message lists."""

    regex: str
    shown: str

    def check(self, value: str, key: str) -> None:
        if not re.fullmatch(self.regex, value):
            raise ConfigError(f"{key}: expected {self.shown}, got {value!r}")


@dataclass(frozen=True)
class Length:
    """Bounds of a list's length."""

    min: int = 0
    max: int | None = None

    def check(self, value: list, key: str) -> None:
        if len(value) < self.min or (self.max is not None and len(value) > self.max):
            size = f"{self.min}" if self.min == self.max else f"at least {self.min}"
            items = "item" if self.min == 1 else "items"
            raise ConfigError(f"{key}: expected a list of {size} {items}, got {value!r}")


PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, le=1)]


def check_value(value: Any, hint: Any, key: str) -> Any:
    """`value` (as YAML read it) as the type `hint` declares, or ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *constraints = typing.get_args(hint)
        value = check_value(value, base, key)
        for constraint in constraints:
            constraint.check(value, key)
        return value
    if origin is Literal:
        choices = typing.get_args(hint)
        if value is False and "off" in choices:  # YAML 1.1 reads an unquoted off as false
            return "off"
        if value is True and "on" in choices:  # and an unquoted on as true
            return "on"
        if isinstance(value, str) and value in choices:
            return value
        # an integer choice (model.fcn.stride: 32 | 16 | 8); a bool is no integer here
        if isinstance(value, int) and not isinstance(value, bool) and value in choices:
            return value
        raise ConfigError(f"{key}: expected {_one_of(choices)}, got {value!r}")
    if origin in (Union, types.UnionType):
        return _check_union(value, typing.get_args(hint), key)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [check_value(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float:
        return _finite_float(value, key)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        # torch, numpy and float arithmetic (a schedule's step / steps) all need int64
        if not -(2**63) <= value < 2**63:
            raise ConfigError(f"{key}: expected an integer that fits in 64 bits, got {value!r}")
        return value
    if hint not in (int, float) and isinstance(value, hint):
        return value
    raise ConfigError(f"{key}: expected {type_name(hint)}, got {value!r}")


def check_relations(section: Any, hints: dict[str, Any], prefix: str) -> None:
    """The Range bounds that name sibling fields, checked on a built section."""
    for field in dataclasses.fields(section):
        hint = hints[field.name]
        if typing.get_origin(hint) is not Annotated:
            continue
        for constraint in typing.get_args(hint)[1:]:
            if isinstance(constraint, Range):
                value = getattr(section, field.name)
                constraint.check_siblings(value, prefix + field.name, section, prefix)


def type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Annotated:
        return type_name(typing.get_args(hint)[0])
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check_union(value: Any, options: tuple, key: str) -> Any:
    if value is None and type(None) in options:
        return None
    options = tuple(o for o in options if o is not type(None))
    if len(options) == 1:  # X | None: X's own message says what is wrong
        return check_value(value, options[0], key)
    for option in options:
        try:
            return check_value(value, option, key)
        except ConfigError:
            continue
    raise ConfigError(f"{key}: expected {' or '.join(map(type_name, options))}, got {value!r}")


def _finite_float(value: Any, key: str) -> float:
    # YAML 1.1 reads 1e-3 (no dot) as a string: a float field takes any Python float literal
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got {value!r}") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{key}: expected float, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return number


def _one_of(choices: tuple) -> str:
    names = [str(c) for c in choices]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
