"""Decode latency against the memory-bandwidth limit (CUDA only; Llama-3.1-8B shape, random bf16 weights).

For each batch x context case, one process measures side by side:

- dense-eager: transformers' DynamicCache, eager decode;
- dense-compiled: transformers' StaticCache filled with the same prefill, decode steps through
  `torch.compile(model.forward, mode="reduce-overhead")` (CUDA graphs), what a user picks today;
- snapkv-evict-eager / -graph and adaptive-snapkv-evict-eager / -graph at each ratio: the press prefills and
  compresses, then the same cache is decoded eagerly and then inside `press(model, cuda_graphs=True)`;
  adaptive-snapkv-evict-graph-joined adds `join_projections=True` (q/k/v and gate/up as one product each),
  adaptive-snapkv-evict-graph-joined-fused also `fuse_elementwise=True` (norms, rotary, SiLU gates as one
  Triton kernel each), adaptive-snapkv-evict-graph-joined-fused-gemv also `gemv_linears=True` (the linears'
  matrix-vector products as adakv's Triton GEMV): the fastest decode adakv offers.

With `--kv-dtypes bfloat16 float8_e4m3fn` every press row is measured again with the press's
kv_dtype="float8_e4m3fn" (method names with "-fp8", e.g. adaptive-snapkv-fp8-evict-graph): the flat cache holds
e4m3 codes and one float32 scale per row, and the limit counts those bytes (`row_bytes`). `--presses` and
`--no-dense` keep a run to the rows it needs (scripts/gpu_fp8.sh).

Every row: decode ms/token (median of `--steps` CUDA-event timings per step after `--warmup` steps; two
passes, both kept, the second reported), KV GiB held (slack rows included), KV GiB read per step, peak GiB,
and limit_ms = (weight bytes read per step + KV bytes read per step) / copy bandwidth, the bandwidth
measured in the same run with a large device-to-device copy (bytes read + bytes written over its time).
Weight bytes leave out the input embedding (a step reads one row of it); KV bytes read are the rows in use
(kept context + appended tokens), averaged over the row's steps: the variants of a case continue one
cache, which grows by every step. Graph rows also give the graph pool's memory.

    python benchmarks/bench_decode_limit.py --cases 1x8192 1x32768 1x131072 8x8192 8x32768
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, StaticCache

sys.path.insert(0, str(Path(__file__).parent))
from bench_evict import GiB, build_model, cuda_time_ms, kv_bytes, synchronize  # noqa: E402

from adakv import presses as P  # noqa: E402
from adakv.apps.provenance import provenance  # noqa: E402
from adakv.cache.flat import FlatHeadwiseLayer  # noqa: E402


def copy_bandwidth(gib: float = 4.0, device="cuda") -> float:
    """Bytes per second of a device-to-device copy (read + write), median of 10 after a warm-up (on a CPU
    device, timed by the host clock: a smoke test's stand-in)."""
    source = torch.empty(int(gib * GiB), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(12):
        if source.device.type == "cuda":
            times.append(cuda_time_ms(lambda: target.copy_(source)) / 1000)
        else:
            started = time.perf_counter()
            target.copy_(source)
            times.append(time.perf_counter() - started)
    del source, target
    return 2 * gib * GiB / statistics.median(times[2:])


def weight_bytes(model) -> int:
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    tied = model.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()
    return total if tied else total - embedding.numel() * embedding.element_size()


def step_timings(step, token: torch.Tensor, warmup: int, steps: int) -> list[float]:
    """ms of each of `steps` decode steps (CUDA events around each, no host wait inside the loop)."""
    events = []
    for index in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        token = step(token)
        end.record()
        if index >= warmup:
            events.append((start, end))
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def two_passes(step, token, warmup, steps) -> list[float]:
    return [statistics.median(step_timings(step, token, warmup, steps)) for _ in range(2)]


def greedy_step(model, cache, cache_position: torch.Tensor | None = None, forward=None):
    """A decode step feeding its own argmax back (no host wait); cache_position advances on the device."""
    forward = forward or model

    def step(token):
        kwargs = {}
        if cache_position is not None:
            kwargs = dict(cache_position=cache_position, position_ids=cache_position.expand(token.shape[0], 1))
        logits = forward(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs).logits
        if cache_position is not None:
            cache_position.add_(1)
        return logits[:, -1:].argmax(-1)

    return step


def prefill(model, ids, cache, press=None):
    with torch.no_grad(), press(model) if press is not None else nullcontext():
        model(ids, past_key_values=cache, logits_to_keep=1)
    torch.cuda.synchronize()


def row(batch, context, method, ratio, passes, limit_s, kv, peak, **extra) -> dict:
    return dict(
        batch=batch, context=context, method=method, ratio=ratio, decode_ms=passes[-1], decode_ms_passes=passes,
        limit_ms=limit_s * 1000, ratio_to_limit=passes[-1] / (limit_s * 1000), kv_gib=kv / GiB, peak_gib=peak / GiB,
        **extra,
    )  # fmt: skip


def kv_read_bytes(cache) -> int:
    """K and V bytes a decode step reads now: the rows in use of flat layers (not their slack) at the layer's
    bytes per row (`row_bytes`: whatever a cached row holds), the whole tensors of dense ones."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, FlatHeadwiseLayer):
            total += layer.used_rows * layer.row_bytes
        elif getattr(layer, "keys", None) is not None:
            total += (layer.keys.numel() + layer.values.numel()) * layer.keys.element_size()
    return total


def timed_with_reads(step, token, args, cache) -> tuple[list[float], float]:
    """(two_passes' timings, the KV bytes read per step averaged over them: the cache grows by each step)."""
    before = kv_read_bytes(cache)
    passes = two_passes(step, token, args.warmup, args.steps)
    return passes, (before + kv_read_bytes(cache)) / 2


def dense_rows(model, ids, args, bandwidth, weights) -> list[dict]:
    batch, context = ids.shape
    cache = DynamicCache(config=model.config)
    torch.cuda.reset_peak_memory_stats()
    prefill(model, ids, cache)
    token = ids[:, -1:]
    with torch.no_grad():
        eager, read = timed_with_reads(greedy_step(model, cache), token, args, cache)
    held = kv_bytes(cache)
    rows = [row(batch, context, "dense-eager", 0.0, eager, (weights + read) / bandwidth, held,
                torch.cuda.max_memory_allocated(), kv_read_gib=read / GiB)]  # fmt: skip
    print(rows[-1], flush=True)
    if args.no_compiled:
        return rows
    length = context + 2 * (args.warmup + args.steps) + 8
    static = StaticCache(config=model.config, max_cache_len=length)
    positions = torch.arange(context, device="cuda")
    for index, layer in enumerate(cache.layers):
        static.update(layer.keys[..., :context, :], layer.values[..., :context, :], index, {"cache_position": positions})
    del cache
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    compiled = torch.compile(model.forward, mode="reduce-overhead")
    cache_position = torch.tensor([context], device="cuda")
    started = time.perf_counter()
    with torch.no_grad():
        step = greedy_step(model, static, cache_position, compiled)
        token = step(step(step(token)))  # compile and record the graphs
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - started
        timings = two_passes(step, token, args.warmup, args.steps)
    static_bytes = sum(layer.keys.numel() * 2 * layer.keys.element_size() for layer in static.layers)
    # the static cache attends over all max_cache_len positions, so that is what a step reads
    limit = (weights + static_bytes) / bandwidth
    rows.append(row(batch, context, "dense-compiled", 0.0, timings, limit, static_bytes, torch.cuda.max_memory_allocated(),
                    kv_read_gib=static_bytes / GiB, compile_s=compile_s))  # fmt: skip
    print(rows[-1], flush=True)
    del static, compiled
    torch._dynamo.reset()
    return rows


PRESSES = {
    "snapkv": lambda ratio, **kv: P.SnapKVPress(ratio, backend="evict", **kv),
    "adaptive-snapkv": lambda ratio, **kv: P.AdaptivePress(P.SnapKVPress(ratio), backend="evict", **kv),
}
NATIVE_KV_DTYPE = "bfloat16"  # the model's dtype: the press rows without a kv_dtype
KV_DTYPE_SUFFIXES = {NATIVE_KV_DTYPE: "", "float8_e4m3fn": "-fp8"}


def press_rows(model, ids, args, bandwidth, weights, name, ratio, kv_dtype=NATIVE_KV_DTYPE) -> list[dict]:
    batch, context = ids.shape
    press = PRESSES[name](ratio, **({} if kv_dtype == NATIVE_KV_DTYPE else {"kv_dtype": kv_dtype}))
    name += KV_DTYPE_SUFFIXES[kv_dtype]
    cache = DynamicCache(config=model.config)
    torch.cuda.reset_peak_memory_stats()
    prefill(model, ids, cache, press)
    token = ids[:, -1:]
    with torch.no_grad(), press(model):
        eager, read = timed_with_reads(greedy_step(model, cache), token, args, cache)
    held = kv_bytes(cache)
    rows = [row(batch, context, f"{name}-evict-eager", ratio, eager, (weights + read) / bandwidth, held,
                torch.cuda.max_memory_allocated(), kv_read_gib=read / GiB, kv_dtype=kv_dtype)]  # fmt: skip
    print(rows[-1], flush=True)
    variants = [("graph", {})]
    if name.removesuffix("-fp8") in args.joined:
        variants += [(f"graph-{fusion}", FUSIONS[fusion]) for fusion in FUSIONS]
    for suffix, fusions in variants:
        rows.append(dict(graph_row(model, cache, press, token, args, bandwidth, weights, name, ratio, suffix, fusions),
                         kv_dtype=kv_dtype))
        print(rows[-1], flush=True)
    return rows


FUSIONS = {
    "joined": dict(join_projections=True),
    "joined-fused": dict(join_projections=True, fuse_elementwise=True),
    "joined-fused-gemv": dict(join_projections=True, fuse_elementwise=True, gemv_linears=True),
}


def graph_row(model, cache, press, token, args, bandwidth, weights, name, ratio, suffix, fusions) -> dict:
    """Decode the compressed `cache` inside press(model, cuda_graphs=True, **fusions)."""
    batch, context = token.shape[0], args.context
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.no_grad(), press(model, cuda_graphs=True, **fusions) as session:
        step = greedy_step(model, cache)
        token = step(step(token))  # warm-up, then capture
        torch.cuda.synchronize()
        pool = torch.cuda.memory_allocated() - before
        graph, read = timed_with_reads(step, token, args, cache)
        generate_ms = generate_ms_per_token(model, cache, batch, args.steps)
        decoder = session.graph_decoder
    held = kv_bytes(cache)
    return row(batch, context, f"{name}-evict-{suffix}", ratio, graph, (weights + read) / bandwidth, held,
               torch.cuda.max_memory_allocated(), kv_read_gib=read / GiB, graph_pool_gib=pool / GiB,
               captures=decoder.captures, graph_disabled=decoder.disabled_reason,
               generate_ms_per_token=generate_ms)  # fmt: skip


def generate_ms_per_token(model, cache, batch: int, tokens: int) -> float | str:
    """Wall ms per token of `model.generate` continuing `cache` for `tokens` greedy tokens (the second of two
    calls: the first one reserves slack and captures), what a user of generate sees: the graph replays plus
    generate's own host work between steps, where it waits for each step's token."""
    options = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, past_key_values=cache)
    try:
        for _ in range(2):
            ids = torch.randint(0, model.config.vocab_size, (batch, cache.get_seq_length() + 1), device=model.device)
            synchronize(model.device)
            started = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), **options)
            synchronize(model.device)
        return (time.perf_counter() - started) * 1000 / tokens
    except Exception as error:  # noqa: BLE001 - a measurement beside the table's: report why it failed
        return f"{type(error).__name__}: {error}"[:300]


