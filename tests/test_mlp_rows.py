"""A long forward runs each dense MLP over row chunks (adakv/runtimes/hf/mlp_rows.py): the same outputs bit for bit
on CPU, the same kept sets and tokens under a press, a lower peak, the MLPs back in place after every forward
(also one that raised), and clear refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, GPT2Config

from adakv import kept_token_counts
from adakv import presses as P
from adakv.runtimes.hf.mlp_rows import MLP_CHUNK_ROWS, RowChunkedMLP, chunkable_layers, mlp_in_row_chunks
from tests.conftest import random_ids, tiny_model
from tests.test_prefill_memory import live_bytes, model as memory_model  # noqa: F401  (the fixture)

# 2 x 44 = 88 rows: 5 full chunks and a partial one of 8. On CPU a product over a slice rounds as over the whole when
# the slices start at multiples of 8 rows (the kernels' row blocking; 7-row slices differ in the last bit)
ROWS = 16
PROMPT = (5, 9, 17, 33)  # KVzip's repeat prompt ids (a random model has no tokenizer)


def mlp_inputs_rows(model) -> tuple[list[int], list]:
    """(rows of every MLP input seen, the hook handles): a forward pre-hook on each original MLP."""
    seen = []
    handles = [layer.mlp.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[:-1].numel()))
               for layer in chunkable_layers(model)]  # fmt: skip
    return seen, handles


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3"])
def test_chunked_mlps_give_the_logits_bit_for_bit(family):
    model = tiny_model(family)
    ids = random_ids(batch=2, seq_len=44)
    with torch.no_grad():
        expected = model(ids).logits
        seen, handles = mlp_inputs_rows(model)
        with mlp_in_row_chunks(model, ROWS) as layers:
            chunked = model(ids).logits
        for handle in handles:
            handle.remove()
    assert layers == model.config.num_hidden_layers
    assert max(seen) == ROWS and len(seen) == layers * 6  # each layer: 88 rows in 6 chunks
    assert torch.equal(chunked, expected)


def test_the_mlps_are_swapped_only_during_a_long_forward_and_put_back():
    model = tiny_model("llama")
    originals = [layer.mlp for layer in chunkable_layers(model)]
    during = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda module, args: during.append(type(module.mlp)))
    with torch.no_grad(), mlp_in_row_chunks(model, ROWS):
        model(random_ids(seq_len=ROWS))  # 7 rows: not more than ROWS, runs as before
        model(random_ids(seq_len=ROWS + 1))
        assert [layer.mlp for layer in chunkable_layers(model)] == originals
    hook.remove()
    assert during == [type(originals[0]), RowChunkedMLP]


def test_a_forward_that_raises_puts_the_mlps_back():
    model = tiny_model("llama")
    originals = [layer.mlp for layer in chunkable_layers(model)]

    def fail(module, args):
        raise RuntimeError("boom")

    with torch.no_grad(), mlp_in_row_chunks(model, ROWS):
        handle = model.model.layers[1].mlp.register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError, match="boom"):
            model(random_ids(seq_len=20))
        assert [layer.mlp for layer in chunkable_layers(model)] == originals
        handle.remove()
        model(random_ids(seq_len=20))  # and the next long forward chunks again
    assert [layer.mlp for layer in chunkable_layers(model)] == originals


@pytest.mark.parametrize(
    "make_press",
    [lambda: P.AdaptivePress(P.SnapKVPress(0.5, window_size=8)),
     lambda: P.AdaptivePress(P.KVzipPress(0.5, chunk_size=16, repeat_prompt_ids=PROMPT), scope="model")],  # fmt: skip
    ids=["adakv_snapkv", "adakv_model_kvzip"],
)
def test_a_press_keeps_the_same_pairs_and_tokens_with_chunked_mlps(make_press):
    model = tiny_model("llama")
    ids = random_ids(batch=2, seq_len=44)
    runs = []
    for rows in (None, ROWS):
        cache = DynamicCache(config=model.config)
        seen, handles = mlp_inputs_rows(model)
        with torch.no_grad(), make_press()(model, mlp_chunk_rows=rows):
            tokens = model.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False, pad_token_id=0)
        for handle in handles:
            handle.remove()
        runs.append((tokens, kept_token_counts(cache), max(seen)))
    (plain_tokens, plain_kept, plain_rows), (tokens, kept, rows_seen) = runs
    assert plain_rows == 88 and rows_seen == ROWS  # KVzip's replay runs chunks of 16 x 2 rows: chunked too
    assert torch.equal(tokens, plain_tokens)
    assert plain_kept.keys() == kept.keys() and all(torch.equal(kept[i], plain_kept[i]) for i in kept)


def test_a_press_block_chunks_by_default_above_mlp_chunk_rows(monkeypatch):
    import adakv.runtimes.hf.session as session

    monkeypatch.setattr(session, "MLP_CHUNK_ROWS", ROWS)  # the default PressBlock reads
    model = tiny_model("llama")
    seen, handles = mlp_inputs_rows(model)
    with torch.no_grad(), P.SnapKVPress(0.5, window_size=8)(model):
        model(random_ids(seq_len=40))
    assert max(seen) == ROWS
    assert MLP_CHUNK_ROWS == 8192


def test_chunked_mlps_lower_a_compressed_generate_peak(memory_model):  # noqa: F811
    """The memory-shaped model of test_prefill_memory (1024 tokens, MLP 3.5x hidden, bf16): at 128 rows per chunk
    the MLP's three (tokens, intermediate) products shrink to three of (128, intermediate). The peak then moves
    to SnapKV's window scores (2 x window x heads x tokens float32, 2 MiB here; 2 GiB against the MLP's 10.5 at
    the 8B shape and 128k), so of the 4.6 MiB saved 3.0 show at the peak here: at least half is required."""
    config = memory_model.config
    ids = torch.randint(3, 250, (1, 1024), generator=torch.Generator().manual_seed(1))
    peaks, tokens = {}, {}
    for rows in (None, 128):
        with torch.no_grad(), P.AdaptivePress(P.SnapKVPress(0.75))(memory_model, mlp_chunk_rows=rows):
            with live_bytes.LiveBytes(where_depth=0) as live:
                out = memory_model.generate(ids, max_new_tokens=3, do_sample=False)
        peaks[rows], tokens[rows] = live.peak, out.tolist()
    intermediates_saved = 3 * (1024 - 128) * config.intermediate_size * 2
    assert tokens[None] == tokens[128]
    assert peaks[None] - peaks[128] >= 0.5 * intermediates_saved, (peaks, intermediates_saved)


def test_bad_rows_and_models_without_dense_mlps_are_refused():
    model = tiny_model("llama")
    press = P.SnapKVPress(0.5)
    for bad in (0, -1, 2.5, True, "8192"):
        with pytest.raises(ValueError, match="mlp_chunk_rows must be a positive int"):
            press(model, mlp_chunk_rows=bad)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="no decoder layer with a dense MLP"):
        with mlp_in_row_chunks(gpt2, 16):
            pass
    with mlp_in_row_chunks(gpt2, None) as layers:  # None: nothing to do, nothing refused
        assert layers == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [40000, 131072])
def test_on_cuda_an_8b_shaped_mlp_in_row_chunks_gives_its_output_bit_for_bit(rows):
    """cuBLAS may pick another kernel for a product of MLP_CHUNK_ROWS rows than for the whole: the bf16 MLP of
    the Llama-3.1-8B shape (4096 -> 14336 -> 4096) over `rows` rows, whole and in chunks (the last one partial)."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    config = type("Config", (), dict(hidden_size=4096, intermediate_size=14336, mlp_bias=False, hidden_act="silu"))
    mlp = LlamaMLP(config).to("cuda", torch.bfloat16).eval()
    hidden = torch.randn(1, rows, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        whole = mlp(hidden)
        chunked = RowChunkedMLP(mlp, MLP_CHUNK_ROWS)(hidden)
    assert torch.equal(chunked, whole), f"largest difference {(chunked - whole).abs().max().item()}"
