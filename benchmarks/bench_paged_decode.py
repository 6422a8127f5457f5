"""The vLLM runtime's packed-page decode kernel alone, against the bandwidth limit of the bytes it reads.

Where the time of a compressed decode step in vLLM goes: this measures only the attention
(`adakv.kernels.paged_decode.packed_decode_attention`, both Triton launches) on random pages in vLLM's
layout, so a serving benchmark's ms/token can be split into attention and the rest. Per case (rows x
kept pairs per KV head + tail tokens; 8 KV heads x 4 query heads, head_dim 128, bf16, blocks of 16 slots,
each row's pages shuffled in a pool):

- `eager_us`: one call as the eager backend makes it (host work and launches included), CUDA events;
- `graph_us`: the same call replayed from a CUDA graph (GPU time, what full decode graphs pay);
- `max_difference`: the output against the torch reference, relative to its largest value;
- `limit_us`: keys and values read (rows x KV heads x (kept + tail) x head_dim x 2 x 2 bytes) over the
  device-to-device copy bandwidth measured in the same run; `graph_us / limit_us` is the kernel's factor.

Beside each case (every head keeping the same pairs, `packed`): `uneven`, the same pairs per row but head 0
holding half of them and the other heads sharing the rest (Ada-KV's heads keep very different shares: the
kernel splits a row's keys over all its heads evenly, so this should cost what `packed` costs), and `dense`
(prompt_len 0, every token a tail token) of the same length. On a CPU with TRITON_INTERPRET=1 (`--smoke`) it
runs one tiny case with host timing: a check that the script works, not a figure.

    python benchmarks/bench_paged_decode.py                       # -> results/paged_decode_<GPU>.{json,md}
    python benchmarks/bench_paged_decode.py --programs-per-sm 2 4 8 --min-chunks 64 128 256 --tag _plans
                                                                  # the plan's two settings, swept
    python benchmarks/bench_paged_decode.py --num-warps 4 8 --num-stages 1 2 3 4 --tag _launch
                                                                  # the attention launch's warps and stages
    git show REV:adakv/kernels/triton_pages.py > .baseline/triton_pages_REV.py
    python benchmarks/bench_paged_decode.py --baseline .baseline/triton_pages_REV.py --tag _vs_REV
                                                                  # another version's kernels beside these, same run

`--baseline` takes files with the kernels of `adakv.kernels.triton_pages` as other commits had them (same
launch arguments as the current launcher's) and measures every case with each of them and the current ones,
rows labelled by `kernel`, so that a kernel change is judged in one process (.baseline/ is git-ignored; a GPU
call carries it with `carry`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from bench_decode_limit import copy_bandwidth  # noqa: E402
from adakv.apps.provenance import provenance  # noqa: E402
from adakv.kernels import paged_decode  # noqa: E402
from adakv.kernels.device import multiprocessor_count  # noqa: E402
from adakv.kernels.paged_decode import decode_plan, packed_decode_attention, packed_decode_reference  # noqa: E402
from adakv.kernels.triton_decode import MIN_KEYS_PER_SPLIT, PROGRAMS_PER_SM  # noqa: E402

KV_HEADS, GROUP, HEAD_DIM, BLOCK_SIZE = 8, 4, 128, 16
CASES = ["1x8192+64", "1x32768+64", "8x8192+64", "32x8192+64", "96x8192+64"]
LAYOUTS = ("packed", "uneven", "dense")


def parse_case(case: str) -> tuple[int, int, int]:
    """"ROWSxKEPT+TAIL" -> (rows, kept pairs per KV head, tail tokens)."""
    rows, rest = case.split("x")
    kept, tail = rest.split("+")
    return int(rows), int(kept), int(tail)


def head_offsets(kept: int, uneven: bool) -> list[int]:
    """One row's offsets (KV_HEADS + 1) over KV_HEADS x kept pairs: each head `kept`, or head 0 half of
    them and the others the rest, as evenly as integers allow."""
    if not uneven:
        return [head * kept for head in range(KV_HEADS + 1)]
    total, first = KV_HEADS * kept, KV_HEADS * kept // 2
    others = [(total - first) * head // (KV_HEADS - 1) for head in range(KV_HEADS)]
    return [0] + [first + share for share in others]


def packed_batch(rows: int, kept: int, tail: int, layout: str, dtype, device, plan_settings: dict) -> dict:
    """Random pages holding `rows` requests in the packed layout (KV_HEADS x `kept` pairs fill the first
    `kept` slots; `layout` packed or uneven, see head_offsets) or dense (prompt_len 0: `kept + tail` tail
    tokens), and the kernel's arguments; plan_settings: decode_plan's programs_per_sm and min_chunk."""
    slots = kept + tail
    blocks_per_row = -(-slots // BLOCK_SIZE)
    pool = rows * blocks_per_row
    cache = torch.randn(pool, BLOCK_SIZE, KV_HEADS, 2 * HEAD_DIM, dtype=dtype, device=device)
    key_cache, value_cache = cache.transpose(1, 2).split(HEAD_DIM, dim=-1)
    block_table = torch.randperm(pool, device=device).view(rows, blocks_per_row).int()
    dense = layout == "dense"
    offsets = torch.zeros(2, KV_HEADS + 1, dtype=torch.int32, device=device)
    offsets[1] = torch.tensor(head_offsets(kept, layout == "uneven"), dtype=torch.int32, device=device)
    plan = decode_plan(rows, KV_HEADS, multiprocessor_count(0) if device == "cuda" else 4, **plan_settings)
    rows_info = torch.tensor(
        [[row, row, 0 if dense else kept, 0 if dense else 1] for row in range(rows)], dtype=torch.int32, device=device
    )
    return dict(
        query=torch.randn(rows, KV_HEADS * GROUP, HEAD_DIM, dtype=dtype, device=device),
        key_cache=key_cache, value_cache=value_cache, block_table=block_table,
        seq_lens=torch.full((rows,), slots, dtype=torch.int32, device=device), rows_info=rows_info,
        offset_table=offsets, scale=HEAD_DIM**-0.5, plan=plan,
    )  # fmt: skip


def reference_difference(batch: dict, out: torch.Tensor) -> float:
    """Largest difference of the kernel's output from the torch reference, relative to the largest output."""
    expected = torch.zeros_like(out)
    packed_decode_reference(
        batch["query"], batch["key_cache"], batch["value_cache"], batch["block_table"], batch["seq_lens"],
        batch["rows_info"], batch["offset_table"], batch["scale"], expected,
    )  # fmt: skip
    return float((out.float() - expected.float()).abs().max() / expected.float().abs().max().clamp(min=1e-6))


