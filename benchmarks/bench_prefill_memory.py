"""Peak memory, time to first token and decode through `model.generate` as a user calls it: dense against
AdaptivePress(SnapKV) and AdaptivePress(KVzip, scope="model"), per KV dtype (CUDA; `--device cpu --tiny`: a
smoke test). Issue 23, item 4; the .md checks the issue's targets.

One process, the Llama-3.1-8B shape with random bf16 weights (sdpa), built as benchmarks/bench_peak_memory.py
builds it. Per BATCHxCONTEXT case (default 1x32768 1x131072 8x32768), one call
`model.generate(ids, max_new_tokens=1 + --decode-warmup + --decode-steps)` per method and KV dtype:

- dense-dynamic: transformers' DynamicCache (generate's default), eager decode;
- dense-mlp-rows: the same inside `mlp_in_row_chunks(model, rows)` (adakv/runtimes/hf/mlp_rows.py: each MLP over
  at most `rows` token rows at a time, as a press block does by default; rows: --mlp-chunk-rows): what dense
  alone gains from it;
- adakv-snapkv: AdaptivePress(SnapKVPress(r)) (layer scope, default backend: evict) inside
  `press(model, cuda_graphs=True, join_projections=True, fuse_elementwise=True, gemv_linears=True)`, the
  README's four speed switches (`--no-switches`: none; on a CPU there are none), and the block's MLP row chunks
  (`--mlp-chunk-rows`, default MLP_CHUNK_ROWS; `none`: each MLP over all rows, as before they existed);
- adakv-kvzip: the same with AdaptivePress(KVzipPress(r, repeat_prompt_ids=...), scope="model");
- dense-static: a StaticCache of context + new tokens passed to generate, which then compiles the decode step
  itself (torch.compile, "reduce-overhead": transformers' choice for a static cache on a GPU); run last in
  a case, its compiled call and graphs dropped after it. It is not warmed up (its compilation depends on the
  cache's length): its first decode step compiles inside the measured call, after the token that times its
  TTFT and within the steps --decode-warmup leaves out.

The press rows run once per `--kv-dtypes` entry (default bfloat16, the model's dtype; float8_e4m3fn: the press's
kv_dtype, the fp8 flat cache); dense rows hold the model's bf16. A KV dtype adakv's presses do not take stops the run before the model is built
(`kv_dtype_refusal`), and a row whose cache holds another dtype than asked is recorded as an error.

Per row: tokens_sha256 (of the generated ids: rows that differ only in mlp_chunk_rows must match), mlp_chunk_rows (None: no chunks; rows measured before the option existed have no such key and ran
without), peak_gib (`max_memory_allocated` over the call, weights included; what was allocated before it
beyond the weights is `leftover_gib`), kv_gib (held after the call, slack rows included), ttft_s (from the
call to the first token's logits), decode_ms (median time between two tokens' logits over --decode-steps
steps after --decode-warmup: the first steps capture graphs or compile), limit_ms = (weight bytes + KV
bytes a decode step reads) / the device-to-device copy bandwidth measured in this process, as
benchmarks/bench_decode_limit.py counts them, and x_limit = decode_ms / limit_ms. The times are CUDA events
recorded by a logits processor (`TokenClock`), so the call runs as a user's does, with no wait added. Each
row is merged into prefill_memory_<GPU><tag>.json as soon as it is measured (keyed by method, batch,
context, ratio, kv_dtype and switches; every call's provenance under "runs") and the .md is written again
from all the rows, so cases measured in separate calls accumulate in one table.

    python benchmarks/bench_prefill_memory.py --cases 1x32768      # H200: ~5 min on a fresh machine
    python benchmarks/bench_prefill_memory.py --cases 1x131072     # ~6.5 min
    python benchmarks/bench_prefill_memory.py --cases 8x32768      # ~6 min (the three cases do not fit one 10-minute call)
    python benchmarks/bench_prefill_memory.py --cases 1x131072 --methods adakv-snapkv --kv-dtypes bfloat16 float8_e4m3fn
    python benchmarks/bench_prefill_memory.py --device cpu --tiny  # CPU smoke test (seconds)
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StaticCache

sys.path.insert(0, str(Path(__file__).parent))
import bench_decode_limit as limits  # noqa: E402
from bench_evict import GiB, build_model, kv_bytes, llama_8b_config, synchronize  # noqa: E402
from bench_kvzip_cost import prompt_ids  # noqa: E402
from bench_peak_memory import SWITCHES, tiny_config, weight_bytes  # noqa: E402
from live_bytes import LiveBytes  # noqa: E402

from adakv import presses as P  # noqa: E402
from adakv.apps.devices import check_device  # noqa: E402
from adakv.runtimes.hf.mlp_rows import MLP_CHUNK_ROWS, mlp_in_row_chunks  # noqa: E402

METHODS = ("dense-dynamic", "dense-mlp-rows", "adakv-snapkv", "adakv-kvzip", "dense-static")  # a case's rows, in order
ROW_KEY = ("method", "batch", "context", "ratio", "kv_dtype", "switches", "mlp_chunk_rows")
SETTINGS = ("layers", "tiny")  # a results file holds rows of one model
NATIVE_KV_DTYPE = "bfloat16"  # the model's dtype: what every cache holds without a kv_dtype option
KV_DTYPE_ALIASES = {"bf16": "bfloat16", "fp8": "float8_e4m3fn"}
# issue 23's targets
PEAK_CASE = (1, 131072)  # peak <= dense peak - r x dense KV (33.6 GiB where dense peaks at 45.6)
TTFT_TARGET, TTFT_CASES = 2.0, ((1, 32768), (1, 131072))  # KVzip's TTFT, x dense
FP8_KV_TARGET, FP8_LIMIT_TARGET = 0.52, 1.3  # fp8 KV x the bf16 KV of the same row; its decode x its limit


def press_options(kv_dtype: str) -> dict:
    """The press keywords that ask for a cache of `kv_dtype` (the native width needs none): the press field
    `kv_dtype` (presses/base.py)."""
    return {} if kv_dtype == NATIVE_KV_DTYPE else {"kv_dtype": kv_dtype}


def kv_dtype_refusal(kv_dtype: str) -> str | None:
    """None where adakv's presses take `kv_dtype`, else why not. The press is asked as the benchmark will ask
    it (an option it does not declare or a value its field rule refuses is an error), so support is read
    from the code, not assumed."""
    if kv_dtype == NATIVE_KV_DTYPE:
        return None
    try:
        P.AdaptivePress(P.SnapKVPress(0.5), **press_options(kv_dtype))
    except (TypeError, ValueError, AttributeError) as error:
        return (
            f"--kv-dtypes {kv_dtype}: adakv's cache cannot hold {kv_dtype} keys and values in this checkout: "
            f"AdaptivePress refuses {press_options(kv_dtype)} ({type(error).__name__}: {error}). Run with "
            f"--kv-dtypes {NATIVE_KV_DTYPE} or a kv_dtype the presses take."
        )
    return None


def kv_dtype_name(text: str) -> str:
    """--kv-dtypes: a torch dtype's name (bf16 and fp8 taken for bfloat16 and float8_e4m3fn)."""
    name = KV_DTYPE_ALIASES.get(text, text).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch dtype (bfloat16, float8_e4m3fn, ...)")
    return name


