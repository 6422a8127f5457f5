"""vLLM's scheduler, returning a compressed request's emptied pages to the pool when its prefill ends.

A compressed request keeps `kept` token slots of its prompt (layout.py); the blocks wholly inside
[kept, prompt_len) hold nothing any more once the step that finished its prompt has run, so they are freed
(vLLM puts its null block in their place, as it does for sliding windows) and the scheduler admits more
requests with them. A preempted request gives back all its pages as usual and is compressed again after
its recomputation. Which requests compress, and how much, follows from their settings alone
(`ServingPress.kept_per_head`), so the scheduler needs nothing back from the workers.
"""

from __future__ import annotations

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from .settings import check_engine, request_setting


class CompressedPages:
    """The part shared by the synchronous and asynchronous schedulers (a mixin before vLLM's class)."""

    def _adakv_setup(self) -> None:
        self.adakv_engine = check_engine(self.vllm_config)
        self.adakv_pending: dict[str, int] = {}  # request id -> slots it keeps, until its pages are freed
        self.adakv_max_running = 0  # the most requests running at once (benchmarks and tests read it)
        self.adakv_preemptions = 0

    def add_request(self, request) -> None:
        setting = request_setting(self.adakv_engine, request.sampling_params)
        super().add_request(request)
        if setting.compresses:
            self.adakv_pending[request.request_id] = setting.kept_per_head(request.num_prompt_tokens)

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if request is None or req_id not in self.adakv_pending:
                continue
            if request.num_computed_tokens >= request.num_prompt_tokens:
                self._free_compressed_prompt(req_id, self.adakv_pending.pop(req_id), request.num_prompt_tokens)
        self.adakv_max_running = max(self.adakv_max_running, len(self.running))
        return outputs

    def _free_compressed_prompt(self, req_id: str, kept_slots: int, prompt_len: int) -> None:
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            if isinstance(manager, FullAttentionManager):
                first = -(-kept_slots // manager.block_size)
                manager._remove_blocks_in_range(req_id, first, prompt_len // manager.block_size)

    def _preempt_request(self, request, timestamp: float) -> None:
        super()._preempt_request(request, timestamp)
        self.adakv_preemptions += 1
        setting = request_setting(self.adakv_engine, request.sampling_params)
        if setting.compresses:  # recomputed from scratch: compressed, and its pages freed, again
            self.adakv_pending[request.request_id] = setting.kept_per_head(request.num_prompt_tokens)

    def _free_request(self, request, delay_free_blocks: bool = False):
        self.adakv_pending.pop(request.request_id, None)
        return super()._free_request(request, delay_free_blocks)


class CompressingScheduler(CompressedPages, Scheduler):
    """vLLM's scheduler (synchronous) with compressed prompts' pages given back."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._adakv_setup()


class CompressingAsyncScheduler(CompressedPages, AsyncScheduler):
    """vLLM's asynchronous scheduler with compressed prompts' pages given back."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._adakv_setup()
