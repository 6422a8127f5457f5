"""adakv's vLLM worker on CPU (`engine_args` picks it there: `worker_cls`)."""

from __future__ import annotations

from vllm.v1.worker.cpu_worker import CPUWorker

from .steps import CompressionSteps


class CompressingCPUWorker(CompressionSteps, CPUWorker):
    """vLLM's CPU worker with adakv's compression steps."""
