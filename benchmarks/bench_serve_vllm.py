"""Serving throughput inside vLLM: vLLM dense against adakv's plugin, through `LLM.generate` (CUDA).

The Llama-3.1-8B shape with random bf16 weights (`--make-checkpoint DIR` saves its config; vLLM draws the
weights, `load_format="dummy"`), prompts as token ids. One engine per run (`--method dense`: vLLM unchanged, its default backend and full CUDA
graphs; `--method adakv`: `engine_args(press, ratio)`, every ratio of `--ratios` per request through
`SamplingParams.extra_args`; `--full-decode-graphs` for decode steps replayed from full CUDA graphs), both
with prefix caching off and the same `--gpu-memory-utilization`.

- saturation: `--requests` prompts of `--context` tokens + `--new-tokens` outputs submitted at once:
  output tokens/s over the whole call (prefill included), the most requests running at once (from the
  requests' scheduled and last-token times), mean ms per output token per request, TTFT p50 / p95
  (queueing included);
- batch 1: per `--batch1` context, (T(65 + 256 tokens) - T(65 tokens)) / 256 through generate, and the
  TTFT of one request alone.

Each run merges its rows into serve_vllm_<GPU>.json (rows keyed by measure, method, batch, context, ratio and
the CUDA graph mode the worker ran, each with the commit measured) and rewrites the .md beside it, so the methods
can run in separate processes of one lease.

    python benchmarks/bench_serve_vllm.py --make-checkpoint /tmp/llama8b
    python benchmarks/bench_serve_vllm.py --checkpoint /tmp/llama8b --method dense
    python benchmarks/bench_serve_vllm.py --checkpoint /tmp/llama8b --method adakv --ratios 0.75 0.875
    python benchmarks/bench_serve_vllm.py --checkpoint /tmp/llama8b --method adakv --requests 0 --full-decode-graphs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from functools import partial
from pathlib import Path

ROWS_KEY = ("measure", "method", "batch", "context", "ratio", "cudagraph_mode")


def make_checkpoint(path: Path, layers: int) -> None:
    """The model's config alone: vLLM draws random weights for it (`load_format="dummy"`)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=262144, rope_theta=500000.0,
        torch_dtype="bfloat16", architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    config.save_pretrained(path)
    print(f"saved the config of a {layers}-layer 8B-shape Llama to {path}")


def prompt_ids(length: int, seed: int) -> dict:
    generator = random.Random(seed)
    return {"prompt_token_ids": [generator.randrange(1000, 120000) for _ in range(length)]}


def params(new_tokens: int, ratio: float | None):
    from vllm import SamplingParams

    extra = None if ratio is None else {"adakv": {"compression_ratio": ratio}}
    return SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0, ignore_eos=True, extra_args=extra)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of [start, end] intervals that overlap."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = best = 0
    for _, change in events:
        running += change
        best = max(best, running)
    return best


def concurrency_figures(outputs) -> dict:
    """The most requests running at once (from their scheduled and last-token times) and TTFT p50 / p95
    of one `generate` call's outputs."""
    metrics = [output.metrics for output in outputs]
    ttft = [m.first_token_latency for m in metrics]
    return dict(
        max_running=most_at_once([(m.scheduled_ts, m.last_token_ts) for m in metrics]),
        ttft_p50_s=percentile(ttft, 0.5), ttft_p95_s=percentile(ttft, 0.95),
    )  # fmt: skip


def saturation(llm, method: str, ratio: float | None, requests: int, context: int, new_tokens: int) -> dict:
    prompts = [prompt_ids(context, 1000 + i) for i in range(requests)]
    start = time.perf_counter()
    outputs = llm.generate(prompts, [params(new_tokens, ratio)] * requests, use_tqdm=False)
    wall = time.perf_counter() - start
    produced = sum(len(output.outputs[0].token_ids) for output in outputs)
    per_token = [
        (m.last_token_ts - m.first_token_ts) / max(m.num_generation_tokens - 1, 1) for m in (o.metrics for o in outputs)
    ]
    return dict(
        measure="saturation", method=method, batch=requests, context=context, ratio=ratio or 0.0, new_tokens=new_tokens,
        tokens_per_s=produced / wall, wall_s=wall, decode_ms=1000 * statistics.mean(per_token),
        **concurrency_figures(outputs),
    )  # fmt: skip


