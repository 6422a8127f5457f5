"""Peak memory of `model.generate` as a user calls it: dense against AdaptivePress(SnapKV) evict (CUDA; --tiny on CPU).

One process, the Llama-3.1-8B shape with random bf16 weights (sdpa). For each BATCHxCONTEXT case:

- dense: transformers' own cache (`--dense-cache dynamic`: DynamicCache, the default of generate;
  `static`: StaticCache sized to the prompt and the new tokens, generate's compilation switched off: the
  peak of the prefill is what is measured);
- adakv: `with AdaptivePress(SnapKVPress(r))(model): model.generate(...)` (layer scope, default backend);
- adakv-switches: the same inside `press(model, cuda_graphs=True, join_projections=True,
  fuse_elementwise=True, gemv_linears=True)`.

Every row: peak GiB (`torch.cuda.max_memory_allocated` over the generate call, the weights included), the
memory allocated before the call (the weights alone: anything more is a leftover of an earlier row and
is reported), KV GiB held after the call (flat layers: kept rows + slack + lengths), the generate wall
time, and for adakv rows the target `dense peak - r x dense KV` (the dense peak with the KV the press
frees taken out) and the margin to it. On CPU (--tiny) the peak is the live tensor bytes counted by
benchmarks/live_bytes.py plus the weights. Writes peak_memory_<GPU><tag>.json and .md.

    python benchmarks/bench_peak_memory.py                                      # 1x32768 1x131072 8x32768, all methods
    python benchmarks/bench_peak_memory.py --cases 1x131072 --methods dense adakv   # one case, switches off
    python benchmarks/bench_peak_memory.py --tiny                               # CPU smoke test (seconds)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, StaticCache

sys.path.insert(0, str(Path(__file__).parent))
from bench_evict import GiB, build_model, kv_bytes, llama_8b_config  # noqa: E402
from live_bytes import LiveBytes  # noqa: E402

from adakv import presses as P  # noqa: E402
from adakv.apps.provenance import provenance  # noqa: E402

METHODS = ("dense", "adakv", "adakv-switches")
SWITCHES = dict(cuda_graphs=True, join_projections=True, fuse_elementwise=True, gemv_linears=True)


def tiny_config(layers: int) -> LlamaConfig:
    """The 8B model's proportions (GQA 4:1, MLP 3.5x hidden) at 1/16 of its width."""
    return LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=896, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=1 << 20,
    )  # fmt: skip


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(model, ids, method: str, ratio: float, new_tokens: int, dense_cache: str, weights: int) -> dict:
    """One generate call of `method` on `ids`: its peak, the memory before it, the KV it holds after."""
    device = ids.device
    batch, context = ids.shape
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
    else:
        before = weights
    if method == "dense" and dense_cache == "static":
        cache = StaticCache(config=model.config, max_cache_len=context + new_tokens)
    else:
        cache = DynamicCache(config=model.config)
    press = None if method == "dense" else P.AdaptivePress(P.SnapKVPress(ratio))
    block = nullcontext() if press is None else press(model, **(SWITCHES if method == "adakv-switches" else {}))
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, past_key_values=cache,
                   attention_mask=torch.ones_like(ids), disable_compile=True)  # fmt: skip
    counting = LiveBytes(where_depth=0) if device.type != "cuda" else nullcontext()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    with torch.no_grad(), block, counting:
        model.generate(ids, **options)
    synchronize(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else weights + counting.peak
    row = dict(
        method=method, batch=batch, context=context, ratio=0.0 if press is None else ratio,
        switches=sorted(SWITCHES) if method == "adakv-switches" else [],
        dense_cache=dense_cache if press is None else None, peak_gib=peak / GiB, before_gib=before / GiB,
        leftover_gib=(before - weights) / GiB, kv_gib=kv_bytes(cache) / GiB, generate_s=seconds,
        new_tokens=new_tokens,
    )  # fmt: skip
    del cache, block, press
    return row


def run_case(model, batch, context, args, weights, device) -> list[dict]:
    generator = torch.Generator().manual_seed(batch * 1_000_003 + context)
    ids = torch.randint(10, model.config.vocab_size - 10, (batch, context), generator=generator).to(device)
    rows = []
    for method in args.methods:
        try:
            row = measure(model, ids, method, args.ratio, args.new_tokens, args.dense_cache, weights)
        except torch.cuda.OutOfMemoryError as error:
            row = dict(method=method, batch=batch, context=context, ratio=args.ratio, error=f"out of memory: {error}"[:300])
        rows.append(row)
        print(json.dumps(row), flush=True)
        if row.get("leftover_gib", 0) > 0.05:
            print(f"warning: {row['leftover_gib']:.2f} GiB were allocated before this row's call", flush=True)
    dense = next((r for r in rows if r["method"] == "dense" and "error" not in r), None)
    for row in rows:
        if dense is not None and row["method"] != "dense" and "error" not in row:
            row["target_gib"] = dense["peak_gib"] - row["ratio"] * dense["kv_gib"]
            row["margin_gib"] = row["target_gib"] - row["peak_gib"]
            row["meets_target"] = row["peak_gib"] <= row["target_gib"]
            # the dense peak less what is really freed: the dense KV less the KV held (slack rows included)
            row["held_target_gib"] = dense["peak_gib"] - dense["kv_gib"] + row["kv_gib"]
            row["held_margin_gib"] = row["held_target_gib"] - row["peak_gib"]
            row["saving_gib"] = dense["peak_gib"] - row["peak_gib"]
    return rows


def write_table(path: Path, meta: dict, rows: list[dict]) -> None:
    lines = [
        f"# Peak memory of model.generate, {meta['device']}",
        "",
        f"{meta['layers']}-layer Llama-3.1-8B shape, random bf16 weights ({meta['weight_gib']:.2f} GiB), sdpa, "
        f"{meta['new_tokens']} new tokens. Peak = max_memory_allocated over the generate call (weights included); "
        "target = dense peak - r x dense KV. adakv = AdaptivePress(SnapKVPress(r)) evict, layer scope; "
        "adakv-switches adds cuda_graphs, join_projections, fuse_elementwise, gemv_linears. "
        f"adakv commit {meta.get('adakv_commit')}, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"{meta.get('date')}.",
        "",
        "held target = dense peak - dense KV + the KV adakv holds (its slack rows included).",
        "",
        "| batch x context | method | peak GiB | KV GiB | target GiB | margin GiB | held target GiB | held margin GiB | leftover before GiB | generate s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        case = f"{r['batch']} x {r['context']}"
        if "error" in r:
            lines.append(f"| {case} | {r['method']} | {r['error'][:60]} | | | | | | | |")
            continue
        target = f"{r['target_gib']:.2f}" if "target_gib" in r else ""
        margin = f"{r['margin_gib']:+.3f}" if "margin_gib" in r else ""
        held = f"{r['held_target_gib']:.2f} | {r['held_margin_gib']:+.3f}" if "held_target_gib" in r else " | "
        method = r["method"] + (f" ({r['dense_cache']})" if r.get("dense_cache") else "")
        lines.append(
            f"| {case} | {method} | {r['peak_gib']:.2f} | {r['kv_gib']:.2f} | {target} | {margin} | {held} | "
            f"{r['leftover_gib']:.2f} | {r['generate_s']:.2f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=None, help="BATCHxCONTEXT (default 1x32768 1x131072 8x32768; --tiny: 1x1024 2x512)")
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                        help="default: all three (--tiny: dense adakv, the switches need CUDA)")
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--dense-cache", choices=("dynamic", "static"), default="dynamic")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; --tiny: 4)")
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama on CPU (smoke test)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args(argv)
    args.layers = args.layers or (4 if args.tiny else 32)
    args.cases = args.cases or (["1x1024", "2x512"] if args.tiny else ["1x32768", "1x131072", "8x32768"])
    args.methods = args.methods or (["dense", "adakv"] if args.tiny else list(METHODS))
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("bench_peak_memory.py needs CUDA (or --tiny for the CPU smoke test).")
    if device.type == "cpu" and "adakv-switches" in args.methods:
        raise SystemExit("adakv-switches needs CUDA (CUDA graphs and Triton kernels).")
    config = tiny_config(args.layers) if args.tiny else llama_8b_config(args.layers)
    model = build_model(args.layers, config=config, device=device.type)
    weights = weight_bytes(model)
    origin = provenance(device)
    meta = dict(origin, device=origin["gpu"] or origin["device"], layers=args.layers, weight_gib=weights / GiB,
                ratio=args.ratio, new_tokens=args.new_tokens, dense_cache=args.dense_cache, cases=args.cases,
                methods=args.methods, tiny=args.tiny)  # fmt: skip
    print(json.dumps(meta), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"peak_memory_{meta['device'].replace(' ', '_')}{args.tag}"
    rows: list[dict] = []
    for case in args.cases:
        batch, context = (int(part) for part in case.split("x"))
        rows.extend(run_case(model, batch, context, args, weights, device))
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        write_table(stem.with_suffix(".md"), meta, rows)
    print(stem.with_suffix(".md").read_text(), flush=True)


if __name__ == "__main__":
    main()
