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
    table_row: int = -1  # its row in the registry's per-layer offset tables (decode kernels read them)
    longest_head: int = 0  # the most pairs any (layer, KV head) packed (bounds the decode kernel's splits)
    press: Any = field(init=False, repr=False)  # the adakv press of `setting`, built once

    def __post_init__(self):
        self.press = self.setting.build()

    @property
    def kept_slots(self) -> int:
        return self.setting.kept_per_head(self.prompt_len)

    def decodes_packed(self, num_layers: int) -> bool:
        """This step is one token after a prompt packed in every layer (the decode kernel's case)."""
        return self.scheduled == 1 and self.computed >= self.prompt_len and len(self.packed) == num_layers

    def restart(self, first_block: int, computed: int) -> None:
        """Resumed after a preemption: its pages were given back, the prefill (and compression) runs again."""
        self.first_block, self.computed = first_block, computed
        self.packed.clear()
        self.recent_queries.clear()
        self.longest_head = 0


class ServedRequests:
    """The compressed requests of one worker, keyed by request id."""

    def __init__(self, engine: ServingPress):
        self.engine = engine
        self.by_id: dict[str, ServedRequest] = {}
        self.by_first_block: dict[int, ServedRequest] = {}
        self.finished: dict[str, ServedRequest] = {}  # the last few, for inspection (collective_rpc)
        self.keep_finished = 0
        self.batch_req_ids: list[str] = []  # the current step's batch order (the CUDA worker records it)
        self.offset_tables: dict[int, torch.Tensor] = {}  # layer -> (rows, kv_heads + 1) int32
        self.decode_launches = 0  # packed-page decode kernel calls (one per layer and step)
        self.decode_differences: list[float] = []  # kernel vs torch reference (relative), when checked
        self._free_table_rows: list[int] = []
        self._table_rows_used = 0

    def update(self, scheduler_output) -> None:
        """Take one step's scheduling: new, resumed, continuing and finished requests."""
        for req_id in scheduler_output.finished_req_ids:
            self._finish(req_id)
        for new in scheduler_output.scheduled_new_reqs:
            setting = request_setting(self.engine, new.sampling_params)
            if setting.compresses:
                prompt_len = len(new.prompt_token_ids or ())
                request = ServedRequest(new.req_id, setting, prompt_len, new.block_ids[0][0])
                request.computed, request.table_row = new.num_computed_tokens, self._take_table_row()
                self.by_id[new.req_id] = request
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
        if request is None:
            return
        self._free_table_rows.append(request.table_row)
        if self.keep_finished:
            self.finished[req_id] = request
            while len(self.finished) > self.keep_finished:
                self.finished.pop(next(iter(self.finished)))

    def rows(self, first_blocks: list[int]) -> list[ServedRequest | None]:
        """The compressed request of each batch row (None: served dense)."""
        return [self.by_first_block.get(block) for block in first_blocks]

    def rows_of_batch(self, num_reqs: int) -> list[ServedRequest | None]:
        """The compressed request of each row of the current step's batch, by the recorded order."""
        return [self.by_id.get(req_id) for req_id in self.batch_req_ids[:num_reqs]]

    def _take_table_row(self) -> int:
        if self._free_table_rows:
            return self._free_table_rows.pop()
        self._table_rows_used += 1
        return self._table_rows_used - 1

    def record_offsets(self, request: ServedRequest, layer: int, packed: PackedLayer) -> None:
        """Write a request's packed-pair offsets of one layer into that layer's offset table (grown as
        needed): row request.table_row = (offsets[0], ..., offsets[kv_heads - 1], pairs)."""
        kv_heads = packed.lengths.shape[0]
        table = self.offset_tables.get(layer)
        if table is None or table.shape[0] <= request.table_row:
            rows = max(64, 2 * (request.table_row + 1))
            grown = torch.zeros(rows, kv_heads + 1, dtype=torch.int32, device=packed.lengths.device)
            if table is not None:
                grown[: table.shape[0]] = table
            table = self.offset_tables[layer] = grown
        table[request.table_row] = packed.offset_row()


@dataclass
class DecodeBatch:
    """The decode rows of one step's batch, for the packed-page decode kernel.

    decoding: per batch row, whether it is one (one token after a prompt packed in every layer);
    rows_info: per decode row (query token index, block-table row, prompt_len, seq_len, offset-table row);
    mean_length, max_length: the mean and an upper bound of a decode row's (KV head) sequence length."""

    decoding: list[bool]
    rows_info: list[list[int]]
    mean_length: int
    max_length: int


def decode_batch(rows: list[ServedRequest | None], num_layers: int, query_start: list[int]) -> DecodeBatch:
    """Which batch rows decode from packed pages and what the kernel needs of them; query_start:
    (rows + 1) token offsets of the batch."""
    decoding = [request is not None and request.decodes_packed(num_layers) for request in rows]
    requests = [(row, request) for row, (request, decodes) in enumerate(zip(rows, decoding)) if decodes]
    rows_info = [
        [query_start[row], row, request.prompt_len, request.computed + 1, request.table_row] for row, request in requests
    ]
    tails = [request.computed + 1 - request.prompt_len for _, request in requests]
    lengths = [request.kept_slots + tail for (_, request), tail in zip(requests, tails)]
    longest = [request.longest_head + tail for (_, request), tail in zip(requests, tails)]
    return DecodeBatch(
        decoding=decoding,
        rows_info=rows_info,
        mean_length=sum(lengths) // max(len(lengths), 1),
        max_length=max(longest, default=0),
    )


_SERVED: ServedRequests | None = None


def served_requests(engine: ServingPress | None = None) -> ServedRequests | None:
    """This process's registry (created by the worker with the engine's setting)."""
    global _SERVED
    if engine is not None and _SERVED is None:
        _SERVED = ServedRequests(engine)
    return _SERVED
