"""All presses. One press per file; see each file's docstring for its paper."""

from .adaptive import AdaptivePress
from .base import BasePress, PrefillContext, WrapperPress
from .chunk import ChunkPress
from .composed import ComposedPress
from .criticalkv import CriticalKVPress
from .cur import CURPress
from .duo_attention import DuoAttentionPress
from .expected_attention import ExpectedAttentionPress
from .finch import FinchPress
from .headkv import HeadKVPress
from .key_rerotation import KeyRerotationPress
from .keydiff import KeyDiffPress
from .knorm import KnormPress
from .merge import MergePress
from .observed_attention import ObservedAttentionPress
from .per_layer import PerLayerCompressionPress
from .pyramidkv import PyramidKVPress
from .random_press import RandomPress
from .recording import RecordingPress
from .scorer import ScorerPress
from .snapkv import SnapKVPress
from .streaming_llm import StreamingLLMPress
from .think import ThinKPress
from .tova import TOVAPress

__all__ = [
    "AdaptivePress",
    "BasePress",
    "ChunkPress",
    "ComposedPress",
    "CriticalKVPress",
    "CURPress",
    "DuoAttentionPress",
    "ExpectedAttentionPress",
    "FinchPress",
    "HeadKVPress",
    "KeyDiffPress",
    "KeyRerotationPress",
    "KnormPress",
    "MergePress",
    "ObservedAttentionPress",
    "PerLayerCompressionPress",
    "PrefillContext",
    "PyramidKVPress",
    "RandomPress",
    "RecordingPress",
    "ScorerPress",
    "SnapKVPress",
    "StreamingLLMPress",
    "ThinKPress",
    "TOVAPress",
    "WrapperPress",
]
