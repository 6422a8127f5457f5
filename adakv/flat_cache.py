"""Flattened head-wise cache layer (backend "evict"): pruned keys/values are really freed.

Per layer, one K and one V buffer of shape (rows, head_dim) hold the rows of every
(batch, kv-head) "sequence" s = batch * kv_heads + head, one after another:

    rows [offsets[s], offsets[s] + capacity[s])      region of sequence s
    first context_kept[s] rows                        kept context rows, in position order
    next `appended` rows                              tokens added after the context (every head keeps them)
    the rest (`slack` rows)                           free room for later tokens

Every head receives the same appended tokens, so all sequences share one slack size. An append
writes only the new rows; when the slack runs out the layer is re-laid out once with a larger
slack (geometric growth, at least `slack_fraction` of the mean head length), so appends cost
O(new tokens) amortised. `get_seq_length()` counts dense positions (context + appended), which
transformers uses for positions and masks.

A chunked context prefill (adakv/chunked_prefill.py) appends each context chunk like any other tokens
(so the chunk attends to the compressed earlier context), then `fold_appended_into_context` moves the
chunk's kept rows behind each head's context rows in fresh buffers with `min_slack` free rows: the
context grows by the chunk, `appended` is back to 0 and the chunk's pruned rows are freed.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import DynamicLayer

from . import kernels
from .cache import check_attention_can_read
from .triton_decode import SplitWorkspace

DEFAULT_MIN_SLACK = 64
DEFAULT_SLACK_FRACTION = 0.125
DEFAULT_GROWTH = 2.0
WRITE_POSITION_STEPS = 64  # decode steps whose write positions are computed at once (one launch per 64 steps)


def exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0) - counts


def compaction_indices(keep: torch.Tensor, offsets: torch.Tensor, kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and destination rows that gather the kept rows of every sequence into the flat layout.

    keep: (sequences, seq) bool with `kept` True entries; offsets: (sequences,) first row of each
    sequence's region. Returns (src_index into the (sequences * seq) dense rows, dst_index into the flat
    buffer), int64. Knowing `kept` lets the GPU build them without waiting for the host (nonzero_static)."""
    sequences, seq_len = keep.shape
    src_index = torch.nonzero_static(keep.reshape(-1), size=kept).squeeze(1)  # by sequence, then position
    rank_within = (torch.cumsum(keep, dim=-1) - 1).reshape(-1).index_select(0, src_index)
    dst_index = offsets.index_select(0, torch.div(src_index, seq_len, rounding_mode="floor")) + rank_within
    return src_index, dst_index


def segment_rows(starts: torch.Tensor, lengths: torch.Tensor, total: int) -> torch.Tensor:
    """Rows starts[s] + j for every sequence s and j < lengths[s], concatenated: (total,) int64."""
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths, output_size=total)
    within = torch.arange(total, device=lengths.device) - exclusive_cumsum(lengths).index_select(0, seq_ids)
    return starts.index_select(0, seq_ids) + within


