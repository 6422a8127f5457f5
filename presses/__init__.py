"""All presses. One press per file; see each file's docstring for its paper."""

from .adaptive import AdaptivePress
from .base import BasePress, PrefillContext
from .scorer import ScorerPress
from .snapkv import SnapKVPress

__all__ = ["AdaptivePress", "BasePress", "PrefillContext", "ScorerPress", "SnapKVPress"]
