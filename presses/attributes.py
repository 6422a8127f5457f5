"""Which attribute names a press takes: a misspelt one is an error, not a new attribute.

Python lets `press.compresion_ratio = 0.5` create a new attribute next to `compression_ratio`, and the press
then runs with its old ratio without a word. `BasePress.__setattr__` asks `check_known_attribute` first: a
name is known when the class declares it (a dataclass field, an annotated name, a class attribute, a method
or a property anywhere in its MRO); anything else raises an AttributeError that names the field, lists the
valid ones and suggests the nearest.
"""

from __future__ import annotations

import dataclasses
import difflib
from functools import lru_cache


@lru_cache(maxsize=None)
def declared_names(cls: type) -> frozenset[str]:
    """Every name `cls` or a class of its MRO declares: fields, annotations, class attributes, methods."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is object:
            continue
        names.update(vars(klass))
        names.update(vars(klass).get("__annotations__", {}))
    if dataclasses.is_dataclass(cls):
        names.update(f.name for f in dataclasses.fields(cls))
    return frozenset(names)


def settable_fields(cls: type) -> list[str]:
    """The fields a user sets on a press of class `cls`: dataclass fields and properties with a setter."""
    names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
    for klass in cls.__mro__:
        for name, value in vars(klass).items():
            if isinstance(value, property) and value.fset is not None and name not in names:
                names.append(name)
    return names


def unknown_attribute_message(cls: type, name: str) -> str:
    fields = settable_fields(cls)
    close = difflib.get_close_matches(name, fields, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"{cls.__name__} has no field {name!r}, so setting it would change nothing.{hint} "
        f"{cls.__name__}'s fields: {', '.join(fields) or 'none'}."
    )


def check_known_attribute(obj: object, name: str) -> None:
    """Raise AttributeError when `name` is not declared by `type(obj)` (a typo would create a new attribute)."""
    if name in declared_names(type(obj)):
        return
    raise AttributeError(unknown_attribute_message(type(obj), name))
