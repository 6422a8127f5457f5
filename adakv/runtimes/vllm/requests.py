"""The worker's view of the requests it serves compressed: what each asked for, where its prefill stands,
and, once compressed, where each layer's kept pairs are packed.

The worker fills it from each step's `SchedulerOutput` before the model runs; the attention backend reads
it to find, for every batch row, its request (by the row's first block, which no other running request
holds: prefix caching is refused with compression). Nothing here imports vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .layout import PackedLayer
from .settings import ServingPress, request_setting


@dataclass
class ServedRequest:
    """One compressed request on this worker.

    computed: tokens in the cache before the current step; scheduled: tokens of the current step.
    packed: layer index -> its packed pairs, once the layer is compressed.
    recent_queries: layer index -> (num_heads, n, head_dim) queries of the prompt's last positions seen so
    far in a chunked prefill (SnapKV's window may span the last chunks)."""

    req_id: str
    setting: ServingPress
    prompt_len: int
    first_block: int
    computed: int = 0
    scheduled: int = 0
    packed: dict[int, PackedLayer] = field(default_factory=dict)
    recent_queries: dict[int, torch.Tensor] = field(default_factory=dict)
    press: Any = field(init=False, repr=False)  # the adakv press of `setting`, built once

    def __post_init__(self):
        self.press = self.setting.build()

    @property
    def kept_slots(self) -> int:
        return self.setting.kept_per_head(self.prompt_len)

    def restart(self, first_block: int, computed: int) -> None:
        """Resumed after a preemption: its pages were given back, the prefill (and compression) runs again."""
        self.first_block, self.computed = first_block, computed
        self.packed.clear()
        self.recent_queries.clear()


class ServedRequests:
    """The compressed requests of one worker, keyed by request id."""

    def __init__(self, engine: ServingPress):
        self.engine = engine
        self.by_id: dict[str, ServedRequest] = {}
        self.by_first_block: dict[int, ServedRequest] = {}
        self.finished: dict[str, ServedRequest] = {}  # the last few, for inspection (collective_rpc)
        self.keep_finished = 0

    def update(self, scheduler_output) -> None:
        """Take one step's scheduling: new, resumed, continuing and finished requests."""
        for req_id in scheduler_output.finished_req_ids:
            self._finish(req_id)
        for new in scheduler_output.scheduled_new_reqs:
            setting = request_setting(self.engine, new.sampling_params)
            if setting.compresses:
                prompt_len = len(new.prompt_token_ids or ())
                self.by_id[new.req_id] = ServedRequest(new.req_id, setting, prompt_len, new.block_ids[0][0])
                self.by_id[new.req_id].computed = new.num_computed_tokens
        cached = scheduler_output.scheduled_cached_reqs
        for index, req_id in enumerate(cached.req_ids):
            request = self.by_id.get(req_id)
            if request is None:
                continue
            request.computed = cached.num_computed_tokens[index]
            if req_id in cached.resumed_req_ids:
                request.restart(cached.new_block_ids[index][0][0], request.computed)
        for req_id, request in self.by_id.items():
            request.scheduled = scheduler_output.num_scheduled_tokens.get(req_id, 0)
        self.by_first_block = {request.first_block: request for request in self.by_id.values()}

    def _finish(self, req_id: str) -> None:
        request = self.by_id.pop(req_id, None)
        if request is not None and self.keep_finished:
            self.finished[req_id] = request
            while len(self.finished) > self.keep_finished:
                self.finished.pop(next(iter(self.finished)))

    def rows(self, first_blocks: list[int]) -> list[ServedRequest | None]:
        """The compressed request of each batch row (None: served dense)."""
        return [self.by_first_block.get(block) for block in first_blocks]


_SERVED: ServedRequests | None = None


def served_requests(engine: ServingPress | None = None) -> ServedRequests | None:
    """This process's registry (created by the worker with the engine's setting)."""
    global _SERVED
    if engine is not None and _SERVED is None:
        _SERVED = ServedRequests(engine)
    return _SERVED
