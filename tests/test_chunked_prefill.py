"""Chunked context prefill that compresses every chunk as it arrives (adakv.prefill_in_chunks)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, pipeline

from adakv import presses as P
from adakv import kept_token_counts, prefill_in_chunks, rollback
from adakv.cache import MaskedLayer, checkpoint, compressed_layers, restore
from adakv.cache.flat import FlatHeadwiseLayer
from adakv.pipeline import TASK
from adakv.selection import kept_count

from conftest import random_ids
from test_presses import SCORERS, WRAPPERS, cached_model, fake_context, full_layer_indices

SEQ = 53
CHUNK = 16
CHUNK_SIZES = [16, 16, 16, 5]  # SEQ split by CHUNK
FAMILIES = ["llama", "qwen3", "gemma3"]

PRESSES = {
    "snapkv": lambda backend: P.SnapKVPress(0.5, window_size=8, backend=backend),
    "adaptive_snapkv": lambda backend: P.AdaptivePress(P.SnapKVPress(0.6, window_size=8), backend=backend),
    "pyramidkv": lambda backend: P.PyramidKVPress(0.5, window_size=8, backend=backend),
    "criticalkv": lambda backend: P.CriticalKVPress(P.SnapKVPress(0.5, window_size=8), backend=backend),
    "adaptive_criticalkv": lambda backend: P.AdaptivePress(
        P.CriticalKVPress(P.SnapKVPress(0.5, window_size=8)), backend=backend
    ),
    "streaming_llm": lambda backend: P.StreamingLLMPress(0.7, backend=backend),
    "knorm": lambda backend: P.KnormPress(0.5, backend=backend),
}


def kept(tokens: int, ratio: float) -> int:
    return int(kept_count(torch.tensor(tokens), ratio))


def question_ids(batch: int = 1, length: int = 5) -> torch.Tensor:
    return random_ids(batch, length, seed=7)


def greedy_logits(model, cache, next_ids, forwards, attention_mask=None) -> list[torch.Tensor]:
    """Feed `next_ids`, then greedy tokens, `forwards` times; the last-position logits of each forward."""
    logits, mask = [], attention_mask
    for _ in range(forwards):
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
        out = model(next_ids, attention_mask=mask, past_key_values=cache)
        logits.append(out.logits[:, -1])
        next_ids = out.logits[:, -1:].argmax(-1)
    return logits


def chunked_run(model, press, ids, chunk_size=CHUNK, attention_mask=None, decode_steps=3):
    """Chunked prefill with `press`, then a 5-token question and a few greedy steps.
    Returns the last-position logits of every forward after the prefill, and the cache."""
    with torch.no_grad(), press(model):
        cache = prefill_in_chunks(model, press, ids, chunk_size, attention_mask=attention_mask)
        logits = greedy_logits(model, cache, question_ids(ids.shape[0]), decode_steps + 1, attention_mask)
    return logits, cache


def assert_same_logits(actual, expected, exact=False):
    for step, (a, e) in enumerate(zip(actual, expected)):
        if exact:
            assert torch.equal(a, e), f"forward {step}"
        else:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"forward {step}: {m}")


def assert_evict_matches_mask(model, make_press, ids, attention_mask=None):
    mask_logits, mask_cache = chunked_run(model, make_press("mask"), ids, attention_mask=attention_mask)
    evict_logits, evict_cache = chunked_run(model, make_press("evict"), ids, attention_mask=attention_mask)
    assert all(isinstance(layer, MaskedLayer) for layer in compressed_layers(mask_cache).values())
    evict_layers = compressed_layers(evict_cache)
    assert evict_layers and all(isinstance(layer, FlatHeadwiseLayer) for layer in evict_layers.values())
    assert_same_logits(evict_logits, mask_logits)
    mask_counts, evict_counts = kept_token_counts(mask_cache), kept_token_counts(evict_cache)
    assert mask_counts.keys() == evict_counts.keys()
    for index in mask_counts:
        assert torch.equal(mask_counts[index], evict_counts[index])
    return mask_cache, evict_cache


# ----- evict == mask ------------------------------------------------------------------------------
@pytest.mark.parametrize("press_name", sorted(PRESSES))
@pytest.mark.parametrize("family_name", FAMILIES)
def test_evict_matches_mask_after_chunked_prefill(family_name, press_name):
    model = cached_model(family_name)
    mask_cache, _ = assert_evict_matches_mask(model, PRESSES[press_name], random_ids(1, SEQ))
    assert sorted(compressed_layers(mask_cache)) == full_layer_indices(model)


MATRIX = [
    (scorer, wrapper)
    for scorer in sorted(SCORERS)
    for wrapper in sorted(WRAPPERS)
    if scorer != "observed_attention" and wrapper not in ("key_rerotation", "think", "merge")
]


@pytest.mark.parametrize("scorer, wrapper", MATRIX)
def test_evict_matches_mask_for_the_press_matrix(scorer, wrapper):
    def make(backend):
        press = WRAPPERS[wrapper](SCORERS[scorer](0.5), 0.5)
        press.backend = backend
        return press

    assert_evict_matches_mask(cached_model("llama"), make, random_ids(1, SEQ))


def test_evict_matches_mask_with_left_padding():
    model = cached_model("llama")
    ids = random_ids(2, SEQ, seed=3)
    attention_mask = torch.ones_like(ids)
    ids[1, :5], attention_mask[1, :5] = 0, 0
    mask_cache, _ = assert_evict_matches_mask(model, PRESSES["snapkv"], ids, attention_mask)
    # the padded row keeps from 11 real tokens in its first chunk; pads are never kept
    real_chunks = {0: CHUNK_SIZES, 1: [11, 16, 16, 5]}
    for layer in compressed_layers(mask_cache).values():
        for row, sizes in real_chunks.items():
            assert layer.context_keep[row].sum(-1).tolist() == [sum(kept(c, 0.5) for c in sizes)] * 2
        assert not layer.context_keep[1, :, :5].any()


# ----- what each layer keeps ------------------------------------------------------------------
@pytest.mark.parametrize("press_name", ["snapkv", "pyramidkv", "streaming_llm", "adaptive_snapkv"])
def test_each_layer_keeps_the_sum_of_its_chunks_budgets(press_name):
    model = cached_model("llama")
    if press_name == "adaptive_snapkv":  # a short window leaves room for Ada-KV's choice in every chunk
        press = P.AdaptivePress(P.SnapKVPress(0.5, window_size=2), backend="evict")
    else:
        press = PRESSES[press_name]("evict")
    inner = press.press if isinstance(press, P.AdaptivePress) else press
    _, cache = chunked_run(model, press, random_ids(1, SEQ), decode_steps=0)
    kv_heads = model.config.num_key_value_heads
    heads_differ, compressed = False, False
    for index, layer in compressed_layers(cache).items():
        ratio = inner.layer_compression_ratio(fake_context(model, index))
        expected = sum(kept(size, ratio) for size in CHUNK_SIZES)
        assert layer.context_length == SEQ and layer.appended == 5  # the question is appended, not compressed
        per_head = layer.context_kept.view(1, kv_heads)
        if press_name == "adaptive_snapkv":
            assert int(per_head.sum()) == expected * kv_heads
            heads_differ |= per_head.min() != per_head.max()
        else:
            assert per_head.tolist() == [[expected] * kv_heads]
        compressed |= expected < SEQ
        # memory: the kept rows and the question's rows plus a bounded slack, nothing of the pruned rows
        rows_used = int(layer.context_kept.sum()) + 5 * kv_heads
        assert layer.kv_bytes() == layer.total_rows * layer.row_bytes
        assert rows_used <= layer.total_rows <= rows_used + layer.slack * layer.num_sequences
    assert compressed
    if press_name == "adaptive_snapkv":
        assert heads_differ  # Ada-KV moved budget between heads in at least one layer


def test_evict_buffers_shrink_after_every_chunk():
    model = cached_model("llama")
    press = P.SnapKVPress(0.75, window_size=8, backend="evict")
    ids = random_ids(1, 200)
    with torch.no_grad(), press(model):
        cache = prefill_in_chunks(model, press, ids, 64)
    kv_heads = model.config.num_key_value_heads
    for layer in compressed_layers(cache).values():
        kept_rows = sum(kept(size, 0.75) for size in (64, 64, 64, 8)) * kv_heads
        assert layer.appended == 0 and layer.slack == layer.min_slack
        assert layer.total_rows == kept_rows + layer.min_slack * kv_heads
        assert layer.total_context_kept == kept_rows


# ----- equivalences ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["mask", "evict"])
@pytest.mark.parametrize("family_name", FAMILIES)
def test_one_chunk_is_the_ordinary_prefill(family_name, backend):
    model = cached_model(family_name)
    ids = random_ids(1, SEQ)
    press = P.AdaptivePress(P.SnapKVPress(0.5, window_size=8), backend=backend)
    chunked_logits, chunked_cache = chunked_run(model, press, ids, chunk_size=SEQ + 10)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(ids, past_key_values=cache)
        ordinary_logits = greedy_logits(model, cache, question_ids(), 4)
    assert_same_logits(chunked_logits, ordinary_logits, exact=True)
    for index, counts in kept_token_counts(cache).items():
        assert torch.equal(kept_token_counts(chunked_cache)[index], counts)


@pytest.mark.parametrize("backend", ["mask", "evict"])
@pytest.mark.parametrize("family_name", FAMILIES)
def test_ratio_zero_is_a_plain_chunked_prefill(family_name, backend):
    model = cached_model(family_name)
    ids = random_ids(1, SEQ)
    press_logits, press_cache = chunked_run(model, P.SnapKVPress(0.0, window_size=8, backend=backend), ids)
    assert compressed_layers(press_cache) == {}
    with torch.no_grad():
        cache = prefill_in_chunks(model, None, ids, CHUNK)
        plain_logits = greedy_logits(model, cache, question_ids(), 4)
    assert_same_logits(press_logits, plain_logits, exact=True)
    # and a ratio > 0 really compresses, and changes the output
    logits, cache = chunked_run(model, P.SnapKVPress(0.5, window_size=8, backend=backend), ids)
    assert all(int(counts.max()) < SEQ for counts in kept_token_counts(cache).values())
    assert not torch.equal(logits[0], plain_logits[0])


@dataclass
class LaterChunksOnly(P.KnormPress):
    """Leaves each layer's first chunk uncompressed, compresses the later ones."""

    seen: set = field(default_factory=set)

    def compress(self, context):
        if context.layer_idx not in self.seen:
            self.seen.add(context.layer_idx)
            return None
        return super().compress(context)


