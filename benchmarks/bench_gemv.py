"""adakv's Triton GEMV (adakv/kernels/triton_gemv.py) against torch's matmul for the decode-step linears of the
Llama-3.1-8B shape (CUDA only): per shape, and all of one step's linears captured in one CUDA graph.

1. Per weight shape (q/k/v joined, o, gate/up joined, down, lm_head; bf16) and 1 or 8 input rows: GPU us
   per call with launches hidden (calls queued behind a long matmul, bench_decode_kernels.py's `timings`)
   of F.linear and of `gemv` for every tile setting in the sweep; the weight-read floor is the weight's
   bytes over the copy bandwidth measured in the same run.
2. One decode step's linears (32 layers joined as `join_projections` does, then the lm_head; random weights,
   14 GiB) in one CUDA graph, F.linear against `gemv` with each shape's best tiles and with the planned ones
   (`gemv_tiles`): ms, and x the weight-read limit (the same comparison as profile_decode_floor.py's
   linear-graph rows).

    python benchmarks/bench_gemv.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode_kernels import timings  # noqa: E402
from bench_decode_limit import copy_bandwidth  # noqa: E402
from profile_decode_floor import graph_ms  # noqa: E402

from adakv.apps.provenance import provenance  # noqa: E402

HIDDEN, INTERMEDIATE, VOCAB, LAYERS = 4096, 14336, 128256, 32
SHAPES = {  # name: (N, K) of weight (N, K)
    "qkv_joined": (4096 + 2 * 1024, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_up_joined": (2 * INTERMEDIATE, HIDDEN),
    "down_proj": (HIDDEN, INTERMEDIATE),
    "lm_head": (VOCAB, HIDDEN),
}
TILES = [
    dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s)
    for n, k, w, s in itertools.product((8, 16, 32), (256, 512, 1024), (4, 8), (2, 4))
]


def sweep_shape(gemv, name: str, rows: int, busy: torch.Tensor, bandwidth: float) -> dict:
    n_features, k_features = SHAPES[name]
    weight = torch.randn(n_features, k_features, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(rows, k_features, device="cuda", dtype=torch.bfloat16)
    expected = F.linear(x, weight).float()
    row = dict(
        shape=name, rows=rows, weight_mib=weight.numel() * 2 / 2**20,
        floor_us=weight.numel() * 2 / bandwidth * 1e6,
        torch_us=timings(lambda: F.linear(x, weight), busy, calls=40)["gpu_us"], settings=[],
    )  # fmt: skip
    for tiles in TILES:
        try:
            error = (gemv(x, weight, tiles=tiles).float() - expected).abs().max().item()
            us = timings(lambda t=tiles: gemv(x, weight, tiles=t), busy, calls=40)["gpu_us"]
            row["settings"].append(dict(tiles, us=us, max_abs_error=error))
        except Exception as failure:  # noqa: BLE001 - e.g. tiles x stages beyond shared memory: skip that setting
            row["settings"].append(dict(tiles, failed=f"{type(failure).__name__}: {failure}"[:200]))
    allowed = 1e-2 * expected.abs().max().item() + 1e-2  # bf16 outputs: a wrong result is far above this
    correct = [setting for setting in row["settings"] if "us" in setting and setting["max_abs_error"] <= allowed]
    row["best"] = min(correct, key=lambda setting: setting["us"])
    return row


def whole_step(gemv, best_tiles: dict, rows: int, bandwidth: float) -> dict:
    """One decode step's linears in one graph: torch vs gemv with each shape's best tiles at `rows` (gemv)
    and with the tiles `gemv_tiles` plans (gemv_plan, what gemv_linears runs)."""
    order = ["qkv_joined", "o_proj", "gate_up_joined", "down_proj"] * LAYERS + ["lm_head"]
    weights = {}
    for index, name in enumerate(order):
        n_features, k_features = SHAPES[name]
        weights[index] = torch.randn(n_features, k_features, device="cuda", dtype=torch.bfloat16) * 0.02
    inputs = {k: torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for k in {s[1] for s in SHAPES.values()}}
    weight_bytes = sum(w.numel() * 2 for w in weights.values())

    def torch_step():
        for weight in weights.values():
            F.linear(inputs[weight.shape[1]], weight)

    def gemv_step():
        for index, weight in weights.items():
            gemv(inputs[weight.shape[1]], weight, tiles=best_tiles[order[index]])

    def gemv_plan_step():
        for weight in weights.values():
            gemv(inputs[weight.shape[1]], weight)

    limit_ms = weight_bytes / bandwidth * 1000
    result = dict(rows=rows, weight_gib=weight_bytes / 2**30, limit_ms=limit_ms)
    for name, step in (("torch", torch_step), ("gemv", gemv_step), ("gemv_plan", gemv_plan_step)):
        result[f"{name}_ms_passes"] = [graph_ms(step) for _ in range(2)]
        result[f"{name}_x_limit"] = result[f"{name}_ms_passes"][-1] / limit_ms
    weights.clear()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gemv.py needs a CUDA device.")
    from adakv.kernels.triton_gemv import gemv

    device = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    busy = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    shapes, steps = [], []
    for rows in args.rows:
        best = {}
        for name in SHAPES:
            row = sweep_shape(gemv, name, rows, busy, bandwidth)
            shapes.append(row)
            best[name] = {k: v for k, v in row["best"].items() if k in TILES[0]}
            print(f"rows {rows} {name}: floor {row['floor_us']:.1f} us, torch {row['torch_us']} us, best gemv "
                  f"{row['best']}", flush=True)  # fmt: skip
        steps.append(dict(whole_step(gemv, best, rows, bandwidth), best_tiles=best))
        print(steps[-1], flush=True)
    result = dict(provenance("cuda"), device=device, torch=torch.__version__, copy_tb_s=bandwidth / 1e12, shapes=shapes, steps=steps)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gemv_{device.replace(' ', '_')}.json"
    path.write_text(json.dumps(result, indent=1))
    lines = [f"# Triton GEMV against torch on {device}", "", f"torch {torch.__version__}; copy bandwidth "
             f"{bandwidth / 1e12:.2f} TB/s (same run); bf16; GPU us per call, launches hidden.", "",
             "| rows | shape | floor us | torch us | best gemv us |", "|---:|---|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {r['rows']} | {r['shape']} | {r['floor_us']:.1f} | {r['torch_us']} | {r['best']['us']} |" for r in shapes]
    lines += ["", "One decode step's linears (32 layers + lm_head) in one CUDA graph, ms (x the weight-read limit):", "",
              "| rows | limit ms | torch | gemv, best tiles | gemv, planned tiles |", "|---:|---:|---:|---:|---:|"]  # fmt: skip
    lines += [
        f"| {s['rows']} | {s['limit_ms']:.2f} | {s['torch_ms_passes'][-1]:.2f} ({s['torch_x_limit']:.2f}x) | "
        f"{s['gemv_ms_passes'][-1]:.2f} ({s['gemv_x_limit']:.2f}x) | "
        f"{s['gemv_plan_ms_passes'][-1]:.2f} ({s['gemv_plan_x_limit']:.2f}x) |"
        for s in steps
    ]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
