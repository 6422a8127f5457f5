"""Split-KV ("flash-decoding") attention over a `FlatHeadwiseLayer`, written in Triton.

At decode a (batch, kv-head) sequence has one query token per query head, too little work for one
GPU program per sequence to keep the GPU busy. So the keys of every sequence are split into
`num_splits` chunks, one program each (grid: sequences x splits x query-row blocks); each program
runs an online softmax in fp32 over its chunk and writes (normalised output, log-sum-exp); a second
small kernel merges the chunks, or, with a reusable `SplitWorkspace` (decode steps), the program that
finishes a sequence's last chunk merges them (one kernel per call). `decode_plan` chooses
`num_splits` and the key step from the longest sequence, the number of sequences and the GPU's
multiprocessor count, so that batch 1 already fills the GPU (settings measured by
benchmarks/tune_decode_attention.py). The same kernels serve multi-token
appends (a question): query j of q_len sees rows < length - q_len + j + 1.

Shapes: query (batch, heads, q_len, head_dim), any strides with a unit last stride; the layer's flat
keys/values (rows, head_dim); offsets/lengths (batch * kv_heads,). Output (batch, q_len, heads,
head_dim) in the query's dtype. CUDA only (CPU tensors under TRITON_INTERPRET=1, for tests), fp16/bf16/fp32,
head_dim <= 256. fp32 uses IEEE fp32 dot products (no tf32). Keys/values may instead be float8_e4m3fn codes
with (rows,) float32 key/value scales (a layer with kv_dtype float8_e4m3fn), dequantized inside the kernel.
Triton is imported only when a function here runs, so this module imports on machines without it
(adakv.kernels.triton_flat holds the @triton.jit kernels).
"""

from __future__ import annotations

import importlib.util
import math
import os
from functools import lru_cache

import torch

from .device import multiprocessor_count

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MIN_KEYS_PER_SPLIT = 256  # below this a split's fixed cost outweighs the parallelism it adds
MAX_SPLITS = 128
PROGRAMS_PER_SM = 2  # target grid size: a couple of programs per multiprocessor
# With few (batch, kv-head) sequences each program walks a long chunk: then 128-key steps and one program
# per multiprocessor read fastest (benchmarks/results/tune_decode_attention_NVIDIA_H200.json: batch 1,
# 8 KV heads, 8,192 rows per head 20.8 -> 18.4 us; 32,768 rows 51.1 -> 44.6 us; batch 8 keeps 64-key steps).
FEW_SEQUENCES_PER_SM = 0.25  # "few": sequences x row blocks <= this share of the multiprocessors
LONG_CHUNK_BLOCK_N = 128
LOG2_E = math.log2(math.e)
INTERPRETER_MULTIPROCESSORS = 132  # planned for under Triton's CPU interpreter (tests): an H200's count


def interpreted() -> bool:
    """Whether Triton runs its CPU interpreter (TRITON_INTERPRET=1, tests): then CPU tensors are taken."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def planned_multiprocessors(device: torch.device) -> int:
    return multiprocessor_count(device.index) if device.type == "cuda" else INTERPRETER_MULTIPROCESSORS


@lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


@lru_cache(maxsize=None)
def _kernels():
    from . import triton_flat

    return triton_flat


@lru_cache(maxsize=None)
def block_sizes(query_rows: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes: query rows (>= 16 for tl.dot), keys per step, padded head_dim, warps, stages."""
    block_d = max(16, next_power_of_2(head_dim))
    block_m = min(64, max(16, next_power_of_2(query_rows)))
    wide = _wide_rows(block_d, dtype)
    block_n = 32 if wide else 64
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4, num_stages=2 if wide else 3)


def _wide_rows(block_d: int, dtype: torch.dtype) -> bool:
    """Rows of more than 256 bytes (beyond 128 bf16 values) need smaller key steps to fit shared memory."""
    return block_d * (4 if dtype == torch.float32 else 2) > 256


def next_power_of_2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def choose_num_splits(
    max_length: int, programs_without_split: int, num_sms: int, programs_per_sm: int = PROGRAMS_PER_SM
) -> int:
    """Splits per sequence so that sequences x row blocks x splits stays within ~programs_per_sm per SM
    (whole waves: a partly filled extra wave costs as much as a full one), with at least
    MIN_KEYS_PER_SPLIT keys in a split of the longest sequence."""
    wanted = programs_per_sm * num_sms // max(programs_without_split, 1)
    useful = math.ceil(max_length / MIN_KEYS_PER_SPLIT)
    return max(1, min(wanted, useful, MAX_SPLITS))