def run_case(model, batch, context, args, bandwidth, weights) -> list[dict]:
    ids = torch.randint(10, 128000, (batch, context), device="cuda")
    args.context = context
    rows = [] if args.no_dense else dense_rows(model, ids, args, bandwidth, weights)
    for ratio in args.ratios:
        for name in args.presses:
            for kv_dtype in args.kv_dtypes:
                gc.collect()
                torch.cuda.empty_cache()
                rows.extend(press_rows(model, ids, args, bandwidth, weights, name, ratio, kv_dtype))
    return rows


def measured_setup(layers: int) -> tuple[torch.nn.Module, float, int, dict]:
    """(model, copy bandwidth in bytes/s, weight bytes a step reads, metadata): the 8B-shaped model with
    `layers` layers and the figures every result of this GPU is compared with, measured in this process."""
    model = build_model(layers)
    bandwidth = copy_bandwidth()
    weights = weight_bytes(model)
    return model, bandwidth, weights, run_meta(layers, bandwidth, weights)


def run_meta(layers: int, bandwidth: float, weights: int, device="cuda") -> dict:
    """The metadata of a run on `device`: its provenance, then the figures its results are compared with
    (`device` in it is the GPU's name, as before provenance was recorded; "cpu" without one)."""
    origin = provenance(device)
    return dict(
        origin, device=origin["gpu"] or origin["device"], torch=torch.__version__,
        transformers=transformers.__version__, layers=layers, copy_bandwidth_tb_s=bandwidth / 1e12,
        weight_gib=weights / GiB,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--cases", nargs="+", default=["1x8192", "1x32768", "1x131072", "8x8192", "8x32768"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.75, 0.875])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--joined", nargs="*", default=["adaptive-snapkv"], choices=list(PRESSES),
                        help="presses also measured with join_projections=True (suffix graph-joined), with "
                             "fuse_elementwise=True as well (suffix graph-joined-fused) and with gemv_linears=True "
                             "as well (suffix graph-joined-fused-gemv)")
    parser.add_argument("--no-compiled", action="store_true", help="skip the torch.compile dense baseline")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense rows (eager and compiled)")
    parser.add_argument("--presses", nargs="+", default=list(PRESSES), choices=list(PRESSES))
    parser.add_argument("--kv-dtypes", nargs="+", default=[NATIVE_KV_DTYPE], choices=list(KV_DTYPE_SUFFIXES),
                        help="KV dtypes of the press rows (float8_e4m3fn: the press's kv_dtype, methods named -fp8)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="", help="suffix of the result files (runs split over several calls)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="only merge these result files into --out")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, Path(args.out))
        return

    model, bandwidth, weights, meta = measured_setup(args.layers)
    meta.update(steps=args.steps, warmup=args.warmup)
    device = meta["device"]
    print(meta, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"decode_limit_{device.replace(' ', '_')}{args.tag}"
    rows = []
    for case in args.cases:
        batch, context = (int(part) for part in case.split("x"))
        rows.extend(dict(row, device=device) for row in run_case(model, batch, context, args, bandwidth, weights))
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    write_table(stem.with_suffix(".md"), meta, rows)


def merge(files: list[str], out: Path) -> None:
    """One JSON, table and plot from runs of the same device and settings split over several processes.
    A row measured again in a later file (same batch, context, method, ratio) replaces the earlier one in
    the table; the earlier one stays in the JSON under "superseded_rows"."""
    runs = [json.loads(Path(name).read_text()) for name in files]
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(runs[0]["meta"], merged_runs=[run["meta"] for run in runs], merge_provenance=provenance("cpu"))
    latest: dict[tuple, dict] = {}
    superseded = []
    for run in runs:
        for row in run["rows"]:
            key = (row["batch"], row["context"], row["method"], row["ratio"])
            if key in latest:
                superseded.append(latest.pop(key))
            latest[key] = row
    rows = sorted(latest.values(), key=lambda row: (row["batch"], row["context"], row["ratio"]))
    stem = out / f"decode_limit_{meta['device'].replace(' ', '_')}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "superseded_rows": superseded}, indent=1))
    write_table(stem.with_suffix(".md"), meta, rows)
    plot(stem.with_suffix(".png"), meta, rows)


def plot(path: Path, meta: dict, rows: list[dict], ratio: float = 0.75) -> None:
    """Decode latency and peak memory against context at batch 1: dense (eager, compiled), uniform SnapKV
    and AdaptivePress(SnapKV) at `ratio` (graph and eager), with the bandwidth limit of the adaptive rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ["dense-eager", "dense-compiled", "snapkv-evict-eager", "snapkv-evict-graph",
               "adaptive-snapkv-evict-eager", "adaptive-snapkv-evict-graph", "adaptive-snapkv-evict-graph-joined",
               "adaptive-snapkv-evict-graph-joined-fused", "adaptive-snapkv-evict-graph-joined-fused-gemv"]  # fmt: skip
    figure, (latency, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in methods:
        points = sorted(
            (r["context"], r["decode_ms"], r["peak_gib"])
            for r in rows
            if r["batch"] == 1 and r["method"] == method and r["ratio"] in (0.0, ratio)
        )
        if points:
            contexts, decode_ms, peak = zip(*points)
            style = "--" if "eager" in method else "-"
            latency.plot(contexts, decode_ms, style, marker="o", label=method)
            memory.plot(contexts, peak, style, marker="o", label=method)
    limit = sorted((r["context"], r["limit_ms"]) for r in rows if r["batch"] == 1 and r["method"] == "adaptive-snapkv-evict-graph" and r["ratio"] == ratio)
    if limit:
        latency.plot(*zip(*limit), ":", color="black", label=f"bandwidth limit, adaptive r={ratio}")
    for axis, label in ((latency, "decode ms / token"), (memory, "peak GiB")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context tokens (batch 1)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    latency.set_yscale("log")
    latency.legend(fontsize=7)
    figure.suptitle(f"{meta['device']}, Llama-3.1-8B shape ({meta['layers']} layers, bf16), evict ratio {ratio}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def write_table(path: Path, meta: dict, rows: list[dict]) -> None:
    bandwidths = [run["copy_bandwidth_tb_s"] for run in meta.get("merged_runs", [meta])]
    bandwidth = f"{bandwidths[0]:.2f} TB/s"
    if len(bandwidths) > 1:
        bandwidth = f"{min(bandwidths):.2f}-{max(bandwidths):.2f} TB/s across {len(bandwidths)} runs (each row's limit uses its run's)"
    lines = [
        f"Device: {meta['device']}; torch {meta['torch']}; transformers {meta['transformers']}; Llama-3.1-8B shape, "
        f"{meta['layers']} layers, bf16, random weights. Copy bandwidth measured in the same run: "
        f"{bandwidth}; weights read per step {meta['weight_gib']:.2f} GiB. decode ms = "
        f"median of {meta['steps']} steps, pass 2 (pass 1 in brackets). generate ms = wall ms per token of "
        "`model.generate` continuing the same cache (graph rows of later runs; empty where not measured). "
        "KV read = rows in use, averaged over the row's steps; where it is empty (rows of earlier runs) the "
        "limit counted the KV held, slack rows included, as read.",
        "",
        "| batch | context | method | ratio | decode ms | limit ms | x limit | KV GiB held | KV GiB read | peak GiB | generate ms |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        generate = r.get("generate_ms_per_token")
        read = r.get("kv_read_gib")
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['method']} | {r['ratio']} | {r['decode_ms']:.2f} "
            f"({r['decode_ms_passes'][0]:.2f}) | {r['limit_ms']:.2f} | {r['ratio_to_limit']:.2f} | "
            f"{r['kv_gib']:.2f} | {'' if read is None else f'{read:.2f}'} | {r['peak_gib']:.1f} | "
            f"{f'{generate:.2f}' if isinstance(generate, float) else ('failed' if generate else '')} |"
        )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
