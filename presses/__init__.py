"""All presses. One press per file; see each file's docstring for its paper."""

from .adaptive import AdaptivePress
from .base import BasePress, PrefillContext, WrapperPress
from .chunk import ChunkPress
from .composed import ComposedPress
from .criticalkv import CriticalKVPress
from .expected_attention import ExpectedAttentionPress
from .key_rerotation import KeyRerotationPress
from .keydiff import KeyDiffPress
from .knorm import KnormPress
from .kvzip import KVzipPress
from .observed_attention import ObservedAttentionPress
from .per_layer import PerLayerCompressionPress
from .pyramidkv import PyramidKVPress
from .random_press import RandomPress
from .recording import RecordingPress
from .scorer import ScorerPress
from .snapkv import SnapKVPress
from .streaming_llm import StreamingLLMPress
from .tova import TOVAPress

__all__ = [
    "AdaptivePress",
    "BasePress",
    "ChunkPress",
    "ComposedPress",
    "CriticalKVPress",
    "ExpectedAttentionPress",
    "KeyDiffPress",
    "KeyRerotationPress",
    "KnormPress",
    "KVzipPress",
    "ObservedAttentionPress",
    "PerLayerCompressionPress",
    "PrefillContext",
    "PyramidKVPress",
    "RandomPress",
    "RecordingPress",
    "ScorerPress",
    "SnapKVPress",
    "StreamingLLMPress",
    "TOVAPress",
    "WrapperPress",
]
