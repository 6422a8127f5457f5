"""Benchmark of the evict backend on a Llama-3.1-8B-shaped random bf16 model (CUDA only).

For each context length: dense (no press), uniform SnapKV with backend "evict", AdaptivePress(SnapKV)
with "evict" and with "mask", at each ratio. Figures: KV bytes held, peak GPU memory, prefill seconds
(scoring and eviction included), decode ms/token (after warm-up, median of CUDA-event timings), and
the cost of one append as the cache grows (FlatHeadwiseLayer.update vs the dense cache's torch.cat).

    python benchmarks/bench_evict.py --layers 8 --cases 1x8192 1x32768 8x8192 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from adakv import presses as P
from adakv.cache import MaskedLayer
from adakv.flat_cache import FlatHeadwiseLayer
from adakv.varlen import available_gpu_path

GiB = 2**30


def llama_8b_config(layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=262144, rope_theta=500000.0,
    )  # fmt: skip


def build_model(layers: int):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(
            llama_8b_config(layers), dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    return model.eval()


def press_factories(ratio: float):
    return {
        "dense": None,
        "snapkv-evict": lambda: P.SnapKVPress(ratio, backend="evict"),
        "ada_snapkv-evict": lambda: P.AdaptivePress(P.SnapKVPress(ratio), backend="evict"),
        "ada_snapkv-mask": lambda: P.AdaptivePress(P.SnapKVPress(ratio), backend="mask"),
    }


def kv_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        if isinstance(layer, FlatHeadwiseLayer):
            total += layer.held_bytes()
        elif isinstance(layer, MaskedLayer):
            total += (layer.keys.numel() + layer.values.numel()) * layer.keys.element_size()
            total += layer.context_keep.numel() * layer.context_keep.element_size()
        elif getattr(layer, "keys", None) is not None:
            total += (layer.keys.numel() + layer.values.numel()) * layer.keys.element_size()
    return total


def cuda_time_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def run_case(model, make_press, context: int, batch: int, decode_steps: int, warmup_steps: int) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(10, 128000, (batch, context), device="cuda")
    cache = DynamicCache(config=model.config)
    press = make_press() if make_press else None
    token = ids[:, -1:]
    with torch.no_grad():
        context_manager = press(model) if press else _nothing()
        with context_manager:
            torch.cuda.synchronize()
            started = time.perf_counter()
            out = model(ids, past_key_values=cache, logits_to_keep=1)
            torch.cuda.synchronize()
            prefill_s = time.perf_counter() - started
            del out
            held = kv_bytes(cache)
            times, wall = [], []
            for step in range(warmup_steps + decode_steps):
                started = time.perf_counter()
                elapsed = cuda_time_ms(lambda: model(token, past_key_values=cache, logits_to_keep=1))
                if step >= warmup_steps:
                    times.append(elapsed)
                    wall.append((time.perf_counter() - started) * 1000)
    peak = torch.cuda.max_memory_allocated()
    del cache, ids
    return dict(
        kv_bytes=held,
        kv_gib=held / GiB,
        peak_gib=peak / GiB,
        prefill_s=prefill_s,
        decode_ms=statistics.median(times),
        decode_wall_ms=statistics.median(wall),
        decode_ms_min=min(times),
        decode_ms_max=max(times),
    )


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def append_cost(lengths: list[int], heads: int = 8, head_dim: int = 128, repeats: int = 50) -> list[dict]:
    """One-token append to one layer: FlatHeadwiseLayer.update vs the dense cache's concatenation."""

    class Config:
        _attn_implementation = "adakv_sdpa"

    rows = []
    for length in lengths:
        keys = torch.randn(1, heads, length, head_dim, device="cuda", dtype=torch.bfloat16)
        keep = torch.ones(1, heads, length, device="cuda", dtype=torch.bool)
        layer = FlatHeadwiseLayer(keys, keys, keep, Config(), min_slack=repeats * 3)
        new = torch.randn(1, heads, 1, head_dim, device="cuda", dtype=torch.bfloat16)
        for _ in range(5):
            layer.update(new, new)
        flat = statistics.median(cuda_time_ms(lambda: layer.update(new, new)) for _ in range(repeats))
        dense = statistics.median(cuda_time_ms(lambda: torch.cat([keys, new], dim=-2)) for _ in range(repeats))
        rows.append(dict(rows_per_head=length, evict_append_ms=flat, dense_cat_ms=dense))
        del keys, keep, layer
    return rows


def markdown_table(results: list[dict], meta: dict) -> str:
    lines = [
        f"Device: {meta['device']}; torch {meta['torch']}; transformers {meta['transformers']}; "
        f"Llama-3.1-8B shape with {meta['layers']} of 32 layers (KV figures are for these layers), bf16, "
        f"second of {meta['passes']} passes over all cases; evict attention path: {meta['attention_path']}.",
        "",
        "| batch | context | ratio | method | KV GiB | peak GiB | prefill s | decode ms/token (median) |",
        "|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['context']} | {r['ratio']} | {r['method']} | {r['error']} | | | |")
            continue
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['ratio']} | {r['method']} | {r['kv_gib']:.3f} | {r['peak_gib']:.2f} | "
            f"{r['prefill_s']:.3f} | {r['decode_ms']:.2f} |"
        )
    lines += ["", "Append of one token to one layer (8 KV heads, head_dim 128, bf16):", "",
              "| rows per head | evict append ms | dense torch.cat ms |", "|---:|---:|---:|"]  # fmt: skip
    for r in meta["append_cost"]:
        lines.append(f"| {r['rows_per_head']} | {r['evict_append_ms']:.4f} | {r['dense_cat_ms']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument(
        "--cases", nargs="+", default=["1x8192", "1x32768", "1x131072", "8x8192", "8x32768"],
        help="BATCHxCONTEXT pairs",
    )
    parser.add_argument("--passes", type=int, default=2, help="sweep repeats; the table shows the last")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.875])
    parser.add_argument("--decode-steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_evict.py needs a CUDA device.")

    model = build_model(args.layers)
    # warm-up: every code path once (kernel JIT build, cuBLAS/flash handles), at a short context
    for name, factory in press_factories(0.5).items():
        run_case(model, factory, 2048, 1, 3, 2)

    cases = [tuple(int(x) for x in case.split("x")) for case in args.cases]
    passes = []
    for _ in range(args.passes):
        results = []
        for batch, context in cases:
            for ratio in args.ratios:
                for name, factory in press_factories(ratio).items():
                    if name == "dense" and ratio != args.ratios[0]:
                        continue
                    row = dict(batch=batch, context=context, ratio=0.0 if name == "dense" else ratio, method=name)
                    try:
                        row.update(run_case(model, factory, context, batch, args.decode_steps, args.warmup_steps))
                    except torch.cuda.OutOfMemoryError:
                        row["error"] = "out of memory"
                    results.append(row)
                    print(json.dumps(row), flush=True)
        passes.append(results)

    meta = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        layers=args.layers,
        passes=args.passes,
        attention_path=available_gpu_path(),
        decode_steps=args.decode_steps,
        warmup_steps=args.warmup_steps,
        append_cost=append_cost([1024, 8192, 32768, 131072]),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_evict_" + meta["device"].replace(" ", "_").replace("/", "_")
    (args.out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, results=results, all_passes=passes), indent=2))
    table = markdown_table(results, meta)
    (args.out / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
