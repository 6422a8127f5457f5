"""The fp8 row format of the flat head-wise cache, in pure PyTorch (the CPU path and the test oracle).

A row is one cached token of one KV head: head_dim values. In fp8 it is stored as head_dim float8_e4m3fn
codes plus one float32 scale, amax(|row|) / 448 (448 is e4m3's largest finite value), so that the row's
largest entry maps to +-448 and its values are `codes * scale`. A row of zeros gets scale 1. At head_dim 128
a K+V row takes 2 * (128 + 4) bytes instead of bf16's 2 * 256: 0.516 of the bf16 bytes.

- `quantize(rows)` / `dequantize(codes, scales, dtype)`: the format itself.
- `copy_rows`: dst[dst_index[i]] = src[src_index[i]] for the codes and scales of K and V (compaction and
  re-layout of an fp8 flat layer). Codes are moved as bytes (uint8 views): PyTorch's CPU index kernels do
  not take fp8.
- `append_rows`: quantize new rows into the slots behind each sequence's used rows and advance the lengths,
  as `adakv.kernels.flat_reference.append_rows` does for unquantized rows.

`fp8_refusal(device)` says why a device cannot hold fp8 KV rows (CUDA GPUs below compute capability 8.9,
where the attention kernels cannot convert e4m3). This module imports nothing from the rest of adakv.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
KV_DTYPES = ("float8_e4m3fn",)  # what a press's kv_dtype takes besides None (the model's dtype)
MIN_CAPABILITY = (8, 9)  # e4m3 conversions in the attention kernels need sm_89 (Ada, Hopper) or newer


@dataclass
class ScaledRows:
    """Quantized rows: codes (..., head_dim) float8_e4m3fn and scales (...,) float32; values = codes * scales."""

    codes: torch.Tensor
    scales: torch.Tensor


def quantize(rows: torch.Tensor) -> ScaledRows:
    """rows (..., head_dim) of any float dtype -> ScaledRows with one scale per row (amax / 448)."""
    rows = rows.float()
    amax = rows.abs().amax(dim=-1)
    # a tensor divisor: torch on CUDA multiplies by the reciprocal of a Python scalar divisor, which can
    # differ from the division (the format, and the Triton append kernel, divide) in the last bit
    scales = amax / torch.full_like(amax, FP8_MAX)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    # the division may land a hair above 448, which e4m3fn (no infinity) would turn into NaN
    codes = (rows / scales[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return ScaledRows(codes, scales)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes (..., head_dim) float8_e4m3fn, scales (...,) float32 -> (..., head_dim) in `dtype`."""
    return (codes.float() * scales[..., None]).to(dtype)


def as_bytes(codes: torch.Tensor) -> torch.Tensor:
    """The same memory as uint8 (fp8 codes are one byte each), for index kernels that do not take fp8."""
    return codes.view(torch.uint8)


def copy_rows(
    src: tuple[ScaledRows, ScaledRows], dst: tuple[ScaledRows, ScaledRows], src_index: torch.Tensor, dst_index: torch.Tensor
) -> None:
    """src/dst: (keys, values), codes (rows, head_dim) and scales (rows,) each; src_index/dst_index: (n,) int64."""
    for source, target in zip(src, dst):
        as_bytes(target.codes).index_copy_(0, dst_index, as_bytes(source.codes).index_select(0, src_index))
        target.scales.index_copy_(0, dst_index, source.scales.index_select(0, src_index))


def write_rows(dst: ScaledRows, rows: torch.Tensor, dst_index: torch.Tensor) -> None:
    """Quantize rows (n, head_dim) into dst's rows dst_index (n,) int64."""
    quantized = quantize(rows)
    as_bytes(dst.codes).index_copy_(0, dst_index, as_bytes(quantized.codes))
    dst.scales.index_copy_(0, dst_index, quantized.scales)


def append_rows(
    dst: tuple[ScaledRows, ScaledRows], new_keys: torch.Tensor, new_values: torch.Tensor,
    offsets: torch.Tensor, lengths: torch.Tensor, first_token: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """Quantize new_keys/new_values (sequences, new_tokens, head_dim) into rows offsets[s] + lengths[s] + j -
    first_token[s] of dst (keys, values) for every token j >= first_token[s], then advance `lengths` in place.
    offsets/lengths/first_token: (sequences,) int64; first_token None writes every token."""
    sequences, new_tokens, head_dim = new_keys.shape
    tokens = torch.arange(new_tokens, device=lengths.device)
    first = torch.zeros_like(lengths) if first_token is None else first_token
    destinations = (offsets + lengths - first)[:, None] + tokens[None, :]  # (sequences, new_tokens)
    if first_token is None:  # no boolean selection: nothing waits for the device (CUDA graphs capture this)
        dst_index, keys, values = destinations.reshape(-1), new_keys.reshape(-1, head_dim), new_values.reshape(-1, head_dim)
    else:
        written = tokens[None, :] >= first_token[:, None]
        dst_index, keys, values = destinations[written], new_keys[written], new_values[written]
    write_rows(dst[0], keys, dst_index)
    write_rows(dst[1], values, dst_index)
    lengths += new_tokens - first


def fp8_refusal(device: torch.device) -> str | None:
    """Why fp8 KV rows cannot live on `device` (a sentence), or None when they can (CPU, CUDA sm_89+)."""
    if device.type != "cuda":
        return None
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) >= MIN_CAPABILITY:
        return None
    major, minor = capability
    return (
        f"kv_dtype='float8_e4m3fn' needs a GPU of compute capability 8.9 or newer (Ada, Hopper: e4m3 conversions in "
        f"the attention kernels), but {torch.cuda.get_device_name(device)} is {major}.{minor}. Use kv_dtype=None "
        "(the model's dtype) on this GPU"
    )