def decode_plan(
    max_length: int, sequences: int, query_rows: int, head_dim: int, dtype: torch.dtype, num_sms: int
) -> tuple[dict, int]:
    """(tile sizes, num_splits) for `sequences` (batch x kv-heads) of at most max_length rows each,
    `query_rows` query rows per sequence (GQA group x new tokens)."""
    sizes = block_sizes(query_rows, head_dim, dtype)
    programs = sequences * cdiv(query_rows, sizes["BLOCK_M"])
    few_sequences = programs <= FEW_SEQUENCES_PER_SM * num_sms
    if few_sequences and sizes["BLOCK_N"] < LONG_CHUNK_BLOCK_N and not _wide_rows(sizes["BLOCK_D"], dtype):
        sizes = sizes | dict(BLOCK_N=LONG_CHUNK_BLOCK_N)
    programs_per_sm = 1 if few_sequences else PROGRAMS_PER_SM
    return sizes, choose_num_splits(max_length, programs, num_sms, programs_per_sm)


def check_inputs(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_kv_heads: int, scales: tuple | None = None
) -> None:
    """scales: (key_scales, value_scales), each (rows,) float32, when keys/values are float8_e4m3fn codes."""
    if not (query.is_cuda and keys.is_cuda and values.is_cuda) and not interpreted():
        raise ValueError(
            f"Triton flat attention needs CUDA tensors, got query on {query.device} and keys on {keys.device}."
        )
    kv_dtype = query.dtype if scales is None else torch.float8_e4m3fn
    if query.dtype not in SUPPORTED_DTYPES or keys.dtype != kv_dtype or values.dtype != kv_dtype:
        raise TypeError(
            f"Triton flat attention supports {SUPPORTED_DTYPES} with keys and values in the query's dtype, or in "
            f"torch.float8_e4m3fn with scales; got {query.dtype}, {keys.dtype}, {values.dtype} "
            f"({'with' if scales is not None else 'without'} scales)."
        )
    if scales is not None:
        for name, tensor in zip(("key_scales", "value_scales"), scales):
            if tensor.dtype != torch.float32 or tensor.shape != keys.shape[:1] or not tensor.is_contiguous():
                raise ValueError(
                    f"{name} must be contiguous float32 of shape ({keys.shape[0]},) (one scale per row), got "
                    f"{tensor.dtype} {tuple(tensor.shape)}."
                )
    head_dim = query.shape[-1]
    if head_dim > MAX_HEAD_DIM or keys.shape[-1] != head_dim or values.shape != keys.shape:
        raise ValueError(
            f"head_dim must be <= {MAX_HEAD_DIM} and equal for query {tuple(query.shape)}, keys "
            f"{tuple(keys.shape)} and values {tuple(values.shape)}."
        )
    if keys.dim() != 2 or not keys.is_contiguous() or not values.is_contiguous():
        raise ValueError("keys and values must be contiguous (rows, head_dim) buffers.")
    if query.shape[1] % num_kv_heads:
        raise ValueError(f"{query.shape[1]} query heads cannot be grouped over {num_kv_heads} KV heads.")


class SplitWorkspace:
    """Reusable buffers for decode steps: fp32 per-split partial outputs and log2-sum-exps, and the int32
    counters with which the last split of each (sequence, row block) merges them (zero between calls).

    Kept on a `FlatHeadwiseLayer` so that a decode step allocates nothing for it. Reuse is safe because
    every call that uses it runs on the same CUDA stream (one model forward after another), so a call's
    kernels finish reading the buffer before the next call's kernels write it."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self.counters: torch.Tensor | None = None
        self.key = None
        self.views: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def take(self, slots: int, head_dim: int, counters: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(partial outputs of >= slots * head_dim, log2-sum-exps of >= slots, >= `counters` zeroed int32
        counters) views on `device`; the buffers grow, never shrink, and the views are reused while the sizes
        stay the same."""
        key = (slots, head_dim, counters, device)
        if key != self.key:
            numel = slots * (head_dim + 1)
            if self.buffer is None or self.buffer.numel() < numel or self.buffer.device != device:
                self.buffer = torch.empty(numel, device=device, dtype=torch.float32)
            if self.counters is None or self.counters.numel() < counters or self.counters.device != device:
                self.counters = torch.zeros(counters, device=device, dtype=torch.int32)
            self.views = (self.buffer, self.buffer[slots * head_dim :], self.counters)
            self.key = key
        return self.views


def split_kv_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    lengths: torch.Tensor,
    num_kv_heads: int,
    max_length: int,
    scaling: float,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    tiles: dict | None = None,
    extra_length: int = 0,
    workspace: SplitWorkspace | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """query (batch, heads, q_len, head_dim) over sequences s = batch * num_kv_heads + kv_head whose rows
    are keys/values[offsets[s] : offsets[s] + lengths[s] + extra_length] -> (batch, q_len, heads, head_dim).
    scales: (key_scales, value_scales) (rows,) float32 when keys/values are float8_e4m3fn codes.

    Every length must be >= q_len (the new tokens are the last rows); max_length >= the longest length.
    offsets/lengths: int32 or int64 CUDA tensors. out: optional contiguous output buffer. tiles: overrides
    of `block_sizes` (BLOCK_N, num_warps, num_stages; for tuning). extra_length lets a caller pass
    (context rows, appended tokens) without adding them in a separate launch. workspace: reusable
    buffers for the per-split results, whose last split then merges (see `SplitWorkspace`); None allocates
    one per call and merges in a second kernel."""
    check_inputs(query, keys, values, num_kv_heads, scales)
    if out is not None:
        batch, heads, query_length, head_dim = query.shape
        if out.shape != (batch, query_length, heads, head_dim) or out.dtype != query.dtype:
            raise ValueError(f"out must be ({batch}, {query_length}, {heads}, {head_dim}) {query.dtype}.")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous.")
    return _launch(
        query, keys, values, offsets, lengths, num_kv_heads, max_length, scaling, num_splits, out, tiles,
        extra_length, workspace, scales,
    )  # fmt: skip


