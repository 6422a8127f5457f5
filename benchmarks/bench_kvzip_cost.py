"""KVzip's cost through `model.generate` as a user calls it: time to first token and peak memory, dense
against `AdaptivePress(KVzipPress(r), scope="model")` (CUDA; --tiny on CPU). Issue 23, item 2: TTFT <= 2x
dense and peak <= dense's at 1 x 32k and 1 x 128k.

One process, the Llama-3.1-8B shape with random bf16 weights (sdpa), as benchmarks/bench_peak_memory.py
builds it. For each BATCHxCONTEXT case and method, after a warm-up call at --warmup-context tokens:

- dense: `model.generate(ids, max_new_tokens=1)` with a DynamicCache: the prefill and the first token;
- kvzip: the same inside `press(model, cuda_graphs=True, join_projections=True, fuse_elementwise=True,
  gemv_linears=True)` with press = AdaptivePress(KVzipPress(r, repeat_prompt_ids=...), scope="model"),
  backend evict: prefill, KVzip's reconstruction and scoring, the model-wide selection, eviction, first token;
- kvzip-chunk-order (only when asked for): kvzip with the replay forced to run chunk by chunk through the
  whole decoder (the order adakv used before the layer-by-layer replay), to show what the order saves.

Every row: ttft_s (median of --repeats calls, every call in `runs_s`), peak_gib (`max_memory_allocated`
over the call, the weights included), kv_gib held after the call, `model_flops` (the matrix-product FLOPs
of the call by the model's arithmetic, for kvzip also as the reconstruction ran before its scoring moved into
its attention), and for kvzip rows the ratios to the dense row of the same case (`ttft_vs_dense`,
`peak_vs_dense`, `model_flops_vs_dense`) and whether the targets hold. On CPU (--tiny) the peak is the
weights plus the live tensor bytes counted by benchmarks/live_bytes.py in one more call (it slows the call,
so it is not timed). Writes kvzip_cost_<GPU><tag>.json and .md.

    python benchmarks/bench_kvzip_cost.py                       # 1x32768 1x131072, dense and kvzip (H200: < 5 min)
    python benchmarks/bench_kvzip_cost.py --cases 1x32768 --methods dense kvzip kvzip-chunk-order
    python benchmarks/bench_kvzip_cost.py --tiny                # CPU (a minute)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).parent))
from bench_evict import GiB, build_model, kv_bytes, llama_8b_config  # noqa: E402
from bench_peak_memory import tiny_config, weight_bytes  # noqa: E402
from live_bytes import LiveBytes  # noqa: E402

from adakv import presses as P  # noqa: E402
from adakv.apps.provenance import provenance  # noqa: E402

METHODS = ("dense", "kvzip", "kvzip-chunk-order")
SWITCHES = dict(cuda_graphs=True, join_projections=True, fuse_elementwise=True, gemv_linears=True)
REPEAT_PROMPT_IDS = (271, 39432, 279, 3766, 2317, 25)  # a fixed stand-in for the tokenized repeat prompt
TTFT_TARGET, PEAK_TARGET = 2.0, 1.0  # x dense
warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def chunk_order():
    """A block in which KVzip's replay runs chunk by chunk through the decoder (the earlier order)."""
    from unittest import mock

    return mock.patch("adakv.runtimes.hf.replay.layer_by_layer_decoder", lambda decoder, contexts: False)


def prompt_ids(model) -> tuple[int, ...]:
    """REPEAT_PROMPT_IDS within the model's vocabulary."""
    return tuple(token % model.config.vocab_size for token in REPEAT_PROMPT_IDS)


def press_block(model, method: str, ratio: float, chunk_size: int, switches: dict):
    """The `with` block of `method` around a generate call (dense: none)."""
    if method == "dense":
        return nullcontext()
    press = P.AdaptivePress(
        P.KVzipPress(ratio, repeat_prompt_ids=prompt_ids(model), chunk_size=chunk_size), scope="model"
    )
    return press(model, **switches)