def mlp_rows_option(text: str) -> int | None:
    """--mlp-chunk-rows: a positive int, or none."""
    if text.lower() == "none":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of token rows, or none")
    return int(text)


def row_mlp_rows(method: str, args) -> int | None:
    """The mlp_chunk_rows of a row: --mlp-chunk-rows for the press rows and dense-mlp-rows (which takes
    MLP_CHUNK_ROWS when it is none), None for the other dense rows."""
    if method == "dense-mlp-rows":
        return args.mlp_chunk_rows or MLP_CHUNK_ROWS
    return None if method.startswith("dense") else args.mlp_chunk_rows


def make_press(model, method: str, ratio: float, kv_dtype: str):
    options = press_options(kv_dtype)
    if method == "adakv-snapkv":
        return P.AdaptivePress(P.SnapKVPress(ratio), **options)
    return P.AdaptivePress(P.KVzipPress(ratio, repeat_prompt_ids=prompt_ids(model)), scope="model", **options)


class TokenClock(LogitsProcessor):
    """Stamps the moment each new token's logits are ready, after a first stamp at `start()`: a CUDA event on
    the current stream (no host wait added to the call), the host clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stamps: list = []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self.stamps = [self._now()]

    def __call__(self, input_ids, scores):
        self.stamps.append(self._now())
        return scores

    def seconds(self) -> list[float]:
        """Seconds from the start to each token's logits (waits for the GPU)."""
        first, *rest = self.stamps
        if not self.cuda:
            return [stamp - first for stamp in rest]
        torch.cuda.synchronize()
        return [first.elapsed_time(stamp) / 1000 for stamp in rest]


