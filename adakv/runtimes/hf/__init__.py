"""The transformers runtime: everything that runs a press inside a Hugging Face model.

- `session`: `PressBlock`, what `press(model)` returns (arguments checked at the call, entered once, a
  `NotEnteredWarning` when dropped unentered); `PressSession`, the hooks and per-block state of
  `with press(model):`; `compressed_layer`,
  `compressed_layers_after_prefill` and `whole_prefill` for code that compresses recorded prefills.
- `attention`: the "adakv_sdpa" / "adakv_eager" attention functions that read compressed layers.
- `chunked_prefill`: `prefill_in_chunks`, the context a chunk at a time, each chunk compressed as it arrives.
- `mlp_rows`: `mlp_in_row_chunks`, a long forward's MLPs over row chunks (every press block enters it).
- `decoding`: compression during decoding (DecodingPress).
- `accelerate`: `accelerate(model, ...)`, the speed switches (CUDA graphs: `graph_decode`; fusions: `fusion/`).
"""

from .acceleration import Acceleration, accelerate
from .chunked_prefill import prefill_in_chunks
from .mlp_rows import MLP_CHUNK_ROWS, mlp_in_row_chunks
from .session import (
    NotEnteredWarning,
    PressBlock,
    PressSession,
    active_session,
    block_backend,
    compressed_layer,
    compressed_layers_after_prefill,
    whole_prefill,
)

__all__ = [
    "Acceleration",
    "MLP_CHUNK_ROWS",
    "NotEnteredWarning",
    "PressBlock",
    "PressSession",
    "accelerate",
    "active_session",
    "block_backend",
    "compressed_layer",
    "compressed_layers_after_prefill",
    "mlp_in_row_chunks",
    "prefill_in_chunks",
    "whole_prefill",
]
