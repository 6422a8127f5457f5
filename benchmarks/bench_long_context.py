"""Longest context that fits: dense prefill vs chunked prefill with evict compression (CUDA; --tiny runs on CPU).

Model: Llama-3.1-8B-shaped random bf16 model with --layers layers (default 32, the real model's count, so
peak memory is what a real 8B run needs). For each context length and method it measures the peak GPU memory
of the prefill (torch.cuda.max_memory_allocated after a reset, weights included), the KV bytes the cache
holds afterwards, the prefill seconds, and the median ms of --decode-steps single-token decode steps
continuing from that cache. A case that runs out of GPU memory is recorded as "OOM" (memory is freed and
the run goes on; longer contexts of that method are then skipped). A case whose weights plus final KV
cache alone exceed the GPU is skipped without running (a lower bound, so it would certainly run out).
Results are saved after every case (JSON + Markdown in --out), so a run cut short keeps what it measured.
From two or more measured lengths per method, the longest context that fits the GPU is computed by a
straight-line fit of peak memory against context length (marked "computed, not run").

Methods: dense (one forward, DynamicCache), dense-chunked (adakv.prefill_in_chunks without a press: dense
KV, chunked activations, but transformers builds a chunk x context mask for every chunk), snapkv-evict and ada_snapkv-evict (one forward, compressed after each layer, as
before chunking existed), snapkv-evict-chunked and ada_snapkv-evict-chunked (prefill_in_chunks with
SnapKVPress(--ratio) / AdaptivePress(SnapKVPress(--ratio)), backend "evict").

Cost (8B shape, 32 layers, bf16; FLOPs from `case_flops`; seconds measured with this script on one H100
for 128k-512k and one H200 for 1M, benchmarks/results/bench_long_context_*):
  dense (one forward): 128k 6.3e15 FLOPs, 11.8 s; 256k runs out of memory on an 80 GB card.
  ada_snapkv-evict-chunked, r=0.875, chunk 32k: 128k 3.4e15 FLOPs 9.2 s; 256k 7.9e15 24 s; 512k 2.0e16 68 s;
  1M 5.9e16 195 s (~300 TFLOP/s); 2M 1.9e17, ~10.5 min at that rate: longer than one device command may
  run (10 minutes), so 2M needs a faster long-append attention path or a longer limit.
  A fresh machine also spends ~100 s building adakv's CUDA kernels during the warm-up.
Before each case the run prints its estimate (the first case of a method assumes 300 TFLOP/s, later ones
use that method's measured rate); --estimate-only prints them all without a GPU, and --time-budget skips
cases that would not finish in time.
Attention dominates at long contexts: each chunk attends to (1 - r) x all earlier tokens.

    python benchmarks/bench_long_context.py --time-budget 420    # 128k, 256k, 512k: ~4 min + build
    python benchmarks/bench_long_context.py --lengths 1048576 --methods ada_snapkv-evict-chunked --tag 1M
    python benchmarks/bench_long_context.py --tiny          # CPU smoke test (seconds)
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_evict import GiB, build_model, fit_line, kv_bytes, llama_8b_config, synchronize  # noqa: E402

from adakv import presses as P  # noqa: E402
from adakv.apps.provenance import provenance  # noqa: E402
from adakv.runtimes.hf.chunked_prefill import prefill_in_chunks  # noqa: E402

ASSUMED_TFLOPS = 300.0  # effective bf16 rate measured for the chunked evict prefill at 512k-1M (H100/H200)
METHODS = (
    "dense", "dense-chunked", "snapkv-evict", "ada_snapkv-evict", "snapkv-evict-chunked", "ada_snapkv-evict-chunked",
)  # fmt: skip
DEFAULT_METHODS = ["dense", "snapkv-evict-chunked", "ada_snapkv-evict-chunked"]


def tiny_config(layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 22,
    )  # fmt: skip


def make_press(method: str, ratio: float):
    if method.startswith("snapkv-evict"):
        return P.SnapKVPress(ratio, backend="evict")
    if method.startswith("ada_snapkv-evict"):
        return P.AdaptivePress(P.SnapKVPress(ratio), backend="evict")
    return None


def is_chunked(method: str) -> bool:
    return method.endswith("chunked")


# ----- cost model --------------------------------------------------------------------------------
def case_flops(config, context: int, method: str, ratio: float, chunk_size: int) -> dict:
    """Forward FLOPs of one prefill: 2 x non-embedding weights per token, plus attention
    4 x heads x head_dim per (query, key) pair. Chunked compression: chunk i's queries see the kept
    (1 - r) share of the i earlier chunks and their own chunk causally."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_width = config.num_key_value_heads * head_dim
    per_layer = config.hidden_size * (2 * config.hidden_size + 2 * kv_width) + 3 * config.hidden_size * config.intermediate_size
    linear = 2.0 * context * per_layer * config.num_hidden_layers
    kept = 1.0 - ratio if (make_press(method, ratio) is not None and is_chunked(method)) else 1.0
    chunk = min(chunk_size, context) if is_chunked(method) else context
    pairs = kept * (context * context - context * chunk) / 2 + context * chunk / 2
    attention = 4.0 * config.num_attention_heads * head_dim * pairs * config.num_hidden_layers
    return dict(linear_flops=linear, attention_flops=attention, flops=linear + attention)