def call(batch: dict, out: torch.Tensor) -> None:
    packed_decode_attention(
        batch["query"], batch["key_cache"], batch["value_cache"], batch["block_table"], batch["seq_lens"],
        batch["rows_info"], batch["offset_table"], batch["scale"], out, batch["plan"],
    )  # fmt: skip


def median_us(fn, repeats: int, device: str) -> float:
    """Median µs of `fn` over `repeats` calls after 3 warm-up calls (CUDA events on a GPU, else the host)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000)
        else:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e6)
    return statistics.median(times)


def graph_replay(batch: dict, out: torch.Tensor):
    """The call captured in a CUDA graph (after a warm-up on a side stream, as capture needs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call(batch, out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(batch, out)
    return graph.replay


def measure(case: str, layout: str, plan_settings: dict, bandwidth: float, repeats: int, device: str, dtype) -> dict:
    rows, kept, tail = parse_case(case)
    batch = packed_batch(rows, kept, tail, layout, dtype, device, plan_settings)
    out = torch.zeros_like(batch["query"])
    bytes_read = rows * KV_HEADS * (kept + tail) * HEAD_DIM * 2 * dtype.itemsize
    row = dict(
        case=case, layout=layout, rows=rows, kept=kept, tail=tail, programs=rows * batch["plan"].programs_per_row,
        **plan_settings, bytes_read=bytes_read, limit_us=bytes_read / bandwidth * 1e6,
    )  # fmt: skip
    row["eager_us"] = median_us(lambda: call(batch, out), repeats, device)
    row["max_difference"] = reference_difference(batch, out)
    row["graph_us"] = median_us(graph_replay(batch, out), repeats, device) if device == "cuda" else None
    if row["graph_us"] is not None:
        row["graph_vs_limit"] = row["graph_us"] / row["limit_us"]
    return row


def load_kernels(path: Path):
    """The module of Triton kernels in `path` (another version of adakv/kernels/triton_pages.py)."""
    spec = importlib.util.spec_from_file_location(f"triton_pages_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def kernels_of(module):
    """packed_decode_attention launching `module`'s kernels (None: the current ones) inside the block."""
    current = paged_decode._kernels
    if module is not None:
        paged_decode._kernels = lambda: module
    try:
        yield
    finally:
        paged_decode._kernels = current


def programs(row: dict) -> int:
    """The grid's programs; rows measured before the work was split over a row's heads recorded splits per
    (row, head) instead."""
    return row["programs"] if "programs" in row else row["rows"] * KV_HEADS * row["num_splits"]


def plan_of(row: dict) -> str:
    """programs per SM / min chunk / warps / stages ("tiles": block_sizes' choice, which rows measured before
    these settings existed also ran)."""
    if "programs_per_sm" not in row:  # measured before the plan had these settings
        return "—"
    warps, stages = (row.get(name) or "tiles" for name in ("num_warps", "num_stages"))
    return f"{row['programs_per_sm']} / {row['min_chunk']} / {warps} / {stages}"


def render(data: dict) -> str:
    meta = data["meta"]
    lines = [
        "# Packed-page decode attention (the vLLM runtime's kernel) against its bandwidth limit", "",
        f"{meta.get('gpu')}, torch {meta.get('torch')}, triton {meta.get('triton')}, adakv {meta.get('adakv_commit')}, "
        f"{meta.get('date')}; copy bandwidth {data['bandwidth_gb_s']:.0f} GB/s. {KV_HEADS} KV heads x {GROUP} query "
        f"heads, head_dim {HEAD_DIM}, {data['dtype']}, blocks of {BLOCK_SIZE}; one call = both launches.", "",
        "| case | layout | kernel | programs per SM / min chunk / warps / stages | programs | MB read | limit µs | eager µs | "
        "graph µs | graph / limit | vs reference |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for row in data["rows"]:
        graph = "—" if row["graph_us"] is None else f"{row['graph_us']:.1f}"
        factor = f"{row['graph_vs_limit']:.2f}x" if row.get("graph_vs_limit") else "—"
        lines.append(
            f"| {row['case']} | {row['layout']} | {row.get('kernel', 'current')} | {plan_of(row)} | {programs(row)} | "
            f"{row['bytes_read'] / 1e6:.1f} | {row['limit_us']:.1f} | {row['eager_us']:.1f} | {graph} | {factor} | "
            f"{row['max_difference']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=CASES, help="ROWSxKEPT+TAIL per KV head")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, one tiny case")
    parser.add_argument("--programs-per-sm", type=int, nargs="+", default=[PROGRAMS_PER_SM], help="decode_plan's")
    parser.add_argument("--min-chunks", type=int, nargs="+", default=[MIN_KEYS_PER_SPLIT], help="decode_plan's")
    parser.add_argument("--num-warps", type=int, nargs="+", default=[None], help="the launch's (default: the tiles')")
    parser.add_argument("--num-stages", type=int, nargs="+", default=[None], help="the launch's (default: the tiles')")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--baseline", type=Path, nargs="+", default=[],
                        help="other versions of triton_pages.py, measured beside")  # fmt: skip
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: give --smoke to check the script on a CPU (TRITON_INTERPRET=1)")
    cases, repeats, dtype = (["2x40+3"], 1, torch.float32) if args.smoke else (args.cases, args.repeats, torch.bfloat16)
    bandwidth = copy_bandwidth(gib=0.01 if args.smoke else 2.0, device=device)
    plans = [dict(programs_per_sm=n, min_chunk=chunk, num_warps=warps, num_stages=stages)
             for n in args.programs_per_sm for chunk in args.min_chunks
             for warps in args.num_warps for stages in args.num_stages]  # fmt: skip
    kernels = {"current": None, **{f"baseline {path.stem}": load_kernels(path) for path in args.baseline}}
    rows = []
    for case in cases:
        for plan in plans:
            for layout in LAYOUTS:
                for name, module in kernels.items():
                    with kernels_of(module):
                        rows.append(dict(measure(case, layout, plan, bandwidth, repeats, device, dtype), kernel=name))
                    print(json.dumps(rows[-1]), flush=True)
    meta = provenance(device)
    data = dict(meta=meta, dtype=str(dtype).removeprefix("torch."), bandwidth_gb_s=bandwidth / 1e9, rows=rows)
    name = "smoke_cpu" if args.smoke else (meta.get("gpu") or "gpu").replace(" ", "_")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"paged_decode_{name}{args.tag}.json"
    path.write_text(json.dumps(data, indent=1))
    path.with_suffix(".md").write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    main()
