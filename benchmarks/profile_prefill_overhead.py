"""Where the prefill overhead of scoring + allocation + eviction goes (CUDA only).

DESIGN §5 asks that compressing the context costs at most 10% of a dense prefill. This script
measures, on a Llama-3.1-8B-shaped random bf16 model with `--layers` layers:

1. whole prefills (median of `--repeats` after warm-up): dense, SnapKV evict, AdaptivePress(SnapKV)
   evict and mask, so the overhead is (press - dense) / dense;
2. each stage alone on one recorded layer: SnapKV's scores, the uniform and the adaptive keep masks,
   building the evict layer (compaction) and the mask layer; host time per call on an idle GPU and
   GPU time per call with the launches queued behind a long matmul (bench_decode_kernels.timings);
3. a torch.profiler table of one AdaptivePress(SnapKV) evict prefill (top ops by host time).

    python benchmarks/profile_prefill_overhead.py --context 8192 --layers 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache

from adakv import presses as P
from adakv.apps.provenance import provenance
from adakv.cache import make_compressed_layer
from adakv.runtimes.hf import compressed_layer
from adakv.selection import adaptive_keep_mask, uniform_keep_mask

from bench_decode_kernels import timings
from bench_evict import build_model

RATIO = 0.75


def prefill_seconds(model, ids, make_press, repeats: int, warmup: int = 2) -> list[float]:
    times = []
    for step in range(warmup + repeats):
        cache = DynamicCache(config=model.config)
        press = make_press() if make_press else None
        with torch.no_grad():
            torch.cuda.synchronize()
            started = time.perf_counter()
            if press is None:
                model(ids, past_key_values=cache, logits_to_keep=1)
            else:
                with press(model):
                    model(ids, past_key_values=cache, logits_to_keep=1)
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - started)
        del cache
    return times


def stages(model, ids) -> dict:
    recorder = P.RecordingPress()
    with torch.no_grad(), recorder(model):
        model(ids, past_key_values=DynamicCache(config=model.config), logits_to_keep=1)
    context = recorder.contexts[len(recorder.contexts) // 2]
    snapkv = P.SnapKVPress(RATIO)
    busy = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def stage_cost(fn) -> dict:
        return timings(fn, busy, calls=20)

    with torch.no_grad():
        scores = snapkv.score(context)
        keep = uniform_keep_mask(scores, context.available, RATIO)
        config = context.module.config
        return {
            "snapkv_score": stage_cost(lambda: snapkv.score(context)),
            "uniform_keep_mask": stage_cost(lambda: uniform_keep_mask(scores, context.available, RATIO)),
            "adaptive_keep_mask": stage_cost(lambda: adaptive_keep_mask(scores, context.available, RATIO, 0.2)),
            "evict_layer": stage_cost(lambda: make_compressed_layer("evict", context.keys, context.values, keep, config)),
            "mask_layer": stage_cost(lambda: make_compressed_layer("mask", context.keys, context.values, keep, config)),
            "ada_snapkv_evict_total": stage_cost(
                lambda: compressed_layer(P.AdaptivePress(P.SnapKVPress(RATIO), backend="evict"), context)
            ),
        }


def profiler_table(model, ids) -> str:
    from torch.profiler import ProfilerActivity, profile

    press = P.AdaptivePress(P.SnapKVPress(RATIO), backend="evict")
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with press(model):
            model(ids, past_key_values=DynamicCache(config=model.config), logits_to_keep=1)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--no-profiler", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_prefill_overhead.py needs a CUDA device.")

    model = build_model(args.layers)
    ids = torch.randint(10, 128000, (1, args.context), device="cuda")
    methods = {
        "dense": None,
        "snapkv-evict": lambda: P.SnapKVPress(RATIO, backend="evict"),
        "ada_snapkv-evict": lambda: P.AdaptivePress(P.SnapKVPress(RATIO), backend="evict"),
        "ada_snapkv-mask": lambda: P.AdaptivePress(P.SnapKVPress(RATIO), backend="mask"),
    }
    prefill = {}
    for _ in range(2):  # two rounds over all methods; the second is reported (first-config warm-up effects)
        prefill = {name: prefill_seconds(model, ids, make, args.repeats) for name, make in methods.items()}
    dense = statistics.median(prefill["dense"])
    meta = dict(
        provenance("cuda"), device=torch.cuda.get_device_name(), torch=torch.__version__,
        transformers=transformers.__version__, context=args.context, layers=args.layers, ratio=RATIO,
    )  # fmt: skip
    print(json.dumps(meta))
    rows = []
    for name, times in prefill.items():
        median = statistics.median(times)
        rows.append(dict(method=name, median_s=median, overhead=median / dense - 1, times=times))
        print(f"{name:18s} prefill median {median * 1000:8.2f} ms  overhead {100 * (median / dense - 1):+6.2f}%  "
              f"(min {min(times) * 1000:.2f}, max {max(times) * 1000:.2f})", flush=True)  # fmt: skip
    stage_rows = stages(model, ids)
    for name, cost in stage_rows.items():
        print(f"stage {name:24s} host {cost['host_us']:8.1f} us  gpu {cost['gpu_us']:8.1f} us", flush=True)
    table = "" if args.no_profiler else profiler_table(model, ids)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"profile_prefill_{torch.cuda.get_device_name().replace(' ', '_')}_{args.context}"
    (args.out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, prefill=rows, stages=stage_rows), indent=1))
    (args.out / f"{stem}_profiler.txt").write_text(table)


if __name__ == "__main__":
    main()
