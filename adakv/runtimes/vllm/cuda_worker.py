"""adakv's vLLM worker on CUDA (`engine_args` picks it there: `worker_cls`).

Besides the compression steps it records each step's batch order (request ids by batch row) from vLLM's
V2 model runner, so that the attention backend finds every row's request without reading the block
table back from the GPU.
"""

from __future__ import annotations

from vllm.v1.worker.gpu_worker import Worker

from .requests import served_requests
from .steps import CompressionSteps


class CompressingCUDAWorker(CompressionSteps, Worker):
    """vLLM's GPU worker with adakv's compression steps."""

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
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
