"""Pair-slot packing: a compressed request's kept (token, KV head) pairs inside vLLM's ordinary pages.

vLLM's pool gives a request token slots; slot s of a layer holds one row per KV head ("lane") in block
`block_table[s // block_size]`. After compression a layer keeps P = kv_heads * kept pairs (uniform and
layer-scope Ada-KV keep the same total in every layer). They are packed head after head, each head's in
position order, into the request's first `kept` slots: pair i goes to slot i // kv_heads, lane i % kv_heads.
So head h's kept rows are pairs [offsets[h], offsets[h] + lengths[h]), wherever their lanes fall. The
prompt's other slots are free: the scheduler returns the blocks wholly inside [kept, prompt_len) to the
pool. Tokens after the prompt are written by vLLM as usual (slot = position, lane = head) and read as the
head's tail.

Every cache here is a per-layer view `(num_blocks, kv_heads, block_size, head_dim)` (the backend makes it
from its own layout). Nothing imports vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedLayer:
    """Where one layer's kept pairs of one request are. lengths, offsets: (kv_heads,) int64 (offsets is
    the exclusive cumulative sum of lengths); kept_positions: (pairs,) the token position of every packed
    pair, in pair order (kept for tests and for checking against the HF runtime)."""

    lengths: torch.Tensor
    offsets: torch.Tensor
    kept_positions: torch.Tensor

    @property
    def pairs(self) -> int:
        return int(self.lengths.sum())

    def offset_row(self) -> torch.Tensor:
        """(kv_heads + 1,) int32: head h's pairs are [row[h], row[h + 1]) (the decode kernel's offset-table row)."""
        return torch.cat([self.offsets, self.lengths.sum()[None]]).to(torch.int32)


def pair_addresses(pair_index: torch.Tensor, block_table: torch.Tensor, kv_heads: int, block_size: int):
    """(block, lane, row) of packed pairs `pair_index` (any shape) in a request's pages."""
    slot = pair_index // kv_heads
    return block_table[slot // block_size], pair_index % kv_heads, slot % block_size


def token_addresses(position: torch.Tensor, head: torch.Tensor, block_table: torch.Tensor, block_size: int):
    """(block, lane, row) of head `head`'s row of the token at `position`, as vLLM writes it."""
    return block_table[position // block_size], head, position % block_size


def gather_prompt(cache: torch.Tensor, block_table: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(kv_heads, prompt_len, head_dim): the prompt's dense rows of one request, in position order."""
    block_size = cache.shape[2]
    positions = torch.arange(prompt_len, device=cache.device)
    blocks, rows = block_table[positions // block_size], positions % block_size
    return cache[blocks, :, rows].transpose(0, 1)


def pack_layer(
    key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor, keep: torch.Tensor, slots: int
) -> PackedLayer:
    """Move one request's kept pairs of one layer to its first `slots` token slots.

    keep: (kv_heads, prompt_len) bool, the press's decision over the prompt. Raises if the kept pairs do
    not fit in `slots` slots (the scheduler frees the pages after them). All rows are read before any is
    written, so sources and destinations may overlap."""
    kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    heads, positions = keep.nonzero(as_tuple=True)  # head-major, positions ascending within a head
    if heads.numel() > slots * kv_heads:
        raise RuntimeError(
            f"the press kept {heads.numel()} pairs, more than the {slots * kv_heads} the scheduler reserved "
            f"({slots} slots x {kv_heads} KV heads)."
        )
    source = token_addresses(positions, heads, block_table, block_size)
    kept_keys, kept_values = key_cache[source].clone(), value_cache[source].clone()
    destination = pair_addresses(torch.arange(heads.numel(), device=keep.device), block_table, kv_heads, block_size)
    key_cache[destination] = kept_keys
    value_cache[destination] = kept_values
    lengths = keep.sum(-1)
    offsets = torch.cumsum(lengths, 0) - lengths
    return PackedLayer(lengths=lengths, offsets=offsets, kept_positions=positions)


def head_rows(
    cache: torch.Tensor, block_table: torch.Tensor, packed: PackedLayer, prompt_len: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's rows per KV head after compression: its packed context pairs, then its tail tokens
    [prompt_len, seq_len). Returns rows (kv_heads, longest, head_dim) padded with zeros and `present`
    (kv_heads, longest) bool."""
    kv_heads, block_size = cache.shape[1], cache.shape[2]
    tail = seq_len - prompt_len
    longest = int(packed.lengths.max()) + tail
    column = torch.arange(longest, device=cache.device)
    in_context = column[None, :] < packed.lengths[:, None]  # (kv_heads, longest)
    present = column[None, :] < (packed.lengths[:, None] + tail)
    pair = (packed.offsets[:, None] + column[None, :]).clamp(max=max(packed.pairs - 1, 0))
    position = (prompt_len + column[None, :] - packed.lengths[:, None]).clamp(min=prompt_len, max=seq_len - 1)
    head = torch.arange(kv_heads, device=cache.device)[:, None].expand(kv_heads, longest)
    packed_block, packed_lane, packed_row = pair_addresses(pair, block_table, kv_heads, block_size)
    tail_block, _, tail_row = token_addresses(position, head, block_table, block_size)
    block = torch.where(in_context, packed_block, tail_block)
    lane = torch.where(in_context, packed_lane, head)
    row = torch.where(in_context, packed_row, tail_row)
    rows = cache[block, lane, row] * present[..., None]
    return rows, present


def compressed_attention(
    query: torch.Tensor,
    query_positions: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    packed: PackedLayer,
    prompt_len: int,
    scale: float,
) -> torch.Tensor:
    """Reference attention of one compressed request's queries at positions >= prompt_len (decode steps,
    or the recomputation after a preemption): each sees its head's packed context and the tail tokens up
    to its own position. query: (n, num_heads, head_dim); query_positions: (n,) -> (n, num_heads, head_dim)."""
    seq_len = int(query_positions.max()) + 1
    keys, present = head_rows(key_cache, block_table, packed, prompt_len, seq_len)
    values, _ = head_rows(value_cache, block_table, packed, prompt_len, seq_len)
    kv_heads, longest, head_dim = keys.shape
    group = query.shape[1] // kv_heads
    # tail column j holds position prompt_len + j - lengths[h]; a query at p sees tail positions <= p
    column = torch.arange(longest, device=query.device)
    tail_position = prompt_len + column[None, :] - packed.lengths[:, None]  # (kv_heads, longest)
    in_context = column[None, :] < packed.lengths[:, None]
    visible = present[None] & (in_context[None] | (tail_position[None] <= query_positions[:, None, None]))
    grouped = query.float().view(-1, kv_heads, group, head_dim)  # (n, kv_heads, group, head_dim)
    logits = torch.einsum("nhgd,hld->nhgl", grouped, keys.float()) * scale
    logits = logits.masked_fill(~visible[:, :, None, :], float("-inf"))
    weights = logits.softmax(dim=-1)
    out = torch.einsum("nhgl,hld->nhgd", weights, values.float())
    return out.reshape(query.shape).to(query.dtype)
