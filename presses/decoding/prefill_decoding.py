"""PrefillDecodingPress: one press for the context, another (a DecodingPress) while generating."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import BasePress, PrefillContext, check_is_press
from .decoding import DecodingPress


@dataclass
class PrefillDecodingPress(BasePress):
    """Compresses the context with `prefill_press` (any press, e.g. AdaptivePress(SnapKVPress(0.5))), then
    keeps re-compressing during generation with `decoding_press`. Returns the prefill press's keep mask
    (batch, kv_heads, seq) for the context. Both run with one backend (the composed-press rule of BasePress).
    """

    prefill_press: BasePress
    decoding_press: DecodingPress
    compresses_during_decoding = True  # the runtime drives `decoding_press` after the context

    def __post_init__(self):
        super().__post_init__()
        check_is_press(self.prefill_press, "PrefillDecodingPress")
        if not isinstance(self.decoding_press, DecodingPress):
            raise TypeError(
                f"PrefillDecodingPress needs a DecodingPress as decoding_press, got {type(self.decoding_press).__name__}."
            )

    def inner_presses(self) -> tuple[BasePress, ...]:
        return (self.prefill_press, self.decoding_press)

    @property
    def compression_ratio(self) -> float:
        """The prefill press's ratio (the context's share removed)."""
        return getattr(self.prefill_press, "compression_ratio", 0.0)

    def compress(self, context: PrefillContext) -> torch.Tensor | None:
        return self.prefill_press.compress(context)
