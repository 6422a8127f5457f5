"""Flattened head-wise cache layer (backend "evict"): pruned keys/values are really freed.

Per layer, one K and one V buffer of shape (rows, head_dim) hold the rows of every
(batch, kv-head) "sequence" s = batch * kv_heads + head, one after another:

    rows [offsets[s], offsets[s] + capacity[s])      region of sequence s
    first context_kept[s] rows                        kept context rows, in position order
    next rows, up to seq_lengths[s]                   tokens added after the context (every head keeps them)
    the rest (`slack` rows)                           free room for later tokens

`seq_lengths` (sequences,) is a device tensor: the append kernel writes behind it and advances it, and
the attention kernels read it, so a decode step needs no host bookkeeping on the GPU and can be
captured in a CUDA graph (adakv/runtimes/hf/graph_decode.py). The host keeps `appended`, the number of dense
positions added after the context; a sequence holds one row per appended position except the left
padding of a padded question batch, which is never written (`skip_leading_tokens`).

Every head receives the same appended tokens, so all sequences share one slack size. An append
writes only the new rows; when the slack runs out the layer is re-laid out once with a larger
slack (geometric growth, at least `slack_fraction` of the mean head length), so appends cost
O(new tokens) amortised; `reserve(tokens)` makes room up front (graph decoding does, so that no
re-layout moves the buffers under a captured graph). `get_seq_length()` counts dense positions
(context + appended), which transformers uses for positions and masks.

A chunked context prefill (adakv/runtimes/hf/chunked_prefill.py) appends each context chunk like any other tokens
(so the chunk attends to the compressed earlier context), then `fold_appended_into_context` moves the
chunk's kept rows behind each head's context rows in fresh buffers with `min_slack` free rows: the
context grows by the chunk, `appended` is back to 0 and the chunk's pruned rows are freed.

With kv_dtype=torch.float8_e4m3fn (a press's `kv_dtype="float8_e4m3fn"`) the buffers hold e4m3 codes and
`key_scales`/`value_scales` (rows,) hold one float32 scale per row (adakv.kernels.fp8_reference): rows are
quantized once, when they enter the layer (the compressed context, every appended token), and every reader
dequantizes (the attention kernels inside, `dense_rows`/`held_view`/`newest_keys_values` into `dtype`, the
model's dtype). Copies move codes and scales together. At head_dim 128 a row takes 0.516 of its bf16 bytes.

`FlatHeadwiseLayer.stacked(layers)` puts the batch rows of several layers holding compressions of one
context (different presses or ratios) into one layer, each row with its own per-head lengths, so that they
are answered in one batched decode (the evaluation's batched answers; `adakv.cache.stacked_cache`).
"""

from __future__ import annotations

import itertools
import math

import torch

from adakv.kernels import cuda_flat, fp8_append
from adakv.kernels import fp8_reference as fp8
from adakv.kernels.fp8_reference import ScaledRows
from adakv.kernels.triton_decode import SplitWorkspace

from .layer import CompressedLayer, check_attention_can_read

DEFAULT_MIN_SLACK = 64
DEFAULT_SLACK_FRACTION = 0.125
DEFAULT_GROWTH = 2.0
_LAYOUT_IDS = itertools.count()  # every allocation gets a new id: a captured graph is valid for one layout


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


