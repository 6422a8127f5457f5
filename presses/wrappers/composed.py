"""ComposedPress: apply several presses one after the other."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import BasePress, PrefillContext, WholePrefill, check_is_press
from ..fields import Check
from .key_rerotation import KeyRerotationPress


def check_not_rerotation(press: BasePress, wrapper: str) -> None:
    """A press (not a KeyRerotationPress: it edits the cache's keys in place, so nothing may run on them after it)."""
    check_is_press(press, wrapper)
    if isinstance(press, KeyRerotationPress):
        raise TypeError(
            f"{wrapper} cannot wrap a KeyRerotationPress: rerotation must come last. "
            f"Wrap the {wrapper} in the KeyRerotationPress instead."
        )


def check_press_list(presses, wrapper: str) -> None:
    if not isinstance(presses, (list, tuple)) or not presses:
        raise TypeError(f"{wrapper} needs a non-empty list of presses, got {presses!r}.")
    for press in presses:
        check_not_rerotation(press, wrapper)


@dataclass
class ComposedPress(BasePress):
    """Applies `presses` in order. Each press chooses only among the tokens the previous ones kept
    (it sees `context.restrict(keep)`), and its ratio applies to what remains, so the kept fraction
    is the product of the presses' kept fractions. Returns the keep mask (batch, kv_heads, seq).
    """

    presses: list[BasePress]

    field_rules = {"presses": Check(check_press_list)}
    reads_hidden_states = False  # its presses read theirs, of the same positions (`restrict`)

    def inner_presses(self) -> tuple[BasePress, ...]:
        return tuple(self.presses) if isinstance(self.presses, (list, tuple)) else ()

    @property
    def compression_ratio(self) -> float:
        """Overall fraction removed: 1 - product of each press's kept fraction (before rounding)."""
        kept = 1.0
        for press in self.presses:
            kept *= 1.0 - getattr(press, "compression_ratio", 0.0)
        return 1.0 - kept

    @compression_ratio.setter
    def compression_ratio(self, value: float) -> None:
        raise AttributeError("ComposedPress's compression_ratio follows from its presses' ratios: set those.")

    @property
    def compresses_after_prefill(self) -> bool:
        return any(press.compresses_after_prefill for press in self.presses)

    def compress_prefill(self, prefill: WholePrefill) -> list[torch.Tensor | None]:
        keeps: list[torch.Tensor | None] = [None] * len(prefill.contexts)
        for press in self.presses:
            steps = press.compress_prefill(prefill.restrict(keeps))
            keeps = [keep if step is None else (step if keep is None else keep & step) for keep, step in zip(keeps, steps)]
        return keeps

    def compress(self, context: PrefillContext) -> torch.Tensor | None:
        keep = None
        for press in self.presses:
            step = press.compress(context if keep is None else context.restrict(keep))
            if step is not None:
                keep = step if keep is None else keep & step
        return keep
