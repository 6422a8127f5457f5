"""RecordingPress: compresses nothing, records what a press would see."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import BasePress, PrefillContext
from .fields import Check


def check_context_list(contexts, owner: str) -> None:
    if not isinstance(contexts, list):
        raise TypeError(f"{owner}.contexts must be a list (it records into it), got {type(contexts).__name__}.")


@dataclass
class RecordingPress(BasePress):
    """Leaves the cache dense and keeps the PrefillContext of every full-attention layer's context prefill,
    in layer order. Useful to inspect what presses see, and to compress one dense prefill many ways
    (`adakv.runtimes.hf.compressed_layer(press, context)` on each recorded context), as the evaluation
    runner does. A chunked prefill is refused (it would record chunks, not whole contexts)."""

    contexts: list[PrefillContext] = field(default_factory=list)

    field_rules = {"contexts": Check(check_context_list)}
    # no compressed layer is ever built, so no backend is chosen for the model (and none falls back)
    builds_no_layers = True
    refuses_chunked_prefill = "it records whole contexts, and a chunked prefill compresses chunks. Use an ordinary prefill."
    hidden_states_rows = None  # the contexts it records may be compressed later by any press

    def compress(self, context: PrefillContext) -> None:
        self.contexts.append(context)
        return None
