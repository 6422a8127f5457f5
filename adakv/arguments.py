"""Argument checks shared by the public entry points (cache helpers, `press(model)`, `accelerate`,
`prefill_in_chunks`, the pipeline): a wrong type or value raises a TypeError / ValueError that names the
argument, what was given and what is allowed. Like adakv/models.py, anything may use it; it uses nothing of
adakv. Numbers follow the press fields' rule: numpy numbers are taken, bools are never taken for numbers.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a ValueError too, which some of these checks raised before)."""


def given(value: Any) -> str:
    """`value` as a message shows it: its repr and its type."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_integer(name: str, value: Any, minimum: int, owner: str) -> int:
    """`value` as an int >= minimum, or a TypeError / ValueError naming `owner`'s argument `name`."""
    if not is_integer(value):
        raise TypeError(f"{owner}: {name} must be an integer >= {minimum}, got {given(value)}.")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_flag(name: str, value: Any, owner: str, choices: tuple = (False, True)) -> Any:
    """`value` when it is one of `choices` (bools compared by identity, so 1 is not True), else ArgumentTypeError."""
    if isinstance(value, np.bool_):
        value = bool(value)
    if any(value is choice or (not isinstance(choice, bool) and value == choice) for choice in choices):
        return value
    raise ArgumentTypeError(f"{owner}: {name} must be one of {choices}, got {given(value)}.")


def check_model(model: Any, owner: str) -> None:
    """A transformers model: a torch Module with a `config` (what from_pretrained / from_config return)."""
    from torch import nn

    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(
            f"{owner} takes a transformers model (a torch.nn.Module with a config, e.g. from "
            f"AutoModelForCausalLM.from_pretrained), got {given(model)}."
        )