def test_a_dense_first_chunk_then_a_compressed_one():
    """The layer is then built from the dense history (kept whole) and the chunk's keep mask."""
    model = cached_model("llama")
    results = {}
    for backend in ("mask", "evict"):
        press = LaterChunksOnly(0.5, backend=backend)
        with torch.no_grad(), press(model):
            cache = prefill_in_chunks(model, press, random_ids(1, 2 * CHUNK), CHUNK)
            results[backend] = model(question_ids(), past_key_values=cache).logits
        for layer in compressed_layers(cache).values():
            assert layer.kept_counts()[0].tolist() == [CHUNK + kept(CHUNK, 0.5) + 5] * 2
    torch.testing.assert_close(results["evict"], results["mask"], rtol=1e-5, atol=1e-5)


# ----- attention masks of later chunks ------------------------------------------------------------
def masks_seen_by_attention(model, press, ids, attention_mask=None) -> list:
    """For every forward of a chunked prefill: was the first attention layer given a mask?"""
    seen = []
    module = model.model.layers[0].self_attn

    def record(module, args, kwargs):
        seen.append(kwargs.get("attention_mask") is not None)

    handle = module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad(), press(model):
            prefill_in_chunks(model, press, ids, CHUNK, attention_mask=attention_mask)
    finally:
        handle.remove()
    return seen


