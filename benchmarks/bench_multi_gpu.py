"""Tensor parallelism on 2 GPUs: dense vs AdaptivePress(SnapKV) evict, with transformers' tp_plan="auto".

    torchrun --nproc-per-node 2 benchmarks/bench_multi_gpu.py                      # 128k, 256k, 512k
    torchrun --nproc-per-node 2 benchmarks/bench_multi_gpu.py --contexts 524288 --tag 512k
    python -m torch.distributed.run --nproc-per-node 2 benchmarks/bench_multi_gpu.py --tiny   # CPU + gloo smoke test

Model: Llama-3.1-8B-shaped (32 layers, 8 KV heads: 4 per rank), random bf16 weights. The weights are
initialised by transformers itself: the model is loaded with `from_pretrained(dir, distributed_config=DistributedConfig(tp_plan="auto"))` from a
directory holding its config and an empty safetensors file, so every parameter is "missing" and gets its
random initialisation directly as this rank's shard.

Methods (--methods): "dense", one ordinary forward into a DynamicCache (FlashAttention, no mask; the dense
cache of 512k tokens is 32 GiB per GPU, so it fits an H200 pair); "dense-chunked", a plain chunked prefill
(`adakv.prefill_in_chunks` with press=None: transformers then builds a chunk x context mask for every chunk,
slow and large at 512k); "ada", a chunked prefill (--chunk-size tokens per forward) that compresses every
chunk with AdaptivePress(SnapKVPress(r), backend="evict", exchange=--exchange), for every --ratios. Per case
and GPU: KV GiB the cache holds, peak GiB (torch.cuda.max_memory_allocated, weights included), prefill s,
median decode ms/token.

Cross-rank allocation: the only extra work TP adds to AdaptivePress is the exchange (the selection's
tensor-parallel reduction, adakv/selection/distributed.py), once per layer and chunk. It is timed on its own,
for both exchanges, on scores of the shape one layer compresses per chunk ((1, 4, chunk) per rank), and
reported as layers x chunks x that time, as a share of the measured prefill; next to it the same selection on
one GPU over all 8 heads (no exchange). The model-wide allocation (AdaptivePress(scope="model"), which
compresses after an ordinary prefill) is timed the same way on the scores of every layer over the whole
context (`model_wide_selection_ms`: both exchanges and one GPU).

Longest context that fits (per GPU): from >= 2 measured contexts per method, a straight-line fit of peak memory
against context, solved for the GPU's memory (computed, not run; --fit-with adds earlier result files).

NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 are
set before torch.distributed starts). The process group is destroyed in a `finally`, with a timeout on every
collective, so a failing rank does not leave the other one waiting.
"""

from __future__ import annotations

import os

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(MULTICAST_OFF)  # before torch (and NCCL) are imported

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_evict import GiB, kv_bytes, llama_8b_config, synchronize  # noqa: E402
from bench_long_context import decode_steps, longest_context, tiny_config  # noqa: E402

from adakv import presses as P  # noqa: E402
from adakv.apps.provenance import provenance  # noqa: E402
from adakv.runtimes.hf.chunked_prefill import prefill_in_chunks  # noqa: E402
from adakv.selection import (  # noqa: E402
    EXCHANGES, adaptive_budget_keep_mask, adaptive_keep_mask, kept_count, model_keep_masks, tensor_parallel_reduction,
)  # fmt: skip

