"""Tile and split sweep of the Triton split-KV decode attention (CUDA only): which settings read the cache
closest to the copy bandwidth, per (batch, rows per head).

One layer of a Llama-3.1-8B-shaped cache (8 KV heads, 32 query heads, head_dim 128, bf16 rows, or with
`--kv-dtype float8_e4m3fn` the fp8 flat cache's e4m3 codes and per-row scales). For every case
it times the default settings (`adakv.kernels.triton_decode.decode_plan`), the CUDA
decode kernel, and every combination of BLOCK_N x num_warps x num_stages x num_splits; GPU time per call
with launches hidden (calls queued behind a long matmul, timed by bench_decode_kernels.py's `timings`). `floor_us` is the
K+V bytes over the device-to-device copy bandwidth measured in the same run.

    python benchmarks/tune_decode_attention.py --out benchmarks/results
    python benchmarks/tune_decode_attention.py --kv-dtype float8_e4m3fn     # -> ..._fp8.json (no CUDA-kernel column)
    python benchmarks/tune_decode_attention.py --uneven                      # -> ..._uneven.json: Ada-KV's uneven heads
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from adakv.kernels import cuda_flat as kernels, triton_decode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode_kernels import make_layer, timings  # noqa: E402
from bench_decode_limit import copy_bandwidth  # noqa: E402

from adakv.apps.provenance import provenance  # noqa: E402

CASES = [(1, 2048), (1, 8192), (1, 32768), (8, 2048), (8, 8192)]
BLOCK_N = (32, 64, 128)
FP8_BLOCK_N = BLOCK_N + (256,)  # an fp8 tile of 128 keys moves half a bf16 tile's bytes per step
NUM_WARPS = (2, 4, 8)
NUM_STAGES = (2, 3, 4)
SPLITS = (4, 8, 16, 32, 64, 128)
UNEVEN_NOTE = ", head 0 keeping every row and the others a seventh"


def gpu_us(fn, busy: torch.Tensor) -> float:
    return timings(fn, busy, calls=40)["gpu_us"]


def sweep_case(
    batch: int, rows: int, busy: torch.Tensor, bandwidth: float, kv_dtype: str | None = None, uneven: bool = False
) -> dict:
    from triton.runtime.errors import OutOfResources  # CUDA machines only

    layer = make_layer(batch, rows, kv_dtype, uneven)
    scales = (layer.key_scales, layer.value_scales) if kv_dtype else None
    query = torch.randn(batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    scaling = 128**-0.5
    expected = triton_decode.triton_flat_attention(query, layer, scaling)
    cache_bytes = layer.used_rows * layer.row_bytes
    default_sizes, default_splits = triton_decode.decode_plan(
        layer.max_length, layer.num_sequences, 4, 128, torch.bfloat16,
        triton_decode.multiprocessor_count(query.device.index),
    )  # fmt: skip
    row = dict(
        batch=batch,
        rows_per_head=rows,
        cache_mib=round(cache_bytes / 2**20, 1),
        floor_us=round(cache_bytes / bandwidth * 1e6, 2),
        default=dict(num_splits=default_splits, **default_sizes),
        default_us=round(gpu_us(lambda: triton_decode.triton_flat_attention(query, layer, scaling), busy), 2),
        cuda_decode_us=None if kv_dtype else round(
            gpu_us(lambda: kernels.cuda_decode_flat_attention(query, layer, scaling), busy), 2
        ),  # the CUDA kernel reads no fp8
        settings=[],
    )
    block_ns = FP8_BLOCK_N if kv_dtype else BLOCK_N
    for block_n, warps, stages, splits in itertools.product(block_ns, NUM_WARPS, NUM_STAGES, SPLITS):
        if splits * block_n > rows:
            continue
        tiles = dict(BLOCK_N=block_n, num_warps=warps, num_stages=stages)

        def call():
            return triton_decode.split_kv_attention(
                query, layer.keys, layer.values, layer.offsets, layer.seq_lengths, layer.num_heads,
                layer.max_length, scaling, num_splits=splits, tiles=tiles, workspace=layer.split_workspace,
                scales=scales,
            )  # fmt: skip

        try:
            error = (call().float() - expected.float()).abs().max().item()
        except OutOfResources as failure:  # e.g. 256-key tiles with 4 stages: more shared memory than the GPU has
            row["settings"].append(dict(tiles, num_splits=splits, us=None, failed=str(failure)[:200]))
            continue
        us = gpu_us(call, busy)
        row["settings"].append(dict(tiles, num_splits=splits, us=round(us, 2), max_abs_error=error))
    row["best"] = min((setting for setting in row["settings"] if setting["us"] is not None), key=lambda s: s["us"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--table", type=Path, metavar="JSON", help="only write the .md table of a saved result")
    parser.add_argument("--kv-dtype", choices=("float8_e4m3fn",), default=None, help="the fp8 flat cache's rows")
    parser.add_argument(
        "--uneven", action="store_true",
        help="head 0 keeps every row, the others a seventh (the kernel's splits follow the longest head)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.table:
        write_table(args.table.with_suffix(".md"), json.loads(args.table.read_text()))
        return
    if not torch.cuda.is_available():
        raise SystemExit("tune_decode_attention.py needs a CUDA device.")
    device = torch.cuda.get_device_name()
    busy = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bandwidth = copy_bandwidth()
    args.out.mkdir(parents=True, exist_ok=True)
    tag = ("_fp8" if args.kv_dtype else "") + ("_uneven" if args.uneven else "")
    path = args.out / f"tune_decode_attention_{device.replace(' ', '_')}{tag}.json"
    result = dict(
        provenance("cuda"), device=device, torch=torch.__version__, copy_tb_s=bandwidth / 1e12, cases=[],
        kv_dtype=args.kv_dtype or "bfloat16", uneven=args.uneven,
    )  # fmt: skip
    for batch, rows in CASES:
        row = sweep_case(batch, rows, busy, bandwidth, args.kv_dtype, args.uneven)
        result["cases"].append(row)
        best = row["best"]
        print(
            f"batch {batch} rows {rows}: floor {row['floor_us']} us, default {row['default_us']} us "
            f"({row['default']}), cuda {row['cuda_decode_us']} us, best {best}",
            flush=True,
        )
        for setting in sorted((s for s in row["settings"] if s["us"] is not None), key=lambda s: s["us"])[:8]:
            print("   ", setting, flush=True)
        path.write_text(json.dumps(result, indent=1))  # after every case: a run stopped early keeps its cases
        write_table(path.with_suffix(".md"), result)
    print(f"saved {path}")


def write_table(path: Path, result: dict) -> None:
    lines = [
        f"# Triton decode attention settings on {result['device']}",
        "",
        f"torch {result['torch']}; one layer, 8 KV / 32 query heads, head_dim 128, "
        f"{result.get('kv_dtype', 'bfloat16')} rows{UNEVEN_NOTE if result.get('uneven') else ''}; GPU us per call (both "
        f"kernels, launches hidden); floor = K+V bytes / copy bandwidth ({result['copy_tb_s']:.2f} TB/s, same run); "
        "default = the settings the code chose when the run was made.",
        *(["", result["note"]] if "note" in result else []),
        "",
        "| batch | rows/head | floor us | default us | CUDA kernel us | best us | best key step | best splits "
        "| best warps / stages |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case in result["cases"]:
        best = case["best"]
        lines.append(
            f"| {case['batch']} | {case['rows_per_head']} | {case['floor_us']} | {case['default_us']} | "
            f"{case['cuda_decode_us'] if case['cuda_decode_us'] is not None else '—'} | {best['us']} | "
            f"{best['BLOCK_N']} | {best['num_splits']} | {best['num_warps']} / {best['num_stages']} |"
        )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
