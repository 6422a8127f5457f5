"""What each press costs on the run's own model and device: KV bytes held, peak memory, prefill time and
decode ms/token, one row per (context length, press, ratio) in the run folder's costs.csv.

Measured as a user would run the press, not through the sweep's shared dense prefill: the context (sample 0
of the run's first task at that length) is prefilled with the press active and the run's decode switches
(`cuda_graphs`, `fused_decode`), then the question, `WARMUP_STEPS` untimed and `DECODE_TOKENS` timed greedy tokens are decoded (no
stop at end of sequence, so every press decodes the same number of steps; the untimed ones take the CUDA graph
capture that every new cache needs). On CUDA every setting is measured
twice and the second measurement is kept (the first one compiles kernels and captures graphs), and the
peak is `torch.cuda.max_memory_allocated` since a reset just before the prefill (model weights included);
on a CPU peak memory is not measured (None) and the times are indicative only.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import pandas as pd
import torch

from adakv.cache import checkpoint, restore
from adakv.models import cache_argument_name

from . import engine, tasks

DECODE_TOKENS = 32
WARMUP_STEPS = 4  # untimed decode steps before the timed ones (graph capture, first-use kernels)
COST_KEYS = ["context_length", "press", "ratio"]


@dataclass(frozen=True)
class Cost:
    """One (context length, press, ratio) of costs.csv."""

    context_length: int
    press: str
    ratio: float
    task: str
    context_tokens: int
    kv_bytes: int  # what the compressed context's layers hold before the question: slack, masks, bookkeeping too
    kv_kept_bytes: int  # the keys and values the heads attend to (`kept_kv_bytes`)
    peak_memory_bytes: int | None  # CUDA only
    prefill_s: float  # context prefill with the press active (compression included)
    decode_ms_per_token: float  # over DECODE_TOKENS single-token steps after the question and WARMUP_STEPS
    decode_tokens: int
    device: str
    cuda_graphs: bool | str
    fused_decode: bool


def held_kv_bytes(cache) -> int:
    """Bytes the cache's layers hold: `held_bytes()` where a layer has it (the flat evicted layout), else its
    keys and values (and the keep mask of the mask backend)."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "held_bytes"):
            total += int(layer.held_bytes())
            continue
        for name in ("keys", "values", "context_keep"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def kept_kv_bytes(cache) -> int:
    """Bytes of the keys and values the heads attend to: each compressed layer's kept positions (per head) times
    K and V of one position; a layer left dense counts all its keys and values. No slack, mask or bookkeeping."""
    total = 0
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if not isinstance(keys, torch.Tensor) or keys.numel() == 0:
            continue
        if hasattr(layer, "kept_counts"):
            total += int(layer.kept_counts().sum()) * 2 * keys.shape[-1] * keys.element_size()
        else:
            total += 2 * keys.numel() * keys.element_size()
    return total


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_steps(model, cache, question_ids: torch.Tensor, steps: int, warmup: int = WARMUP_STEPS) -> float:
    """Seconds of `steps` greedy single-token forwards from `cache` after the question and `warmup` untimed
    steps (a new cache's first graphable step captures its CUDA graph); the cache is rolled back after."""
    saved = checkpoint(cache)
    kwarg = {cache_argument_name(model): cache}
    position, device = saved.seq_len, question_ids.device

    def forward(ids):
        positions = torch.arange(position, position + ids.shape[1], device=device)[None]
        return model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1, **kwarg).logits

    try:
        logits = forward(question_ids)
        position += question_ids.shape[1]
        start = None
        for step in range(warmup + steps):
            if step == warmup:
                _sync(device)
                start = time.perf_counter()
            logits = forward(logits[:, -1:].argmax(-1))
            position += 1
        _sync(device)
        return time.perf_counter() - start
    finally:
        restore(cache, saved)


def measure(model, tokenizer, config, sample, press_name: str, ratio: float, device) -> Cost:
    """The Cost of (press_name, ratio) on `sample` (see the module docstring)."""
    context_ids, question_ids = engine.encode_prompt(tokenizer, sample, device)
    cuda = torch.device(device).type == "cuda"
    for _ in range(2 if cuda else 1):
        press = config.build_press(press_name, ratio)
        engine.attach_tokenizer(press, tokenizer)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        with engine.active(press, model, config.cuda_graphs, config.fused_decode):
            _sync(device)
            start = time.perf_counter()
            cache = engine.prefill(model, context_ids)
            _sync(device)
            prefill_s = time.perf_counter() - start
            kv_bytes, kept_bytes = held_kv_bytes(cache), kept_kv_bytes(cache)
            decode_s = decode_steps(model, cache, question_ids, DECODE_TOKENS)
        peak = int(torch.cuda.max_memory_allocated(device)) if cuda else None
        del cache
    return Cost(int(sample.metadata["context_length"]), press_name, float(ratio), sample.task, int(context_ids.shape[1]),
                kv_bytes, kept_bytes, peak, round(prefill_s, 5), round(1000 * decode_s / DECODE_TOKENS, 4), DECODE_TOKENS,
                str(device), config.cuda_graphs, config.fused_decode)


def read_costs(out: str) -> pd.DataFrame:
    path = os.path.join(out, "costs.csv")
    return pd.read_csv(path) if os.path.exists(path) else pd.DataFrame()


def record_costs(model, tokenizer, config, haystack, out: str, device, deadline: float | None = None) -> int:
    """Measure every (context length, press, ratio) of `config` not yet in out/costs.csv, appending each row as
    measured (a resumed run measures only what is missing). deadline: a `time.monotonic()` time; no setting is
    started once the longest so far would end past it (the rest wait for a later run). Returns the rows added."""
    done = read_costs(out)
    seen = set() if done.empty else {(int(c), p, round(float(r), 6)) for c, p, r in done[COST_KEYS].itertuples(index=False)}
    path, added, longest = os.path.join(out, "costs.csv"), 0, 0.0
    for length in config.context_lengths:
        sample = tasks.generate(config.tasks[0], 0, haystack, length, config.seed, config.query_aware)
        for press_name, ratio in config.settings():
            if (int(length), press_name, round(float(ratio), 6)) in seen:
                continue
            if deadline is not None and time.monotonic() + longest > deadline:
                return added
            started = time.monotonic()
            cost = measure(model, tokenizer, config, sample, press_name, ratio, device)
            longest = max(longest, time.monotonic() - started)
            pd.DataFrame([asdict(cost)]).to_csv(path, mode="a", header=not os.path.exists(path), index=False)
            added += 1
    return added
