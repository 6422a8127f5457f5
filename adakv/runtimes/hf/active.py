"""Which press session and which acceleration block are open on a model (both keyed by the model and by
its decoder module, so that code holding either finds them)."""

from __future__ import annotations

from weakref import WeakKeyDictionary

from torch import nn

_sessions: WeakKeyDictionary = WeakKeyDictionary()
_accelerations: WeakKeyDictionary = WeakKeyDictionary()


def _keys(model: nn.Module) -> list[nn.Module]:
    keys = [model]
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if isinstance(decoder, nn.Module) and decoder is not model:
        keys.append(decoder)
    return keys


def register(registry: WeakKeyDictionary, model: nn.Module, block) -> None:
    for key in _keys(model):
        registry[key] = block


def unregister(registry: WeakKeyDictionary, model: nn.Module) -> None:
    for key in _keys(model):
        registry.pop(key, None)


def session_of(model_or_decoder: nn.Module):
    """The PressSession open on this model (or decoder), or None."""
    return _sessions.get(model_or_decoder)


def acceleration_of(model_or_decoder: nn.Module):
    """The Acceleration block open on this model (or decoder), or None."""
    return _accelerations.get(model_or_decoder)