def _launch(
    query, keys, values, offsets, lengths, num_kv_heads, max_length, scaling, num_splits, out, tiles,
    extra_length, workspace, scales=None,
) -> torch.Tensor:  # fmt: skip
    """`split_kv_attention` after its input checks (the decode hot path calls this directly)."""
    if query.stride(-1) != 1:
        query = query.contiguous()
    batch, heads, query_length, head_dim = query.shape
    group = heads // num_kv_heads
    sequences = batch * num_kv_heads
    query_rows = group * query_length
    sizes, planned_splits = decode_plan(
        max_length, sequences, query_rows, head_dim, query.dtype, planned_multiprocessors(query.device)
    )
    if tiles:
        sizes = sizes | tiles
    row_blocks = cdiv(query_rows, sizes["BLOCK_M"])
    if num_splits is None:
        num_splits = planned_splits

    # one workspace for the per-split outputs (slots, head_dim) and log2-sum-exps (slots,); with a reusable
    # workspace (decode steps) the last split of each (sequence, row block) merges, counted in `counters`
    # (asked for one per sequence and query row, as the CUDA decode path reserves them: see kernels.py)
    slots = sequences * num_splits * query_rows
    if workspace is None:
        buffer = torch.empty(slots * (head_dim + 1), device=query.device, dtype=torch.float32)
        partial_out, partial_lse, counters = buffer[: slots * head_dim], buffer[slots * head_dim :], buffer
    else:  # the kernels index from the start of each view, so the views may be longer than needed
        partial_out, partial_lse, counters = workspace.take(slots, head_dim, sequences * query_rows, query.device)
    output = out if out is not None else query.new_empty(batch, query_length, heads, head_dim)
    kernels = _kernels()
    key_scales, value_scales = (keys, values) if scales is None else scales  # unread unless SCALED
    kernels.partial_attention[(sequences, num_splits, row_blocks)](
        query, keys, values, key_scales, value_scales, offsets, lengths, partial_out, partial_lse, output, counters,
        query.stride(0), query.stride(1), query.stride(2), keys.stride(0),
        output.stride(0), output.stride(1), output.stride(2),
        scaling * LOG2_E, extra_length, num_kv_heads, query_length, num_splits,
        GROUP=group, HEAD_DIM=head_dim, DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        COMBINE_IN_LAST=workspace is not None, SCALED=scales is not None, **sizes,
    )  # fmt: skip
    if workspace is None:
        kernels.combine_splits[(sequences, row_blocks)](
            partial_out, partial_lse, output,
            output.stride(0), output.stride(1), output.stride(2),
            num_kv_heads, query_length, num_splits,
            GROUP=group, HEAD_DIM=head_dim, BLOCK_M=sizes["BLOCK_M"], BLOCK_D=sizes["BLOCK_D"],
        )  # fmt: skip
    return output


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_flat_attention(query: torch.Tensor, layer, scaling: float, num_splits: int | None = None) -> torch.Tensor:
    """query (batch, heads, q_len, head_dim) over a FlatHeadwiseLayer's rows -> (batch, q_len, heads, head_dim).

    The layer's buffers are contiguous (rows, head_dim) tensors of its kv_dtype by construction (fp8 ones with
    their (rows,) scales), so a decode step checks only the query (the full check runs when that cheap test
    fails, for its message).
    Single-token steps reuse the layer's split workspace; longer appends allocate theirs (it grows with
    the number of query tokens and should not stay allocated)."""
    scales = (layer.key_scales, layer.value_scales) if layer.key_scales is not None else None
    if not (
        query.dtype == layer.dtype
        and query.is_cuda
        and query.shape[-1] == layer.head_dim
        and layer.keys.is_cuda
        and query.dtype in SUPPORTED_DTYPES
        and layer.head_dim <= MAX_HEAD_DIM
        and query.shape[1] % layer.num_heads == 0
    ):
        check_inputs(query, layer.keys, layer.values, layer.num_heads, scales)
    workspace = layer.split_workspace if query.shape[-2] == 1 else None
    return _launch(
        query, layer.keys, layer.values, layer.offsets, layer.seq_lengths, layer.num_heads, layer.max_length,
        scaling, num_splits, None, None, 0, workspace, scales,
    )  # fmt: skip
