"""What adakv's vLLM workers add to vLLM's (a mixin placed before vLLM's worker class): before each step,
tell the attention backend which requests it compresses, and report finished requests' packings.

The worker keeps the process's `ServedRequests` up to date from each step's `SchedulerOutput`;
`adakv_packings` (through `LLM.collective_rpc`) reports where finished requests' kept pairs came from.
"""

from __future__ import annotations

from .requests import served_requests
from .settings import CONFIG_KEY, check_engine


class CompressionSteps:
    """The part shared by the CPU and CUDA workers."""

    def _adakv_registry(self):
        served = served_requests()
        if served is None:
            served = served_requests(check_engine(self.vllm_config))
            served.keep_finished = int(self.vllm_config.additional_config[CONFIG_KEY].get("keep_finished", 0))
        return served

    def execute_model(self, scheduler_output):
        self._adakv_registry().update(scheduler_output)
        return super().execute_model(scheduler_output)

    def adakv_packings(self) -> dict[str, dict[int, list[list[int]]]]:
        """Finished requests kept for inspection: request id -> layer -> per KV head, the kept positions."""
        packings = {}
        for req_id, request in self._adakv_registry().finished.items():
            packings[req_id] = {
                layer: [chunk.tolist() for chunk in packed.kept_positions.split(packed.lengths.tolist())]
                for layer, packed in sorted(request.packed.items())
            }
        return packings

    def adakv_stats(self) -> dict:
        """Counters of this worker's attention backend: packed-page decode launches and, when
        ADAKV_VLLM_CHECK_DECODE=1, the kernel's largest difference from the torch reference per launch."""
        served = self._adakv_registry()
        return {"decode_launches": served.decode_launches, "decode_differences": served.decode_differences}
