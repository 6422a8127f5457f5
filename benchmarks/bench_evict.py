"""Benchmark of the evict backend on a Llama-3.1-8B-shaped random bf16 model (CUDA only).

For each context length: dense (no press), uniform SnapKV with backend "evict", AdaptivePress(SnapKV)
with "evict" and with "mask", at each ratio. Figures: KV bytes held, peak GPU memory, prefill seconds
(scoring and eviction included), decode ms/token (after warm-up, median of CUDA-event timings), and
the cost of one append as the cache grows (FlatHeadwiseLayer.update vs the dense cache's torch.cat),
the attention kernel alone (flat-cache path vs dense SDPA over the same rows), and an estimate of the
longest context that fits a full 32-layer model on one GPU (dense vs evict at the largest ratio),
computed from the measured per-token KV bytes and prefill peaks (see `longest_context`).

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
from adakv.apps.provenance import provenance
from adakv.cache import MaskedLayer
from adakv.cache.flat import FlatHeadwiseLayer
from adakv.cache.flat_attention import available_gpu_path, flat_attention

GiB = 2**30


def llama_8b_config(layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=262144, rope_theta=500000.0,
    )  # fmt: skip


def build_model(layers: int, config: LlamaConfig | None = None, device: str = "cuda", dtype=torch.bfloat16):
    """A random-weight sdpa model of `config` (default: the 8B shape with `layers` layers)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config or llama_8b_config(layers), dtype=dtype, attn_implementation="sdpa"
        )
    return model.eval()


