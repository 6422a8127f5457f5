"""The GEMV's tile plan (pure arithmetic, no Triton import): which tiles `triton_gemv.gemv` launches for a
number of input rows and a weight shape."""

from __future__ import annotations

MAX_ROWS = 16  # decode batches; longer inputs are a matrix product's job

# Tile plan, fitted to benchmarks/results/gemv_NVIDIA_H200.json (bf16, the 8B shape's five weight shapes,
# 1 and 8 rows, 36 settings each): one setting per class below is within 3% of each shape's fastest there.
# The classes are by output features per multiprocessor: few -> fewer, longer programs (wide K tiles).
FEW_FEATURES_PER_SM = 32  # N <= 32 x SMs: o_proj / down_proj of the 8B shape (N = 4096 on 132 SMs)
MANY_FEATURES_PER_SM = 64  # N > 64 x SMs: gate/up joined and the lm_head


def gemv_tiles(rows: int, n_features: int, num_sms: int, element_bytes: int = 2) -> dict:
    """Tile sizes and launch settings of the GEMV for `rows` input rows and an (n_features, K) weight of
    `element_bytes` per value. The plan is fitted for 2-byte values; 4-byte ones (fp32) take half as wide K
    tiles, the same bytes per tile (the tl.dot path stages its tiles in shared memory, which the 2-byte
    tiles fill to about 192 KiB of an H200's 227)."""
    per_sm = n_features / num_sms
    if rows == 1:  # products in registers: narrow programs, many of them
        block_n, block_k, stages = (16, 1024, 2) if per_sm <= FEW_FEATURES_PER_SM else (8, 512, 2)
    else:  # tl.dot over 16 padded rows
        block_n = 32
        block_k, stages = (512, 4) if per_sm <= FEW_FEATURES_PER_SM else (256, 4 if per_sm <= MANY_FEATURES_PER_SM else 2)
    block_k = block_k * 2 // max(element_bytes, 2)
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=stages)
