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

from adakv.kernels.paged_decode import EMPTY_ROW

from .layout import PackedLayer
from .settings import ServingPress, request_setting

DENSE_TABLE_ROW = 0  # the offset tables' row of zeros: what a dense row (no packed pairs) reads


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
    table_row: int = -1  # its row in the registry's offset tables (the decode kernel reads them); -1: none
    press: Any = field(init=False, repr=False)  # the adakv press of `setting`, built once

    def __post_init__(self):
        self.press = self.setting.build()

    @property
    def kept_slots(self) -> int:
        return self.setting.kept_per_head(self.prompt_len)

    @property
    def in_prompt(self) -> bool:
        """This step runs some of its prompt (a chunk, the compression, or a recomputation)."""
        return self.scheduled > 0 and self.computed < self.prompt_len

    def decodes_packed(self, num_layers: int) -> bool:
        """This step is one token after a prompt packed in every layer (the decode kernel's case)."""
        return self.scheduled == 1 and self.computed >= self.prompt_len and len(self.packed) == num_layers

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
        self.batch_req_ids: list[str] = []  # the current step's batch order (the CUDA worker records it)
        self.offset_tables: torch.Tensor | None = None  # (layers, table rows, kv_heads + 1) int32 (CUDA)
        self.decode_launches = 0  # eager packed-page decode launches that served compressed rows
        self.decode_differences: list[float] = []  # kernel vs torch reference (relative), when checked
        self._free_table_rows: list[int] = []

    def allocate_offset_tables(self, num_layers: int, kv_heads: int, capacity: int, device) -> None:
        """The offset tables the decode kernel reads, allocated once (a CUDA graph reads them where they
        were at capture): row DENSE_TABLE_ROW stays zeros, rows 1..capacity are compressed requests'."""
        if self.offset_tables is not None:
            if self.offset_tables.shape != (num_layers, capacity + 1, kv_heads + 1):
                raise ValueError(f"offset tables already allocated as {tuple(self.offset_tables.shape)}")
            return
        self.offset_tables = torch.zeros(num_layers, capacity + 1, kv_heads + 1, dtype=torch.int32, device=device)
        self._free_table_rows = list(range(capacity, DENSE_TABLE_ROW, -1))

    def update(self, scheduler_output) -> None:
        """Take one step's scheduling: new, resumed, continuing and finished requests."""
        for req_id in scheduler_output.finished_req_ids:
            self._finish(req_id)
        for req_id in getattr(scheduler_output, "preempted_req_ids", None) or ():
            if req_id in self.by_id:  # its row is taken again when it resumes
                self._give_back_table_row(self.by_id[req_id])
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
                self._give_back_table_row(request)
                request.table_row = self._take_table_row()
        for req_id, request in self.by_id.items():
            request.scheduled = scheduler_output.num_scheduled_tokens.get(req_id, 0)
        self.by_first_block = {request.first_block: request for request in self.by_id.values()}

    def _finish(self, req_id: str) -> None:
        request = self.by_id.pop(req_id, None)
        if request is None:
            return
        self._give_back_table_row(request)
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

    def compresses_this_step(self) -> bool:
        """Some compressed request runs part of its prompt in this step: the step needs the attention
        backend's eager path (the compression is not captured in a CUDA graph)."""
        return any(request.in_prompt for request in self.by_id.values())

    def _take_table_row(self) -> int:
        """A free row of the offset tables (-1 where none are allocated: the CPU backend reads none)."""
        if self.offset_tables is None:
            return -1
        if not self._free_table_rows:
            raise RuntimeError(
                f"adakv's offset tables are full ({self.offset_tables.shape[1] - 1} compressed requests at "
                "once, twice max_num_seqs): more requests than the engine can run are registered"
            )
        return self._free_table_rows.pop()

    def _give_back_table_row(self, request: ServedRequest) -> None:
        if request.table_row > DENSE_TABLE_ROW:
            self._free_table_rows.append(request.table_row)
        request.table_row = -1

    def record_offsets(self, request: ServedRequest, layer: int, packed: PackedLayer) -> None:
        """Write a request's packed-pair offsets of one layer into that layer's offset table: row
        request.table_row = (offsets[0], ..., offsets[kv_heads - 1], pairs)."""
        if self.offset_tables is None or request.table_row <= DENSE_TABLE_ROW:
            raise RuntimeError(f"request {request.req_id} has no row in the offset tables (none are allocated)")
        self.offset_tables[layer, request.table_row] = packed.offset_row().to(self.offset_tables.device)


@dataclass
class DecodeBatch:
    """The rows of one step's batch that the packed-page decode kernel attends.

    decoding: per batch row, whether the kernel attends it; rows_info: per such row (query token index,
    batch row, prompt_len, offset-table row): adakv.kernels.paged_decode's columns."""

    decoding: list[bool]
    rows_info: list[list[int]]


def _packed_row(token: int, row: int, request: ServedRequest) -> list[int]:
    return [token, row, request.prompt_len, request.table_row]


def decode_batch(rows: list[ServedRequest | None], num_layers: int, query_start: list[int]) -> DecodeBatch:
    """A batch with prefill rows: the rows that decode one token after a prompt packed in every layer
    (the others go through FlashAttention and `serve_layer`); query_start: (rows + 1) token offsets."""
    decoding = [request is not None and request.decodes_packed(num_layers) for request in rows]
    rows_info = [_packed_row(query_start[row], row, request) for row, request in enumerate(rows) if decoding[row]]
    return DecodeBatch(decoding=decoding, rows_info=rows_info)


def uniform_decode_batch(rows: list[ServedRequest | None], batch_rows: int) -> DecodeBatch:
    """A batch of one new token per row (what vLLM replays from full CUDA graphs): every row through the
    kernel, compressed ones from their packed pairs, dense ones as all tail, and the rows past the step's
    requests up to `batch_rows` (a graph's padding) empty. rows: the compressed request (or None) of each
    of the step's requests."""
    rows_info = []
    for row in range(batch_rows):
        request = rows[row] if row < len(rows) else None
        if request is not None:
            rows_info.append(_packed_row(row, row, request))
        else:
            rows_info.append([row, row, 0 if row < len(rows) else EMPTY_ROW, DENSE_TABLE_ROW])
    return DecodeBatch(decoding=[True] * batch_rows, rows_info=rows_info)


_SERVED: ServedRequests | None = None


def served_requests(engine: ServingPress | None = None) -> ServedRequests | None:
    """This process's registry (created by the worker with the engine's setting)."""
    global _SERVED
    if engine is not None and _SERVED is None:
        _SERVED = ServedRequests(engine)
    return _SERVED
