"""GPU time and host time of one decode step's attention: adakv's CUDA kernel vs its Triton kernels (CUDA only).

Sets `adakv.cache.flat_attention.CUDA_DECODE_MAX_BYTES`, the cache size up to which the evict backend's decode uses the
CUDA kernel (one C++ call, little host time) rather than Triton (more host time, higher memory throughput).
One layer of a Llama-3.1-8B-shaped cache (8 KV heads, 32 query heads, head_dim 128, bf16), every head
holding `rows` rows. GPU us: back-to-back calls queued behind a long matmul, so launches are hidden and
only kernel time counts. Host us: the same calls issued on an idle GPU (CPU-bound at small sizes).

    python benchmarks/bench_decode_kernels.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from adakv.kernels import cuda_flat as kernels, triton_decode
from adakv.cache.flat import FlatHeadwiseLayer
from adakv.cache.flat_attention import CUDA_DECODE_MAX_BYTES
from adakv.apps.provenance import provenance

CASES = [(1, 4096), (1, 8192), (1, 16384), (1, 32768), (8, 8192), (8, 32768), (1, 131072)]


def make_layer(batch: int, rows: int, kv_dtype: str | None = None, uneven: bool = False) -> FlatHeadwiseLayer:
    """A flat layer of (batch, 8 KV heads, rows, 128) random bf16 keys and values, every row kept, or with
    `uneven` head 0 keeping all `rows` and the others rows // 7 each (Ada-KV's extreme: the layer holds
    about 2 x rows per sequence, a quarter of the rows on average per head); kv_dtype: stored as the press
    option would store them."""
    keys = torch.randn(batch, 8, rows, 128, device="cuda", dtype=torch.bfloat16)
    keep = torch.ones(batch, 8, rows, dtype=torch.bool, device="cuda")
    if uneven:
        keep[:, 1:] = torch.arange(rows, device="cuda") < rows // 7
    stored = getattr(torch, kv_dtype) if kv_dtype else None
    return FlatHeadwiseLayer(keys, torch.randn_like(keys), keep, config=None, kv_dtype=stored)


def timings(fn, busy: torch.Tensor, calls: int = 50) -> dict:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    host_us = (time.perf_counter() - started) / calls * 1e6
    for _ in range(10):
        busy @ busy  # keeps the GPU busy while every call below is queued
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return dict(host_us=round(host_us, 1), gpu_us=round(start.elapsed_time(end) / calls * 1000, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode_kernels.py needs a CUDA device.")
    busy = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    device = torch.cuda.get_device_name()
    rows_out = []
    for batch, rows in CASES:
        layer = make_layer(batch, rows)
        query = torch.randn(batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        cache_mib = layer.used_rows * layer.row_bytes / 2**20
        triton = timings(lambda: triton_decode.triton_flat_attention(query, layer, 0.088), busy)
        cuda = timings(lambda: kernels.cuda_decode_flat_attention(query, layer, 0.088), busy)
        row = dict(batch=batch, rows_per_head=rows, cache_mib=round(cache_mib, 1), triton=triton, cuda_decode=cuda)
        rows_out.append(row)
        print(json.dumps(row), flush=True)
        del layer
    lines = [
        f"# Decode attention kernels on {device}",
        "",
        f"torch {torch.__version__}; one layer, 8 KV / 32 query heads, head_dim 128, bf16. GPU us = kernel time with "
        "launches hidden; host us = time per call issued back to back on an idle GPU (the cost at batch 1, "
        f"where decode is CPU-bound). The evict backend uses the CUDA kernel up to {CUDA_DECODE_MAX_BYTES / 2**20:.0f} MiB.",
        "",
        "| batch | rows/head | K+V MiB | Triton host us | Triton GPU us | CUDA host us | CUDA GPU us |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows_out:
        t, c = row["triton"], row["cuda_decode"]
        lines.append(
            f"| {row['batch']} | {row['rows_per_head']} | {row['cache_mib']} | {t['host_us']} | {t['gpu_us']} | "
            f"{c['host_us']} | {c['gpu_us']} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"decode_kernels_{device.replace(' ', '_')}"
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps(dict(provenance("cuda"), device=device, torch=torch.__version__, cases=rows_out), indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
