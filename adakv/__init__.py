"""adakv: head-wise adaptive KV cache compression for Hugging Face transformers.

    from adakv import AdaptivePress, SnapKVPress
    press = AdaptivePress(SnapKVPress(compression_ratio=0.75))
    with press(model):
        model.generate(...)

The package is layered, imports pointing down only: apps (demo, CLI, default model), evaluation and the
pipeline above the runtimes (adakv.runtimes.hf), the presses (policy), the selection, the cache and the
kernels. This module is the public face over all of them.
"""

from adakv.cache import kept_token_counts, rollback
from adakv.presses import *  # noqa: F401,F403
from adakv.presses import __all__ as _press_names
from adakv.runtimes.hf.acceleration import accelerate
from adakv.runtimes.hf.chunked_prefill import prefill_in_chunks
from adakv.runtimes.hf.mlp_rows import mlp_in_row_chunks
from adakv.apps.default_model import load_default_model
from adakv.pipeline import KVPressTextGenerationPipeline  # importing registers "kv-press-text-generation"

__version__ = "0.1.0"
__all__ = [*_press_names, "accelerate", "kept_token_counts", "rollback"]
__all__ += ["KVPressTextGenerationPipeline", "load_default_model", "mlp_in_row_chunks", "prefill_in_chunks"]
