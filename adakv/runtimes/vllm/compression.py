"""What the attention backend does for compressed requests in one layer, after vLLM's own attention ran:
compress the prompt in the step that finishes it, stash the window's queries in the steps before, and
attend the queries after the prompt over the packed pairs. Runtime-neutral torch; nothing imports vLLM.
"""

from __future__ import annotations

import torch

from adakv.presses.base import PrefillContext

from .layout import compressed_attention, gather_prompt, pack_layer
from .requests import ServedRequest, ServedRequests


def recent_queries(request: ServedRequest, layer: int, step_queries: torch.Tensor, start: int) -> torch.Tensor:
    """(num_heads, n, head_dim): the prompt's queries from position max(0, prompt_len - window) seen so
    far, from earlier steps' stash and this step's `step_queries` (n_step, num_heads, head_dim) at
    positions [start, start + n_step)."""
    window = request.setting.recent_queries_needed
    first = max(request.prompt_len - window, 0)
    end = min(start + step_queries.shape[0], request.prompt_len)
    fresh = step_queries[max(first - start, 0) : max(end - start, 0)].transpose(0, 1)
    earlier = request.recent_queries.get(layer)
    return fresh if earlier is None else torch.cat([earlier, fresh], dim=1)


def compress_request_layer(
    request: ServedRequest,
    layer: int,
    num_layers: int,
    step_queries: torch.Tensor,
    start: int,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    offsets_for: ServedRequests | None = None,
) -> None:
    """Score the request's prompt in `layer` with its press, select, and pack the kept pairs (and record
    where in `offsets_for`'s offset tables, for the decode kernel)."""
    prompt_len, kv_heads = request.prompt_len, key_cache.shape[1]
    keys = gather_prompt(key_cache, block_table, prompt_len)[None]
    values = gather_prompt(value_cache, block_table, prompt_len)[None]
    queries = recent_queries(request, layer, step_queries, start)[None]
    context = PrefillContext(
        module=None,
        hidden_states=None,
        keys=keys,
        values=values,
        position_embeddings=None,
        attentions=None,
        available=torch.ones(1, kv_heads, prompt_len, dtype=torch.bool, device=keys.device),
        layer_idx=layer,
        num_layers=num_layers,
        recent_queries=queries,
        scaling=scale,
    )
    keep = request.press.compress(context)
    if keep is None:
        keep = context.available
    packed = request.packed[layer] = pack_layer(key_cache, value_cache, block_table, keep[0], request.kept_slots)
    request.recent_queries.pop(layer, None)
    if offsets_for is not None:
        offsets_for.record_offsets(request, layer, packed)


def serve_layer(
    rows: list[ServedRequest | None],
    query_start: list[int],
    layer: int,
    num_layers: int,
    query: torch.Tensor,
    output: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    offsets_for: ServedRequests | None = None,
) -> None:
    """Everything compressed requests need in this layer, after the dense attention wrote `output`.

    query, output: (tokens, num_heads, head_dim) of the whole batch; query_start: (rows + 1) token offsets;
    key_cache, value_cache: (num_blocks, kv_heads, block_size, head_dim) views of the layer's pages."""
    for row, request in enumerate(rows):
        if request is None or request.scheduled == 0:
            continue
        first, last = query_start[row], query_start[row + 1]
        start, end, prompt_len = request.computed, request.computed + (last - first), request.prompt_len
        step_queries, block_table = query[first:last], block_tables[row]
        if layer not in request.packed:
            if end < prompt_len:
                if end > prompt_len - request.setting.recent_queries_needed:
                    request.recent_queries[layer] = recent_queries(request, layer, step_queries, start)
                continue
            compress_request_layer(
                request, layer, num_layers, step_queries, start, key_cache, value_cache, block_table, scale,
                offsets_for,
            )  # fmt: skip
        after_prompt = max(prompt_len - start, 0)  # this step's first query at a position >= prompt_len
        if after_prompt >= last - first:
            continue
        positions = torch.arange(start + after_prompt, end, device=query.device)
        output[first + after_prompt : last] = compressed_attention(
            step_queries[after_prompt:], positions, key_cache, value_cache, block_table,
            request.packed[layer], prompt_len, scale,
        )  # fmt: skip