def test_later_chunks_build_no_mask_once_every_layer_is_compressed():
    ids = random_ids(2, SEQ, seed=3)
    attention_mask = torch.ones_like(ids)
    ids[1, :5], attention_mask[1, :5] = 0, 0
    llama = cached_model("llama")
    for backend in ("mask", "evict"):
        # the padded first chunk needs its mask; later chunks none (the pads were never kept)
        assert masks_seen_by_attention(llama, PRESSES["snapkv"](backend), ids, attention_mask) == [True] + [False] * 3
        assert llama.config._attn_implementation == "sdpa"
    # a dense layer left (ratio 0 everywhere, or Gemma3's sliding layers): transformers' mask as usual
    assert masks_seen_by_attention(llama, P.SnapKVPress(0.0), random_ids(1, SEQ)) == [False] + [True] * 3
    gemma = cached_model("gemma3")
    assert masks_seen_by_attention(gemma, PRESSES["snapkv"]("evict"), random_ids(1, SEQ))[1:] == [True] * 3


@pytest.mark.parametrize("backend", ["mask", "evict"])
def test_unmasked_chunks_give_the_masked_result(backend, monkeypatch):
    import adakv.runtimes.hf.chunked_prefill as chunked

    model = cached_model("llama")
    ids = random_ids(2, SEQ, seed=3)
    attention_mask = torch.ones_like(ids)
    ids[1, :5], attention_mask[1, :5] = 0, 0
    unmasked, _ = chunked_run(model, PRESSES["adaptive_snapkv"](backend), ids, attention_mask=attention_mask)
    monkeypatch.setattr(chunked, "every_layer_compressed", lambda cache: False)
    masked, _ = chunked_run(model, PRESSES["adaptive_snapkv"](backend), ids, attention_mask=attention_mask)
    assert_same_logits(unmasked, masked)


