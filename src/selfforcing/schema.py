"""Dataclasses from untyped data (YAML, JSON), every value checked against its field's annotation.

A config value of the wrong type does not fail where it is given but deep inside whatever
first uses it (YAML reads ``lr: 3e-4`` as a string, and Adam raises a TypeError a minute
later), and a NaN or a negative learning rate fails nowhere at all. So the annotations of
the config dataclasses are the schema: ``int``, ``float`` (ints accepted, never NaN or
infinite), ``bool``, ``str``, ``dict``, ``list[X]`` / ``tuple[X, ...]``, ``X | None`` and
nested config dataclasses; a field declared with :func:`bounded` also has a range, checked
for the number and for each number in a list.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

from selfforcing.errors import SelfForcingError


@dataclass(frozen=True)
class Range:
    """The interval a number must lie in; ``*_open`` excludes that bound."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    name: str | None = None  # what the message calls it, e.g. "a positive integer"

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.name:
            return self.name
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1, name="a positive integer")
SEED = Range(0, 2**32 - 1)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)
UNIT = Range(0, 1)  # [0, 1]
OPEN_UNIT = Range(0, 1, low_open=True, high_open=True)  # (0, 1)


def bounded(valid: Range, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field whose numbers must lie in ``valid`` (``default`` as in ``field``)."""
    return dataclasses.field(default=default, metadata={"range": valid}, **kwargs)


def build(cls: type, data: Any, where: str = "") -> Any:
    """``cls`` from a mapping, nested config dataclasses included; an unknown or missing key
    and a value of the wrong type or out of range are errors naming the key."""
    if not isinstance(data, dict):
        raise SelfForcingError(f"{where or 'the config'} must be a mapping of keys to values, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    section = where or "top level"
    unknown = sorted(str(key) for key in set(data) - set(fields))
    if unknown:
        raise SelfForcingError(f"unknown config keys in {section}: {', '.join(unknown)}")
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SelfForcingError(f"missing config keys in {section}: {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _value(value, hints[name], fields[name], _key(where, name)) for name, value in data.items()})


def check_values(cls: type, data: dict, where: str) -> None:
    """Check the values of ``data`` that name fields of ``cls`` (unknown keys are the caller's)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in data:
            _value(data[f.name], hints[f.name], f, _key(where, f.name))


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _value(value: Any, hint: Any, f: dataclasses.Field, key: str) -> Any:
    """The value to store in field ``f``: a nested dataclass built, anything else checked."""
    inner = _strip_none(hint)
    if dataclasses.is_dataclass(inner) and value is not None:
        return build(inner, value, key)
    check(value, hint, key, f.metadata.get("range"))
    return value


def check(value: Any, hint: Any, key: str, valid: Range | None = None) -> None:
    """Raise a :class:`SelfForcingError` naming ``key`` unless ``value`` is a ``hint`` (in ``valid``)."""
    if value is None and _strip_none(hint) is not hint:
        return
    hint = _strip_none(hint)
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SelfForcingError(f"{key} must be a list, got {_show(value)}")
        item = typing.get_args(hint)[0]
        for i, element in enumerate(value):
            check(element, item, f"{key}[{i}]", valid)
        return
    expected = _EXPECTED.get(origin or hint)
    if expected is None:  # Any, or a type this schema does not describe
        return
    name, accepts = expected
    if not accepts(value):
        raise SelfForcingError(f"{key} must be {name}, got {_show(value)}{_string_hint(value, hint)}")
    if hint is float and not math.isfinite(value):
        raise SelfForcingError(f"{key} must be a finite number, got {value}")
    if valid is not None and hint in (int, float) and value not in valid:
        raise SelfForcingError(f"{key} must be {valid}, got {value}")


_EXPECTED = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
    dict: ("a mapping", lambda v: isinstance(v, dict)),
}


def _strip_none(hint: Any) -> Any:
    """``X | None`` -> ``X`` (the configs never use other unions)."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return hint


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML: null, true, 'text', 1.5."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_EXPONENT = re.compile(r"([+-]?[0-9_]*\.?[0-9_]*)[eE]([+-]?[0-9]+)")


def _string_hint(value: Any, hint: Any) -> str:
    """Why a number came out a string: YAML 1.1 (PyYAML) reads ``3e-4`` and ``1.0e5`` as
    strings; it needs a dot in the mantissa and a sign in the exponent (``3.0e-4``)."""
    if not isinstance(value, str) or hint not in (int, float):
        return ""
    try:
        number = float(value)
    except ValueError:
        return " (a string)"
    exponent = _EXPONENT.fullmatch(value.strip())
    if exponent and math.isfinite(number):
        mantissa, power = exponent.groups()
        fixed = (mantissa if "." in mantissa else mantissa + ".0") + "e" + (power if power[0] in "+-" else "+" + power)
        return f" (a string; YAML needs a dot and a signed exponent to read a number: {fixed})"
    return " (a string: write it without quotes)" if math.isfinite(number) else " (a string)"