def decode_at_concurrency(
    llm, method: str, ratio: float | None, concurrency: int, context: int, new_tokens: int, short: int = 65
) -> dict:
    """Decode alone at `concurrency` requests running together: `concurrency` prompts submitted at once
    with `short` and with `short + new_tokens` outputs; the extra `new_tokens` steps run after every prompt
    is in, so (T(long) - T(short)) / new_tokens is one decode step over all of them (the issue's basis:
    dense's 708 tokens/s at 24 x 32k)."""
    prompts = [prompt_ids(context, 2000 + i) for i in range(concurrency)]
    walls, outputs = {}, None
    for count in (short, short + new_tokens):
        start = time.perf_counter()
        outputs = llm.generate(prompts, [params(count, ratio)] * concurrency, use_tqdm=False)
        walls[count] = time.perf_counter() - start
    step_s = (walls[short + new_tokens] - walls[short]) / new_tokens
    return dict(
        measure="decode", method=method, batch=concurrency, context=context, ratio=ratio or 0.0, new_tokens=new_tokens,
        tokens_per_s=concurrency / step_s, wall_s=walls[short + new_tokens], decode_ms=1000 * step_s,
        **concurrency_figures(outputs),
    )  # fmt: skip


def batch_one(llm, method: str, ratio: float | None, context: int, new_tokens: int, short: int = 65) -> dict:
    prompt = [prompt_ids(context, 7)]
    timings = {}
    for count in (short, short + new_tokens):
        start = time.perf_counter()
        (output,) = llm.generate(prompt, [params(count, ratio)], use_tqdm=False)
        timings[count] = (time.perf_counter() - start, output.metrics.first_token_latency)
    decode_ms = 1000 * (timings[short + new_tokens][0] - timings[short][0]) / new_tokens
    return dict(
        measure="batch1", method=method, batch=1, context=context, ratio=ratio or 0.0, new_tokens=new_tokens,
        tokens_per_s=1000 / decode_ms, wall_s=timings[short + new_tokens][0], max_running=1, decode_ms=decode_ms,
        ttft_p50_s=timings[short][1], ttft_p95_s=timings[short][1],
    )  # fmt: skip


def build_engine(args):
    from vllm import LLM

    from adakv.runtimes.vllm import engine_args

    common = dict(
        model=str(args.checkpoint), skip_tokenizer_init=True, dtype="bfloat16", max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False, disable_log_stats=False,
        load_format="dummy", max_num_seqs=args.max_num_seqs,
    )  # fmt: skip
    if args.method == "dense":
        return LLM(**common)
    adakv = engine_args(
        args.press, args.ratios[0], window_size=args.window_size, full_decode_graphs=args.full_decode_graphs
    )
    adakv.pop("enable_prefix_caching")
    return LLM(**common, **adakv)


def engine_facts(llm) -> dict:
    config = llm.llm_engine.vllm_config
    core = getattr(llm.llm_engine, "engine_core", None)
    return dict(
        max_num_batched_tokens=config.scheduler_config.max_num_batched_tokens,
        max_num_seqs=config.scheduler_config.max_num_seqs,
        cudagraph_mode=str(config.compilation_config.cudagraph_mode),
        attention_backend=str(config.attention_config.backend),
        async_scheduling=config.scheduler_config.async_scheduling,
        num_gpu_blocks=config.cache_config.num_gpu_blocks,
        block_size=config.cache_config.block_size,
        engine_core=type(core).__name__ if core is not None else None,
    )


def merge(path: Path, rows: list[dict], meta: dict, method: str) -> dict:
    data = json.loads(path.read_text()) if path.exists() else {"meta": {}, "rows": []}
    fresh = {tuple(row[k] for k in ROWS_KEY) for row in rows}
    data["rows"] = [row for row in data["rows"] if tuple(row[k] for k in ROWS_KEY) not in fresh] + rows
    data["meta"][method] = meta  # the method's latest run; every run's provenance stays in "runs"
    runs = data.setdefault("runs", [])
    if not any(run.get("date") == meta.get("date") and run.get("command") == meta.get("command") for run in runs):
        runs.append(meta)
    path.write_text(json.dumps(data, indent=1))
    return data


