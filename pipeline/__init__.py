"""The "kv-press-text-generation" pipeline (registered with transformers when adakv is imported)."""

from .text_generation import (
    QUESTION_SEPARATOR,
    TASK,
    KVPressTextGenerationPipeline,
    answer_from_cache,
    encode_prompt_parts,
    prefill_context,
    register_pipeline,
    split_prompt,
    truncate_context,
)

register_pipeline()

__all__ = [
    "QUESTION_SEPARATOR",
    "TASK",
    "KVPressTextGenerationPipeline",
    "answer_from_cache",
    "encode_prompt_parts",
    "prefill_context",
    "register_pipeline",
    "split_prompt",
    "truncate_context",
]
