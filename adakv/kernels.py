"""CUDA kernels of the flattened head-wise cache (csrc/flat_cache.cu), built on first use.

`copy_rows` and `append_rows` run the CUDA kernels for CUDA tensors and the pure-PyTorch reference
(adakv.kernels_reference) for CPU tensors. `cuda_copy_rows` / `cuda_append_rows` always use the
kernels and refuse anything else with a clear error.

The extension is compiled with torch.utils.cpp_extension + ninja into ADAKV_KERNEL_CACHE (default
~/.cache/adakv/kernels). Set ADAKV_KERNELS=reference to use the PyTorch reference on CUDA too
(e.g. on a machine without nvcc).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

from . import kernels_reference

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROW_ALIGNMENT_BYTES = 16  # the kernels move rows in 16-byte vectors
SOURCES = ("flat_cache.cu", "flat_cache_binding.cpp")


class KernelBuildError(RuntimeError):
    """The CUDA extension could not be compiled; the message holds the compiler output."""


def kernel_cache_dir() -> Path:
    return Path(os.environ.get("ADAKV_KERNEL_CACHE", Path.home() / ".cache" / "adakv" / "kernels"))


def use_reference_on_cuda() -> bool:
    return os.environ.get("ADAKV_KERNELS", "cuda").lower() == "reference"


def _source_dir() -> Path:
    import adakv.csrc

    return Path(adakv.csrc.__file__).parent


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


def cuda_append_rows(dst_keys, dst_values, new_keys, new_values, write_start) -> None:
    """CUDA kernel: dst[write_start[s] + j] = new[s, j] for K and V. Shapes as in the reference."""
    check_kernel_inputs(
        {"dst_keys": dst_keys, "dst_values": dst_values, "new_keys": new_keys, "new_values": new_values},
        {"write_start": write_start},
    )
    if new_keys.dim() != 3 or new_keys.shape != new_values.shape:
        raise ValueError("new_keys/new_values must both be (sequences, new_tokens, head_dim).")
    if dst_keys.dim() != 2 or dst_keys.shape != dst_values.shape:
        raise ValueError("dst_keys/dst_values must both be (rows, head_dim).")
    if write_start.shape[0] != new_keys.shape[0]:
        raise ValueError(f"write_start has {write_start.shape[0]} sequences, new_keys has {new_keys.shape[0]}.")
    load_extension().append_rows(dst_keys, dst_values, new_keys, new_values, write_start)


def _on_reference(tensor: torch.Tensor) -> bool:
    return not tensor.is_cuda or use_reference_on_cuda()


def copy_rows(src_keys, src_values, dst_keys, dst_values, src_index, dst_index) -> None:
    if _on_reference(dst_keys):
        kernels_reference.copy_rows(src_keys, src_values, dst_keys, dst_values, src_index, dst_index)
    else:
        cuda_copy_rows(
            src_keys.contiguous(), src_values.contiguous(), dst_keys, dst_values, src_index, dst_index
        )


def append_rows(dst_keys, dst_values, new_keys, new_values, write_start, check: bool = True) -> None:
    """check=False skips the CUDA kernel's input checks (for callers that ran them once on buffers that
    have not changed since, like FlatHeadwiseLayer's decode steps); new rows are still made contiguous."""
    if _on_reference(dst_keys):
        kernels_reference.append_rows(dst_keys, dst_values, new_keys, new_values, write_start)
    elif check:
        cuda_append_rows(dst_keys, dst_values, new_keys.contiguous(), new_values.contiguous(), write_start)
    else:
        load_extension().append_rows(dst_keys, dst_values, new_keys.contiguous(), new_values.contiguous(), write_start)
