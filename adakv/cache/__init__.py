"""Cache layers that hold a compressed context, and helpers to inspect and roll back a cache.

A press's keep mask replaces a layer of the model's `DynamicCache` after the context prefill:

- `MaskedLayer` (backend "mask", masked.py) keeps the dense keys/values and a per-head keep mask over the
  context. Attention excludes pruned positions per head; no memory is freed.
- `FlatHeadwiseLayer` (backend "evict", flat.py) gathers the kept rows of every head into one flat buffer
  per K and V; pruned rows are freed. `flat_attention` (flat_attention.py) attends over it. With a press's
  kv_dtype="float8_e4m3fn" the rows are stored in fp8 with one scale per row.

Both implement `CompressedLayer` (layer.py), the one interface the runtimes use.
"""

from .backends import (
    BACKENDS,
    DEFAULT_BACKEND,
    KV_DTYPES,
    BackendFallbackWarning,
    evict_refusal,
    kv_dtype_refusal,
    make_compressed_layer,
)
from .flat import FlatHeadwiseLayer
from .layer import ADAKV_ATTENTION_PREFIX, CompressedLayer, check_attention_can_read
from .masked import MaskedLayer
from .operations import (
    Checkpoint,
    checkpoint,
    compressed_layers,
    kept_token_counts,
    newest_keys_values,
    restore,
    rollback,
    stacked_cache,
    stacking_refusal,
)

__all__ = [
    "ADAKV_ATTENTION_PREFIX",
    "BACKENDS",
    "DEFAULT_BACKEND",
    "KV_DTYPES",
    "BackendFallbackWarning",
    "Checkpoint",
    "CompressedLayer",
    "FlatHeadwiseLayer",
    "MaskedLayer",
    "check_attention_can_read",
    "checkpoint",
    "compressed_layers",
    "evict_refusal",
    "kept_token_counts",
    "kv_dtype_refusal",
    "make_compressed_layer",
    "newest_keys_values",
    "restore",
    "rollback",
    "stacked_cache",
    "stacking_refusal",
]