# ----- one case --------------------------------------------------------------------------------
class ChunkProgress:
    """Prints progress every few chunks (a forward pre-hook on the model: one forward = one chunk)."""

    def __init__(self, label: str, chunks: int, device: str):
        self.label, self.chunks, self.device = label, chunks, device
        self.every = max(1, chunks // 8)
        self.seen, self.started = 0, time.perf_counter()

    def __call__(self, module, args, kwargs):
        self.seen += 1
        if self.seen == 1 or self.seen % self.every == 0 or self.seen == self.chunks:
            memory = f", {torch.cuda.memory_allocated() / GiB:.1f} GiB allocated" if self.device == "cuda" else ""
            elapsed = time.perf_counter() - self.started
            print(f"    {self.label}: chunk {self.seen}/{self.chunks} starts at {elapsed:.1f} s{memory}", flush=True)


def run_case(model, method: str, context: int, args, device: str) -> dict:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    vocab = model.config.vocab_size
    ids = torch.randint(10, vocab, (1, context), device=device)
    press = make_press(method, args.ratio)
    chunks = -(-context // args.chunk_size) if is_chunked(method) else 1
    progress = model.register_forward_pre_hook(ChunkProgress(f"{method} {context}", chunks, device), with_kwargs=True)
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad(), press(model) if press is not None else nullcontext():
            synchronize(device)
            started = time.perf_counter()
            if is_chunked(method):
                prefill_in_chunks(model, press, ids, args.chunk_size, cache=cache)
            else:
                model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            synchronize(device)
            prefill_s = time.perf_counter() - started
            progress.remove()
            peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
            held = kv_bytes(cache)
            decode_ms = decode_steps(model, cache, ids[:, -1:], args.decode_steps, device)
    finally:
        progress.remove()
        del cache, ids
    return dict(
        peak_gib=None if peak is None else peak / GiB,
        kv_bytes=held,
        kv_gib=held / GiB,
        prefill_s=prefill_s,
        tokens_per_s=context / prefill_s,
        decode_ms=decode_ms,
    )


def decode_steps(model, cache, token, steps: int, device: str) -> float | None:
    """Median ms of single-token decode steps on top of the prefilled cache (the first two are warm-up)."""
    times = []
    for step in range(steps + 2):
        synchronize(device)
        started = time.perf_counter()
        model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        synchronize(device)
        if step >= 2:
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times) if times else None


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ----- the sweep ---------------------------------------------------------------------------------
def estimate_seconds(flops: float, method: str, rates: dict) -> float:
    return flops / rates.get(method, ASSUMED_TFLOPS * 1e12)


def minimum_bytes(config, weights: int, context: int, method: str, ratio: float) -> float:
    """Weights plus the KV cache the method holds after the prefill (no slack, no activations)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dense_kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2 * context  # bf16
    kept = 1.0 - ratio if make_press(method, ratio) is not None else 1.0
    return weights + kept * dense_kv


def skip_reason(row: dict, left: float | None, failed_at: dict, capacity: float | None, needed: float) -> str | None:
    if row["method"] in failed_at:
        return f"skipped: OOM at {failed_at[row['method']]}"
    if capacity is not None and needed > capacity:
        return f"skipped: weights + KV alone need {needed / GiB:.1f} GiB > {capacity / GiB:.1f} GiB"
    if left is not None and row["estimated_s"] > left:
        return f"skipped: estimated {row['estimated_s']:.0f} s > {left:.0f} s of --time-budget left"
    return None


def sweep(model, args, device: str, started: float, save) -> list[dict]:
    """Every (context, method) case, shortest contexts first; `save(results)` after each."""
    results, rates, failed_at = [], {}, {}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    capacity = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None
    for context in sorted(args.lengths):
        for method in args.methods:
            row = dict(method=method, context=context, ratio=0.0 if make_press(method, args.ratio) is None else args.ratio,
                       chunk_size=args.chunk_size if is_chunked(method) else None)  # fmt: skip
            cost = case_flops(model.config, context, method, args.ratio, args.chunk_size)
            row["estimated_s"] = estimate_seconds(cost["flops"], method, rates)
            left = None if args.time_budget is None else args.time_budget - (time.perf_counter() - started)
            needed = minimum_bytes(model.config, weights, context, method, args.ratio)
            reason = skip_reason(row, left, failed_at, capacity, needed)
            if reason is not None:
                row["error"] = reason
            else:
                print(f"  {method}, {context} tokens: estimated {row['estimated_s']:.1f} s ({cost['flops']:.2e} FLOPs)", flush=True)
                try:
                    row.update(run_case(model, method, context, args, device))
                    rates[method] = cost["flops"] / row["prefill_s"]
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "OOM"
                    failed_at[method] = context
                free_memory(device)
            results.append(row)
            print(json.dumps(row), flush=True)
            save(results)
    return results


def longest_context(results: list[dict], capacity_bytes: float) -> list[dict]:
    """Per method with >= 2 measured contexts: fit peak = a + b * context (least squares) and solve
    peak = capacity. Computed, not run; meaningful when --layers is the model's real layer count."""
    estimates = []
    for method in dict.fromkeys(r["method"] for r in results):
        rows = [r for r in results if r["method"] == method and "error" not in r and r["peak_gib"] is not None]
        if len(rows) < 2:
            continue
        contexts = torch.tensor([float(r["context"]) for r in rows], dtype=torch.float64)
        peaks = torch.tensor([r["peak_gib"] * GiB for r in rows], dtype=torch.float64)
        fixed, per_token, fit_error = fit_line(contexts, peaks)
        estimates.append(dict(
            method=method, fixed_gib=fixed / GiB, bytes_per_token=per_token, fit_max_error_gib=fit_error / GiB,
            max_context=int((capacity_bytes - fixed) / per_token) if per_token > 0 else None,
        ))  # fmt: skip
    return estimates


def markdown_table(results: list[dict], meta: dict) -> str:
    lines = [
        f"Device: {meta['device']}; torch {meta['torch']}; transformers {meta['transformers']}; "
        f"{meta['model']} with {meta['layers']} layers, {meta['dtype']}; chunk size {meta['chunk_size']}; "
        f"evict attention for long appends: {meta['long_append_path']}, for decode: {meta['decode_path']}.",
        f"Command: `{meta['command']}`",
        "",
        "| context | method | ratio | peak GiB | KV GiB | prefill s | tokens/s | decode ms/token |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['context']} | {r['method']} | {r['ratio']} | {r['error']} | | | | |")
            continue
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        decode = "" if r["decode_ms"] is None else f"{r['decode_ms']:.2f}"
        lines.append(
            f"| {r['context']} | {r['method']} | {r['ratio']} | {peak} | {r['kv_gib']:.4g} | "
            f"{r['prefill_s']:.2f} | {r['tokens_per_s']:.0f} | {decode} |"
        )
    if meta.get("longest_context"):
        lines += ["", f"Longest context whose prefill fits {meta['capacity_gib']:.1f} GiB (computed from a straight-line "
                  "fit of the peaks above, not run):", "",
                  "| method | fixed GiB | bytes/token | fit error GiB | max context |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for r in meta["longest_context"]:
            lines.append(
                f"| {r['method']} | {r['fixed_gib']:.2f} | {r['bytes_per_token']:.0f} | {r['fit_max_error_gib']:.2f} | "
                f"{r['max_context'] if r['max_context'] is None else format(r['max_context'], ',')} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; --tiny: 2)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="context lengths (default 131072 262144 524288; --tiny: 512 1024)")
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default 32768; --tiny: 128)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=METHODS)
    parser.add_argument("--ratio", type=float, default=0.875)
    parser.add_argument("--decode-steps", type=int, default=8, help="timed decode steps after each prefill (0: none)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; a case whose estimate exceeds what is left is skipped")
    parser.add_argument("--estimate-only", action="store_true", help="print the FLOP/time estimates and exit")
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama (smoke test; CPU when there is no GPU)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="", help="appended to the result files' name (keeps runs apart)")
    args = parser.parse_args(argv)
    tiny_defaults = dict(layers=2, lengths=[512, 1024], chunk_size=128)
    full_defaults = dict(layers=32, lengths=[131072, 262144, 524288], chunk_size=32768)
    for name, value in (tiny_defaults if args.tiny else full_defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    config = tiny_config(args.layers) if args.tiny else llama_8b_config(args.layers)
    config.max_position_embeddings = max(config.max_position_embeddings, max(args.lengths))
    if args.estimate_only:
        for context in sorted(args.lengths):
            for method in args.methods:
                cost = case_flops(config, context, method, args.ratio, args.chunk_size)
                print(f"{method:>26} {context:>9}: {cost['flops']:.2e} FLOPs, ~{estimate_seconds(cost['flops'], method, {}):.0f} s")
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        raise SystemExit("bench_long_context.py needs a CUDA device (or --tiny for a CPU smoke test).")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    started = time.perf_counter()
    print(f"building the model ({args.layers} layers, {dtype}, {device}) ...", flush=True)
    model = build_model(config.num_hidden_layers, config, device, dtype)
    # warm-up: every method once at a short context (kernel JIT build, Triton compile, cuBLAS handles)
    warmup = argparse.Namespace(**{**vars(args), "chunk_size": max(1, args.chunk_size // 16), "decode_steps": 1})
    for method in args.methods:
        run_case(model, method, 4 * warmup.chunk_size, warmup, device)
    print(f"model and warm-up took {time.perf_counter() - started:.1f} s", flush=True)

    from adakv.cache.flat_attention import available_gpu_path, choose_implementation

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    chunk_query = torch.empty(1, config.num_attention_heads, args.chunk_size, head_dim, device=device, dtype=dtype)

    meta = dict(
        provenance(device),
        device=torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        command="python benchmarks/bench_long_context.py " + " ".join(argv),
        model="tiny random Llama" if args.tiny else "Llama-3.1-8B-shaped random model",
        layers=args.layers,
        dtype=str(dtype).replace("torch.", ""),
        weights_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        lengths=sorted(args.lengths),
        methods=args.methods,
        ratio=args.ratio,
        chunk_size=args.chunk_size,
        decode_steps=args.decode_steps,
        decode_path=available_gpu_path() if device == "cuda" else "reference",
        long_append_path=choose_implementation(chunk_query),  # what a chunk's attention over the flat cache uses
        assumed_tflops=ASSUMED_TFLOPS,
    )
    if device == "cuda":  # one GiB less than the card, for the CUDA context and fragmentation
        meta["capacity_gib"] = torch.cuda.get_device_properties(0).total_memory / GiB - 1
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_long_context_" + meta["device"] + ("_tiny" if args.tiny else "") + (f"_{args.tag}" if args.tag else "")
    stem = "".join(c if c.isalnum() or c in "_-." else "_" for c in stem)

    def save(results: list[dict]) -> None:
        meta["elapsed_s"] = time.perf_counter() - started
        if "capacity_gib" in meta:
            meta["longest_context"] = longest_context(results, meta["capacity_gib"] * GiB)
        (args.out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, results=results), indent=2))
        (args.out / f"{stem}.md").write_text(markdown_table(results, meta))

    results = sweep(model, args, device, started, save)
    print(markdown_table(results, meta), flush=True)


if __name__ == "__main__":
    main()
