"""Pure-PyTorch reference of the two cache kernels in csrc/ (the CPU path and the test oracle).

The flattened head-wise cache stores the rows of every (batch, kv-head) sequence in one buffer
of shape (rows, head_dim) per K and V. Both jobs move whole rows:

- `copy_rows`: dst[dst_index[i]] = src[src_index[i]] for K and V (compaction after the prefill, and
  re-layout when a head runs out of slack).
- `append_rows`: dst[offsets[s] + lengths[s] + j - first[s]] = new[s, j] for every sequence s and new
  token j >= first[s] (decode steps and question prefill; `first` skips a padded question's left
  padding), then lengths[s] grows by the rows written.
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


def append_rows(
    dst_keys: torch.Tensor,
    dst_values: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    offsets: torch.Tensor,
    lengths: torch.Tensor,
    first_token: torch.Tensor | None = None,
) -> None:
    """dst_*: (rows, head_dim); new_*: (sequences, new_tokens, head_dim); offsets/lengths/first_token:
    (sequences,) int64. Advances `lengths` in place."""
    sequences, new_tokens, head_dim = new_keys.shape
    if first_token is None:  # every token of every sequence: one index_copy_ per buffer
        destinations = ((offsets + lengths)[:, None] + torch.arange(new_tokens, device=lengths.device)).reshape(-1)
        dst_keys.index_copy_(0, destinations, new_keys.reshape(-1, head_dim))
        dst_values.index_copy_(0, destinations, new_values.reshape(-1, head_dim))
        lengths += new_tokens
        return
    tokens = torch.arange(new_tokens, device=lengths.device)
    written = tokens[None, :] >= first_token[:, None]  # (sequences, new_tokens)
    destinations = (offsets + lengths - first_token)[:, None] + tokens[None, :]
    dst_keys[destinations[written]] = new_keys[written]
    dst_values[destinations[written]] = new_values[written]
    lengths += new_tokens - first_token
