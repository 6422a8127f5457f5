"""adakv: head-wise adaptive KV cache compression for Hugging Face transformers.

    from adakv import AdaptivePress, SnapKVPress
    press = AdaptivePress(SnapKVPress(compression_ratio=0.75))
    with press(model):
        model.generate(...)
"""

from adakv.cache import kept_token_counts, rollback
from adakv.presses import *  # noqa: F401,F403
from adakv.presses import __all__ as _press_names
from adakv.chunked_prefill import prefill_in_chunks
from adakv.default_model import load_default_model
from adakv.pipeline import KVPressTextGenerationPipeline  # importing registers "kv-press-text-generation"

__version__ = "0.1.0"
__all__ = [*_press_names, "kept_token_counts", "rollback"]
__all__ += ["KVPressTextGenerationPipeline", "load_default_model", "prefill_in_chunks"]
