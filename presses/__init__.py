"""All presses. One press per file; see each file's docstring for its paper."""

from .wrappers.adaptive import AdaptivePress
from .base import BasePress, PrefillContext, WrapperPress
from .wrappers.block import BlockPress
from .wrappers.chunk import ChunkPress
from .wrappers.chunkkv import ChunkKVPress
from .wrappers.composed import ComposedPress
from .wrappers.criticalkv import CriticalKVPress
from .decoding.decoding import DecodingPress
from .scorers.cur import CURPress
from .scorers.duo_attention import DuoAttentionPress
from .scorers.expected_attention import ExpectedAttentionPress
from .scorers.finch import FinchPress
from .wrappers.headkv import HeadKVPress
from .wrappers.key_rerotation import KeyRerotationPress
from .scorers.keydiff import KeyDiffPress
from .scorers.knorm import KnormPress
from .scorers.lagkv import LagKVPress
from .wrappers.merge import MergePress
from .scorers.kvzip import KVzipPress
from .scorers.observed_attention import ObservedAttentionPress
from .wrappers.per_layer import PerLayerCompressionPress
from .decoding.prefill_decoding import PrefillDecodingPress
from .scorers.pyramidkv import PyramidKVPress
from .scorers.random_press import RandomPress
from .recording import RecordingPress
from .scorer import ScorerPress
from .scorers.simlayerkv import SimLayerKVPress
from .scorers.snapkv import SnapKVPress
from .scorers.streaming_llm import StreamingLLMPress
from .wrappers.think import ThinKPress
from .scorers.tova import TOVAPress

__all__ = [
    "AdaptivePress",
    "BasePress",
    "BlockPress",
    "ChunkKVPress",
    "ChunkPress",
    "ComposedPress",
    "CriticalKVPress",
    "DecodingPress",
    "CURPress",
    "DuoAttentionPress",
    "ExpectedAttentionPress",
    "FinchPress",
    "HeadKVPress",
    "KeyDiffPress",
    "KeyRerotationPress",
    "KnormPress",
    "LagKVPress",
    "MergePress",
    "KVzipPress",
    "ObservedAttentionPress",
    "PerLayerCompressionPress",
    "PrefillContext",
    "PrefillDecodingPress",
    "PyramidKVPress",
    "RandomPress",
    "RecordingPress",
    "ScorerPress",
    "SimLayerKVPress",
    "SnapKVPress",
    "StreamingLLMPress",
    "ThinKPress",
    "TOVAPress",
    "WrapperPress",
]
