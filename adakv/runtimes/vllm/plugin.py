"""The `vllm.general_plugins` entry point: registers adakv's attention backends in every vLLM process.

On CPU vLLM always picks CPU_ATTN; its adakv subclass takes that name and is CPU_ATTN itself for every
request that is not compressed (see attention.py). On CUDA adakv's FlashAttention subclass is registered
as vLLM's CUSTOM backend, which an engine runs only when asked (`engine_args` asks): engines without
adakv keep vLLM's own backend and its full CUDA graphs. The scheduler and worker classes are chosen by
the engine arguments too.
"""

from __future__ import annotations


def register() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, "adakv.runtimes.vllm.attention.CPUCompressingBackend")
    elif current_platform.is_cuda():
        register_backend(AttentionBackendEnum.CUSTOM, "adakv.runtimes.vllm.cuda_attention.CUDACompressingBackend")