FULL = dict(layers=32, contexts=[131072, 262144, 524288], chunk_size=32768, ratios=[0.75, 0.875])
TINY = dict(layers=2, contexts=[512, 1024], chunk_size=128, ratios=[0.75, 0.875])
METHODS = ("dense", "dense-chunked", "ada")
COLLECTIVE_TIMEOUT_S = 900  # a rank that died leaves the other one waiting at most this long


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="default 131072 262144 524288 (--tiny: 512 1024)")
    parser.add_argument("--ratios", type=float, nargs="+", default=None, help="compression ratios (default 0.75 0.875)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; --tiny: 2)")
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per prefill chunk (default 32768; --tiny: 128)")
    parser.add_argument("--exchange", choices=EXCHANGES, default="all_gather", help="AdaptivePress's exchange in the prefills")
    parser.add_argument("--decode-steps", type=int, default=8, help="timed decode steps after each prefill")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["dense", "ada"],
                        help="dense: one ordinary forward; dense-chunked: prefill_in_chunks without a press; "
                        "ada: chunked AdaptivePress(SnapKV) evict at every --ratios (default: dense ada)")
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama (CPU + gloo without GPUs): a smoke test")
    parser.add_argument("--fit-with", type=Path, nargs="*", default=[], help="earlier result JSON files for the fit")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="", help="appended to the result files' name")
    args = parser.parse_args(argv)
    for name, value in (TINY if args.tiny else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if any(not 0 < ratio < 1 for ratio in args.ratios):
        parser.error(f"--ratios must lie in (0, 1), got {args.ratios}")
    if args.chunk_size < 1 or any(context < 1 for context in args.contexts):
        parser.error("--chunk-size and --contexts must be positive")
    return args


# ----- process group and model ---------------------------------------------------------------------
def start_process_group() -> str:
    """Join torchrun's group (NCCL on GPUs, gloo on CPU); returns the device string of this rank."""
    if "RANK" not in os.environ:
        raise SystemExit("Run under torchrun: torchrun --nproc-per-node 2 benchmarks/bench_multi_gpu.py ...")
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
        dist.init_process_group("nccl", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S), device_id=torch.device(device))
        return device
    dist.init_process_group("gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return "cpu"


def load_random_tp_model(config, dtype):
    """transformers' tensor-parallel model with randomly initialised weights (no checkpoint to read)."""
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, DistributedConfig

    transformers.logging.set_verbosity_error()  # not the list of every (deliberately) missing weight
    torch.manual_seed(0)  # replicated parameters (embeddings, norms) must agree on every rank
    with tempfile.TemporaryDirectory() as directory:
        config.save_pretrained(directory)
        save_file({}, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        model = AutoModelForCausalLM.from_pretrained(
            directory, distributed_config=DistributedConfig(tp_plan="auto"), dtype=dtype, attn_implementation="sdpa"
        )
    return model.eval()


# ----- measurements ----------------------------------------------------------------------------------
def make_press(ratio: float | None, exchange: str):
    if ratio is None:
        return None
    return P.AdaptivePress(P.SnapKVPress(ratio), backend="evict", exchange=exchange)


def run_case(model, context: int, ratio: float | None, args, device: str, chunked: bool = True) -> dict:
    """One prefill (chunked, or one forward) and decode steps of `context` random tokens; this rank's numbers."""
    from contextlib import nullcontext

    from transformers import DynamicCache

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    generator = torch.Generator().manual_seed(context)  # the same tokens on every rank
    ids = torch.randint(10, model.config.vocab_size, (1, context), generator=generator).to(device)
    press = make_press(ratio, args.exchange)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model) if press is not None else nullcontext():
        dist.barrier()
        synchronize(device)
        started = time.perf_counter()
        if chunked:
            prefill_in_chunks(model, press, ids, args.chunk_size, cache=cache)
        else:
            model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        synchronize(device)
        prefill_s = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
        held = kv_bytes(cache)
        decode_ms = decode_steps(model, cache, ids[:, -1:], args.decode_steps, "cuda" if device.startswith("cuda") else "cpu")
    del cache, ids
    return dict(peak_gib=None if peak is None else peak / GiB, kv_gib=held / GiB, prefill_s=prefill_s, decode_ms=decode_ms)


def run_case_or_oom(model, context: int, ratio: float | None, args, device: str, chunked: bool) -> dict:
    """`run_case`, or {"error": "OOM"} when this rank ran out of memory (both ranks hold the same shapes, so
    they run out at the same step and meet again at the next collective)."""
    try:
        return run_case(model, context, ratio, args, device, chunked)
    except torch.OutOfMemoryError:
        pass
    gc.collect()  # outside the except block: its traceback no longer holds the case's tensors
    torch.cuda.empty_cache()
    return {"error": "OOM"}


def time_selection(function, device: str, repeats: int = 7) -> float:
    """Median ms of `function()` (the first two calls are warm-up), every rank starting together."""
    times = []
    for step in range(repeats + 2):
        dist.barrier()
        synchronize(device)
        started = time.perf_counter()
        function()
        synchronize(device)
        if step >= 2:
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def exchange_costs(config, tokens: int, ratio: float, device: str) -> dict:
    """ms of one layer's selection over `tokens` tokens: each exchange (this rank's heads) and one GPU's."""
    world = dist.get_world_size()
    heads = config.num_key_value_heads
    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(1, heads, tokens, generator=generator).to(device)  # the whole layer, identical on every rank
    available = torch.ones_like(scores, dtype=torch.bool)
    local = heads // world
    mine = slice(dist.get_rank() * local, (dist.get_rank() + 1) * local)
    costs = {
        exchange: time_selection(
            lambda r=tensor_parallel_reduction(exchange=exchange): adaptive_keep_mask(
                scores[:, mine], available[:, mine], ratio, 0.2, r
            ),
            device,
        )
        for exchange in EXCHANGES
    }
    costs["one_gpu"] = time_selection(lambda: adaptive_keep_mask(scores, available, ratio, 0.2), device)
    return costs


def model_exchange_costs(config, tokens: int, ratio: float, device: str) -> dict:
    """ms of the model-wide selection over every layer's scores of `tokens` tokens: each exchange (this
    rank's heads of every layer) and one GPU's over every head; "OOM" where the scores did not fit."""
    world, heads, layers = dist.get_world_size(), config.num_key_value_heads, config.num_hidden_layers
    local = heads // world
    mine = slice(dist.get_rank() * local, (dist.get_rank() + 1) * local)
    costs = {}
    try:
        generator = torch.Generator().manual_seed(2)
        scores = [torch.rand(1, heads, tokens, generator=generator).to(device) for _ in range(layers)]
        available = [torch.ones_like(s, dtype=torch.bool) for s in scores]
        for exchange in EXCHANGES:
            costs[exchange] = time_selection(
                lambda r=tensor_parallel_reduction(exchange=exchange): model_keep_masks(
                    [s[:, mine] for s in scores], [a[:, mine] for a in available], [ratio] * layers, 0.2, r
                ),
                device,
            )
        budget = kept_count(torch.full((1, heads * layers), tokens, device=device), ratio).sum(-1)
        all_scores, all_available = torch.cat(scores, 1), torch.cat(available, 1)
        costs["one_gpu"] = time_selection(lambda: adaptive_budget_keep_mask(all_scores, all_available, budget, 0.2), device)
    except torch.cuda.OutOfMemoryError:
        costs["error"] = "OOM"
    return costs


def gather_ranks(row: dict) -> list[dict]:
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    return rows


def sweep(model, config, args, device: str, save) -> list[dict]:
    results = []
    cases = [(method, None, method == "dense-chunked") for method in args.methods if method.startswith("dense")]
    if "ada" in args.methods:
        cases += [(f"ada_snapkv-evict-chunked r={ratio} ({args.exchange})", ratio, True) for ratio in args.ratios]
    for context in sorted(args.contexts):
        for method, ratio, chunked in cases:
            chunks = -(-context // args.chunk_size) if chunked else 1
            per_rank = gather_ranks(run_case_or_oom(model, context, ratio, args, device, chunked))
            if any("error" in r for r in per_rank):
                results.append(dict(context=context, method=method, ratio=ratio or 0.0, error="OOM"))
                if dist.get_rank() == 0:
                    save(results)
                continue
            row = dict(
                context=context, method=method, ratio=ratio or 0.0, chunks=chunks,
                kv_gib_per_gpu=[r["kv_gib"] for r in per_rank],
                peak_gib_per_gpu=[r["peak_gib"] for r in per_rank],
                peak_gib=None if per_rank[0]["peak_gib"] is None else max(r["peak_gib"] for r in per_rank),
                prefill_s=max(r["prefill_s"] for r in per_rank),
                decode_ms=max(r["decode_ms"] for r in per_rank) if per_rank[0]["decode_ms"] is not None else None,
            )  # fmt: skip
            if ratio is not None:
                per_layer = exchange_costs(config, min(args.chunk_size, context), ratio, device)
                calls = config.num_hidden_layers * chunks
                row["selection_ms_per_layer_chunk"] = per_layer
                row["selection_share_of_prefill"] = {
                    name: calls * ms / 1000 / row["prefill_s"] for name, ms in per_layer.items()
                }
                # an ordinary (unchunked) prefill selects once per layer over the whole context
                row["selection_ms_per_layer_whole_context"] = exchange_costs(config, context, ratio, device)
                row["model_wide_selection_ms"] = model_exchange_costs(config, context, ratio, device)
            results.append(row)
            if dist.get_rank() == 0:
                print(json.dumps(row), flush=True)
                save(results)
    return results


# ----- report --------------------------------------------------------------------------------------
def gib_list(values) -> str:
    return " / ".join("n/a" if v is None else f"{v:.3g}" for v in values)


def three_ms(ms: dict) -> str:
    return f"{ms['all_gather']:.3f} / {ms['threshold_search']:.3f} / {ms['one_gpu']:.3f}"


def markdown_table(results: list[dict], meta: dict) -> str:
    lines = [
        f"Devices: {meta['world_size']} x {meta['device']}; torch {meta['torch']}; transformers {meta['transformers']}; "
        f"{meta['model']}, {meta['layers']} layers, {meta['dtype']}, tensor parallel {meta['world_size']} "
        f"(tp_plan=\"auto\"); chunked prefill, chunk {meta['chunk_size']}; AdaptivePress exchange in the prefills: "
        f"{meta['exchange']}. NVLink multicast off.",
        f"Command: `{meta['command']}`",
        "",
        "| context | method | ratio | KV GiB per GPU | peak GiB per GPU | prefill s | decode ms/token | "
        "selection ms per layer and chunk: all_gather / threshold_search / one GPU | share of prefill: all_gather / "
        "threshold_search | selection ms per layer, whole context at once: all_gather / threshold_search / one GPU |",
        "|---:|---|---:|---|---|---:|---:|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['context']} | {r['method']} | {r['ratio']} | {r['error']} | | | | | | |")
            continue
        decode = "" if r["decode_ms"] is None else f"{r['decode_ms']:.2f}"
        selection = share = whole = ""
        if "selection_ms_per_layer_chunk" in r:
            selection = three_ms(r["selection_ms_per_layer_chunk"])
            whole = three_ms(r["selection_ms_per_layer_whole_context"])
            shares = r["selection_share_of_prefill"]
            share = f"{100 * shares['all_gather']:.2f}% / {100 * shares['threshold_search']:.2f}%"
        lines.append(
            f"| {r['context']} | {r['method']} | {r['ratio']} | {gib_list(r['kv_gib_per_gpu'])} | "
            f"{gib_list(r['peak_gib_per_gpu'])} | {r['prefill_s']:.2f} | {decode} | {selection} | {share} | {whole} |"
        )
    if meta.get("longest_context"):
        lines += ["", f"Longest context whose prefill fits one GPU's {meta['capacity_gib']:.1f} GiB (straight-line fit of "
                  "the peaks per GPU, computed, not run):", "",
                  "| method | fixed GiB | bytes/token per GPU | fit error GiB | max context |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for r in meta["longest_context"]:
            longest = "n/a" if r["max_context"] is None else format(r["max_context"], ",")
            lines.append(
                f"| {r['method']} | {r['fixed_gib']:.2f} | {r['bytes_per_token']:.0f} | {r['fit_max_error_gib']:.2f} | {longest} |"
            )
    return "\n".join(lines) + "\n"


def earlier_results(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        rows += json.loads(path.read_text())["results"]
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = start_process_group()
    try:
        run(args, argv, device)
    finally:
        dist.destroy_process_group()


def run(args, argv, device: str) -> None:
    import transformers

    from adakv.cache.flat_attention import available_gpu_path

    if device == "cpu" and not args.tiny:
        raise SystemExit("bench_multi_gpu.py needs CUDA devices (or --tiny for a CPU smoke test).")
    config = tiny_config(args.layers) if args.tiny else llama_8b_config(args.layers)
    config.max_position_embeddings = max(config.max_position_embeddings, max(args.contexts))
    if config.num_key_value_heads % dist.get_world_size():
        raise SystemExit(f"{config.num_key_value_heads} KV heads cannot be split over {dist.get_world_size()} ranks.")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    started = time.perf_counter()
    model = load_random_tp_model(config, dtype)
    warmup = argparse.Namespace(**{**vars(args), "chunk_size": max(1, args.chunk_size // 16), "decode_steps": 1})
    for ratio, chunked in [(None, False), (None, True), (args.ratios[0], True)]:  # kernel builds, Triton, NCCL
        run_case(model, 4 * warmup.chunk_size, ratio, warmup, device, chunked)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({platform.machine()})"
    meta = dict(
        provenance(device), device=name, world_size=dist.get_world_size(), torch=torch.__version__, transformers=transformers.__version__,
        command="torchrun --nproc-per-node 2 benchmarks/bench_multi_gpu.py " + " ".join(argv),
        model="tiny random Llama" if args.tiny else "Llama-3.1-8B-shaped random model", layers=args.layers,
        dtype=str(dtype).replace("torch.", ""), chunk_size=args.chunk_size, exchange=args.exchange,
        decode_path=available_gpu_path() if device.startswith("cuda") else "reference",
        multicast_off=MULTICAST_OFF, setup_s=time.perf_counter() - started,
    )  # fmt: skip
    if device.startswith("cuda"):  # one GiB less than the card, for the CUDA context, NCCL and fragmentation
        meta["capacity_gib"] = torch.cuda.get_device_properties(device).total_memory / GiB - 1
    stem = "bench_multi_gpu_" + name + ("_tiny" if args.tiny else "") + (f"_{args.tag}" if args.tag else "")
    stem = "".join(c if c.isalnum() or c in "_-." else "_" for c in stem)
    fit_rows = earlier_results(args.fit_with)

    def save(results: list[dict]) -> None:
        meta["elapsed_s"] = time.perf_counter() - started
        if "capacity_gib" in meta:
            meta["longest_context"] = longest_context(fit_rows + results, meta["capacity_gib"] * GiB)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, results=results), indent=2))
        (args.out / f"{stem}.md").write_text(markdown_table(results, meta))

    results = sweep(model, config, args, device, save)
    if dist.get_rank() == 0:
        print(markdown_table(results, meta), flush=True)


if __name__ == "__main__":
    main()