class FlatHeadwiseLayer(DynamicLayer):
    """Compressed cache layer holding only the kept rows of every (batch, kv-head).

    Built from the dense context keys/values (batch, kv_heads, seq, head_dim) and the keep mask
    (batch, kv_heads, seq). Attention reads it through `adakv.varlen.flat_attention`.
    """

    backend = "evict"

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        keep: torch.Tensor,
        config,
        min_slack: int = DEFAULT_MIN_SLACK,
        slack_fraction: float = DEFAULT_SLACK_FRACTION,
        growth: float = DEFAULT_GROWTH,
    ):
        super().__init__()
        if keys.shape != values.shape or keep.shape != keys.shape[:3]:
            raise ValueError(
                f"keys {tuple(keys.shape)}, values {tuple(values.shape)} and keep {tuple(keep.shape)} must be "
                "(batch, kv_heads, seq, head_dim), the same, and (batch, kv_heads, seq)."
            )
        self.config = config
        self.batch_size, self.num_heads, self.context_length, self.head_dim = keys.shape
        self.device, self.dtype = keys.device, keys.dtype
        self.is_initialized = True
        self.min_slack, self.slack_fraction, self.growth = min_slack, slack_fraction, growth
        self.appended = 0
        self.split_workspace = SplitWorkspace()  # reused by every decode step's attention (adakv.triton_decode)

        keep = keep.to(device=keys.device, dtype=torch.bool).reshape(self.num_sequences, self.context_length)
        self._set_context_kept(keep.sum(-1))
        self._allocate(min_slack)
        src_index, dst_index = compaction_indices(keep, self.offsets, self.total_context_kept)
        kernels.copy_rows(
            keys.reshape(-1, self.head_dim),
            values.reshape(-1, self.head_dim),
            self.keys,
            self.values,
            src_index,
            dst_index,
        )

    # ----- layout -------------------------------------------------------------------------
    @property
    def num_sequences(self) -> int:
        return self.batch_size * self.num_heads

    @property
    def lengths(self) -> torch.Tensor:
        """(sequences,) rows in use per (batch, kv-head)."""
        return self.context_kept + self.appended

    @property
    def max_context_kept(self) -> int:
        """Rows of the longest compressed context, read from the GPU once per layout (at the first decode
        step, not during the prefill, where waiting for the GPU would stall it)."""
        if self._max_context_kept is None:
            self._max_context_kept = int(self.context_kept.max()) if self.context_kept.numel() else 0
        return self._max_context_kept

    @property
    def max_length(self) -> int:
        return self.max_context_kept + self.appended

    @property
    def cu_capacity(self) -> torch.Tensor:
        """(sequences + 1,) int64: where each sequence's region starts, then the total row count."""
        return torch.nn.functional.pad(torch.cumsum(self.capacity, 0), (1, 0))

    @property
    def used_rows(self) -> int:
        """Rows that hold tokens (kept context + appended, all sequences), from host counters."""
        return self.total_context_kept + self.appended * self.num_sequences

    @property
    def total_rows(self) -> int:
        return self.keys.shape[0]

    def _set_context_kept(self, context_kept: torch.Tensor) -> None:
        """(sequences,) int64 kept context rows per sequence; the total is needed on the host to size the
        buffers (the one point where a compression waits for the GPU)."""
        self.context_kept = context_kept
        self.total_context_kept = int(context_kept.sum())
        self._max_context_kept = None

    def _allocate(self, slack: int) -> None:
        """Fresh buffers for the current context_kept and `slack` rows per sequence (data not copied)."""
        self.slack = slack
        self.capacity = self.context_kept + slack
        self.offsets = exclusive_cumsum(self.capacity)
        self.row_start = self.offsets + self.context_kept  # where appended tokens begin
        rows = self.total_context_kept + slack * self.num_sequences
        self.keys = torch.empty(rows, self.head_dim, dtype=self.dtype, device=self.device)
        self.values = torch.empty_like(self.keys)
        self._write_positions = None  # (first appended index, (steps, sequences) rows), see `_write_start`
        self._kernel_inputs_checked = False

    def _write_start(self) -> torch.Tensor:
        """(sequences,) int64: the row where each sequence's next appended token goes (row_start + appended).

        Computed for WRITE_POSITION_STEPS steps at once and then read as a row of that table, so most
        decode steps launch no kernel and allocate nothing for it."""
        if self._write_positions is not None:
            first, table = self._write_positions
            if first <= self.appended < first + table.shape[0]:
                return table[self.appended - first]
        steps = torch.arange(self.appended, self.appended + WRITE_POSITION_STEPS, device=self.device)
        table = steps[:, None] + self.row_start[None, :]
        self._write_positions = (self.appended, table)
        return table[0]

    def _relayout(self, sequence_ids: torch.Tensor, slack: int) -> None:
        """Copy the used rows of `sequence_ids` (in that order) into fresh buffers with `slack` free rows each."""
        old_keys, old_values, old_offsets, old_kept = self.keys, self.values, self.offsets, self.context_kept
        old_lengths = old_kept.index_select(0, sequence_ids) + self.appended
        self._set_context_kept(old_kept.index_select(0, sequence_ids))
        self._allocate(slack)
        src_index = segment_rows(old_offsets.index_select(0, sequence_ids), old_lengths, self.used_rows)
        dst_index = segment_rows(self.offsets, old_lengths, self.used_rows)
        kernels.copy_rows(old_keys, old_values, self.keys, self.values, src_index, dst_index)

    def fold_appended_into_context(self, keep: torch.Tensor) -> None:
        """Make the appended tokens part of the compressed context, each head keeping only its `keep`
        (batch, kv_heads, appended) bool rows of them, and re-lay the buffers with `min_slack` free rows
        per sequence. Copies only kept rows (old context rows and the kept appended rows), once."""
        expected = (self.batch_size, self.num_heads, self.appended)
        if tuple(keep.shape) != expected:
            raise ValueError(f"keep has shape {tuple(keep.shape)}, expected {expected} (batch, kv_heads, appended).")
        keep = keep.to(device=self.device, dtype=torch.bool).reshape(self.num_sequences, self.appended)
        old_keys, old_values, old_offsets, old_kept = self.keys, self.values, self.offsets, self.context_kept
        old_total, appended = self.total_context_kept, self.appended
        self._set_context_kept(old_kept + keep.sum(-1))
        self.context_length += appended
        self.appended = 0
        self._allocate(self.min_slack)
        # the old context rows of each sequence, in order, to the start of its new region
        context_src = segment_rows(old_offsets, old_kept, old_total)
        context_dst = segment_rows(self.offsets, old_kept, old_total)
        # the kept appended rows right behind them; compaction_indices counts sources as s * appended + j
        dense_src, chunk_dst = compaction_indices(keep, self.offsets + old_kept, self.total_context_kept - old_total)
        sequence = torch.div(dense_src, appended, rounding_mode="floor")
        chunk_src = (old_offsets + old_kept).index_select(0, sequence) + dense_src - sequence * appended
        kernels.copy_rows(
            old_keys, old_values, self.keys, self.values,
            torch.cat([context_src, chunk_src]), torch.cat([context_dst, chunk_dst]),
        )  # fmt: skip

    def _grow(self, needed_slack: int) -> None:
        mean_length = self.total_context_kept / max(self.num_sequences, 1) + self.appended
        slack = max(
            needed_slack,
            math.ceil(self.growth * self.slack),
            math.ceil(self.slack_fraction * mean_length),
            self.min_slack,
        )
        self._relayout(torch.arange(self.num_sequences, device=self.device), slack)

    # ----- transformers cache-layer API ---------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append new tokens (batch, kv_heads, new_tokens, head_dim) to every head; return them unchanged
        (adakv's attention functions read the flat buffers from the layer itself)."""
        check_attention_can_read(self.config, self.backend)
        batch, heads, new_tokens, head_dim = key_states.shape
        if (batch, heads, head_dim) != (self.batch_size, self.num_heads, self.head_dim):
            raise ValueError(
                f"New keys have batch={batch}, kv_heads={heads}, head_dim={head_dim}, but this compressed cache "
                f"holds batch={self.batch_size}, kv_heads={self.num_heads}, head_dim={self.head_dim}. "
                "Continue with the same batch that filled the cache."
            )
        if self.appended + new_tokens > self.slack:
            self._grow(self.appended + new_tokens)
        if key_states.device != self.device or value_states.device != self.device:
            raise ValueError(f"New keys/values are on {key_states.device}, but this cache is on {self.device}.")
        new_keys = key_states.to(self.dtype).reshape(self.num_sequences, new_tokens, head_dim)
        new_values = value_states.to(self.dtype).reshape(self.num_sequences, new_tokens, head_dim)
        # the buffers only change in `_allocate`; the new rows are shaped, typed and placed above, so
        # the kernel's input checks run once per allocation, not on every step
        kernels.append_rows(
            self.keys, self.values, new_keys, new_values, self._write_start(), check=not self._kernel_inputs_checked
        )
        self._kernel_inputs_checked = True
        self.appended += new_tokens
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.context_length + self.appended

    def newest_keys_values(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense copies (batch, kv_heads, count, head_dim) of the last `count` appended tokens."""
        if not 0 < count <= self.appended:
            raise ValueError(f"count must be in [1, {self.appended}] (the appended tokens), got {count}.")
        rows = self.row_start[:, None] + torch.arange(self.appended - count, self.appended, device=self.device)
        shape = (self.batch_size, self.num_heads, count, self.head_dim)
        return self.keys[rows].view(shape), self.values[rows].view(shape)

    def get_max_length(self) -> int:
        return -1

    def kept_counts(self) -> torch.Tensor:
        """(batch, kv_heads) number of rows each head attends to."""
        return self.lengths.view(self.batch_size, self.num_heads)

    def truncate(self, seq_len: int) -> None:
        """Drop tokens after the first `seq_len` positions; the compressed context cannot be cut."""
        if seq_len < self.context_length:
            raise ValueError(
                f"Cannot roll back to {seq_len} tokens: the compressed context holds {self.context_length}."
            )
        self.appended = min(self.appended, seq_len - self.context_length)

    def crop(self, length_or_tokens_to_remove: int) -> None:
        # transformers' convention changed between releases: a negative number removes that many
        # tokens, a non-negative one is the length to keep.
        length = length_or_tokens_to_remove
        if length < 0:
            length = self.get_seq_length() + length
        self.truncate(length)

    def reset(self) -> None:
        raise RuntimeError("A compressed (evict) cache layer cannot be reset; start from a new cache.")

    def _select_batches(self, batch_indices: torch.Tensor) -> None:
        batch_indices = batch_indices.to(self.device, torch.long)
        heads = torch.arange(self.num_heads, device=self.device)
        sequence_ids = (batch_indices[:, None] * self.num_heads + heads[None, :]).reshape(-1)
        self.batch_size = len(batch_indices)
        self._relayout(sequence_ids, self.slack)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batches(torch.as_tensor(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_batches(torch.arange(self.batch_size).repeat_interleave(repeats))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batches(beam_idx)

    # ----- inspection ---------------------------------------------------------------------------
    @property
    def row_bytes(self) -> int:
        """Bytes of one cached token of one head, K and V together."""
        return 2 * self.head_dim * self.keys.element_size()

    def kv_bytes(self) -> int:
        """Bytes of the K and V buffers (kept rows + slack)."""
        return self.total_rows * self.row_bytes

    def metadata_bytes(self) -> int:
        tensors = (self.context_kept, self.capacity, self.offsets, self.row_start)
        return sum(t.numel() * t.element_size() for t in tensors)

    def held_bytes(self) -> int:
        return self.kv_bytes() + self.metadata_bytes()

    def dense_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded copies (sequences, max_length, head_dim) of every sequence's used rows, zero past its length."""
        steps = torch.arange(self.max_length, device=self.device)
        valid = steps[None, :] < self.lengths[:, None]
        index = torch.where(valid, self.offsets[:, None] + steps[None, :], 0)
        keys = self.keys[index].masked_fill(~valid[..., None], 0)
        values = self.values[index].masked_fill(~valid[..., None], 0)
        return keys, values

    def recompress(self, keep: torch.Tensor, slack: int | None = None) -> None:
        """Compress the whole cached sequence again (compression during decoding, DecodingPress): each head
        keeps only its `keep` (batch, kv_heads, max_length) bool rows, indexed like `dense_rows()` (j = the
        head's j-th used row; entries past a head's length are ignored). The appended tokens become part of
        the compressed context (appended = 0) and the buffers are re-laid out with only the kept rows and
        `slack` (default `min_slack`) free rows per head; get_seq_length() still counts dense positions."""
        expected = (self.batch_size, self.num_heads, self.max_length)
        if tuple(keep.shape) != expected:
            raise ValueError(f"keep has shape {tuple(keep.shape)}, expected {expected} (batch, kv_heads, max_length).")
        width = self.max_length
        used = torch.arange(width, device=self.device)[None, :] < self.lengths[:, None]
        keep = keep.to(device=self.device, dtype=torch.bool).reshape(self.num_sequences, width) & used
        old_keys, old_values, old_offsets = self.keys, self.values, self.offsets
        self._set_context_kept(keep.sum(-1))
        self.context_length += self.appended
        self.appended = 0
        self._allocate(self.min_slack if slack is None else slack)
        # compaction_indices counts sources as sequence * width + j: map them to the old rows
        dense_src, dst_index = compaction_indices(keep, self.offsets, self.total_context_kept)
        sequence = torch.div(dense_src, width, rounding_mode="floor")
        src_index = old_offsets.index_select(0, sequence) + dense_src - sequence * width
        kernels.copy_rows(old_keys, old_values, self.keys, self.values, src_index, dst_index)