def check_kv_dtype(kv_dtype: torch.dtype, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The storage dtype of a flat layer whose keys arrive in `dtype` on `device`: `dtype` itself or
    float8_e4m3fn (on a device that can read it); anything else raises ValueError."""
    if kv_dtype not in (dtype, fp8.FP8_DTYPE):
        raise ValueError(f"kv_dtype must be None (the keys' {dtype}) or torch.float8_e4m3fn, got {kv_dtype}.")
    refusal = fp8.fp8_refusal(device) if kv_dtype == fp8.FP8_DTYPE else None
    if refusal is not None:
        raise ValueError(f"{refusal}.")
    return kv_dtype


class FlatHeadwiseLayer(CompressedLayer):
    """Compressed cache layer holding only the kept rows of every (batch, kv-head).

    Built from the dense context keys/values (batch, kv_heads, seq, head_dim) and the keep mask
    (batch, kv_heads, seq). Attention reads it through `adakv.cache.flat_attention.flat_attention`.
    kv_dtype: the dtype rows are stored in: None (the keys' own dtype) or torch.float8_e4m3fn (codes plus one
    float32 scale per row, see the module docstring). `dtype` stays the keys' dtype, the one readers get.
    """

    backend = "evict"
    stores_padding_rows = False
    replays_decode_steps = True

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        keep: torch.Tensor,
        config,
        min_slack: int = DEFAULT_MIN_SLACK,
        slack_fraction: float = DEFAULT_SLACK_FRACTION,
        growth: float = DEFAULT_GROWTH,
        kv_dtype: torch.dtype | None = None,
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
        self.kv_dtype = check_kv_dtype(kv_dtype or keys.dtype, keys.dtype, keys.device)
        self.is_initialized = True
        self.min_slack, self.slack_fraction, self.growth = min_slack, slack_fraction, growth
        self.appended = 0
        self.padded_appends = False  # a padded question batch skipped rows: positions != rows after the context
        self.pending_padding: torch.Tensor | None = None  # (batch,) left padding of the next append
        self.last_append_padding: torch.Tensor | None = None  # (batch,) left padding of the latest append
        self.split_workspace = SplitWorkspace()  # reused by every decode step's attention (adakv.kernels.triton_decode)

        keep = keep.to(device=keys.device, dtype=torch.bool).reshape(self.num_sequences, self.context_length)
        self._set_context_kept(keep.sum(-1))
        self._allocate(min_slack)
        src_index, dst_index = compaction_indices(keep, self.offsets, self.total_context_kept)
        keys, values = keys.reshape(-1, self.head_dim), values.reshape(-1, self.head_dim)
        if self.quantized:  # only the kept rows are quantized
            scaled_keys, scaled_values = self.scaled_rows()
            fp8.write_rows(scaled_keys, keys.index_select(0, src_index), dst_index)
            fp8.write_rows(scaled_values, values.index_select(0, src_index), dst_index)
        else:
            cuda_flat.copy_rows(keys, values, self.keys, self.values, src_index, dst_index)

    @classmethod
    def stacked(cls, layers: list[FlatHeadwiseLayer]) -> FlatHeadwiseLayer:
        """One layer holding the batch rows of `layers`, in order: batch row b of the result is a row of one of
        them, with that row's own kept context per head (the heads of one batch may keep different counts).
        Attention reads every sequence's rows on their own, so a row of the stacked layer is attended exactly as
        it was in its own layer. Used to answer many compressions of one context in one batched decode.

        The layers must hold the same dense context (context_length), heads, head_dim, dtype, kv_dtype, device and
        config, with nothing appended yet; their rows (and fp8 scales) are copied once (the layers themselves are
        unchanged)."""
        if not layers or any(not isinstance(layer, FlatHeadwiseLayer) for layer in layers):
            raise TypeError("stacked takes a non-empty list of FlatHeadwiseLayer.")
        first = layers[0]
        for layer in layers:
            same = (layer.context_length, layer.num_heads, layer.head_dim, layer.dtype, layer.kv_dtype, layer.device) == (
                first.context_length, first.num_heads, first.head_dim, first.dtype, first.kv_dtype, first.device)
            if not same or layer.config is not first.config:
                raise ValueError(
                    "Only layers of one model's compressions of one context can be stacked: context length, KV heads, "
                    "head_dim, dtype, kv_dtype, device and config must agree."
                )
            if layer.appended or layer.padded_appends or layer.pending_padding is not None:
                raise ValueError("Only freshly compressed layers (nothing appended after the context) can be stacked.")
        stack = cls.__new__(cls)
        CompressedLayer.__init__(stack)
        stack.config = first.config
        stack.batch_size = sum(layer.batch_size for layer in layers)
        stack.num_heads, stack.context_length, stack.head_dim = first.num_heads, first.context_length, first.head_dim
        stack.device, stack.dtype, stack.kv_dtype = first.device, first.dtype, first.kv_dtype
        stack.is_initialized = True
        stack.min_slack, stack.slack_fraction, stack.growth = first.min_slack, first.slack_fraction, first.growth
        stack.appended = 0
        stack.padded_appends = False
        stack.pending_padding = None
        stack.last_append_padding = None
        stack.split_workspace = SplitWorkspace()
        stack._set_context_kept(torch.cat([layer.context_kept for layer in layers]))
        slack = max(layer.slack for layer in layers)
        if all(layer.slack == slack for layer in layers):
            # each region is (context_kept + slack) rows, so the concatenated buffers are the stacked layout itself
            stack.slack = slack
            stack.capacity = stack.context_kept + slack
            stack.offsets = exclusive_cumsum(stack.capacity)
            stack.keys = torch.cat([layer.keys for layer in layers])
            stack.values = torch.cat([layer.values for layer in layers])
            stack.key_scales, stack.value_scales = None, None
            if first.quantized:
                stack.key_scales = torch.cat([layer.key_scales for layer in layers])
                stack.value_scales = torch.cat([layer.value_scales for layer in layers])
            stack.seq_lengths = stack.context_kept.clone()
            stack.layout_id = next(_LAYOUT_IDS)
            stack._kernel_inputs_checked = False
            return stack
        stack._allocate(slack)
        first_sequence = 0
        for layer in layers:
            count = layer.num_sequences
            src_index = segment_rows(layer.offsets, layer.context_kept, layer.total_context_kept)
            dst_index = segment_rows(stack.offsets[first_sequence:first_sequence + count], layer.context_kept,
                                     layer.total_context_kept)
            stack._copy_rows(layer._buffers(), src_index, dst_index)
            first_sequence += count
        return stack

    # ----- layout -------------------------------------------------------------------------
    @property
    def num_sequences(self) -> int:
        return self.batch_size * self.num_heads

    @property
    def lengths(self) -> torch.Tensor:
        """(sequences,) int64 rows in use per (batch, kv-head), on the device (the tensor itself: appends
        advance it in place)."""
        return self.seq_lengths

    @property
    def max_context_kept(self) -> int:
        """Rows of the longest compressed context, read from the GPU once per layout (at the first decode
        step, not during the prefill, where waiting for the GPU would stall it)."""
        if self._max_context_kept is None:
            self._max_context_kept = int(self.context_kept.max()) if self.context_kept.numel() else 0
        return self._max_context_kept

    @property
    def max_length(self) -> int:
        """An upper bound of the longest sequence (exact unless a padded append skipped rows)."""
        return self.max_context_kept + self.appended

    @property
    def cu_capacity(self) -> torch.Tensor:
        """(sequences + 1,) int64: where each sequence's region starts, then the total row count."""
        return torch.nn.functional.pad(torch.cumsum(self.capacity, 0), (1, 0))

    @property
    def used_rows(self) -> int:
        """Rows that hold tokens (kept context + appended, all sequences), from host counters; an upper
        bound after a padded append, whose skipped rows the host does not count."""
        return self.total_context_kept + self.appended * self.num_sequences

    @property
    def total_rows(self) -> int:
        return self.keys.shape[0]

    @property
    def quantized(self) -> bool:
        """Whether rows are stored as fp8 codes with per-row scales (kv_dtype float8_e4m3fn)."""
        return self.kv_dtype == fp8.FP8_DTYPE

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
        rows = self.total_context_kept + slack * self.num_sequences
        self.keys = torch.empty(rows, self.head_dim, dtype=self.kv_dtype, device=self.device)
        self.values = torch.empty_like(self.keys)
        self.key_scales, self.value_scales = None, None
        if self.quantized:
            self.key_scales = torch.empty(rows, dtype=torch.float32, device=self.device)
            self.value_scales = torch.empty_like(self.key_scales)
        self.seq_lengths = self.context_kept.clone()  # appends advance it on the device
        self.layout_id = next(_LAYOUT_IDS)
        self._kernel_inputs_checked = False

    def _buffers(self) -> tuple:
        """(keys, values, key_scales, value_scales) as they are now (scales None unless quantized), to copy
        from after `_allocate` replaced them."""
        return self.keys, self.values, self.key_scales, self.value_scales

    def scaled_rows(self) -> tuple[ScaledRows, ScaledRows]:
        """The fp8 keys and values with their scales (quantized layers only)."""
        return ScaledRows(self.keys, self.key_scales), ScaledRows(self.values, self.value_scales)

    def _copy_rows(self, source: tuple, src_index: torch.Tensor, dst_index: torch.Tensor) -> None:
        """Rows src_index of `source` (a layer's `_buffers()` of this kv_dtype) to rows dst_index of this layer."""
        keys, values, key_scales, value_scales = source
        if self.quantized:
            source_rows = (ScaledRows(keys, key_scales), ScaledRows(values, value_scales))
            fp8.copy_rows(source_rows, self.scaled_rows(), src_index, dst_index)
        else:
            cuda_flat.copy_rows(keys, values, self.keys, self.values, src_index, dst_index)

    def _rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (*index.shape, head_dim) in `dtype` of the rows `index` (any shape, int64)."""
        if not self.quantized:
            return self.keys[index], self.values[index]
        return tuple(
            fp8.dequantize(fp8.as_bytes(rows.codes)[index].view(fp8.FP8_DTYPE), rows.scales[index], self.dtype)
            for rows in self.scaled_rows()
        )

    def sequence_rows(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (length, head_dim) in `dtype` of rows [start, start + length): views of the buffers,
        or dequantized copies of fp8 rows."""
        if not self.quantized:
            return self.keys[start : start + length], self.values[start : start + length]
        return tuple(
            fp8.dequantize(rows.codes[start : start + length], rows.scales[start : start + length], self.dtype)
            for rows in self.scaled_rows()
        )

    def _relayout(self, sequence_ids: torch.Tensor, slack: int) -> None:
        """Copy the used rows of `sequence_ids` (in that order) into fresh buffers with `slack` free rows each.
        Waits for the GPU once (the exact row count sizes the copy)."""
        old_buffers, old_offsets, old_kept = self._buffers(), self.offsets, self.context_kept
        old_lengths = self.seq_lengths.index_select(0, sequence_ids)
        used_rows = int(old_lengths.sum())
        self._set_context_kept(old_kept.index_select(0, sequence_ids))
        self._allocate(slack)
        src_index = segment_rows(old_offsets.index_select(0, sequence_ids), old_lengths, used_rows)
        dst_index = segment_rows(self.offsets, old_lengths, used_rows)
        self._copy_rows(old_buffers, src_index, dst_index)
        self.seq_lengths.copy_(old_lengths)

    def fold_appended_into_context(self, keep: torch.Tensor) -> None:
        """Make the appended tokens part of the compressed context, each head keeping only its `keep`
        (batch, kv_heads, appended) bool rows of them, and re-lay the buffers with `min_slack` free rows
        per sequence. Copies only kept rows (old context rows and the kept appended rows), once."""
        expected = (self.batch_size, self.num_heads, self.appended)
        if self.padded_appends:
            raise NotImplementedError(
                "Cannot fold appended tokens into the context after a padded append (a question batch padded to "
                "different lengths); chunked context prefill pads only its first chunk."
            )
        if tuple(keep.shape) != expected:
            raise ValueError(f"keep has shape {tuple(keep.shape)}, expected {expected} (batch, kv_heads, appended).")
        keep = keep.to(device=self.device, dtype=torch.bool).reshape(self.num_sequences, self.appended)
        old_buffers, old_offsets, old_kept = self._buffers(), self.offsets, self.context_kept
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
        self._copy_rows(old_buffers, torch.cat([context_src, chunk_src]), torch.cat([context_dst, chunk_dst]))

    def reserve(self, tokens: int) -> None:
        """Make room for `tokens` more appended tokens now (one re-layout at most), so the next `tokens`
        appends move no buffer: graph decoding calls it before capturing."""
        if self.appended + tokens > self.slack:
            self._grow(self.appended + tokens)

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
        self.reserve(new_tokens)
        if key_states.device != self.device or value_states.device != self.device:
            raise ValueError(f"New keys/values are on {key_states.device}, but this cache is on {self.device}.")
        new_keys = key_states.to(self.dtype).reshape(self.num_sequences, new_tokens, head_dim)
        new_values = value_states.to(self.dtype).reshape(self.num_sequences, new_tokens, head_dim)
        first_token = self._take_pending_first_token(new_tokens)
        if self.quantized:
            fp8_append.append_rows(self.scaled_rows(), new_keys, new_values, self.offsets, self.seq_lengths, first_token)
            self.appended += new_tokens
            return key_states, value_states
        # the buffers only change in `_allocate`; the new rows are shaped, typed and placed above, so
        # the kernel's input checks run once per allocation, not on every step
        cuda_flat.append_rows(
            self.keys, self.values, new_keys, new_values, self.offsets, self.seq_lengths, first_token,
            check=not self._kernel_inputs_checked or first_token is not None,
        )  # fmt: skip
        self._kernel_inputs_checked = True
        self.appended += new_tokens
        return key_states, value_states

    def skip_leading_tokens(self, padding: torch.Tensor) -> None:
        """Have the next append leave out the first padding[b] tokens of batch row b (the left padding of a
        question batch padded to one length): those rows are never written, so no head attends to them.
        padding: (batch,) int64 with entries in [0, new_tokens) of that append."""
        if padding.shape != (self.batch_size,):
            raise ValueError(f"padding must have shape ({self.batch_size},) (one count per batch row), got {tuple(padding.shape)}.")
        self.pending_padding = padding.to(self.device, torch.int64)

    def _take_pending_first_token(self, new_tokens: int) -> torch.Tensor | None:
        """(sequences,) tokens to skip in this append, or None; remembers the padding for the attention."""
        padding, self.pending_padding = self.pending_padding, None
        self.last_append_padding = padding
        if padding is None:
            return None
        if new_tokens == 1:
            raise ValueError("A single new token cannot be left padding (skip_leading_tokens before a 1-token append).")
        self.padded_appends = True
        return padding.repeat_interleave(self.num_heads)

    def advance_after_replay(self, new_tokens: int) -> None:
        """Host bookkeeping of an append that a replayed CUDA graph did on the device (the graph advanced
        `seq_lengths`; the host counter of dense positions follows here)."""
        self.appended += new_tokens

    def get_seq_length(self) -> int:
        return self.context_length + self.appended

    def newest_keys_values(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense copies (batch, kv_heads, count, head_dim) of the last `count` rows of every sequence (the
        last `count` appended tokens; not defined after a padded append)."""
        if not 0 < count <= self.appended:
            raise ValueError(f"count must be in [1, {self.appended}] (the appended tokens), got {count}.")
        rows = (self.offsets + self.seq_lengths - count)[:, None] + torch.arange(count, device=self.device)
        shape = (self.batch_size, self.num_heads, count, self.head_dim)
        keys, values = self._rows(rows)
        return keys.view(shape), values.view(shape)

    def get_max_length(self) -> int:
        return -1

    def kept_counts(self) -> torch.Tensor:
        """(batch, kv_heads) number of rows each head attends to."""
        return self.seq_lengths.clone().view(self.batch_size, self.num_heads)

    def truncate(self, seq_len: int) -> None:
        """Drop tokens after the first `seq_len` positions; the compressed context cannot be cut."""
        if seq_len < self.context_length:
            raise ValueError(
                f"Cannot roll back to {seq_len} tokens: the compressed context holds {self.context_length}."
            )
        appended = min(self.appended, seq_len - self.context_length)
        if appended == self.appended:
            return
        if self.padded_appends and appended > 0:
            raise NotImplementedError(
                f"Cannot roll back to {seq_len} tokens: a padded question batch was appended, so rows no longer "
                f"match positions; roll back to the compressed context ({self.context_length} tokens) instead."
            )
        self.appended = appended
        self.padded_appends = self.padded_appends and appended > 0
        self.seq_lengths.copy_(self.context_kept + appended)  # in place: a captured graph reads this tensor

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
        """Bytes of one cached token of one head, K and V together (with their fp8 scales)."""
        scale_bytes = self.key_scales.element_size() if self.quantized else 0
        return 2 * (self.head_dim * self.keys.element_size() + scale_bytes)

    def kv_bytes(self) -> int:
        """Bytes of the K and V buffers (kept rows + slack)."""
        return self.total_rows * self.row_bytes

    def metadata_bytes(self) -> int:
        tensors = (self.context_kept, self.capacity, self.offsets, self.seq_lengths)
        return sum(t.numel() * t.element_size() for t in tensors)

    def held_bytes(self) -> int:
        return self.kv_bytes() + self.metadata_bytes()

    def dense_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded copies (sequences, max_context_kept + slack, head_dim) of every sequence's used rows, zero past
        its length. The width depends on the layout only, not on the appended count, so code that reads
        these copies stays right inside a CUDA graph replayed while the cache grows."""
        steps = torch.arange(self.max_context_kept + self.slack, device=self.device)
        valid = steps[None, :] < self.lengths[:, None]
        index = torch.where(valid, self.offsets[:, None] + steps[None, :], 0)
        keys, values = self._rows(index)
        return keys.masked_fill(~valid[..., None], 0), values.masked_fill(~valid[..., None], 0)

    def held_view(self, available: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values (batch, kv_heads, max_length, head_dim) of every head's used rows, aligned to the
        right (zero-filled in front) so that the newest tokens share the last positions in every head, and
        the (batch, kv_heads, max_length) bool mask of real rows. The rows hold no padding, so `available`
        (dense positions) is not needed."""
        width = self.max_length
        shift = width - self.lengths  # (sequences,)
        steps = torch.arange(width, device=self.device)
        valid = steps[None, :] >= shift[:, None]
        index = torch.where(valid, self.offsets[:, None] + steps[None, :] - shift[:, None], 0)
        shape = (self.batch_size, self.num_heads, width, self.head_dim)
        keys, values = self._rows(index)
        keys, values = (rows.masked_fill(~valid[..., None], 0).view(shape) for rows in (keys, values))
        return keys, values, valid.view(shape[:3])

    def keep_only(self, keep: torch.Tensor, slack: int) -> None:
        """Keep `keep` (batch, kv_heads, max_length), right-aligned as `held_view` gives the rows: `recompress`
        with the mask brought into the order of each head's used rows (j = the head's j-th used row)."""
        width = keep.shape[-1]
        shift = width - self.lengths
        index = (torch.arange(width, device=keep.device)[None, :] + shift[:, None]).clamp(max=width - 1)
        self.recompress(keep.reshape(self.num_sequences, width).gather(-1, index).view(keep.shape), slack=slack)

    def recompress(self, keep: torch.Tensor, slack: int | None = None) -> None:
        """Compress the whole cached sequence again (compression during decoding, DecodingPress): each head
        keeps only its `keep` (batch, kv_heads, max_length) bool rows, where index j is the head's j-th used
        row (entries past a head's length are ignored). The appended tokens become part of
        the compressed context (appended = 0) and the buffers are re-laid out with only the kept rows and
        `slack` (default `min_slack`) free rows per head; get_seq_length() still counts dense positions."""
        expected = (self.batch_size, self.num_heads, self.max_length)
        if tuple(keep.shape) != expected:
            raise ValueError(f"keep has shape {tuple(keep.shape)}, expected {expected} (batch, kv_heads, max_length).")
        width = self.max_length
        used = torch.arange(width, device=self.device)[None, :] < self.lengths[:, None]
        keep = keep.to(device=self.device, dtype=torch.bool).reshape(self.num_sequences, width) & used
        old_buffers, old_offsets = self._buffers(), self.offsets
        self._set_context_kept(keep.sum(-1))
        self.context_length += self.appended
        self.appended = 0
        self.padded_appends = False  # every row is context now
        self._allocate(self.min_slack if slack is None else slack)
        # compaction_indices counts sources as sequence * width + j: map them to the old rows
        dense_src, dst_index = compaction_indices(keep, self.offsets, self.total_context_kept)
        sequence = torch.div(dense_src, width, rounding_mode="floor")
        src_index = old_offsets.index_select(0, sequence) + dense_src - sequence * width
        self._copy_rows(old_buffers, src_index, dst_index)
