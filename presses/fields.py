"""Rules for press fields: what values each field takes.

A press names a rule per field in its `field_rules` (merged along the class hierarchy). `BasePress.__setattr__`
applies the rule on every assignment, in the constructor and after it (`press.compression_ratio = 0.4`), so
both raise the same error. A rule returns the value to store: numbers arrive as plain Python floats and ints
whatever real type they came as (numpy scalars included); bools are never taken for numbers.

Wrong types raise `FieldTypeError` (a TypeError, and a ValueError as well, which these checks raised before);
values of the right type outside the allowed range raise ValueError. Every message names the field, what was
given and what is allowed.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

REAL_TYPES_NOTE = "ints, floats and numpy numbers are taken; bools and strings are not"
INTEGER_TYPES_NOTE = "ints and numpy integers are taken; bools, floats and strings are not"


class FieldTypeError(TypeError, ValueError):
    """A press field was given a value of the wrong type."""


class FieldRule(Protocol):
    def check(self, name: str, value: Any, owner: str) -> Any:
        """The value to store for field `name` of press class `owner`, or raise."""


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def given(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


@dataclass(frozen=True)
class Real:
    """A finite real number >= minimum and, when `maximum` is set, <= it (< it if not `maximum_included`)."""

    minimum: float
    maximum: float | None = None
    maximum_included: bool = True

    @property
    def allowed(self) -> str:
        if self.maximum is None:
            return f"a number >= {self.minimum:g}"
        closing = "]" if self.maximum_included else ")"
        return f"a number in [{self.minimum:g}, {self.maximum:g}{closing}"

    def in_range(self, value: float) -> bool:
        if not math.isfinite(value) or value < self.minimum:
            return False
        if self.maximum is None:
            return True
        return value <= self.maximum if self.maximum_included else value < self.maximum

    def check(self, name: str, value: Any, owner: str) -> float:
        if not is_real(value):
            raise FieldTypeError(f"{name} must be {self.allowed}, got {given(value)}; {REAL_TYPES_NOTE}.")
        if not self.in_range(float(value)):
            raise ValueError(f"{name} must be {self.allowed}, got {value!r}.")
        return float(value)


FRACTION = Real(0.0, 1.0)
RATIO = Real(0.0, 1.0, maximum_included=False)


@dataclass(frozen=True)
class Integer:
    """An integer >= minimum; odd when `odd`; None also allowed when `optional`."""

    minimum: int
    odd: bool = False
    optional: bool = False

    @property
    def allowed(self) -> str:
        kind = "an odd integer" if self.odd else "an integer"
        return f"{'None or ' if self.optional else ''}{kind} >= {self.minimum}"

    def check(self, name: str, value: Any, owner: str) -> int | None:
        if value is None and self.optional:
            return None
        if not is_integer(value):
            raise FieldTypeError(f"{name} must be {self.allowed}, got {given(value)}; {INTEGER_TYPES_NOTE}.")
        if value < self.minimum or (self.odd and value % 2 == 0):
            raise ValueError(f"{name} must be {self.allowed}, got {value!r}.")
        return int(value)


@dataclass(frozen=True)
class Flag:
    """True or False (a numpy bool too)."""

    def check(self, name: str, value: Any, owner: str) -> bool:
        if not isinstance(value, (bool, np.bool_)):
            raise FieldTypeError(f"{name} must be True or False, got {given(value)}.")
        return bool(value)


@dataclass(frozen=True)
class OneOf:
    """One of `choices` (None too when `optional`); `note` explains the choices."""

    choices: tuple
    optional: bool = False
    note: str = ""

    def check(self, name: str, value: Any, owner: str) -> Any:
        if (value is None and self.optional) or (value is not None and value in self.choices):
            return value
        allowed = f"one of {self.choices}{' or None' if self.optional else ''}{self.note}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")


@dataclass(frozen=True)
class RealList:
    """A non-empty list or tuple of numbers that each satisfy `element` (`what`: what the list holds); stored
    as a list of floats."""

    element: Real
    what: str

    def check(self, name: str, value: Any, owner: str) -> list[float]:
        if not isinstance(value, (list, tuple)) or not value:
            raise FieldTypeError(
                f"{name} must be a non-empty list of numbers in {self.element.allowed.removeprefix('a number in ')}, "
                f"{self.what}, got {given(value)}."
            )
        return [self.element.check(f"{name}[{i}]", item, owner) for i, item in enumerate(value)]


@dataclass(frozen=True)
class TokenIds:
    """None or a sequence of token ids (integers >= 0), stored as a tuple of ints."""

    def check(self, name: str, value: Any, owner: str) -> tuple[int, ...] | None:
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or not all(is_integer(i) and i >= 0 for i in value):
            raise FieldTypeError(f"{name} must be a tuple of token ids (ints >= 0) or None, got {value!r}.")
        return tuple(int(i) for i in value)


@dataclass(frozen=True)
class Tokenizer:
    """None, or something that encodes text as a transformers tokenizer does (`tokenizer(text).input_ids`)."""

    def check(self, name: str, value: Any, owner: str) -> Any:
        if value is not None and not callable(value):
            raise FieldTypeError(
                f"{owner}'s {name} must be the model's tokenizer (e.g. AutoTokenizer.from_pretrained(name)) or None, "
                f"got {type(value).__name__}."
            )
        return value


@dataclass(frozen=True)
class Text:
    """A str."""

    def check(self, name: str, value: Any, owner: str) -> str:
        if not isinstance(value, str):
            raise FieldTypeError(f"{name} must be a str, got {type(value).__name__}.")
        return value


@dataclass(frozen=True)
class Check:
    """A check function `function(value, owner)` that raises on a wrong value; the value is stored as given
    (e.g. `check_is_press` for a wrapper's inner press)."""

    function: Callable[[Any, str], None]

    def check(self, name: str, value: Any, owner: str) -> Any:
        self.function(value, owner)
        return value