def stored_kv_dtypes(cache) -> list[str]:
    return sorted({str(layer.keys.dtype).removeprefix("torch.") for layer in cache.layers if getattr(layer, "keys", None) is not None})


def drop_compiled(model) -> None:
    """Free what generate's compilation holds: the compiled call, its CUDA graphs and their memory pool."""
    for name in ("_compiled_call", "_last_compile_config"):
        model.__dict__.pop(name, None)
    torch._dynamo.reset()


def measure(model, ids, method: str, kv_dtype: str, args) -> dict:
    """One generate call of `method` on `ids` (see the module docstring)."""
    device = ids.device
    batch, context = ids.shape
    new_tokens = 1 + args.decode_warmup + args.decode_steps
    dense = method.startswith("dense")
    press = None if dense else make_press(model, method, args.ratio, kv_dtype)
    switches = {} if dense else args.switches
    mlp_rows = row_mlp_rows(method, args)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
    else:
        before = args.weights
    if method == "dense-static":
        cache = StaticCache(config=model.config, max_cache_len=context + new_tokens)
    else:
        cache = DynamicCache(config=model.config)
    clock = TokenClock(device)
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, past_key_values=cache,
                   attention_mask=torch.ones_like(ids), pad_token_id=0, logits_processor=LogitsProcessorList([clock]))  # fmt: skip
    # a dense row's block: its MLP row chunks, or none (mlp_rows None)
    block = mlp_in_row_chunks(model, mlp_rows) if press is None else press(model, mlp_chunk_rows=mlp_rows, **switches)
    counting = LiveBytes(where_depth=0) if device.type != "cuda" else nullcontext()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad(), block, counting:
        started = time.perf_counter()
        clock.start()
        generated = model.generate(ids, **options)
        synchronize(device)
        generate_s = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else args.weights + counting.peak
    stamps = clock.seconds()
    steps_ms = [(later - earlier) * 1000 for earlier, later in zip(stamps, stamps[1:])]
    measured = steps_ms[args.decode_warmup :]
    read = limits.kv_read_bytes(cache)
    limit_ms = (args.step_weights + read) / args.bandwidth * 1000
    decode_ms = statistics.median(measured)
    row = dict(
        method=method, batch=batch, context=context, ratio=0.0 if dense else args.ratio, kv_dtype=kv_dtype,
        switches=sorted(switches), mlp_chunk_rows=mlp_rows, peak_gib=peak / GiB, kv_gib=kv_bytes(cache) / GiB, ttft_s=stamps[0],
        decode_ms=decode_ms, limit_ms=limit_ms, x_limit=decode_ms / limit_ms, kv_read_gib=read / GiB,
        tokens_sha256=hashlib.sha256(generated[:, context:].cpu().numpy().tobytes()).hexdigest()[:16],
        decode_mean_ms=statistics.fmean(measured), steps_ms=steps_ms, decode_warmup=args.decode_warmup,
        new_tokens=new_tokens, generate_s=generate_s, before_gib=before / GiB, leftover_gib=(before - args.weights) / GiB,
        stored_kv_dtypes=stored_kv_dtypes(cache), press=None if press is None else repr(press),
        compiled="_compiled_call" in model.__dict__ if method == "dense-static" else None,
        copy_bandwidth_tb_s=args.bandwidth / 1e12,
    )  # fmt: skip
    if row["stored_kv_dtypes"] != [kv_dtype]:
        row["error"] = f"asked for {kv_dtype} keys and values, the cache held {row['stored_kv_dtypes']}"
    return row