def fit_line(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """Least-squares y = intercept + slope * x over float64 tensors: (intercept, slope, max abs error)."""
    design = torch.stack([torch.ones_like(x), x], 1)
    intercept, slope = torch.linalg.lstsq(design, y[:, None]).solution[:, 0].tolist()
    error = (design @ torch.tensor([intercept, slope], dtype=torch.float64) - y).abs().max().item()
    return intercept, slope, error


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


def synchronize(device: torch.device | str) -> None:
    """Wait for `device`'s queued work (nothing to wait for on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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


def attention_cost(rows_per_head: list[int], batches: list[int], repeats: int = 50) -> list[dict]:
    """Decode attention of one layer (8 KV heads, 32 query heads, head_dim 128, bf16), alone: the flat path
    `flat_attention` picks vs dense SDPA over the same number of rows. Several layers are rotated so the
    rows do not sit in L2. Two figures per path: "call us", the mean of back-to-back eager calls (includes
    the CPU's launch cost, which dominates small cases), and "GPU us", the same calls replayed from a CUDA
    graph (device time alone). TB/s = K+V bytes read / GPU time."""

    class Config:
        _attn_implementation = "adakv_sdpa"

    import torch.nn.functional as F

    def timed(fn, copies):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(repeats):
            fn(i % copies)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1000 / repeats

    def graph_timed(fn, copies):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(copies):
                fn(i)
        graph.replay()
        return timed(lambda i: graph.replay(), 1) / copies

    rows = []
    for batch in batches:
        for length in rows_per_head:
            kv_bytes = batch * 8 * length * 128 * 2 * 2
            copies = max(2, min(8, -(-4 * 60 * 2**20 // kv_bytes)))
            shape = (batch, 8, length, 128)
            keys = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            values = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            keep = torch.ones(shape[:3], device="cuda", dtype=torch.bool)
            layers = [FlatHeadwiseLayer(k, v, keep, Config()) for k, v in zip(keys, values)]
            query = torch.randn(batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
            paths = {
                "flat": lambda i: flat_attention(query, layers[i], 0.088),
                "dense_sdpa": lambda i: F.scaled_dot_product_attention(
                    query, keys[i], values[i], scale=0.088, enable_gqa=True
                ),
            }
            row = dict(batch=batch, rows_per_head=length, mib=kv_bytes / 2**20)
            for name, fn in paths.items():
                for i in range(5):
                    fn(i % copies)
                row[f"{name}_call_us"] = timed(fn, copies)
                try:
                    row[f"{name}_gpu_us"] = graph_timed(fn, copies)
                except RuntimeError as error:  # a path that cannot be captured: report the call time only
                    row[f"{name}_gpu_us"] = float("nan")
                    print(f"graph capture of {name} failed: {error}", flush=True)
                row[f"{name}_tb_s"] = kv_bytes / row[f"{name}_gpu_us"] / 1e6
            rows.append(row)
            print(json.dumps(row), flush=True)
            del keys, values, layers, keep
    return rows


def parameter_bytes_32_layers(model) -> tuple[int, int]:
    """(bytes of the benchmark model's weights, bytes the same model would have with 32 layers)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    one_layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    return total, total + (32 - len(model.model.layers)) * one_layer


def longest_context(results: list[dict], meta: dict, capacities_gib: dict) -> list[dict]:
    """Longest batch-1 context whose prefill fits a 32-layer model of the benchmark's shape, per method.

    Not run at that size: computed from this run's batch-1 rows. For each method and context c the
    benchmark measured peak memory P(c) and KV bytes held K(c) with L layers and weights W_L. The
    prefill transient T(c) = P(c) - W_L - K(c) (activations and the one layer being compressed) does not
    grow with the layer count, and is fitted as T(c) = t0 + t1 * c (least squares over the contexts). Then
    peak_32(c) = W_32 + (32 / L) * K(c) + T(c), linear in c, is solved for peak_32(c) = capacity."""
    layers, weights, weights_32 = meta["layers"], meta["weights_bytes"], meta["weights_32_layers_bytes"]
    by_method: dict[str, list[dict]] = {}
    for r in results:
        if r["batch"] == 1 and "error" not in r and (r["method"] == "dense" or r["ratio"] == max(meta["ratios"])):
            by_method.setdefault(r["method"], []).append(r)
    estimates = []
    for method, rows in by_method.items():
        if len(rows) < 2:
            continue
        contexts = torch.tensor([float(r["context"]) for r in rows], dtype=torch.float64)
        kv = torch.tensor([float(r["kv_bytes"]) for r in rows], dtype=torch.float64)
        transient = torch.tensor([r["peak_gib"] * GiB for r in rows], dtype=torch.float64) - weights - kv
        t0, t1, fit_error = fit_line(contexts, transient)
        kv_per_token_32 = float((kv / contexts).mean()) * 32 / layers
        row = dict(
            method=method, ratio=rows[0]["ratio"], kv_bytes_per_token_32_layers=kv_per_token_32,
            transient_bytes_per_token=t1, transient_fixed_gib=t0 / GiB, fit_max_error_gib=fit_error / GiB,
        )  # fmt: skip
        for name, capacity in capacities_gib.items():
            row[f"max_context_{name}"] = int((capacity * GiB - weights_32 - t0) / (kv_per_token_32 + t1))
        estimates.append(row)
    return estimates


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
    if meta.get("attention_cost"):
        lines += ["", f"Decode attention of one layer alone (8 KV / 32 query heads, head_dim 128, bf16; flat path "
                  f"= {meta['attention_path']}; call us = mean of back-to-back eager calls, CPU launch cost "
                  "included; GPU us = the same calls replayed from a CUDA graph; TB/s = K+V bytes / GPU time):",
                  "", "| batch | rows per head | K+V MiB | flat call us | flat GPU us | flat TB/s | "
                  "dense SDPA call us | dense GPU us | dense TB/s |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in meta["attention_cost"]:
            lines.append(
                f"| {r['batch']} | {r['rows_per_head']} | {r['mib']:.0f} | {r['flat_call_us']:.1f} | "
                f"{r['flat_gpu_us']:.1f} | {r['flat_tb_s']:.2f} | {r['dense_sdpa_call_us']:.1f} | "
                f"{r['dense_sdpa_gpu_us']:.1f} | {r['dense_sdpa_tb_s']:.2f} |"
            )
    if meta.get("longest_context"):
        names = list(meta["capacities_gib"])
        lines += ["", "Longest batch-1 context for a full 32-layer model of this shape (computed, not run: see "
                  "`longest_context` in bench_evict.py; capacities in GiB: "
                  + ", ".join(f"{n} = {c:.1f}" for n, c in meta["capacities_gib"].items()) + "):", "",
                  "| method | ratio | KV bytes/token (32 layers) | prefill transient bytes/token | fit error GiB | "
                  + " | ".join(f"max context, {n}" for n in names) + " |",
                  "|---|---:|---:|---:|---:|" + "---:|" * len(names)]  # fmt: skip
        for r in meta["longest_context"]:
            lines.append(
                f"| {r['method']} | {r['ratio']} | {r['kv_bytes_per_token_32_layers']:.0f} | "
                f"{r['transient_bytes_per_token']:.0f} | {r['fit_max_error_gib']:.2f} | "
                + " | ".join(f"{r[f'max_context_{n}']:,}" for n in names) + " |"
            )
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
    parser.add_argument("--skip-attention-cost", action="store_true", help="skip the attention-kernel timing")
    parser.add_argument(
        "--methods", nargs="+", default=list(press_factories(0.5)), choices=list(press_factories(0.5)),
        help="methods to run (default: all)",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_evict.py needs a CUDA device.")

    model = build_model(args.layers)
    weights_bytes, weights_32_layers_bytes = parameter_bytes_32_layers(model)
    # warm-up: every code path once (kernel JIT build, cuBLAS/flash handles), at a short context
    for name, factory in press_factories(0.5).items():
        if name in args.methods:
            run_case(model, factory, 2048, 1, 3, 2)

    cases = [tuple(int(x) for x in case.split("x")) for case in args.cases]
    passes = []
    for _ in range(args.passes):
        results = []
        for batch, context in cases:
            for ratio in args.ratios:
                for name, factory in press_factories(ratio).items():
                    if name not in args.methods or (name == "dense" and ratio != args.ratios[0]):
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
        provenance("cuda"),
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
        ratios=args.ratios,
        weights_bytes=weights_bytes,
        weights_32_layers_bytes=weights_32_layers_bytes,
    )
    if not args.skip_attention_cost:
        meta["attention_cost"] = attention_cost([8192, 32768], [1, 8])
    # one GiB less than the card, for the CUDA context and fragmentation
    meta["capacities_gib"] = {
        "this GPU": torch.cuda.get_device_properties(0).total_memory / GiB - 1,
        "80 GB H100": 81559 / 1024 - 1,
    }
    meta["longest_context"] = longest_context(results, meta, meta["capacities_gib"])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_evict_" + meta["device"].replace(" ", "_").replace("/", "_") + "_" + meta["attention_path"]
    (args.out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, results=results, all_passes=passes), indent=2))
    table = markdown_table(results, meta)
    (args.out / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
