"""The `vllm.general_plugins` entry point: registers adakv's attention backend in every vLLM process.

On CPU vLLM always picks CPU_ATTN; its adakv subclass takes that name and is CPU_ATTN itself for every
request that is not compressed (see attention.py). Nothing else in vLLM changes: the scheduler and
worker classes are chosen by the engine arguments (`engine_args`).
"""

from __future__ import annotations


def register() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, "adakv.runtimes.vllm.attention.CPUCompressingBackend")