# ----- continuing from the cache -----------------------------------------------------------------
@pytest.mark.parametrize("family_name", FAMILIES)
def test_generate_continues_and_rolls_back(family_name):
    model = cached_model(family_name)
    ids, question = random_ids(1, SEQ), question_ids()
    prompt = torch.cat([ids, question], dim=1)
    answers = {}
    for backend in ("mask", "evict"):
        press = PRESSES["adaptive_snapkv"](backend)
        with torch.no_grad(), press(model):
            cache = prefill_in_chunks(model, press, ids, CHUNK)
            saved = checkpoint(cache)
            first = model.generate(prompt, past_key_values=cache, max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert cache.get_seq_length() > SEQ
            restore(cache, saved)  # back to the end of the compressed context
            assert cache.get_seq_length() == SEQ
            again = model.generate(prompt, past_key_values=cache, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(first, again)
        answers[backend] = first
    assert torch.equal(answers["mask"], answers["evict"])


@pytest.mark.parametrize("backend", ["mask", "evict"])
def test_rollback_and_crop_stop_at_the_end_of_the_context(backend):
    model = cached_model("llama")
    press = PRESSES["snapkv"](backend)
    with torch.no_grad(), press(model):
        cache = prefill_in_chunks(model, press, random_ids(1, SEQ), CHUNK)
        before = model(question_ids(), past_key_values=cache).logits
        rollback(cache, SEQ)
        assert cache.get_seq_length() == SEQ
        torch.testing.assert_close(model(question_ids(), past_key_values=cache).logits, before, rtol=0, atol=0)
        cache.crop(SEQ)
        assert cache.get_seq_length() == SEQ
        with pytest.raises(ValueError, match=f"compressed context holds {SEQ}"):
            rollback(cache, SEQ - 1)


@pytest.mark.parametrize("backend", ["mask", "evict"])
def test_left_padded_generate_after_one_chunk_matches_the_ordinary_prefill(backend):
    model = cached_model("llama")
    ids = random_ids(2, SEQ, seed=3)
    attention_mask = torch.ones_like(ids)
    ids[1, :9], attention_mask[1, :9] = 0, 0
    question = question_ids(2)
    prompt, prompt_mask = torch.cat([ids, question], 1), torch.cat([attention_mask, torch.ones_like(question)], 1)
    generate = dict(attention_mask=prompt_mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    press = PRESSES["adaptive_snapkv"](backend)
    with torch.no_grad(), press(model):
        cache = prefill_in_chunks(model, press, ids, SEQ, attention_mask=attention_mask)
        chunked = model.generate(prompt, past_key_values=cache, **generate)
        ordinary_cache = DynamicCache(config=model.config)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate counts them
        model(ids, attention_mask=attention_mask, position_ids=positions, past_key_values=ordinary_cache)
        ordinary = model.generate(prompt, past_key_values=ordinary_cache, **generate)
        several = model.generate(
            prompt, past_key_values=prefill_in_chunks(model, press, ids, CHUNK, attention_mask=attention_mask), **generate
        )
    assert torch.equal(chunked, ordinary)
    assert several.shape == ordinary.shape


# ----- pipeline --------------------------------------------------------------------------------
def test_pipeline_prefill_chunk_size():
    from test_pipeline import CONTEXT, QUESTIONS, context_length, tiny_pair

    model, tokenizer = tiny_pair()
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
    length = context_length(tokenizer)
    answers, caches = {}, {}
    for backend in ("mask", "evict"):
        caches[backend] = DynamicCache(config=model.config)
        press = P.AdaptivePress(P.SnapKVPress(0.5, window_size=8), backend=backend)
        answers[backend] = pipe(
            CONTEXT, questions=QUESTIONS, press=press, max_new_tokens=8, prefill_chunk_size=40, cache=caches[backend]
        )["answers"]
    assert answers["mask"] == answers["evict"]
    sizes = [40] * (length // 40) + ([length % 40] if length % 40 else [])
    for counts in kept_token_counts(caches["evict"]).values():
        assert int(counts.sum()) == sum(kept(size, 0.5) for size in sizes) * model.config.num_key_value_heads
    press = P.AdaptivePress(P.SnapKVPress(0.5, window_size=8))
    one_chunk = pipe(CONTEXT, questions=QUESTIONS, press=press, max_new_tokens=8, prefill_chunk_size=length)
    assert one_chunk == pipe(CONTEXT, questions=QUESTIONS, press=press, max_new_tokens=8)
    with pytest.raises(ValueError, match="prefill_chunk_size must be None or an integer >= 1"):
        pipe(CONTEXT, question=QUESTIONS[0], press=press, prefill_chunk_size=0)


# ----- refused inputs --------------------------------------------------------------------------
def run_refused(press, ids=None, chunk_size=CHUNK, attention_mask=None, cache=None, model=None):
    model = model or cached_model("llama")
    ids = random_ids(1, SEQ) if ids is None else ids
    with torch.no_grad(), press(model):
        prefill_in_chunks(model, press, ids, chunk_size, attention_mask=attention_mask, cache=cache)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        run_refused(PRESSES["snapkv"]("mask"), chunk_size=chunk_size)


def test_empty_input():
    with pytest.raises(ValueError, match="input_ids is empty.*at least one token is needed"):
        run_refused(PRESSES["snapkv"]("mask"), ids=torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids is empty.*at least one token is needed"):
        run_refused(P.SnapKVPress(0.5), ids=torch.zeros(1, 0, dtype=torch.long))  # the default backend
    all_padding = torch.ones(2, SEQ, dtype=torch.long)
    all_padding[1] = 0  # the second context of the batch is empty
    with pytest.raises(ValueError, match="all padding.*at least one token is needed in every row"):
        run_refused(P.SnapKVPress(0.5), ids=random_ids(2, SEQ), chunk_size=2 * SEQ, attention_mask=all_padding)
    with pytest.raises(TypeError, match="2-D tensor"):
        run_refused(PRESSES["snapkv"]("mask"), ids=torch.arange(5))


def test_padding_rules():
    ids = random_ids(2, SEQ)
    right_padded = torch.ones_like(ids)
    right_padded[1, -4:] = 0
    with pytest.raises(ValueError, match="left padding only"):
        run_refused(PRESSES["snapkv"]("evict"), ids=ids, attention_mask=right_padded)
    long_padding = torch.ones_like(ids)
    long_padding[1, :CHUNK] = 0
    with pytest.raises(ValueError, match="16 padding tokens.*chunk_size > 16"):
        run_refused(PRESSES["snapkv"]("evict"), ids=ids, attention_mask=long_padding)
    with pytest.raises(ValueError, match="shape of input_ids"):
        run_refused(PRESSES["snapkv"]("evict"), ids=ids, attention_mask=right_padded[:, :10])


def test_cache_that_already_holds_a_context():
    model = cached_model("llama")
    press = PRESSES["snapkv"]("evict")
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        prefill_in_chunks(model, press, random_ids(1, SEQ), CHUNK, cache=cache)
        with pytest.raises(ValueError, match=f"cache already holds {SEQ} tokens"):
            prefill_in_chunks(model, press, random_ids(1, SEQ), CHUNK, cache=cache)


def test_press_must_be_the_active_one():
    model = cached_model("llama")
    press = PRESSES["snapkv"]("mask")
    with pytest.raises(RuntimeError, match="inside `with press\\(model\\):`"):
        prefill_in_chunks(model, press, random_ids(1, SEQ), CHUNK)
    with torch.no_grad(), PRESSES["knorm"]("mask")(model):
        with pytest.raises(RuntimeError, match="same press object"):
            prefill_in_chunks(model, press, random_ids(1, SEQ), CHUNK)
        with pytest.raises(RuntimeError, match="press=None was passed"):
            prefill_in_chunks(model, None, random_ids(1, SEQ), CHUNK)


@pytest.mark.parametrize(
    "press, message",
    [
        (P.KeyRerotationPress(P.SnapKVPress(0.5)), "KeyRerotationPress cannot run in a chunked prefill"),
        (P.AdaptivePress(P.ObservedAttentionPress(0.5)), "ObservedAttentionPress cannot run in a chunked prefill"),
        (P.RecordingPress(), "RecordingPress cannot run in a chunked prefill: it records whole contexts"),
    ],
    ids=["key_rerotation", "observed_attention", "recording"],
)
def test_presses_that_cannot_run_per_chunk_are_refused(press, message):
    with pytest.raises(ValueError, match=message):
        run_refused(press, model=cached_model("llama", "eager"))


def test_questions_after_the_chunked_prefill_are_not_compressed():
    model = cached_model("llama")
    press = PRESSES["snapkv"]("mask")
    with torch.no_grad(), press(model) as session:
        cache = prefill_in_chunks(model, press, random_ids(1, SEQ), CHUNK)
        before = {index: counts.clone() for index, counts in kept_token_counts(cache).items()}
        assert not session.receiving_chunks
        model(random_ids(1, 20, seed=4), past_key_values=cache)
    for index, counts in kept_token_counts(cache).items():
        assert torch.equal(counts, before[index] + 20)
        assert cache.layers[index].context_length == SEQ


# ----- benchmark smoke mode ----------------------------------------------------------------------
def test_long_context_benchmark_smoke(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_long_context.py"
    spec = importlib.util.spec_from_file_location("bench_long_context", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--tiny", "--decode-steps", "2", "--out", str(tmp_path)])
    (json_file,) = tmp_path.glob("*.json")
    assert (tmp_path / (json_file.stem + ".md")).exists()
    report = json.loads(json_file.read_text())
    rows = {(row["method"], row["context"]): row for row in report["results"]}
    assert report["meta"]["command"] and report["meta"]["torch"] == torch.__version__
    assert all("error" not in row for row in report["results"])
    longest = max(report["meta"]["lengths"])
    for context in report["meta"]["lengths"]:
        dense = rows[("dense", context)]["kv_bytes"]
        for method in ("snapkv-evict-chunked", "ada_snapkv-evict-chunked"):
            # kept rows (1 - 0.875) plus 64 rows of slack per head
            assert rows[(method, context)]["kv_bytes"] < (0.2 if context == longest else 0.5) * dense


# ----- GPU (skipped without CUDA) ----------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("chunk_size", [64, 700])  # short appends (Triton) and long ones (varlen path if any)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_evict_matches_mask_on_gpu(dtype, chunk_size):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to("cuda", dtype).eval()
    ids = torch.randint(3, 256, (1, 2000), device="cuda")
    question = torch.randint(3, 256, (1, 7), device="cuda")
    logits, counts = {}, {}
    for backend in ("mask", "evict"):
        press = P.AdaptivePress(P.SnapKVPress(0.75, window_size=16), backend=backend)
        with torch.no_grad(), press(model):
            cache = prefill_in_chunks(model, press, ids, chunk_size)
            logits[backend] = model(question, past_key_values=cache).logits.float()
            counts[backend] = kept_token_counts(cache)
    tolerance = 1e-4 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(logits["evict"], logits["mask"], rtol=tolerance, atol=tolerance)
    sizes = [chunk_size] * (2000 // chunk_size) + ([2000 % chunk_size] if 2000 % chunk_size else [])
    for index, per_head in counts["evict"].items():
        assert int(per_head.sum()) == (sum(kept(size, 0.75) for size in sizes) + 7) * 2
        if dtype == torch.float32:  # in bf16 a near-tie may pick another token
            assert torch.equal(per_head, counts["mask"][index])
