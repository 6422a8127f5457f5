"""Scoring presses: each gives every context token of every KV head a score; the lowest go (ScorerPress).

One press per file; `adakv.presses` exports them all."""