def plan(methods, kv_dtypes) -> list[tuple[str, str]]:
    """(method, kv_dtype) of a case's rows, in order: the press rows once per KV dtype."""
    return [(method, kv_dtype) for method in METHODS if method in methods
            for kv_dtype in ([NATIVE_KV_DTYPE] if method.startswith("dense") else kv_dtypes)]  # fmt: skip


def case_ids(model, batch: int, context: int, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch * 1_000_003 + context)
    return torch.randint(10, model.config.vocab_size - 10, (batch, context), generator=generator).to(device)


def warm_up(model, args, device) -> None:
    """Build and compile the kernels of every row but dense-static's once, at --warmup-context tokens and each
    case's batch size, so that no measured call pays for them (see the module docstring for dense-static)."""
    for batch in sorted({batch for batch, _ in args.cases}):
        ids = case_ids(model, batch, args.warmup_context, device)
        for method, kv_dtype in plan(args.methods, args.kv_dtypes):
            if method != "dense-static":
                measure(model, ids, method, kv_dtype, args)


class Results:
    """prefill_memory_<device><tag>.json and .md: the rows of every call into them, a row measured again
    replacing the earlier one; this call's provenance appended to "runs", each row naming its run."""

    def __init__(self, stem: Path, meta: dict):
        self.json_path, self.md_path = Path(f"{stem}.json"), Path(f"{stem}.md")
        self.data = json.loads(self.json_path.read_text()) if self.json_path.exists() else {"runs": [], "rows": []}
        for key in SETTINGS:
            if self.data["runs"] and self.data["runs"][-1].get(key) != meta[key]:
                raise SystemExit(
                    f"{self.json_path} holds rows of {key} {self.data['runs'][-1].get(key)!r}, this run has "
                    f"{meta[key]!r}: give another --tag or --out."
                )
        self.data["runs"].append(meta)
        self.data["meta"] = meta
        self.run = len(self.data["runs"]) - 1

    def add(self, row: dict) -> None:
        row["run"] = self.run
        key = tuple(str(row.get(k)) for k in ROW_KEY)
        self.data["rows"] = [r for r in self.data["rows"] if tuple(str(r.get(k)) for k in ROW_KEY) != key] + [row]
        self.data["rows"].sort(key=order)
        self.data["targets"] = targets(self.data["rows"])
        self.json_path.write_text(json.dumps(self.data, indent=1))
        self.md_path.write_text(render(self.data))


def order(row: dict) -> tuple:
    return row["batch"], row["context"], METHODS.index(row["method"]), row["kv_dtype"] != NATIVE_KV_DTYPE, row["kv_dtype"]


def dense_rows(rows: list[dict]) -> dict[tuple[int, int], dict]:
    """The dense-dynamic row of each (batch, context): what the targets and ratios compare with."""
    return {(r["batch"], r["context"]): r for r in rows if r["method"] == "dense-dynamic" and "error" not in r}


