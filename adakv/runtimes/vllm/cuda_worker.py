"""adakv's vLLM worker on CUDA (`engine_args` picks it there: `worker_cls`).

Besides the compression steps it records each step's batch order (request ids by batch row) from vLLM's
V2 model runner, so that the attention backend finds every row's request without reading the block
table back from the GPU, and it keeps vLLM from replaying a full CUDA graph in a step where a compressed
request runs part of its prompt (its compression runs in torch, which a graph cannot hold; such a step
runs eagerly).
"""

from __future__ import annotations

import time

from vllm.v1.worker.gpu_worker import Worker

from .requests import served_requests
from .steps import CompressionSteps


class CompressingCUDAWorker(CompressionSteps, Worker):
    """vLLM's GPU worker with adakv's compression steps."""

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        self._adakv_registry()  # before the attention backend's builders, which allocate its offset tables
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner

        runner = self.model_runner
        if not isinstance(runner, GPUModelRunner):
            raise NotImplementedError(
                "adakv's CUDA backend runs with vLLM's V2 model runner (the default for dense decoder "
                f"models); this engine uses {type(runner).__name__}: leave VLLM_USE_V2_MODEL_RUNNER unset or 1."
            )
        prepare_inputs = runner.prepare_inputs

        def recording_batch_order(scheduler_output, batch_desc):
            input_batch = prepare_inputs(scheduler_output, batch_desc)
            served = served_requests()
            if served is not None:
                served.batch_req_ids = list(input_batch.req_ids)
            return input_batch

        runner.prepare_inputs = recording_batch_order

    def compile_or_warm_up_model(self, *args, **kwargs):
        runner = self.model_runner
        manager = getattr(runner, "cudagraph_manager", None)
        if manager is not None:
            manager.dispatch = eager_while_compressing(manager.dispatch)
        capture_model = runner.capture_model

        def timed_capture(*capture_args, **capture_kwargs):
            started = time.perf_counter()
            try:
                return capture_model(*capture_args, **capture_kwargs)
            finally:
                self._adakv_time("capture_model_s", time.perf_counter() - started)

        runner.capture_model = timed_capture  # where an engine's start goes (adakv_stats)
        return super().compile_or_warm_up_model(*args, **kwargs)


def eager_while_compressing(dispatch):
    """vLLM's CUDA graph dispatch, but no full graph for a step in which a compressed request runs part of
    its prompt: that step runs eagerly."""
    from vllm.config import CUDAGraphMode
    from vllm.v1.worker.gpu.cudagraph_utils import BatchExecutionDescriptor

    def dispatching(num_reqs, num_tokens, uniform_token_count, num_active_loras=0):
        desc = dispatch(num_reqs, num_tokens, uniform_token_count, num_active_loras=num_active_loras)
        served = served_requests()
        if desc.cg_mode == CUDAGraphMode.FULL and served is not None and served.compresses_this_step():
            return BatchExecutionDescriptor(
                cg_mode=CUDAGraphMode.NONE,
                num_tokens=num_tokens,
                num_reqs=num_reqs,
                num_active_loras=desc.num_active_loras,
            )
        return desc

    return dispatching
