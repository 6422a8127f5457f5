"""Appending tokens to a flat layer that stores fp8 rows: quantize each new key and value row, write its
codes and scale behind the sequence's used rows, advance the sequence's length.

On CUDA with Triton this is one launch per layer and call (`triton_append_rows`: the kernel
`append_fp8_rows` in adakv.kernels.triton_flat), so a decode step in a CUDA graph adds one node per layer;
elsewhere (CPU, ADAKV_KERNELS=reference, no Triton) it is the PyTorch reference,
`adakv.kernels.fp8_reference.append_rows` (a dozen small torch operations). Both quantize as
`fp8_reference.quantize` does.
"""

from __future__ import annotations

import torch

from . import cuda_flat, fp8_reference
from .device import on_device_of
from .fp8_reference import FP8_MAX, ScaledRows
from .triton_decode import next_power_of_2, triton_available


def triton_append_rows(
    dst: tuple[ScaledRows, ScaledRows], new_keys: torch.Tensor, new_values: torch.Tensor,
    offsets: torch.Tensor, lengths: torch.Tensor, first_token: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """`fp8_reference.append_rows` as one Triton launch (CUDA, or CPU under TRITON_INTERPRET=1).

    dst: (keys, values) ScaledRows, codes (rows, head_dim) float8_e4m3fn and scales (rows,) float32, contiguous;
    new_keys/new_values: (sequences, new_tokens, head_dim) with a unit last stride, the same strides;
    offsets/lengths/first_token: (sequences,) int64 (lengths advanced in place)."""
    from . import triton_flat

    sequences, new_tokens, head_dim = new_keys.shape
    if new_keys.stride() != new_values.stride() or new_keys.stride(-1) != 1:
        new_keys, new_values = new_keys.contiguous(), new_values.contiguous()
    keys, values = dst
    with on_device_of(new_keys):
        triton_flat.append_fp8_rows[(sequences,)](
            new_keys, new_values, keys.codes, values.codes, keys.scales, values.scales, offsets, lengths,
            lengths if first_token is None else first_token, new_tokens, new_keys.stride(0), new_keys.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim), FP8_MAX=FP8_MAX, HAS_FIRST=first_token is not None,
        )  # fmt: skip


def append_rows(
    dst: tuple[ScaledRows, ScaledRows], new_keys: torch.Tensor, new_values: torch.Tensor,
    offsets: torch.Tensor, lengths: torch.Tensor, first_token: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """The Triton kernel for CUDA tensors where Triton is there and ADAKV_KERNELS is not "reference", else the
    PyTorch reference (shapes as in `triton_append_rows`)."""
    if new_keys.is_cuda and triton_available() and not cuda_flat.use_reference_on_cuda():
        triton_append_rows(dst, new_keys, new_values, offsets, lengths, first_token)
    else:
        fp8_reference.append_rows(dst, new_keys, new_values, offsets, lengths, first_token)
