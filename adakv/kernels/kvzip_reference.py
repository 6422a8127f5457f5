"""KVzip's scoring update: the running maximum attention each context key receives from the reconstruction
queries, in PyTorch (`torch_max_attention`, the reference and the path off CUDA) or through the Triton
kernels of kvzip_scoring.py (`update_max_attention` picks).

`attend_and_score` is what the reconstruction runs as each scored layer's attention: the chunk's attention
output and its scores from one softmax (PyTorch: `torch_attend_and_score`; CUDA: torch's flash attention,
whose log-sum-exps feed one Triton pass, `flash_attend_and_score`), so the keys are not read again for a
separate normaliser pass and the queries need not be recomputed."""

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
    if not fused_scoring(chunk_queries, keys):
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


def attend_and_score(
    running_max: torch.Tensor, chunk_queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
    context_length: int, chunk_start: int, first_counted: int, output_needed: bool = True,
) -> torch.Tensor | None:
    """One reconstruction chunk's attention *and* its KVzip scores from the same softmax.

    Shapes as in `torch_max_attention`, values like keys. Returns the attention output (batch, chunk, heads,
    head_dim) in the queries' dtype (what a transformers attention function returns), or None when
    `output_needed` is False (the last scored layer: only its scores are read). running_max is updated as
    `torch_max_attention` updates it. Where the Triton kernels take the tensors (CUDA): scores alone by both
    kernels (`update_max_attention`); with the output, for fp16/bf16, `flash_attend_and_score` (torch's flash
    attention gives the output and each query's log-sum-exp, one Triton pass turns them into the scores).
    Elsewhere (CPU, fp32 on CUDA) `torch_attend_and_score`."""
    fused = fused_scoring(chunk_queries, keys)
    if fused and not output_needed:  # the scores alone: two Triton passes over the keys, no values read
        update_max_attention(running_max, chunk_queries, keys, scaling, context_length, chunk_start, first_counted)
        return None
    if fused and flash_attention_takes(chunk_queries):
        return flash_attend_and_score(
            running_max, chunk_queries, keys, values, scaling, context_length, chunk_start, first_counted
        )
    return torch_attend_and_score(
        running_max, chunk_queries, keys, values, scaling, context_length, chunk_start, first_counted, output_needed
    )


