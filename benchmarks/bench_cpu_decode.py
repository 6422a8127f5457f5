"""Decode step time on CPU: dense cache vs evicted flat cache, with the flat cache read in place
(`segment_flat_attention`, the CPU default) and through padded copies (`reference_flat_attention`).

The embedded SmolLM2-135M-Instruct in float32; a random-token context of each --contexts length is
prefilled once into a dense cache and once under AdaptivePress(SnapKVPress(r)), backend "evict"; then
blocks of --steps greedy decode steps alternate: dense, evict read in place, evict through padded copies
(the two evict paths share one cache, which grows by one token per step for both), --rounds times. Every
block's ms per step is kept; the table gives the medians.

    .venv/bin/python benchmarks/bench_cpu_decode.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from adakv import AdaptivePress, SnapKVPress, load_default_model
from adakv.apps.provenance import provenance
from adakv.cache import flat_attention as varlen

IMPLEMENTATIONS = ("segments", "reference")


def decode_block_ms(model, cache, token: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    started = time.perf_counter()
    for _ in range(steps):
        token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
    return (time.perf_counter() - started) / steps * 1000, token


def forced(implementation: str):
    """choose_implementation that always answers `implementation` (what flat_attention then runs)."""
    return lambda query, num_kv_heads=None, cache_bytes=0: implementation


def measure(model, context: int, ratio: float, args) -> dict:
    ids = torch.randint(100, 40000, (1, context), generator=torch.Generator().manual_seed(context))
    press = AdaptivePress(SnapKVPress(ratio), backend="evict")
    dense_cache, evicted_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    blocks: dict[str, list[float]] = {"dense": [], **{f"evict_{name}": [] for name in IMPLEMENTATIONS}}
    chooser = varlen.choose_implementation
    with torch.no_grad():
        model(ids, past_key_values=dense_cache)
        with press(model):
            model(ids, past_key_values=evicted_cache)
        tokens = {"dense": ids[:, -1:], "evict": ids[:, -1:]}
        try:
            for _ in range(args.rounds):  # every block of every setting alternates with the others
                _, tokens["dense"] = decode_block_ms(model, dense_cache, tokens["dense"], 1)  # warm-up
                milliseconds, tokens["dense"] = decode_block_ms(model, dense_cache, tokens["dense"], args.steps)
                blocks["dense"].append(milliseconds)
                with press(model):
                    for implementation in IMPLEMENTATIONS:
                        varlen.choose_implementation = forced(implementation)
                        _, tokens["evict"] = decode_block_ms(model, evicted_cache, tokens["evict"], 1)
                        milliseconds, tokens["evict"] = decode_block_ms(model, evicted_cache, tokens["evict"], args.steps)
                        blocks[f"evict_{implementation}"].append(milliseconds)
        finally:
            varlen.choose_implementation = chooser
    medians = {name: statistics.median(values) for name, values in blocks.items()}
    row = dict(context=context, ratio=ratio, ms_per_step=medians, blocks=blocks)
    print(json.dumps({k: v for k, v in row.items() if k != "blocks"}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.9])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    model, _ = load_default_model()
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads"
    rows = [measure(model, context, ratio, args) for context in args.contexts for ratio in args.ratios]
    lines = [
        f"# Decode step on CPU ({machine}; torch {torch.__version__})",
        "",
        "SmolLM2-135M-Instruct, float32, random-token context, AdaptivePress(SnapKVPress(r)) evict; median ms per",
        f"step of {args.rounds} blocks of {args.steps} greedy steps, the three settings' blocks alternating.",
        "",
        "| context | r | dense | evict, in place (segments) | evict, padded copies (reference) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ms = row["ms_per_step"]
        lines.append(
            f"| {row['context']} | {row['ratio']} | {ms['dense']:.1f} | {ms['evict_segments']:.1f} | "
            f"{ms['evict_reference']:.1f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "cpu_decode_smollm2"
    stem.with_suffix(".json").write_text(json.dumps(dict(provenance("cpu"), machine=machine, torch=torch.__version__, rows=rows), indent=1))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
