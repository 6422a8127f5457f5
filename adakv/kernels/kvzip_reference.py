"""KVzip's scoring update: the running maximum attention each context key receives from the reconstruction
queries, in PyTorch (`torch_max_attention`, the reference and the path off CUDA) or through the Triton
kernels of kvzip_scoring.py (`update_max_attention` picks)."""

from __future__ import annotations

import torch

from .attention_scores import float32_scores
from .triton_decode import MAX_HEAD_DIM, triton_available

# Upper bound of attention probabilities held at once while scoring (elements of float32).
SCORING_BLOCK_ELEMENTS = 1 << 26
# Reconstruction queries scored at once: smaller blocks skip more of the causal triangle, larger ones
# make fewer, larger matrix products.
SCORING_BLOCK_ROWS = 512


def update_max_attention(
    running_max: torch.Tensor, chunk_queries: torch.Tensor, keys: torch.Tensor, scaling: float,
    context_length: int, chunk_start: int, first_counted: int,
) -> None:
    """`torch_max_attention`'s update, by the Triton kernels of kvzip_scoring.py on CUDA (they hold no
    probabilities), by PyTorch elsewhere."""
    fused = (
        keys.is_cuda
        and triton_available()
        and chunk_queries.dtype == keys.dtype
        and keys.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and keys.shape[-1] <= MAX_HEAD_DIM
    )
    if not fused:
        torch_max_attention(running_max, chunk_queries, keys, scaling, context_length, chunk_start, first_counted)
        return
    from .kvzip_scoring import triton_max_attention

    unit_last_stride = [tensor if tensor.stride(-1) == 1 else tensor.contiguous() for tensor in (chunk_queries, keys)]
    triton_max_attention(running_max, *unit_last_stride, scaling, context_length, chunk_start, first_counted)


def torch_max_attention(
    running_max: torch.Tensor, chunk_queries: torch.Tensor, keys: torch.Tensor, scaling: float,
    context_length: int, chunk_start: int, first_counted: int,
) -> None:
    """running_max (batch, kv_heads, context_length) = max(running_max, attention of this chunk's counted
    queries to each context key, over query heads and queries).

    chunk_queries: (batch, heads, chunk, head_dim), the reconstruction stream's tokens
    [chunk_start, chunk_start + chunk); keys: (batch, kv_heads, context_length + chunk_start + chunk, head_dim).
    Query i of the stream sees the context and stream keys up to itself; queries before `first_counted`
    (the repeat prompt) are not counted. Rows go in blocks of at most SCORING_BLOCK_ROWS, each against
    only the keys its last row sees, so the causal triangle of the reconstruction is mostly skipped."""
    batch, heads, chunk, head_dim = chunk_queries.shape
    groups = heads // keys.shape[1]
    first_row = max(0, first_counted - chunk_start)  # the counted queries are a suffix of the stream
    seen_before = context_length + chunk_start  # keys every row of this chunk sees
    rows_per_block = min(SCORING_BLOCK_ROWS, max(1, SCORING_BLOCK_ELEMENTS // (keys.shape[2] * groups)))
    lowest = torch.finfo(torch.float32).min
    for start in range(first_row, chunk, rows_per_block):
        end = min(start + rows_per_block, chunk)
        # among the keys this block sees beyond seen_before, row i of the block sees the first start + i + 1
        stream_keys = torch.arange(end, device=keys.device)
        future = stream_keys[None, :] > torch.arange(start, end, device=keys.device)[:, None]  # (rows, end)
        for head in range(keys.shape[1]):
            block = chunk_queries[:, head * groups : (head + 1) * groups, start:end].reshape(batch, -1, head_dim)
            logits = float32_scores(block, keys[:, head, : seen_before + end].transpose(1, 2)).mul_(scaling)
            logits = logits.view(batch, groups, end - start, seen_before + end)
            logits[..., seen_before:].masked_fill_(future, lowest)
            probabilities = logits.softmax(dim=-1)[..., :context_length]  # (batch, groups, rows, context)
            best = probabilities.amax(dim=(1, 2))  # (batch, context)
            torch.maximum(running_max[:, head], best, out=running_max[:, head])