def fused_scoring(chunk_queries: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether the Triton scoring kernels take these tensors."""
    return (
        keys.is_cuda
        and triton_available()
        and chunk_queries.dtype == keys.dtype
        and keys.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and keys.shape[-1] <= MAX_HEAD_DIM
    )


def flash_attention_takes(queries: torch.Tensor) -> bool:
    """Whether torch's flash attention (which returns the log-sum-exp) takes these queries."""
    head_dim = queries.shape[-1]
    return queries.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256


def torch_attend_and_score(
    running_max: torch.Tensor, chunk_queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
    context_length: int, chunk_start: int, first_counted: int, output_needed: bool = True,
) -> torch.Tensor | None:
    """`attend_and_score` in PyTorch: blocks of rows as `torch_max_attention`, each block's float32
    probabilities (computed exactly as there) both scored and multiplied by the values. Rows of the repeat
    prompt are attended but not scored; with `output_needed` False they are skipped and no values are read."""
    batch, heads, chunk, head_dim = chunk_queries.shape
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    first_row = max(0, first_counted - chunk_start)
    seen_before = context_length + chunk_start
    rows_per_block = min(SCORING_BLOCK_ROWS, max(1, SCORING_BLOCK_ELEMENTS // (keys.shape[2] * groups)))
    output = chunk_queries.new_empty(batch, chunk, heads, head_dim) if output_needed else None
    lowest = torch.finfo(torch.float32).min
    for start in range(0 if output_needed else first_row, chunk, rows_per_block):
        end = min(start + rows_per_block, chunk)
        future = torch.arange(end, device=keys.device)[None, :] > torch.arange(start, end, device=keys.device)[:, None]
        for head in range(kv_heads):
            block = chunk_queries[:, head * groups : (head + 1) * groups, start:end].reshape(batch, -1, head_dim)
            logits = float32_scores(block, keys[:, head, : seen_before + end].transpose(1, 2)).mul_(scaling)
            logits = logits.view(batch, groups, end - start, seen_before + end)
            logits[..., seen_before:].masked_fill_(future, lowest)
            probabilities = logits.softmax(dim=-1)  # (batch, groups, rows, seen_before + end)
            counted = probabilities[:, :, max(0, first_row - start) :, :context_length]
            if counted.shape[2]:
                torch.maximum(running_max[:, head], counted.amax(dim=(1, 2)), out=running_max[:, head])
            if output is not None:
                mixed = probabilities.view(batch, -1, seen_before + end) @ values[:, head, : seen_before + end].float()
                output[:, start:end, head * groups : (head + 1) * groups] = (
                    mixed.view(batch, groups, end - start, head_dim).transpose(1, 2).to(output.dtype)
                )
    return output


def flash_attention_with_logsumexp(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's flash attention (CUDA, or its CPU twin): queries (batch, heads, rows, head_dim), keys/values
    (batch, heads, n, head_dim) -> output (batch, heads, rows, head_dim), natural log-sum-exp of each row's
    scaled logits (batch, heads, rows) float32. causal: rows and keys end together (square here)."""
    if queries.is_cuda:
        output, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            queries, keys, values, 0.0, causal, False, scale=scaling
        )[:2]
    else:
        output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            queries, keys, values, 0.0, causal, scale=scaling
        )
    return output, lse[..., : queries.shape[-2]]


def flash_attention_split(
    chunk_queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float, seen_before: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A reconstruction chunk's attention as two flash calls merged by their log-sum-exps: every row sees the
    keys before the chunk (one call, each KV head's query heads folded into its rows, so no key is repeated)
    and the chunk's own keys causally (a square causal call). Returns output (batch, chunk, heads, head_dim)
    in the queries' dtype and the natural log-sum-exp (batch, heads, chunk) float32."""
    batch, heads, chunk, head_dim = chunk_queries.shape
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    folded = chunk_queries.reshape(batch, kv_heads, groups * chunk, head_dim)
    before, lse_before = flash_attention_with_logsumexp(
        folded, keys[:, :, :seen_before], values[:, :, :seen_before], scaling, causal=False
    )
    own_keys, own_values = (t[:, :, seen_before:].repeat_interleave(groups, dim=1) for t in (keys, values))
    own, lse_own = flash_attention_with_logsumexp(chunk_queries.contiguous(), own_keys, own_values, scaling, causal=True)
    lse_before = lse_before.reshape(batch, heads, chunk)
    lse = torch.logaddexp(lse_before, lse_own)
    before = before.reshape(batch, heads, chunk, head_dim)
    merged = before.float() * (lse_before - lse).exp_()[..., None] + own.float() * (lse_own - lse).exp_()[..., None]
    return merged.to(chunk_queries.dtype).transpose(1, 2), lse


def flash_attend_and_score(
    running_max: torch.Tensor, chunk_queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
    context_length: int, chunk_start: int, first_counted: int,
) -> torch.Tensor:
    """`attend_and_score` on CUDA: `flash_attention_split`'s output, and its log-sum-exps handed to the
    Triton maximum-probability pass (so the keys are read once for the scores, not twice)."""
    output, lse = flash_attention_split(chunk_queries, keys, values, scaling, context_length + chunk_start)
    from .kvzip_scoring import triton_max_probability

    queries = chunk_queries if chunk_queries.stride(-1) == 1 else chunk_queries.contiguous()
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    triton_max_probability(running_max, queries, keys, lse, scaling, context_length, chunk_start, first_counted)
    return output
