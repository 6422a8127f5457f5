"""Pure-PyTorch reference of the two cache kernels in csrc/ (the CPU path and the test oracle).

The flattened head-wise cache stores the rows of every (batch, kv-head) sequence in one buffer
of shape (rows, head_dim) per K and V. Both jobs move whole rows:

- `copy_rows`: dst[dst_index[i]] = src[src_index[i]] for K and V (compaction after the prefill, and
  re-layout when a head runs out of slack).
- `append_rows`: dst[write_start[s] + j] = new[s, j] for every sequence s and new token j (decode
  steps and question prefill).
"""

from __future__ import annotations

import torch


def copy_rows(
    src_keys: torch.Tensor,
    src_values: torch.Tensor,
    dst_keys: torch.Tensor,
    dst_values: torch.Tensor,
    src_index: torch.Tensor,
    dst_index: torch.Tensor,
) -> None:
    """src_*: (src_rows, head_dim); dst_*: (dst_rows, head_dim); src_index/dst_index: (rows,) int64."""
    dst_keys.index_copy_(0, dst_index, src_keys.index_select(0, src_index))
    dst_values.index_copy_(0, dst_index, src_values.index_select(0, src_index))


def append_destinations(write_start: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """(sequences,) first free row of each sequence -> (sequences * new_tokens,) destination rows."""
    steps = torch.arange(new_tokens, device=write_start.device, dtype=write_start.dtype)
    return (write_start[:, None] + steps[None, :]).reshape(-1)


def append_rows(
    dst_keys: torch.Tensor,
    dst_values: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    write_start: torch.Tensor,
) -> None:
    """dst_*: (rows, head_dim); new_*: (sequences, new_tokens, head_dim); write_start: (sequences,) int64."""
    sequences, new_tokens, head_dim = new_keys.shape
    destinations = append_destinations(write_start, new_tokens)
    dst_keys.index_copy_(0, destinations, new_keys.reshape(-1, head_dim))
    dst_values.index_copy_(0, destinations, new_values.reshape(-1, head_dim))
