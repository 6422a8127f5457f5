"""CUDA kernels of the flattened head-wise cache (csrc/flat_cache.cu, csrc/flat_decode.cu), built on first use.

`copy_rows` and `append_rows` run the CUDA kernels for CUDA tensors and the pure-PyTorch reference
(adakv.kernels.flat_reference) for CPU tensors. `cuda_copy_rows` / `cuda_append_rows` always use the
kernels and refuse anything else with a clear error.

`cuda_decode_attention` / `cuda_decode_flat_attention`: single-token (decode) attention over the flat
cache in one extension call (a split-KV kernel, plus a combine kernel when the keys are split); CUDA
only, no CPU fallback (adakv.cache.flat_attention.flat_attention picks it or another path, see `decode_supported`).

The extension is compiled with torch.utils.cpp_extension + ninja into ADAKV_KERNEL_CACHE (default
~/.cache/adakv/kernels). Set ADAKV_KERNELS=reference to use the PyTorch reference on CUDA too
(e.g. on a machine without nvcc).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

from . import flat_reference
from .device import multiprocessor_count
from .triton_decode import SplitWorkspace, choose_num_splits

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROW_ALIGNMENT_BYTES = 16  # the kernels move rows in 16-byte vectors
SOURCES = ("flat_cache.cu", "flat_decode.cu", "flat_cache_binding.cpp")
# limits of csrc/flat_decode.cu (the binding checks them too)
DECODE_MAX_GROUP = 16  # query heads per KV head
DECODE_MAX_HEAD_DIM = 256
DECODE_MIN_ROW_BYTES = 64  # head_dim * element size: 64..1024 bytes, a multiple of 16
DECODE_MAX_SPLITS = 128


class KernelBuildError(RuntimeError):
    """The CUDA extension could not be compiled; the message holds the compiler output."""


def kernel_cache_dir() -> Path:
    return Path(os.environ.get("ADAKV_KERNEL_CACHE", Path.home() / ".cache" / "adakv" / "kernels"))


def use_reference_on_cuda() -> bool:
    return os.environ.get("ADAKV_KERNELS", "cuda").lower() == "reference"


def _source_dir() -> Path:
    import adakv.kernels.csrc

    return Path(adakv.kernels.csrc.__file__).parent


@lru_cache(maxsize=None)
def load_extension():
    """Compile (once per machine, cached on disk) and import the extension module."""
    from torch.utils import cpp_extension

    build_dir = kernel_cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(_source_dir() / name) for name in SOURCES]
    try:
        return cpp_extension.load(
            name="adakv_flat_cache",
            sources=sources,
            build_directory=str(build_dir),
            extra_cuda_cflags=["-O3", "--use_fast_math"],
            extra_cflags=["-O3"],
            verbose=False,
        )
    except Exception as error:  # noqa: BLE001 - re-raised with the compiler's output attached
        log = _build_log(build_dir)
        raise KernelBuildError(
            f"Building adakv's CUDA kernels in {build_dir} failed: {error}\n"
            f"--- compiler output ---\n{log}\n"
            "Set ADAKV_KERNELS=reference to use the (slower) PyTorch reference instead."
        ) from error


def _build_log(build_dir: Path) -> str:
    """Re-run ninja to capture its output (cpp_extension only reports the exit status)."""
    import subprocess

    if not (build_dir / "build.ninja").exists():
        return "(no build.ninja was written)"
    result = subprocess.run(["ninja", "-v"], cwd=build_dir, capture_output=True, text=True)
    return (result.stdout + result.stderr)[-20000:]


def check_kernel_inputs(
    rows: dict[str, torch.Tensor], indices: dict[str, torch.Tensor], require_cuda: bool = True
) -> None:
    """Device, dtype, contiguity and shape checks shared by both kernels (clear messages, no asserts)."""
    first_name, first = next(iter(rows.items()))
    if require_cuda and not first.is_cuda:
        raise ValueError(f"adakv CUDA kernels need CUDA tensors, but {first_name} is on {first.device}.")
    if first.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"adakv CUDA kernels support dtypes {SUPPORTED_DTYPES}, got {first.dtype} for {first_name}.")
    head_dim = first.shape[-1]
    row_bytes = head_dim * first.element_size()
    if row_bytes % ROW_ALIGNMENT_BYTES:
        raise ValueError(
            f"adakv CUDA kernels need head_dim * element size to be a multiple of {ROW_ALIGNMENT_BYTES} bytes, "
            f"got head_dim={head_dim} in {first.dtype}."
        )
    for name, tensor in {**rows, **indices}.items():
        if tensor.device != first.device:
            raise ValueError(f"{name} is on {tensor.device} but {first_name} is on {first.device}.")
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous.")
    for name, tensor in rows.items():
        if tensor.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but {first_name} has {first.dtype}.")
        if tensor.shape[-1] != head_dim:
            raise ValueError(f"{name} has head_dim {tensor.shape[-1]} but {first_name} has {head_dim}.")
    for name, tensor in indices.items():
        if tensor.dtype != torch.int64 or tensor.dim() != 1:
            raise TypeError(f"{name} must be a 1-D int64 tensor, got {tensor.dtype} with shape {tuple(tensor.shape)}.")


def cuda_copy_rows(src_keys, src_values, dst_keys, dst_values, src_index, dst_index) -> None:
    """CUDA kernel: dst[dst_index[i]] = src[src_index[i]] for K and V. Shapes as in the reference."""
    check_kernel_inputs(
        {"src_keys": src_keys, "src_values": src_values, "dst_keys": dst_keys, "dst_values": dst_values},
        {"src_index": src_index, "dst_index": dst_index},
    )
    if src_keys.shape != src_values.shape or dst_keys.shape != dst_values.shape:
        raise ValueError("keys and values must have the same shape.")
    if src_keys.dim() != 2 or dst_keys.dim() != 2:
        raise ValueError("copy_rows needs 2-D (rows, head_dim) buffers.")
    if src_index.shape != dst_index.shape:
        raise ValueError(f"src_index {tuple(src_index.shape)} and dst_index {tuple(dst_index.shape)} differ.")
    load_extension().copy_rows(src_keys, src_values, dst_keys, dst_values, src_index, dst_index)


def cuda_append_rows(dst_keys, dst_values, new_keys, new_values, offsets, lengths, first_token=None) -> None:
    """CUDA kernel: dst[offsets[s] + lengths[s] + j - first[s]] = new[s, j] for K and V and every j >= first[s],
    then lengths[s] += new_tokens - first[s]. Shapes as in the reference."""
    indices = {"offsets": offsets, "lengths": lengths}
    if first_token is not None:
        indices["first_token"] = first_token
    check_kernel_inputs(
        {"dst_keys": dst_keys, "dst_values": dst_values, "new_keys": new_keys, "new_values": new_values}, indices
    )
    if new_keys.dim() != 3 or new_keys.shape != new_values.shape:
        raise ValueError("new_keys/new_values must both be (sequences, new_tokens, head_dim).")
    if dst_keys.dim() != 2 or dst_keys.shape != dst_values.shape:
        raise ValueError("dst_keys/dst_values must both be (rows, head_dim).")
    for name, tensor in indices.items():
        if tensor.shape[0] != new_keys.shape[0]:
            raise ValueError(f"{name} has {tensor.shape[0]} sequences, new_keys has {new_keys.shape[0]}.")
    load_extension().append_rows(dst_keys, dst_values, new_keys, new_values, offsets, lengths, first_token)


def decode_supported(dtype: torch.dtype, head_dim: int, group: int) -> bool:
    """Whether csrc/flat_decode.cu handles this dtype, head_dim and GQA group (query heads per KV head)."""
    if dtype not in SUPPORTED_DTYPES:
        return False
    row_bytes = head_dim * dtype.itemsize
    return (
        head_dim <= DECODE_MAX_HEAD_DIM
        and row_bytes >= DECODE_MIN_ROW_BYTES
        and row_bytes % ROW_ALIGNMENT_BYTES == 0
        and 1 <= group <= DECODE_MAX_GROUP
    )


def check_decode_inputs(query, keys, values, offsets, lengths, num_splits: int | None) -> None:
    """The checks of `cuda_decode_attention`, with messages that say what to pass instead (dtypes and shapes
    first, then devices, so the messages are the same on a machine without a GPU)."""
    if query.dtype not in SUPPORTED_DTYPES or keys.dtype != query.dtype or values.dtype != query.dtype:
        raise TypeError(
            f"adakv's CUDA decode attention supports dtypes {SUPPORTED_DTYPES} with one dtype for query, keys and "
            f"values; got {query.dtype}, {keys.dtype}, {values.dtype}."
        )
    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(f"query must be (batch, heads, 1, head_dim) (one decode token), got {tuple(query.shape)}.")
    batch, heads, _, head_dim = query.shape
    if keys.dim() != 2 or keys.shape != values.shape or keys.shape[-1] != head_dim:
        raise ValueError(
            f"keys and values must both be (rows, {head_dim}) buffers, got {tuple(keys.shape)} and "
            f"{tuple(values.shape)}."
        )
    if not keys.is_contiguous() or not values.is_contiguous():
        raise ValueError("keys and values must be contiguous.")
    sequences = offsets.shape[0] if offsets.dim() == 1 else -1
    for name, tensor in {"offsets": offsets, "lengths": lengths}.items():
        if tensor.dtype != torch.int64 or tensor.dim() != 1 or not tensor.is_contiguous():
            raise TypeError(f"{name} must be a contiguous 1-D int64 tensor, got {tensor.dtype} {tuple(tensor.shape)}.")
        if tensor.shape[0] != sequences or batch == 0 or sequences == 0 or sequences % batch:
            raise ValueError(
                f"{name} must have batch * kv_heads entries (batch={batch}), got {tensor.shape[0]} "
                f"(offsets has {sequences})."
            )
    kv_heads = sequences // batch
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot be grouped over {kv_heads} KV heads.")
    if not decode_supported(query.dtype, head_dim, heads // kv_heads):
        raise ValueError(
            f"adakv's CUDA decode attention supports head_dim <= {DECODE_MAX_HEAD_DIM} with head_dim * element size "
            f"a multiple of {ROW_ALIGNMENT_BYTES} bytes and at least {DECODE_MIN_ROW_BYTES}, and up to "
            f"{DECODE_MAX_GROUP} query heads per KV head; got head_dim={head_dim} in {query.dtype} and "
            f"{heads // kv_heads} query heads per KV head. Use adakv.kernels.triton_decode for other shapes."
        )
    if num_splits is not None and not 1 <= num_splits <= DECODE_MAX_SPLITS:
        raise ValueError(f"num_splits must be None or in [1, {DECODE_MAX_SPLITS}], got {num_splits}.")
    if not query.is_cuda:
        raise ValueError(f"adakv's CUDA decode attention needs CUDA tensors, but query is on {query.device}.")
    for name, tensor in {"keys": keys, "values": values, "offsets": offsets, "lengths": lengths}.items():
        if tensor.device != query.device:
            raise ValueError(f"{name} is on {tensor.device} but query is on {query.device}.")


def cuda_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    lengths: torch.Tensor,
    scaling: float,
    max_length: int,
    num_splits: int | None = None,
    workspace: SplitWorkspace | None = None,
    check: bool = True,
) -> torch.Tensor:
    """One decode token per query head over the flat cache -> (batch, 1, heads, head_dim) in query's dtype.

    query (batch, heads, 1, head_dim), any strides; keys/values (rows, head_dim) contiguous; sequence
    s = batch * kv_heads + kv_head (kv_heads = len(offsets) / batch) reads rows
    [offsets[s], offsets[s] + lengths[s]) and is attended by query heads kv_head * group .. kv_head * group +
    group - 1. offsets/lengths: int64 CUDA tensors; the kernel reads the lengths on the device, so a CUDA
    graph that captured this call stays right while the lengths change.
    max_length (a host int >= every sequence's length) sets the number of splits like the Triton path
    (`adakv.kernels.triton_decode.choose_num_splits`) unless num_splits is given. workspace: a reusable
    `SplitWorkspace` for the per-split results (None allocates one when there is more than one split).
    check=False skips the Python checks (the C++ binding still checks what the kernels rely on)."""
    if check:
        check_decode_inputs(query, keys, values, offsets, lengths, num_splits)
    sequences = offsets.shape[0]
    if num_splits is None:
        num_splits = choose_num_splits(max_length, sequences, multiprocessor_count(query.device.index))
    batch, heads, _, head_dim = query.shape
    all_query_rows = sequences * (heads // (sequences // batch))  # sequences x group
    if workspace is None and num_splits > 1:
        workspace = SplitWorkspace()
    if workspace is not None:
        # Also reserves the workspace's merge counters (one per sequence and query row at most), with which
        # the Triton kernels that a CUDA graph captures in place of this one merge: allocated and zeroed
        # here, in an eager step, a capture finds them ready instead of recording their zeroing into every
        # replay (so this runs with one split too).
        partial_out, partial_lse, _ = workspace.take(num_splits * all_query_rows, head_dim, all_query_rows, query.device)
    if num_splits == 1:
        return load_extension().decode_attention(query, keys, values, offsets, lengths, scaling, 1)
    return load_extension().decode_attention(
        query, keys, values, offsets, lengths, scaling, num_splits, partial_out, partial_lse
    )


def cuda_decode_flat_attention(query: torch.Tensor, layer, scaling: float, num_splits: int | None = None):
    """`cuda_decode_attention` over a FlatHeadwiseLayer (query (batch, heads, 1, head_dim) -> (batch, 1, heads,
    head_dim)), reusing the layer's split workspace. The layer's buffers are contiguous (rows, head_dim) tensors
    of its dtype with int64 offsets/seq_lengths by construction, so only the query is checked here (the full
    check runs when that cheap test fails, for its message). A layer of fp8 rows (kv_dtype float8_e4m3fn) is
    refused: this kernel reads rows in the query's dtype."""
    if getattr(layer, "key_scales", None) is not None:
        raise ValueError(
            "adakv's CUDA decode kernel (csrc/flat_decode.cu) reads keys and values in the query's dtype, but this "
            "layer stores fp8 rows with per-row scales (kv_dtype='float8_e4m3fn'): read it with "
            "adakv.kernels.triton_decode.triton_flat_attention (flat_attention picks it)."
        )
    if not (
        query.is_cuda
        and query.dtype == layer.dtype
        and query.dim() == 4
        and query.shape[2] == 1
        and query.shape[3] == layer.head_dim
        and query.shape[0] == layer.batch_size
        and query.shape[1] % layer.num_heads == 0
        and layer.keys.is_cuda
        and decode_supported(query.dtype, layer.head_dim, query.shape[1] // layer.num_heads)
        and (num_splits is None or 1 <= num_splits <= DECODE_MAX_SPLITS)
    ):
        check_decode_inputs(
            query, layer.keys, layer.values, layer.offsets, layer.seq_lengths, num_splits
        )
    return cuda_decode_attention(
        query, layer.keys, layer.values, layer.offsets, layer.seq_lengths, scaling,
        layer.max_length, num_splits, layer.split_workspace, check=False,
    )  # fmt: skip


def _on_reference(tensor: torch.Tensor) -> bool:
    return not tensor.is_cuda or use_reference_on_cuda()


def copy_rows(src_keys, src_values, dst_keys, dst_values, src_index, dst_index) -> None:
    if _on_reference(dst_keys):
        flat_reference.copy_rows(src_keys, src_values, dst_keys, dst_values, src_index, dst_index)
    else:
        cuda_copy_rows(
            src_keys.contiguous(), src_values.contiguous(), dst_keys, dst_values, src_index, dst_index
        )


def append_rows(dst_keys, dst_values, new_keys, new_values, offsets, lengths, first_token=None, check: bool = True):
    """Append new rows behind each sequence's used rows and advance `lengths` (see `cuda_append_rows`).
    check=False skips the CUDA kernel's input checks (for callers that ran them once on buffers that
    have not changed since, like FlatHeadwiseLayer's decode steps); new rows are still made contiguous."""
    if _on_reference(dst_keys):
        flat_reference.append_rows(dst_keys, dst_values, new_keys, new_values, offsets, lengths, first_token)
    elif check:
        cuda_append_rows(
            dst_keys, dst_values, new_keys.contiguous(), new_values.contiguous(), offsets, lengths, first_token
        )
    else:
        load_extension().append_rows(
            dst_keys, dst_values, new_keys.contiguous(), new_values.contiguous(), offsets, lengths, first_token
        )