def targets(rows: list[dict]) -> list[dict]:
    """Issue 23's targets over the rows measured so far: one entry per row each applies to."""
    rows = [r for r in rows if "error" not in r]
    dense = dense_rows(rows)
    found = []

    def add(target, row, measured, bound, unit):
        found.append(dict(target=target, method=row["method"], batch=row["batch"], context=row["context"],
                          kv_dtype=row["kv_dtype"], measured=measured, bound=bound, unit=unit, met=measured <= bound))  # fmt: skip

    for row in rows:
        case, base = (row["batch"], row["context"]), dense.get((row["batch"], row["context"]))
        if row["method"] == "adakv-snapkv" and case == PEAK_CASE and base is not None:
            add("peak <= dense peak - r x dense KV", row, row["peak_gib"], base["peak_gib"] - row["ratio"] * base["kv_gib"], "GiB")
        if row["method"] == "adakv-kvzip" and case in TTFT_CASES and base is not None:
            add(f"KVzip TTFT <= {TTFT_TARGET}x dense", row, row["ttft_s"] / base["ttft_s"], TTFT_TARGET, "x dense")
        if row["kv_dtype"] != NATIVE_KV_DTYPE:
            native = next((r for r in rows if r["kv_dtype"] == NATIVE_KV_DTYPE and r["method"] == row["method"]
                           and (r["batch"], r["context"], r["ratio"], r["switches"]) == (*case, row["ratio"], row["switches"])), None)  # fmt: skip
            if native is not None:
                add(f"KV <= {FP8_KV_TARGET}x the {NATIVE_KV_DTYPE} KV", row, row["kv_gib"] / native["kv_gib"], FP8_KV_TARGET, "x")
            add(f"decode <= {FP8_LIMIT_TARGET}x its limit", row, row["x_limit"], FP8_LIMIT_TARGET, "x limit")
    return found


def size(gib: float) -> str:
    """GiB with two decimals, three significant digits below 1 GiB (the tiny model's megabytes show)."""
    return f"{gib:.2f}" if gib >= 1 else f"{gib:.3g}"


