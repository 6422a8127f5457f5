"""Cost of KVzip's scoring: context prefill time with and without KVzipPress on the embedded SmolLM2.

    .venv/bin/python scripts/kvzip_cost.py --context-length 2000 --repeats 3 [--threads 1] [--device cuda]

Each setting prefills the same context (Paul Graham essays, as the demo) `--repeats` times after one
warm-up, the settings interleaved (so a change in the machine's load hits all of them alike); medians of
the process's CPU time and of the wall time are printed. "no press" is the plain prefill; the KVzip row
includes the reconstruction forward, the scoring and the compression (backend "evict")."""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import DynamicCache

from adakv import KVzipPress, SnapKVPress, load_default_model
from adakv.demo import haystack
from adakv.pipeline import encode_prompt_parts, prefill_context, split_prompt


def timed_prefill(model, press, context_ids) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one context prefill under `press`."""
    cache = DynamicCache(config=model.config)
    cpu, wall = time.process_time(), time.perf_counter()
    with torch.no_grad(), (press(model) if press is not None else torch.no_grad()):
        prefill_context(model, cache, context_ids)
    if context_ids.is_cuda:
        torch.cuda.synchronize()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context-length", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="e.g. cuda (then read the wall times)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_default_model(device=args.device)
    context_text, _ = split_prompt(tokenizer, haystack(tokenizer, args.context_length), "")
    context_ids = encode_prompt_parts(tokenizer, context_text, [])[0].to(args.device)
    settings = {
        "no press": None,
        "SnapKV 0.5 (evict)": SnapKVPress(0.5, backend="evict"),
        "KVzip 0.5 (evict)": KVzipPress(0.5, chunk_size=args.chunk_size, tokenizer=tokenizer, backend="evict"),
    }
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"{context_ids.shape[1]} context tokens, KVzip chunk_size {args.chunk_size}")
    times = {name: [] for name in settings}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, press in settings.items():
            measured = timed_prefill(model, press, context_ids)
            if repeat:
                times[name].append(measured)
    base_cpu = statistics.median(cpu for cpu, _ in times["no press"])
    for name, runs in times.items():
        cpu, wall = statistics.median(c for c, _ in runs), statistics.median(w for _, w in runs)
        print(f"{name:22s} CPU {cpu:7.2f} s ({cpu / base_cpu:4.2f}x)  wall {wall:7.2f} s  "
              f"runs (cpu, wall) {[(round(c, 1), round(w, 1)) for c, w in runs]}")

if __name__ == "__main__":
    main()
