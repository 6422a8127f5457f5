"""PrefillDecodingPress: one press for the context, another (a DecodingPress) while generating."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import BasePress, PrefillContext, WholePrefill
from ..fields import Check
from .decoding import DecodingPress


def check_is_prefill_press(press, owner: str) -> None:
    if not isinstance(press, BasePress):
        raise TypeError(f"{owner} needs a press (a BasePress instance) as prefill_press, got {type(press).__name__}.")


def check_is_decoding_press(press, owner: str) -> None:
    if not isinstance(press, DecodingPress):
        raise TypeError(f"{owner} needs a DecodingPress as decoding_press, got {type(press).__name__}.")


@dataclass
class PrefillDecodingPress(BasePress):
    """Compresses the context with `prefill_press` (any press, e.g. AdaptivePress(SnapKVPress(0.5))), then
    keeps re-compressing during generation with `decoding_press`. Returns the prefill press's keep mask
    (batch, kv_heads, seq) for the context. Both run with one backend (the composed-press rule of BasePress).
    """

    prefill_press: BasePress
    decoding_press: DecodingPress
    compresses_during_decoding = True  # the runtime drives `decoding_press` after the context

    field_rules = {"prefill_press": Check(check_is_prefill_press), "decoding_press": Check(check_is_decoding_press)}
    reads_hidden_states = False  # its two presses read theirs

    def inner_presses(self) -> tuple[BasePress, ...]:
        return (self.prefill_press, self.decoding_press)

    def allows_inside(self, inner: BasePress, part: BasePress) -> bool:
        """The decoding press itself compresses during decoding; the prefill press is the outermost of the context."""
        if part.compresses_during_decoding:
            return inner is self.decoding_press and part is inner
        return inner is self.prefill_press

    @property
    def compression_ratio(self) -> float:
        """The prefill press's ratio (the context's share removed)."""
        return getattr(self.prefill_press, "compression_ratio", 0.0)

    @compression_ratio.setter
    def compression_ratio(self, value: float) -> None:
        raise AttributeError("PrefillDecodingPress's compression_ratio is its prefill press's: set prefill_press.compression_ratio.")

    @property
    def compresses_after_prefill(self) -> bool:
        """The prefill press's: a model-wide one (AdaptivePress(scope="model"), KVzip) compresses the whole
        context at once, after it."""
        return self.prefill_press.compresses_after_prefill

    def compress(self, context: PrefillContext) -> torch.Tensor | None:
        return self.prefill_press.compress(context)

    def compress_prefill(self, prefill: WholePrefill) -> list[torch.Tensor | None]:
        return self.prefill_press.compress_prefill(prefill)
