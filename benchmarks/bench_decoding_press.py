"""Memory and decode speed over a long generation: dense cache vs DecodingPress(AdaptivePress(SnapKV)), evict.

Model: Llama-3.1-8B-shaped random bf16 model with --layers layers (default 8 of its 32, as bench_evict.py;
memory per layer is the same, so the 32-layer KV is 4x the figures). Each method prefills a --prompt token
prompt (random ids, one forward) and then generates --generate tokens greedily, one forward per token
(no `generate` overhead). Every --sample-every tokens it records the KV bytes the cache holds
(bench_evict.kv_bytes: buffers + metadata for the flat cache), torch.cuda.memory_allocated, and the mean
decode ms/token over those tokens (CUDA-synchronised wall time; DecodingPress's compressions, one every
--interval tokens per layer, are included in the mean). Samples are taken after that step's compression, so the
whole prompt the press holds during the first --interval tokens is not in them. The press starts from the whole
prompt: its first compression scores all of it and keeps --target tokens per head on average (AdaptivePress),
later ones score target + interval rows.

Writes bench_decoding_press_<device>.json, .md and .png (memory and ms/token against generated tokens) into
--out, after each method, so a run cut short keeps what it measured.

    python benchmarks/bench_decoding_press.py                  # 32k prompt + 32k generated (estimated ~8 min on an H200)
    python benchmarks/bench_decoding_press.py --tiny           # CPU smoke test (seconds)
    # one method per device command (each ~5 min at 4 layers on an H200), then one table and plot:
    python benchmarks/bench_decoding_press.py --layers 4 --methods dense --tag _dense
    python benchmarks/bench_decoding_press.py --layers 4 --methods decoding-ada_snapkv-evict --tag _decoding
    python benchmarks/bench_decoding_press.py --merge benchmarks/results/bench_decoding_press_*_dense.json \
        benchmarks/results/bench_decoding_press_*_decoding.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_evict import build_model, kv_bytes, synchronize  # noqa: E402

from adakv import AdaptivePress, DecodingPress, SnapKVPress  # noqa: E402
from adakv.apps.provenance import provenance  # noqa: E402

MiB = 2**20
METHODS = ("dense", "decoding-ada_snapkv-evict")
# meta entries that may differ between runs of the same settings (--merge compares the others)
PER_RUN_KEYS = ("seconds_per_method", "date", "command", "adakv_commit", "adakv_dirty", "platform")


def tiny_config(layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 20,
    )  # fmt: skip


def make_press(method: str, interval: int, target: int):
    if method == "dense":
        return None
    return DecodingPress(AdaptivePress(SnapKVPress()), compression_interval=interval, target_size=target, backend="evict")


def allocated_bytes(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def run_method(model, press, prompt: int, generate: int, sample_every: int, seconds: float = float("inf")) -> list[dict]:
    """Prefill `prompt` random tokens, generate `generate` greedily; one row per `sample_every` tokens.
    Stops at the first sample taken after `seconds` of generation (the rows say how far it got)."""
    device = model.device
    deadline = time.perf_counter() + seconds
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    cache = DynamicCache(config=model.config)
    rows = []
    with torch.no_grad(), (press(model) if press is not None else nullcontext()):
        out = model(ids, past_key_values=cache, logits_to_keep=1)
        next_ids = out.logits[:, -1:].argmax(-1)
        synchronize(device)
        start = time.perf_counter()
        for step in range(1, generate + 1):
            out = model(next_ids, past_key_values=cache)
            next_ids = out.logits[:, -1:].argmax(-1)
            if step % sample_every == 0 or step == generate:
                synchronize(device)
                now = time.perf_counter()
                tokens = step - (rows[-1]["generated"] if rows else 0)
                rows.append(dict(
                    generated=step, seq_length=cache.get_seq_length(), kv_bytes=kv_bytes(cache),
                    allocated_bytes=allocated_bytes(device), ms_per_token=1000 * (now - start) / tokens,
                ))  # fmt: skip
                start = time.perf_counter()
                if start > deadline:
                    break
    return rows


def summary(rows: list[dict]) -> dict:
    half = [row["ms_per_token"] for row in rows[len(rows) // 2 :]]
    return dict(
        final_kv_mib=rows[-1]["kv_bytes"] / MiB,
        max_kv_mib=max(row["kv_bytes"] for row in rows) / MiB,
        median_ms_per_token=statistics.median(row["ms_per_token"] for row in rows),
        median_ms_per_token_second_half=statistics.median(half),
    )


def markdown(results: dict, meta: dict) -> str:
    lines = [
        f"# DecodingPress over a long generation ({meta['device']})",
        "",
        f"{meta['layers']}-layer Llama-3.1-8B-shaped random model, {meta['dtype']}, prompt {meta['prompt']} tokens, "
        f"{meta['generate']} generated (or fewer: see the last row of each method); DecodingPress(AdaptivePress(SnapKVPress()), compression_interval="
        f"{meta['interval']}, target_size={meta['target']}), backend evict. torch {meta['torch']}, "
        f"transformers {meta['transformers']}.",
        "",
        "| method | KV MiB at the end | max KV MiB | median ms/token | median ms/token, second half |",
        "|---|---:|---:|---:|---:|",
    ]
    for method, rows in results.items():
        s = summary(rows)
        lines.append(
            f"| {method} | {s['final_kv_mib']:.3f} | {s['max_kv_mib']:.3f} | {s['median_ms_per_token']:.2f} "
            f"| {s['median_ms_per_token_second_half']:.2f} |"
        )
    lines += ["", "| generated | " + " | ".join(f"{m} KV MiB | {m} ms/token" for m in results) + " |"]
    lines.append("|---:|" + "---:|" * (2 * len(results)))
    by_generated = [{row["generated"]: row for row in rows} for rows in results.values()]
    for generated in sorted({generated for rows in by_generated for generated in rows}):
        cells = []
        for rows in by_generated:
            row = rows.get(generated)
            cells += ["", ""] if row is None else [f"{row['kv_bytes'] / MiB:.3f}", f"{row['ms_per_token']:.2f}"]
        lines.append(f"| {generated} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, speed) = plt.subplots(1, 2, figsize=(11, 4))
    for method, rows in results.items():
        generated = [row["generated"] for row in rows]
        memory.plot(generated, [row["kv_bytes"] / MiB for row in rows], label=method)
        speed.plot(generated, [row["ms_per_token"] for row in rows], label=method)
    memory.set(xlabel="generated tokens", ylabel="KV cache held (MiB)", title=f"prompt {meta['prompt']} tokens")
    speed.set(xlabel="generated tokens", ylabel="decode ms/token", title=meta["device"])
    for axes in (memory, speed):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32768)
    parser.add_argument("--generate", type=int, default=32768)
    parser.add_argument("--interval", type=int, default=512, help="DecodingPress compression_interval")
    parser.add_argument("--target", type=int, default=2048, help="DecodingPress target_size")
    parser.add_argument("--sample-every", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=1024, help="generated tokens of a warm-up run per method")
    parser.add_argument("--seconds", type=float, default=float("inf"),
                        help="stop each method's generation at the first sample after this many seconds")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU with short lengths (smoke test)")
    parser.add_argument("--tag", default="", help="suffix of the result files (one method per device command)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="only merge these result files (same settings, other methods) into --out")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    if args.tiny:
        args.prompt, args.generate, args.interval, args.target, args.sample_every, args.warmup = 256, 256, 32, 64, 32, 16
        model = build_model(args.layers, tiny_config(args.layers), device="cpu", dtype=torch.float32)
    elif not torch.cuda.is_available():
        raise SystemExit("bench_decoding_press.py needs a CUDA device (or --tiny for a CPU smoke test).")
    else:
        model = build_model(args.layers)
    device_name = torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu"
    meta = dict(
        provenance(model.device), device=device_name, dtype=str(model.dtype).removeprefix("torch."), layers=args.layers, prompt=args.prompt,
        generate=args.generate, seconds_per_method=args.seconds, interval=args.interval, target=args.target, sample_every=args.sample_every,
        torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
    )  # fmt: skip
    stem = args.out / f"bench_decoding_press_{device_name.replace(' ', '_')}{args.tag}"
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for method in args.methods:
        # warm-up: kernel builds, cuBLAS handles and one compression, at a short prompt
        run_method(model, make_press(method, args.interval, args.target), 2 * args.target, args.warmup, args.warmup)
        rows = run_method(model, make_press(method, args.interval, args.target), args.prompt, args.generate,
                          args.sample_every, args.seconds)  # fmt: skip
        results[method] = rows
        print(method, json.dumps(summary(rows)), flush=True)
        write(stem, meta, results)
    print(markdown(results, meta))


def write(stem: Path, meta: dict, results: dict) -> None:
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    stem.with_suffix(".md").write_text(markdown(results, meta))
    plot(results, meta, stem.with_suffix(".png"))


def merge(files: list[Path], out: Path) -> None:
    """One JSON, table and plot from runs of the same settings that measured different methods."""
    runs = [json.loads(path.read_text()) for path in files]
    settings = {json.dumps({k: v for k, v in run["meta"].items() if k not in PER_RUN_KEYS}, sort_keys=True)
                for run in runs}
    if len(settings) != 1:
        raise SystemExit(f"--merge needs runs of one device and the same settings; got {len(settings)} different ones.")
    results = {method: rows for run in runs for method, rows in run["results"].items()}
    meta = dict(runs[0]["meta"], merged_files=[path.name for path in files], merge_provenance=provenance("cpu"))
    out.mkdir(parents=True, exist_ok=True)
    write(out / f"bench_decoding_press_{meta['device'].replace(' ', '_')}", meta, results)


if __name__ == "__main__":
    main()
