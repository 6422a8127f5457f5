"""Cost of KVzip's scoring: context prefill time with and without KVzipPress on the embedded SmolLM2.

    .venv/bin/python scripts/kvzip_cost.py --context-length 2000 --repeats 3

Each setting prefills the same context (Paul Graham essays, as the demo) `--repeats` times after one
warm-up; the median is printed. "no press" is the plain prefill; the KVzip rows include the
reconstruction forwards, the scoring and the compression (backend "evict" frees the pruned rows)."""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import DynamicCache

from adakv import AdaptivePress, KVzipPress, SnapKVPress, load_default_model
from adakv.demo import haystack
from adakv.pipeline import encode_prompt_parts, prefill_context, split_prompt


def timed_prefill(model, press, context_ids) -> float:
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    with torch.no_grad(), (press(model) if press is not None else torch.no_grad()):
        prefill_context(model, cache, context_ids)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context-length", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_default_model()
    context_text, _ = split_prompt(tokenizer, haystack(tokenizer, args.context_length), "")
    context_ids, _ = encode_prompt_parts(tokenizer, context_text, [])
    settings = {
        "no press": None,
        "SnapKV 0.5 (evict)": SnapKVPress(0.5, backend="evict"),
        "KVzip 0.5 (evict)": KVzipPress(0.5, chunk_size=args.chunk_size, tokenizer=tokenizer, backend="evict"),
        "AdaptivePress(KVzip, scope=model) 0.5 (evict)": AdaptivePress(
            KVzipPress(0.5, chunk_size=args.chunk_size, tokenizer=tokenizer), scope="model", backend="evict"
        ),
    }
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"{context_ids.shape[1]} context tokens, KVzip chunk_size {args.chunk_size}")
    baseline = None
    for name, press in settings.items():
        timed_prefill(model, press, context_ids)  # warm-up
        times = [timed_prefill(model, press, context_ids) for _ in range(args.repeats)]
        median = statistics.median(times)
        baseline = baseline or median
        print(f"{name:50s} median {median:6.2f} s  ({median / baseline:4.2f}x)  runs {[round(t, 2) for t in times]}")


if __name__ == "__main__":
    main()
