"""adakv: head-wise adaptive KV cache compression for Hugging Face transformers.

    from adakv import AdaptivePress, SnapKVPress
    press = AdaptivePress(SnapKVPress(compression_ratio=0.75))
    with press(model):
        model.generate(...)
"""

from adakv.cache import kept_token_counts, rollback
from adakv.presses import *  # noqa: F401,F403
from adakv.presses import __all__ as _press_names

__version__ = "0.1.0"
__all__ = [*_press_names, "kept_token_counts", "rollback"]
