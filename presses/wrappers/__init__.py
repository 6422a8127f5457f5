"""Presses around other presses: budgets across heads or layers (AdaptivePress, CriticalKV, HeadKV), chunks and blocks, compositions, edits of keys or values.

One press per file; `adakv.presses` exports them all."""
