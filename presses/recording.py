"""RecordingPress: compresses nothing, records what a press would see."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import BasePress, PrefillContext


@dataclass
class RecordingPress(BasePress):
    """Leaves the cache dense and keeps the PrefillContext of every full-attention layer, in layer
    order. Useful to inspect what presses see, and to compress one dense prefill many ways
    (`press.compressed_layer(context)` on each recorded context), as the evaluation runner does."""

    contexts: list[PrefillContext] = field(default_factory=list)

    def backend_for(self, config) -> str:
        """No compressed layer is ever built, so no backend is chosen for the model (and none falls back)."""
        return self.resolved_backend

    def compressed_layer(self, context: PrefillContext):
        self.contexts.append(context)
        return None