def one_call(model, ids, method: str, args, switches: dict, count_bytes: bool) -> dict:
    """One generate call: seconds, peak bytes (weights included; on CPU only when `count_bytes`, which
    slows the call), KV bytes after."""
    device = ids.device
    cache = DynamicCache(config=model.config)
    options = dict(max_new_tokens=1, min_new_tokens=1, do_sample=False, past_key_values=cache,
                   attention_mask=torch.ones_like(ids), disable_compile=True, pad_token_id=0)  # fmt: skip
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    counting = LiveBytes(where_depth=0) if device.type != "cuda" and count_bytes else nullcontext()
    order = chunk_order() if method == "kvzip-chunk-order" else nullcontext()
    synchronize(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    with torch.no_grad(), order, press_block(model, method, args.ratio, args.chunk_size, switches), counting:
        model.generate(ids, **options)
    synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = args.weights + counting.peak if count_bytes else None
    return dict(seconds=seconds, cpu_seconds=cpu_seconds, peak=peak, kv=kv_bytes(cache))


def measure(model, ids, method: str, args, switches: dict) -> dict:
    """`method` on `ids`: the median time of --repeats calls, their largest peak (on CPU: one more call
    under LiveBytes) and the KV held after the last."""
    batch, context = ids.shape
    calls = [one_call(model, ids, method, args, switches, False) for _ in range(args.repeats)]
    if ids.device.type != "cuda":
        calls[-1]["peak"] = one_call(model, ids, method, args, switches, True)["peak"]
    return dict(
        method=method, batch=batch, context=context, ratio=0.0 if method == "dense" else args.ratio,
        switches=sorted(switches) if method != "dense" else [], chunk_size=args.chunk_size,
        ttft_s=statistics.median(c["seconds"] for c in calls), runs_s=[c["seconds"] for c in calls],
        cpu_s=statistics.median(c["cpu_seconds"] for c in calls),
        peak_gib=max(c["peak"] for c in calls if c["peak"] is not None) / GiB, kv_gib=calls[-1]["kv"] / GiB,
        model_flops=model_flops(model.config, batch, context, len(prompt_ids(model)), method),
    )  # fmt: skip


def model_flops(config, batch: int, context: int, prompt: int, method: str) -> dict:
    """Matrix-product FLOPs of one call by the arithmetic of the model's shape (not counted at run time):
    the prefill (projections, MLP, causal attention) and, for kvzip, the reconstruction of `prompt + context`
    tokens as adakv runs it now (every layer's projections and MLP but the last layer's output projection
    and MLP; attention over the context and the stream so far; the last layer's normaliser pass without
    values; one scoring pass over the context keys per layer) and as it ran before the scoring moved into
    the attention (every layer whole, queries recomputed, a normaliser pass and a scoring pass per layer)."""
    hidden, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q = o = hidden * heads * head_dim
    kv = 2 * hidden * config.num_key_value_heads * head_dim
    mlp = 3 * hidden * config.intermediate_size
    pair = 2 * head_dim * heads  # one product over one (query, key) pair, every head of a layer
    stream = prompt + context
    seen = stream * (context + stream / 2)  # (query, key) pairs of the reconstruction, per layer
    prefill = 2 * (q + kv + o + mlp) * layers * context + 2 * pair * context * context / 2 * layers
    flops = dict(prefill=batch * prefill)
    if method != "dense":
        now = 2 * (q + kv + o + mlp) * (layers - 1) * stream + 2 * (q + kv) * stream
        now += 2 * pair * seen * (layers - 1) + pair * seen + pair * context * context * layers
        before = 2 * (q + kv + o + mlp) * layers * stream + 2 * q * stream * layers
        before += 3 * pair * seen * layers + pair * context * context * layers
        flops.update(reconstruction=batch * now, reconstruction_before=batch * before)
    return flops


def compare_to_dense(rows: list[dict]) -> None:
    """Add each kvzip row's ratios to the dense row of its case and whether the targets hold."""
    dense = next((r for r in rows if r["method"] == "dense" and "error" not in r), None)
    for row in rows:
        if dense is None or row["method"] == "dense" or "error" in row:
            continue
        row["ttft_vs_dense"] = row["ttft_s"] / dense["ttft_s"]
        row["cpu_vs_dense"] = row["cpu_s"] / dense["cpu_s"]
        row["peak_vs_dense"] = row["peak_gib"] / dense["peak_gib"]
        row["meets_ttft_target"] = row["ttft_vs_dense"] <= TTFT_TARGET
        row["meets_peak_target"] = row["peak_vs_dense"] <= PEAK_TARGET
        flops = row["model_flops"]
        row["model_flops_vs_dense"] = (flops["prefill"] + flops["reconstruction"]) / dense["model_flops"]["prefill"]
        row["model_flops_before_vs_dense"] = (
            flops["prefill"] + flops["reconstruction_before"]
        ) / dense["model_flops"]["prefill"]


def run_case(model, batch: int, context: int, args, switches: dict, device) -> list[dict]:
    generator = torch.Generator().manual_seed(batch * 1_000_003 + context)
    ids = torch.randint(10, model.config.vocab_size - 10, (batch, context), generator=generator).to(device)
    rows = []
    for method in args.methods:
        try:
            row = measure(model, ids, method, args, switches)
        except torch.cuda.OutOfMemoryError as error:
            row = dict(method=method, batch=batch, context=context, ratio=args.ratio, error=f"out of memory: {error}"[:300])
        rows.append(row)
        print(json.dumps(row), flush=True)
    compare_to_dense(rows)
    return rows


def warm_up(model, args, switches: dict, device) -> None:
    """Compile the Triton kernels and fill the allocator's caches once per method, at a short context."""
    ids = torch.randint(10, model.config.vocab_size - 10, (1, args.warmup_context)).to(device)
    for method in args.methods:
        one_call(model, ids, method, args, switches, False)


def write_table(path: Path, meta: dict, rows: list[dict]) -> None:
    lines = [
        f"# KVzip's cost through model.generate, {meta['device']}",
        "",
        f"{meta['layers']}-layer Llama-3.1-8B shape, random bf16 weights ({meta['weight_gib']:.2f} GiB), sdpa. "
        "TTFT = wall time of generate(max_new_tokens=1) (median of the runs listed); peak = max_memory_allocated "
        "over the call (weights included). kvzip = AdaptivePress(KVzipPress(r), scope='model'), backend evict, "
        f"with {', '.join(meta['switches']) or 'no speed switches'}; chunk_size {meta['chunk_size']}. Targets: TTFT "
        f"<= {TTFT_TARGET}x dense, peak <= dense. adakv commit {meta.get('adakv_commit')}"
        f"{' (dirty)' if meta.get('adakv_dirty') else ''}, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"{meta.get('date')}.",
        "",
        "| batch x context | method | TTFT s | x dense | CPU s | x dense | peak GiB | x dense | KV GiB | targets met | runs s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        case = f"{r['batch']} x {r['context']}"
        if "error" in r:
            lines.append(f"| {case} | {r['method']} | {r['error'][:60]} | | | | | | | | |")
            continue
        ttft_ratio = f"{r['ttft_vs_dense']:.2f}" if "ttft_vs_dense" in r else ""
        peak_ratio = f"{r['peak_vs_dense']:.3f}" if "peak_vs_dense" in r else ""
        cpu_ratio = f"{r['cpu_vs_dense']:.2f}" if "cpu_vs_dense" in r else ""
        met = "" if "meets_ttft_target" not in r else (
            f"TTFT {'yes' if r['meets_ttft_target'] else 'no'}, peak {'yes' if r['meets_peak_target'] else 'no'}"
        )  # fmt: skip
        runs = ", ".join(f"{s:.2f}" for s in r["runs_s"])
        lines.append(
            f"| {case} | {r['method']} | {r['ttft_s']:.3f} | {ttft_ratio} | {r['cpu_s']:.2f} | {cpu_ratio} | "
            f"{r['peak_gib']:.3f} | {peak_ratio} | "
            f"{r['kv_gib']:.3f} | {met} | {runs} |"
        )
    lines += [
        "",
        "FLOPs by the model's arithmetic (matrix products, `model_flops`), prefill + reconstruction over the dense "
        "prefill: what the call costs if every kernel ran as fast as the prefill's.",
        "",
        "| batch x context | method | FLOPs x dense, now | before the scoring moved into the attention |",
        "|---|---|---:|---:|",
    ]
    for r in rows:
        if "model_flops_vs_dense" in r:
            lines.append(
                f"| {r['batch']} x {r['context']} | {r['method']} | {r['model_flops_vs_dense']:.2f} | "
                f"{r['model_flops_before_vs_dense']:.2f} |"
            )
    path.write_text("\n".join(lines) + "\n")


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=None, help="BATCHxCONTEXT (default 1x32768 1x131072; --tiny: 1x2048 1x4096)")
    parser.add_argument("--methods", nargs="+", default=["dense", "kvzip"], choices=METHODS)
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--chunk-size", type=int, default=2048, help="KVzipPress.chunk_size")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup-context", type=int, default=4096)
    parser.add_argument("--no-switches", action="store_true", help="kvzip without the four speed switches")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; --tiny: 4)")
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama on CPU")
    parser.add_argument("--scoring-rows", type=int, default=None,
                        help="kvzip_reference.SCORING_BLOCK_ROWS (the PyTorch scoring's block of queries, CPU; "
                        "smaller blocks hold less scratch, so the cache and hidden states show at the peak)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU time is the steadier measure on a shared CPU)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args(argv)
    args.layers = args.layers or (4 if args.tiny else 32)
    args.cases = args.cases or (["1x2048", "1x4096"] if args.tiny else ["1x32768", "1x131072"])
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.scoring_rows:
        from adakv.kernels import kvzip_reference

        kvzip_reference.SCORING_BLOCK_ROWS = args.scoring_rows
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("bench_kvzip_cost.py needs CUDA (or --tiny for CPU).")
    switches = {} if args.no_switches or device.type == "cpu" else SWITCHES
    config = tiny_config(args.layers) if args.tiny else llama_8b_config(args.layers)
    model = build_model(args.layers, config=config, device=device.type, dtype=torch.float32 if args.tiny else torch.bfloat16)
    args.weights = weight_bytes(model)
    origin = provenance(device)
    meta = dict(origin, device=origin["gpu"] or origin["device"], layers=args.layers, weight_gib=args.weights / GiB,
                ratio=args.ratio, chunk_size=args.chunk_size, repeats=args.repeats, switches=sorted(switches),
                cases=args.cases, methods=args.methods, tiny=args.tiny, scoring_rows=args.scoring_rows, repeat_prompt_ids=prompt_ids(model))  # fmt: skip
    print(json.dumps(meta), flush=True)
    warm_up(model, args, switches, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"kvzip_cost_{meta['device'].replace(' ', '_')}{args.tag}"
    rows: list[dict] = []
    for case in args.cases:
        batch, context = (int(part) for part in case.split("x"))
        rows.extend(run_case(model, batch, context, args, switches, device))
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        write_table(stem.with_suffix(".md"), meta, rows)
    print(stem.with_suffix(".md").read_text(), flush=True)


if __name__ == "__main__":
    main()
