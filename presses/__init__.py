"""All presses. One press per file; see each file's docstring for its paper."""

from .adaptive import AdaptivePress
from .base import BasePress, PrefillContext, WrapperPress
from .block import BlockPress
from .chunk import ChunkPress
from .chunkkv import ChunkKVPress
from .composed import ComposedPress
from .criticalkv import CriticalKVPress
from .decoding import DecodingPress
from .cur import CURPress
from .duo_attention import DuoAttentionPress
from .expected_attention import ExpectedAttentionPress
from .finch import FinchPress
from .headkv import HeadKVPress
from .key_rerotation import KeyRerotationPress
from .keydiff import KeyDiffPress
from .knorm import KnormPress
from .lagkv import LagKVPress
from .merge import MergePress
from .kvzip import KVzipPress
from .observed_attention import ObservedAttentionPress
from .per_layer import PerLayerCompressionPress
from .prefill_decoding import PrefillDecodingPress
from .pyramidkv import PyramidKVPress
from .random_press import RandomPress
from .recording import RecordingPress
from .scorer import ScorerPress
from .simlayerkv import SimLayerKVPress
from .snapkv import SnapKVPress
from .streaming_llm import StreamingLLMPress
from .think import ThinKPress
from .tova import TOVAPress

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