def render(data: dict) -> str:
    lines = ["# Serving in vLLM: dense against adakv's plugin", ""]
    for method, meta in sorted(data["meta"].items()):
        lines.append(
            f"- {method}: {meta.get('gpu')}, vllm {meta.get('vllm')}, torch {meta.get('torch')}, adakv "
            f"{meta.get('adakv_commit')}, {meta.get('date')}; engine {json.dumps(meta.get('engine'))}"
        )
    columns = ["measure", "method", "batch", "context", "ratio", "tokens/s", "max running", "ms/token", "TTFT p50 s",
               "TTFT p95 s", "vs dense tokens/s", "CUDA graphs", "adakv"]  # fmt: skip
    lines += ["", "measure: saturation = all requests at once, over the whole call (prefill included); decode = one "
              "step over that many running requests, (T(65 + 256) - T(65)) / 256; batch1 = the same for one request.",
              "", "| " + " | ".join(columns) + " |", "|---|---|" + "---:|" * 9 + "---|---|"]  # fmt: skip
    dense = {(r["measure"], r["context"]): r for r in data["rows"] if r["method"] == "vllm-dense"}
    for row in sorted(data["rows"], key=lambda r: (r["measure"], -r["batch"], r["context"], r["method"], r["ratio"])):
        base = dense.get((row["measure"], row["context"]))
        versus = f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "—"
        lines.append(
            f"| {row['measure']} | {row['method']} | {row['batch']} | {row['context']} | {row['ratio']} | "
            f"{row['tokens_per_s']:.0f} | {row['max_running']} | {row['decode_ms']:.2f} | {row['ttft_p50_s']:.2f} | "
            f"{row['ttft_p95_s']:.2f} | {versus} | {row['cudagraph_mode']} | {(row.get('adakv_commit') or '')[:7]} |"
        )
    if data.get("runs"):
        lines += ["", "Runs (each row's adakv column names its run's commit):"]
    for run in data.get("runs", []):
        lines.append(f"- {run.get('date')}, adakv {(run.get('adakv_commit') or '')[:7]}: `{run.get('command')}`")
    notes = [row for row in data["rows"] if row.get("note")]
    if notes:
        lines += ["", "Notes:"]
    for row in notes:
        lines.append(f"- {row['method']}, {row['batch']} x {row['context']}, {row['cudagraph_mode']}: {row['note']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make-checkpoint", type=Path)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--method", choices=("dense", "adakv"))
    parser.add_argument("--press", default="adakv_snapkv")
    parser.add_argument("--window-size", type=int, default=64)
    parser.add_argument(
        "--full-decode-graphs", action="store_true", help="adakv: decode steps from full CUDA graphs (engine_args)"
    )
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.75, 0.875])
    parser.add_argument("--requests", type=int, default=96, help="0: batch-1 rows only")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch1", type=int, nargs="*", default=[32768, 131072])
    parser.add_argument(
        "--decode-concurrency", type=int, nargs="*", default=[],
        help="decode alone at these numbers of --context requests (dense's pool holds ~24 at 32k)",
    )  # fmt: skip
    parser.add_argument("--max-model-len", type=int, default=131072 + 1024)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--max-num-seqs", type=int, default=128, help="both engines; dense runs at most ~24 at 32k")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    if args.make_checkpoint:
        make_checkpoint(args.make_checkpoint, args.layers)
        return
    if args.checkpoint is None or args.method is None:
        parser.error("give --make-checkpoint DIR, or --checkpoint DIR and --method")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from adakv.apps.provenance import provenance

    started = time.perf_counter()
    llm = build_engine(args)
    meta = dict(provenance("cuda"), engine=engine_facts(llm), engine_start_s=time.perf_counter() - started)
    if args.method == "adakv":  # the mode its worker runs (the front end's config keeps the one asked for)
        stats = llm.collective_rpc("adakv_stats")[0]
        meta["engine"]["cudagraph_mode"] = stats["cudagraph_mode"]
        meta["engine_start_timings_s"] = stats["start_timings_s"]
    method_names = {"dense": "vllm-dense", "adakv": f"adakv-vllm-{args.press}"}
    ratios = [None] if args.method == "dense" else args.ratios
    warm_up = min(2048, args.max_model_len // 2)
    batch_one(llm, method_names[args.method], ratios[0], warm_up, 8, short=4)  # kernels compiled, graphs hot
    gpu = (meta.get("gpu") or "gpu").replace(" ", "_")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serve_vllm_{gpu}{args.tag}.json"
    name = method_names[args.method]
    runs = [partial(saturation, llm, name, ratio, args.requests, args.context, args.new_tokens) for ratio in ratios]
    runs = runs if args.requests else []
    runs += [partial(batch_one, llm, name, ratios[0], context, args.new_tokens) for context in args.batch1]
    runs += [
        partial(decode_at_concurrency, llm, name, ratio, running, args.context, args.new_tokens)
        for running in args.decode_concurrency
        for ratio in ratios
    ]
    for run in runs:  # each row saved as soon as it is measured: a run cut short keeps its rows
        row = run()
        row.update(cudagraph_mode=meta["engine"]["cudagraph_mode"], adakv_commit=meta.get("adakv_commit"))
        print(json.dumps(row), flush=True)
        data = merge(path, [row], meta, args.method)
        path.with_suffix(".md").write_text(render(data))
    print(render(json.loads(path.read_text())))
    os._exit(0)  # the engine's background processes would otherwise keep the interpreter alive a while


if __name__ == "__main__":
    main()
