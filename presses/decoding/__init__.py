"""Presses that compress during decoding: DecodingPress, and PrefillDecodingPress which adds a prefill press.

One press per file; `adakv.presses` exports them all."""
