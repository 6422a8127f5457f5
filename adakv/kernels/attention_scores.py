"""Attention logits in float32 from half-precision inputs, the products every scoring press starts from."""

from __future__ import annotations

from functools import lru_cache

import torch


def float32_scores(queries: torch.Tensor, keys_transposed: torch.Tensor) -> torch.Tensor:
    """Batched queries (n, rows, d) @ keys (n, d, seq) -> (n, rows, seq) float32.

    On CUDA, fp16/bf16 inputs go through tensor cores with float32 accumulation and output (bmm's
    out_dtype); the products are the same as after upcasting, so only summation order differs."""
    if queries.is_cuda and queries.dtype in (torch.float16, torch.bfloat16) and _bmm_has_out_dtype():
        return torch.bmm(queries, keys_transposed, out_dtype=torch.float32)
    return torch.bmm(queries.float(), keys_transposed.float())


@lru_cache(maxsize=None)
def _bmm_has_out_dtype() -> bool:
    return "dtype" in torch.ops.aten.bmm.overloads()