def render(data: dict) -> str:
    meta, rows = data["meta"], data["rows"]
    dense = dense_rows(rows)
    lines = [
        f"# Peak memory, time to first token and decode through model.generate, {meta['device']}",
        "",
        f"{meta['layers']}-layer Llama-3.1-8B shape{' (tiny: 1/16 of its width)' if meta['tiny'] else ''}, random bf16 "
        f"weights ({size(meta['weights_held_gib'])} GiB), sdpa, r = {meta['ratio']}, one `model.generate` call per row "
        f"(benchmarks/bench_prefill_memory.py). Peak = max_memory_allocated over the call, weights included; KV = "
        "held after it. TTFT = from the call to the first token's logits; decode = median ms between two tokens' "
        "logits after the first --decode-warmup steps; limit = (weights + KV a step reads) / the copy bandwidth "
        "measured in the same run. adakv-snapkv = AdaptivePress(SnapKVPress(r)), adakv-kvzip = "
        "AdaptivePress(KVzipPress(r), scope='model'), switches on = cuda_graphs, join_projections, fuse_elementwise, "
        "gemv_linears; MLP rows = the most token rows a prefill's MLP ran over at once (none: all of them); "
        "dense-mlp-rows = dense-dynamic with the MLPs in row chunks; dense-static = "
        "StaticCache, decode compiled by generate; x dense = over dense-dynamic of the same case.",
        "",
        "## Targets (issue 23)",
        "",
        "| target | batch x context | method | KV dtype | measured | bound | met |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for t in data["targets"]:
        fmt = ".3g" if t["unit"] == "GiB" and t["bound"] < 1 else ".2f" if t["unit"] == "GiB" else ".3f"
        lines.append(
            f"| {t['target']} | {t['batch']} x {t['context']} | {t['method']} | {t['kv_dtype']} | "
            f"{t['measured']:{fmt}} {t['unit']} | {t['bound']:{fmt}} | {'yes' if t['met'] else 'no'} "
            f"(margin {t['bound'] - t['measured']:+{fmt}}) |"
        )
    missing = [name for name, present in (
        (f"peak at {PEAK_CASE[0]} x {PEAK_CASE[1]} (adakv-snapkv and dense-dynamic)", any(t["target"].startswith("peak") for t in data["targets"])),
        ("KVzip TTFT at 1 x 32768 or 1 x 131072 (adakv-kvzip and dense-dynamic)", any(t["target"].startswith("KVzip") for t in data["targets"])),
        (f"fp8 KV and decode (--kv-dtypes {NATIVE_KV_DTYPE} float8_e4m3fn)", any(t["kv_dtype"] != NATIVE_KV_DTYPE for t in data["targets"])),
    ) if not present]  # fmt: skip
    if missing:
        lines += ["", "Not measured yet: " + "; ".join(missing) + "."]
    lines += [
        "",
        "## Rows",
        "",
        "| batch x context | method | KV dtype | switches | MLP rows | peak GiB | x dense | KV GiB | TTFT s | x dense | decode ms | limit ms | x limit | leftover GiB | generate s | run |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        case = f"{r['batch']} x {r['context']}"
        method = r["method"] + (" (compiled)" if r.get("compiled") else "")
        switches = {0: "off", len(SWITCHES): "on"}.get(len(r["switches"]), ", ".join(r["switches"]))
        head = f"| {case} | {method} | {r['kv_dtype']} | {switches} | {r.get('mlp_chunk_rows') or 'none'} |"
        if "error" in r:
            lines.append(f"{head} {r['error'][:80]} | | | | | | | | | | {r['run']} |")
            continue
        base = dense.get((r["batch"], r["context"]))
        peak_x = f"{r['peak_gib'] / base['peak_gib']:.3f}" if base else ""
        ttft_x = f"{r['ttft_s'] / base['ttft_s']:.2f}" if base else ""
        lines.append(
            f"{head} {size(r['peak_gib'])} | {peak_x} | {size(r['kv_gib'])} | {r['ttft_s']:.3f} | {ttft_x} | "
            f"{r['decode_ms']:.2f} | {r['limit_ms']:.2f} | {r['x_limit']:.2f} | {size(r['leftover_gib'])} | "
            f"{r['generate_s']:.2f} | {r['run']} |"
        )
    lines += ["", "## Runs", ""]
    for index, run in enumerate(data["runs"]):
        dirty = " (dirty)" if run.get("adakv_dirty") else ""
        lines.append(
            f"{index}. {run['device']}, torch {run['torch']}, transformers {run['transformers']}, triton "
            f"{run.get('triton')}, adakv {run.get('adakv_commit')}{dirty}, {run.get('date')}; copy bandwidth "
            f"{run['copy_bandwidth_tb_s']:.3g} TB/s, weights read per step {size(run['weight_gib'])} GiB; "
            f"`{run.get('command')}`"
        )
    return "\n".join(lines) + "\n"


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=None, help="BATCHxCONTEXT (default 1x32768 1x131072 8x32768; --tiny: 1x128 2x64)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--kv-dtypes", nargs="+", type=kv_dtype_name, default=[NATIVE_KV_DTYPE],
                        help=f"KV dtypes of the press rows (default {NATIVE_KV_DTYPE}; fp8 = float8_e4m3fn, the fp8 flat cache)")  # fmt: skip
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--decode-steps", type=int, default=32, help="decode steps timed per row")
    parser.add_argument("--decode-warmup", type=int, default=8, help="decode steps left out before them")
    parser.add_argument("--warmup-context", type=int, default=None, help="tokens of the warm-up calls (default 4096; --tiny: 32)")
    parser.add_argument("--no-switches", action="store_true", help="the press rows without the four speed switches")
    parser.add_argument("--mlp-chunk-rows", type=mlp_rows_option, default=MLP_CHUNK_ROWS,
                        help=f"the press rows' mlp_chunk_rows (default {MLP_CHUNK_ROWS}; none: each MLP over all rows)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; --tiny: 2)")
    parser.add_argument("--device", default="cuda", help="cuda (cuda:N) or, with --tiny, cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama of the 8B's proportions (smoke test)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args(argv)
    try:
        args.device = check_device(args.device, who="bench_prefill_memory.py runs")
    except ValueError as error:
        raise SystemExit(f"bench_prefill_memory.py: {error} The 8B shape needs CUDA; the CPU smoke test is --device cpu --tiny.") from None
    if args.device.type == "cpu" and not args.tiny:
        raise SystemExit("bench_prefill_memory.py: the 8B shape needs CUDA; on a CPU run the smoke test, --device cpu --tiny.")
    if args.decode_steps < 1 or args.decode_warmup < 0:
        parser.error("--decode-steps must be at least 1 and --decode-warmup at least 0")
    for kv_dtype in args.kv_dtypes:
        refusal = kv_dtype_refusal(kv_dtype)
        if refusal:
            raise SystemExit(f"bench_prefill_memory.py: {refusal}")
    args.kv_dtypes = list(dict.fromkeys(args.kv_dtypes))
    args.layers = args.layers or (2 if args.tiny else 32)
    args.warmup_context = args.warmup_context or (32 if args.tiny else 4096)
    cases = args.cases or (["1x128", "2x64"] if args.tiny else ["1x32768", "1x131072", "8x32768"])
    args.cases = [tuple(int(part) for part in case.split("x")) for case in cases]
    # CUDA graphs and the fused kernels need CUDA
    args.switches = {} if args.no_switches or args.device.type != "cuda" else SWITCHES
    return args


def main(argv=None) -> None:
    args = parse(argv)
    device = args.device
    config = tiny_config(args.layers) if args.tiny else llama_8b_config(args.layers)
    model = build_model(args.layers, config=config, device=device)
    args.weights, args.step_weights = weight_bytes(model), limits.weight_bytes(model)
    args.bandwidth = limits.copy_bandwidth(4.0 if device.type == "cuda" else 0.125, device=device)
    meta = dict(
        limits.run_meta(args.layers, args.bandwidth, args.step_weights, device), weights_held_gib=args.weights / GiB,
        ratio=args.ratio, decode_steps=args.decode_steps, decode_warmup=args.decode_warmup,
        warmup_context=args.warmup_context, switches=sorted(args.switches), mlp_chunk_rows=args.mlp_chunk_rows, cases=[f"{b}x{c}" for b, c in args.cases],
        methods=args.methods, kv_dtypes=args.kv_dtypes, tiny=args.tiny, kvzip_repeat_prompt_ids=prompt_ids(model),
    )  # fmt: skip
    print(json.dumps(meta), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = Results(out / f"prefill_memory_{meta['device'].replace(' ', '_')}{args.tag}", meta)
    warm_up(model, args, device)
    for batch, context in args.cases:
        ids = case_ids(model, batch, context, device)
        for method, kv_dtype in plan(args.methods, args.kv_dtypes):
            try:
                row = measure(model, ids, method, kv_dtype, args)
            except Exception as error:  # noqa: BLE001 - one failed row (out of memory, a compile error) is recorded, the rest still run
                traceback.print_exc()
                row = dict(method=method, batch=batch, context=context, ratio=0.0 if method.startswith("dense") else args.ratio,
                           kv_dtype=kv_dtype, switches=[] if method.startswith("dense") else sorted(args.switches),
                           mlp_chunk_rows=row_mlp_rows(method, args),
                           error=f"{type(error).__name__}: {error}"[:300])  # fmt: skip
            finally:
                if method == "dense-static":
                    drop_compiled(model)
            results.add(row)
            print(json.dumps({k: v for k, v in row.items() if k != "steps_ms"}), flush=True)
            if row.get("leftover_gib", 0) > 0.05:
                print(f"warning: {row['leftover_gib']:.2f} GiB were allocated before this row's call", flush=True)
    print(results.md_path.read_text(), flush=True)


if __name__ == "__main__":
    main()
