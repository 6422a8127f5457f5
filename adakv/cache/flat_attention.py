"""Attention over a `FlatHeadwiseLayer`: variable-length attention where each (batch, kv-head) is one
sequence, attended by its GQA group of query heads.

The new tokens of the current forward are the last `query_length` rows of every sequence; query j
sees every row up to and including its own (causal within multi-token appends). Paths:

- CUDA, one new token (decode), fp16/bf16/fp32 with a head_dim and GQA group the kernel supports
  (`adakv.kernels.cuda_flat.decode_supported`), adakv's CUDA extension in use (ADAKV_KERNELS is not
  "reference"): `adakv.kernels.cuda_flat.cuda_decode_flat_attention` (csrc/flat_decode.cu), a split-KV kernel
  plus a combine kernel issued by one C++ call, so a decode step costs little host time. Not while a CUDA
  graph is being captured: replays cost no host time, and the Triton kernels take less GPU time.
- CUDA, fp16/bf16/fp32, triton importable: `adakv.kernels.triton_decode` (our split-KV / flash-decoding Triton
  kernels: the keys of every sequence are split over several programs so batch 1 fills the GPU). Used
  for the decode steps the CUDA kernel does not take and for appends of up to TRITON_MAX_QUERY_LENGTH
  tokens; longer appends go to the varlen paths below when one is available, else still to Triton.
- CUDA, fp16/bf16: `torch.nn.attention.varlen.varlen_attn` (FlashAttention inside torch) when it
  accepts `seqused_k` (needed because each sequence's region ends in unused slack rows), else
  `flash_attn_varlen_func` when flash-attn is installed and accepts `seqused_k`.
- CPU: `segment_flat_attention`, PyTorch over each sequence's rows in place (views of the flat buffers,
  one small attention per (batch, kv-head)), so a step reads only the kept rows.
- otherwise: `reference_flat_attention`, plain PyTorch over padded copies of the rows (test oracle and
  GPU fallback; it copies the whole cache every call, so it is slow on long contexts).

A layer that stores fp8 rows (kv_dtype float8_e4m3fn, `layer.quantized`) is read by the Triton kernels on
CUDA (they dequantize inside), by `segment_flat_attention` on CPU and by the reference (both dequantize each
sequence's rows first). The CUDA decode kernel and the FlashAttention varlen paths read unquantized rows only:
asked for by name they raise ValueError (FP8_READERS), and the automatic choice never takes them.
"""

from __future__ import annotations

import inspect
import warnings
from functools import lru_cache

import torch

from adakv.kernels import cuda_flat, triton_decode

FLASH_DTYPES = (torch.float16, torch.bfloat16)
# Above this many K+V bytes per layer the Triton kernels' better memory throughput outweighs their
# ~25-35 us larger host cost (per call on an H200: CUDA kernel 25 vs Triton 49 us at 32 MiB, 52 vs 50 us
# at 64 MiB, 87 vs 52 us at 128 MiB; benchmarks/results/decode_kernels_NVIDIA_H200.md). In GPU time alone
# Triton is faster at every size measured (8 MiB: 11 vs 20 us; tune_decode_attention_NVIDIA_H200.json).
CUDA_DECODE_MAX_BYTES = 48 * 2**20
TRITON_MAX_QUERY_LENGTH = 512  # longer appends prefer FlashAttention's varlen kernels when available


