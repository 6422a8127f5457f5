"""Cost of KVzip's scoring: context prefill time with and without KVzipPress, on any evaluation model.

    .venv/bin/python scripts/kvzip_cost.py --context-length 2000 --repeats 3 [--threads 1]
    python3 scripts/kvzip_cost.py --model qwen2.5-coder-1.5b --device cuda --context-length 4096 8192 \
        --out benchmarks/results

Each setting prefills the same context (Paul Graham essays, as the demo) `--repeats` times after one
warm-up, the settings interleaved (so a change in the machine's load hits all of them alike); medians of
the process's CPU time and of the wall time are printed (on CUDA the device is synchronised, so wall time
is what counts). "no press" is the plain prefill; the KVzip rows include the reconstruction forward, the
scoring and the compression (backend "evict"). On CUDA with Triton a row "PyTorch scoring" runs KVzip with
its PyTorch scoring instead of the Triton kernels, for the kernels' gain in the same run. --model takes what `adakv-eval run --model` takes (the
embedded SmolLM2 by default, a built split-GGUF model, or a folder). --out saves the figures as JSON,
named after the device."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from transformers import DynamicCache

from adakv import AdaptivePress, KVzipPress, SnapKVPress
from adakv.apps.demo import haystack
from adakv.apps.provenance import provenance
from adakv.pipeline import encode_prompt_parts, prefill_context, split_prompt
from adakv.evaluation.runner import load_model
from adakv.kernels import kvzip_reference as kvzip


def timed_prefill(model, press, context_ids, scoring=nullcontext) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one context prefill under `press`, within `scoring()`."""
    cache = DynamicCache(config=model.config)
    cpu, wall = time.process_time(), time.perf_counter()
    with torch.no_grad(), scoring(), (press(model) if press is not None else nullcontext()):
        prefill_context(model, cache, context_ids)
    if context_ids.is_cuda:
        torch.cuda.synchronize()
    return time.process_time() - cpu, time.perf_counter() - wall


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


@contextmanager
def pytorch_scoring():
    """KVzip's scoring through its PyTorch statement, also where its Triton kernels would run."""
    original = kvzip.triton_available
    kvzip.triton_available = lambda: False
    try:
        yield
    finally:
        kvzip.triton_available = original


def settings(tokenizer, chunk_size: int, device: str) -> dict[str, tuple]:
    """name -> (press or None, context the prefill runs in)."""
    def kvzip_press():
        return KVzipPress(0.5, chunk_size=chunk_size, tokenizer=tokenizer, backend="evict")

    rows = {
        "no press": (None, nullcontext),
        "SnapKV 0.5 (evict)": (SnapKVPress(0.5, backend="evict"), nullcontext),
        "KVzip 0.5 (evict)": (kvzip_press(), nullcontext),
        "model-wide KVzip 0.5 (evict)": (
            AdaptivePress(KVzipPress(0.5, chunk_size=chunk_size, tokenizer=tokenizer), scope="model", backend="evict"),
            nullcontext,
        ),
    }
    if device.startswith("cuda") and kvzip.triton_available():  # the kernels' gain, in the same run
        rows["KVzip 0.5 (evict), PyTorch scoring"] = (kvzip_press(), pytorch_scoring)
    return rows


def measure(model, tokenizer, context_length: int, args) -> dict:
    """Median CPU and wall seconds of every setting at one context length, and their ratio to no press."""
    context_text, _ = split_prompt(tokenizer, haystack(tokenizer, context_length), "")
    context_ids = encode_prompt_parts(tokenizer, context_text, [])[0].to(args.device)
    presses = settings(tokenizer, args.chunk_size, args.device)
    times = {name: [] for name in presses}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, (press, scoring) in presses.items():
            measured = timed_prefill(model, press, context_ids, scoring)
            if repeat:
                times[name].append(measured)
    base_cpu = statistics.median(cpu for cpu, _ in times["no press"])
    base_wall = statistics.median(wall for _, wall in times["no press"])
    rows = []
    for name, runs in times.items():
        cpu, wall = statistics.median(c for c, _ in runs), statistics.median(w for _, w in runs)
        rows.append(dict(setting=name, cpu_s=cpu, cpu_vs_plain=cpu / base_cpu, wall_s=wall,
                         wall_vs_plain=wall / base_wall, runs=runs))  # fmt: skip
        print(f"{name:30s} CPU {cpu:7.2f} s ({cpu / base_cpu:4.2f}x)  wall {wall:7.3f} s ({wall / base_wall:4.2f}x)  "
              f"runs (cpu, wall) {[(round(c, 2), round(w, 3)) for c, w in runs]}")
    return dict(context_tokens=context_ids.shape[1], rows=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="as adakv-eval run --model")
    parser.add_argument("--context-length", type=int, nargs="+", default=[2000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="e.g. cuda (then read the wall times)")
    parser.add_argument("--out", type=Path, default=None, help="folder for kvzip_cost_<model>_<device>.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, args.device)
    device = device_name(args.device)
    cases = []
    for length in args.context_length:
        print(f"{args.model} on {device}, {torch.get_num_threads()} torch threads, {length} requested context "
              f"tokens, KVzip chunk_size {args.chunk_size}, {model.dtype}")
        cases.append(measure(model, tokenizer, length, args))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"kvzip_cost_{args.model}_{device.replace(' ', '_')}.json"
        result = dict(provenance(args.device), model=args.model, device=device, dtype=str(model.dtype),
                      torch=torch.__version__, chunk_size=args.chunk_size, repeats=args.repeats, cases=cases)  # fmt: skip
        path.write_text(json.dumps(result, indent=1))
        print(f"saved {path}")


if __name__ == "__main__":
    main()
