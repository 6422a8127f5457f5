"""What adakv's vLLM workers add to vLLM's (a mixin placed before vLLM's worker class): before each step,
tell the attention backend which requests it compresses, and report finished requests' packings.

The worker keeps the process's `ServedRequests` up to date from each step's `SchedulerOutput`;
`adakv_packings` (through `LLM.collective_rpc`) reports where finished requests' kept pairs came from.
"""

from __future__ import annotations

import time

from .requests import served_requests
from .settings import CONFIG_KEY, check_engine


class CompressionSteps:
    """The part shared by the CPU and CUDA workers."""

    _adakv_warming_up = False
    _adakv_timings: dict[str, float] | None = None  # seconds of the engine's start phases (adakv_stats)

    def _adakv_registry(self):
        served = served_requests()
        if served is None:
            served = served_requests(check_engine(self.vllm_config))
            served.keep_finished = int(self.vllm_config.additional_config[CONFIG_KEY].get("keep_finished", 0))
        return served

    def execute_model(self, scheduler_output):
        if not self._adakv_warming_up:
            self._adakv_registry().update(scheduler_output)
        return super().execute_model(scheduler_output)

    def compile_or_warm_up_model(self, *args, **kwargs):
        """vLLM's warm-up runs made-up requests (pages never written, default sampling parameters) through
        execute_model: they are served dense, and never enter the registry."""
        self._adakv_warming_up = True
        started = time.perf_counter()
        try:
            return super().compile_or_warm_up_model(*args, **kwargs)
        finally:
            self._adakv_warming_up = False
            self._adakv_time("compile_or_warm_up_s", time.perf_counter() - started)

    def _adakv_time(self, phase: str, seconds: float) -> None:
        self._adakv_timings = {**(self._adakv_timings or {}), phase: seconds}

    def adakv_packings(self) -> dict[str, dict[int, list[list[int]]]]:
        """Requests kept for inspection (the last `keep_finished` finished ones, and those not yet known
        to be finished: with asynchronous scheduling the last step's finishing reaches the worker with
        the next step): request id -> layer -> per KV head, the kept positions."""
        served = self._adakv_registry()
        packings = {}
        for req_id, request in {**served.finished, **served.by_id}.items():
            packings[req_id] = {
                layer: [chunk.tolist() for chunk in packed.kept_positions.split(packed.lengths.tolist())]
                for layer, packed in sorted(request.packed.items())
            }
        return packings

    def adakv_stats(self) -> dict:
        """Counters of this worker's attention backend: eager packed-page decode launches that served
        compressed rows (full CUDA graph replays count none), when ADAKV_VLLM_CHECK_DECODE=1 the kernel's
        largest difference from the torch reference per launch, and the CUDA graph mode the worker runs
        (the engine lowers the one asked for where a backend cannot do it), and the seconds of the engine's
        start phases the worker timed (compile and warm-up as a whole; on CUDA also graph capture)."""
        served = self._adakv_registry()
        return {
            "decode_launches": served.decode_launches,
            "decode_differences": served.decode_differences,
            "cudagraph_mode": self.vllm_config.compilation_config.cudagraph_mode.name,
            "start_timings_s": dict(self._adakv_timings or {}),
        }