def grouped_queries(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(batch, heads, q, d) -> (batch * kv_heads, group, q, d): each sequence with its query heads."""
    batch, heads, query_length, head_dim = query.shape
    return query.reshape(batch * num_kv_heads, heads // num_kv_heads, query_length, head_dim)


def attention_output(per_sequence: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch * kv_heads, group, q, d) -> (batch, q, heads, d), the layout attention functions return."""
    sequences, group, query_length, head_dim = per_sequence.shape
    return per_sequence.reshape(batch, -1, query_length, head_dim).transpose(1, 2).contiguous()


def reference_flat_attention(query: torch.Tensor, layer, scaling: float) -> torch.Tensor:
    """query: (batch, heads, q, head_dim) -> (batch, q, heads, head_dim)."""
    batch, _, query_length, _ = query.shape
    keys, values = layer.dense_rows()  # (sequences, width, head_dim)
    lengths = layer.lengths
    steps = torch.arange(keys.shape[1], device=query.device)
    # query j may see rows < length - query_length + j + 1
    last_visible = lengths[:, None] - query_length + torch.arange(query_length, device=query.device)[None, :]
    allowed = steps[None, None, :] <= last_visible[:, :, None]  # (sequences, q, width)
    queries = grouped_queries(query, layer.num_heads)
    scores = torch.matmul(queries, keys.unsqueeze(1).transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    return attention_output(torch.matmul(probabilities, values.unsqueeze(1)), batch)


def segment_flat_attention(query: torch.Tensor, layer, scaling: float) -> torch.Tensor:
    """query: (batch, heads, q, head_dim) -> (batch, q, heads, head_dim), one sequence at a time over views
    of its rows (no copy of the cache). Reads the lengths on the host, so it is for CPU tensors (on a GPU
    each call would wait for the device)."""
    batch, _, query_length, _ = query.shape
    queries = grouped_queries(query, layer.num_heads)  # (sequences, group, q, head_dim)
    output = torch.empty_like(queries)
    for sequence, (start, length) in enumerate(zip(layer.offsets.tolist(), layer.lengths.tolist())):
        keys, values = layer.sequence_rows(start, length)
        scores = torch.matmul(queries[sequence], keys.transpose(0, 1)) * scaling  # (group, q, length)
        if query_length > 1:  # query j sees rows < length - query_length + j + 1
            last_visible = length - query_length + torch.arange(query_length, device=query.device)
            hidden = torch.arange(length, device=query.device)[None, :] > last_visible[:, None]
            scores = scores.masked_fill(hidden, float("-inf"))
        probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        output[sequence] = torch.matmul(probabilities, values)
    return attention_output(output, batch)


@lru_cache(maxsize=None)
def _torch_varlen():
    """(varlen_attn, takes_is_causal) when torch's varlen_attn can read slack-padded sequences, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if "seqused_k" not in parameters:
        return None
    return varlen_attn, "is_causal" in parameters


@lru_cache(maxsize=None)
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func if "seqused_k" in inspect.signature(flash_attn_varlen_func).parameters else None


def available_varlen_path() -> str:
    """The FlashAttention-based path for fp16/bf16 CUDA tensors, or "reference" when there is none."""
    if _torch_varlen() is not None:
        return "torch_varlen"
    if _flash_attn_varlen() is not None:
        return "flash_attn"
    return "reference"


def cuda_decode_usable() -> bool:
    """Whether adakv's CUDA extension is in use (ADAKV_KERNELS is not "reference"); it is compiled on first use."""
    return not cuda_flat.use_reference_on_cuda()


def available_gpu_path() -> str:
    """Which implementation `flat_attention` uses for decoding (one new token) with fp16/bf16 CUDA tensors
    of a head_dim and GQA group that `adakv.kernels.cuda_flat.decode_supported` accepts."""
    if cuda_decode_usable():
        return "cuda_decode"
    return "triton" if triton_decode.triton_available() else available_varlen_path()


def capturing_cuda_graph() -> bool:
    """Whether the current CUDA stream is being captured into a graph (False on machines without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def choose_implementation(
    query: torch.Tensor, num_kv_heads: int | None = None, cache_bytes: int = 0, quantized: bool = False
) -> str:
    """The fastest path available for this query (see the module docstring). num_kv_heads: the layer's KV
    heads, which set the GQA group; without it the CUDA decode kernel is not considered. cache_bytes: the
    K+V bytes the step reads; the CUDA decode kernel is chosen up to CUDA_DECODE_MAX_BYTES, and never
    during a CUDA graph capture (it saves host time only, which a graph replay does not spend).
    quantized: the layer stores fp8 rows, which only the Triton kernels and the PyTorch paths read."""
    if not query.is_cuda:
        return "segments" if query.device.type == "cpu" else "reference"
    triton_reads = (
        triton_decode.triton_available()
        and query.dtype in triton_decode.SUPPORTED_DTYPES
        and query.shape[-1] <= triton_decode.MAX_HEAD_DIM
    )
    if quantized:
        return "triton" if triton_reads else "reference"
    if (
        num_kv_heads is not None
        and cache_bytes <= CUDA_DECODE_MAX_BYTES
        and query.shape[-2] == 1
        and cuda_flat.decode_supported(query.dtype, query.shape[-1], query.shape[1] // num_kv_heads)
        and cuda_decode_usable()
        and not capturing_cuda_graph()
    ):
        return "cuda_decode"
    if triton_reads:
        if query.shape[-2] <= TRITON_MAX_QUERY_LENGTH or query.dtype not in FLASH_DTYPES:
            return "triton"
        varlen = available_varlen_path()
        return varlen if varlen != "reference" else "triton"
    return available_varlen_path() if query.dtype in FLASH_DTYPES else "reference"


def _varlen_arguments(query: torch.Tensor, layer):
    batch, heads, query_length, head_dim = query.shape
    group = heads // layer.num_heads
    # (sequences, group, q, d) -> (sequences * q, group, d): the tokens of each sequence, group heads
    packed_queries = grouped_queries(query, layer.num_heads).transpose(1, 2).reshape(-1, group, head_dim)
    sequences = layer.num_sequences
    cu_seq_q = torch.arange(0, (sequences + 1) * query_length, query_length, device=query.device, dtype=torch.int32)
    return dict(
        queries=packed_queries,
        keys=layer.keys.view(-1, 1, head_dim),
        values=layer.values.view(-1, 1, head_dim),
        cu_seq_q=cu_seq_q,
        cu_seq_k=layer.cu_capacity.to(torch.int32),
        seqused_k=layer.lengths.to(torch.int32),
        max_q=query_length,
        max_k=layer.max_length,
        causal=query_length > 1,
    )


def _unpack(output: torch.Tensor, query: torch.Tensor, layer) -> torch.Tensor:
    batch, heads, query_length, head_dim = query.shape
    group = heads // layer.num_heads
    per_sequence = output.reshape(layer.num_sequences, query_length, group, head_dim).transpose(1, 2)
    return attention_output(per_sequence, batch)


def torch_varlen_attention(query: torch.Tensor, layer, scaling: float) -> torch.Tensor:
    varlen_attn, takes_is_causal = _torch_varlen()
    a = _varlen_arguments(query, layer)
    causal = {"is_causal": a["causal"]} if takes_is_causal else {"window_size": (-1, 0) if a["causal"] else (-1, -1)}
    output = varlen_attn(
        a["queries"], a["keys"], a["values"], a["cu_seq_q"], a["cu_seq_k"], a["max_q"], a["max_k"],
        scale=scaling, seqused_k=a["seqused_k"], **causal,
    )  # fmt: skip
    return _unpack(output, query, layer)


def flash_attn_attention(query: torch.Tensor, layer, scaling: float) -> torch.Tensor:
    a = _varlen_arguments(query, layer)
    output = _flash_attn_varlen()(
        a["queries"], a["keys"], a["values"], a["cu_seq_q"], a["cu_seq_k"], a["max_q"], a["max_k"],
        softmax_scale=scaling, causal=a["causal"], seqused_k=a["seqused_k"],
    )  # fmt: skip
    return _unpack(output, query, layer)


IMPLEMENTATIONS = ("reference", "segments", "cuda_decode", "triton", "torch_varlen", "flash_attn")
FP8_READERS = ("reference", "segments", "triton")  # the implementations that read fp8 rows (kv_dtype float8_e4m3fn)


def fp8_refusal(implementation: str) -> str | None:
    """Why `implementation` cannot read a layer of fp8 rows, or None when it can."""
    if implementation in FP8_READERS or implementation not in IMPLEMENTATIONS:
        return None
    names = {"cuda_decode": "adakv's CUDA decode kernel (csrc/flat_decode.cu)", "torch_varlen": "torch's varlen_attn",
             "flash_attn": "flash_attn_varlen_func"}  # fmt: skip
    return (
        f"implementation={implementation!r}: {names[implementation]} reads keys and values in the query's dtype, "
        f"but this layer stores fp8 rows with per-row scales (kv_dtype='float8_e4m3fn'). The paths that read them "
        f"are {FP8_READERS} (None picks one)."
    )


def flat_attention(query: torch.Tensor, layer, scaling: float, implementation: str | None = None) -> torch.Tensor:
    """Attention of `query` (batch, heads, q, head_dim) over `layer`'s flat rows -> (batch, q, heads, head_dim).

    implementation: None picks the best available; or one of IMPLEMENTATIONS ("cuda_decode" takes q == 1 only)."""
    if query.shape[1] % layer.num_heads:
        raise ValueError(f"{query.shape[1]} query heads cannot be grouped over {layer.num_heads} KV heads.")
    if implementation is None:
        implementation = choose_implementation(query, layer.num_heads, layer.used_rows * layer.row_bytes, layer.quantized)
        if query.is_cuda and implementation == "reference":
            _warn_reference_on_gpu()
    elif layer.quantized and fp8_refusal(implementation) is not None:
        raise ValueError(fp8_refusal(implementation))
    if implementation == "cuda_decode":
        return cuda_flat.cuda_decode_flat_attention(query, layer, scaling)
    if implementation == "triton":
        return triton_decode.triton_flat_attention(query, layer, scaling)
    if implementation == "torch_varlen":
        return torch_varlen_attention(query, layer, scaling)
    if implementation == "flash_attn":
        return flash_attn_attention(query, layer, scaling)
    if implementation == "segments":
        return segment_flat_attention(query, layer, scaling)
    if implementation == "reference":
        return reference_flat_attention(query, layer, scaling)
    raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}.")


@lru_cache(maxsize=None)
def _warn_reference_on_gpu() -> None:
    warnings.warn(
        "Neither adakv's CUDA decode kernel (ADAKV_KERNELS=reference, or more than one new token, or an "
        "unsupported dtype/head_dim/GQA group) nor Triton can run this attention, and neither "
        "torch.nn.attention.varlen.varlen_attn nor flash_attn_varlen_func accepts `seqused_k` here; the evict "
        "backend falls back to its PyTorch reference attention, which re-reads the whole cache.",
        stacklevel=3,
    )
