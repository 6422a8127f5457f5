"""The fp8 flat cache (a press's kv_dtype="float8_e4m3fn"): the row format's error bounds, a layer's rows,
bytes, copies and stacking, attention against the unquantized cache, the Triton kernels (interpreter)
against the torch reference, whole models against the model-dtype cache, and every refusal. On CPU; the
CUDA half is tests/test_fp8_gpu.py."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from adakv import kept_token_counts
from adakv import presses as P
from adakv.cache import FlatHeadwiseLayer, make_compressed_layer, stacked_cache
from adakv.cache.flat_attention import IMPLEMENTATIONS, flat_attention
from adakv.kernels import cuda_flat, fp8_append, fp8_reference as fp8, triton_decode

from conftest import TRITON_DEVICE, random_ids, tiny_model, triton_test
from test_evaluation import model, tokenizer  # noqa: F401 (pytest fixtures: the tiny Llama over SmolLM2's vocabulary)
from test_flat_cache import Config, random_layer_inputs

FP8 = torch.float8_e4m3fn
MANTISSA_STEP = 2.0**-3  # e4m3: 3 mantissa bits, so rounding moves a normal value by at most half of 2^-3 of it
SMALLEST_NORMAL = 2.0**-6
CONFIG = Config()  # one model's config: layers of different models do not stack


def fp8_layer(batch=2, heads=2, seq_len=40, head_dim=16, seed=0, keep_prob=0.5, **options):
    keys, values, keep = random_layer_inputs(batch, heads, seq_len, head_dim, seed=seed, keep_prob=keep_prob)
    return FlatHeadwiseLayer(keys, values, keep, CONFIG, kv_dtype=FP8, **options), (keys, values, keep)


def twin_layers(min_slack=64, **inputs):
    """The same rows as an fp32 layer and as an fp8 layer."""
    keys, values, keep = random_layer_inputs(**inputs)
    return tuple(FlatHeadwiseLayer(keys, values, keep, Config(), min_slack=min_slack, kv_dtype=kv_dtype)
                 for kv_dtype in (None, FP8))  # fmt: skip


def update_both(layers, batch, heads, tokens, head_dim, seed):
    generator = torch.Generator().manual_seed(seed)
    new_keys = torch.randn(batch, heads, tokens, head_dim, generator=generator)
    new_values = torch.randn(batch, heads, tokens, head_dim, generator=generator)
    for layer in layers:
        layer.update(new_keys, new_values)


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


# -- the row format -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_is_within_e4m3_rounding(dtype):
    generator = torch.Generator().manual_seed(0)
    rows = (torch.randn(64, 128, generator=generator) * torch.logspace(-3, 3, 64)[:, None]).to(dtype)
    quantized = fp8.quantize(rows)
    assert quantized.codes.dtype == FP8 and quantized.scales.dtype == torch.float32
    assert quantized.scales.shape == (64,) and not torch.isnan(quantized.codes.float()).any()
    back = fp8.dequantize(quantized.codes, quantized.scales, torch.float32)
    exact = rows.float()
    # a normal value moves by at most half a mantissa step of it; a subnormal code by half of its fixed spacing
    bound = torch.maximum(exact.abs() * MANTISSA_STEP / 2, quantized.scales[:, None] * SMALLEST_NORMAL * MANTISSA_STEP / 2)
    assert ((back - exact).abs() <= bound * 1.0001).all()
    # each row's largest entry maps to +-448 and comes back exactly
    largest = exact.abs().argmax(-1, keepdim=True)
    assert torch.equal(quantized.codes.float().abs().gather(-1, largest).squeeze(-1), torch.full((64,), fp8.FP8_MAX))
    torch.testing.assert_close(back.gather(-1, largest), exact.gather(-1, largest))
    assert relative_error(back, exact) < 0.03


@pytest.mark.parametrize("device", ["cpu", TRITON_DEVICE])
def test_the_scale_is_the_division_on_every_device(device):
    """amax / 448 rounded once (IEEE division), as the Triton append kernel computes it; torch on CUDA turns a
    division by a Python scalar into a multiplication by its reciprocal, which differs in the last bit for
    about half of all values (amax 49.2755241394043: 0.10999000817537308 against 0.10999001562595367)."""
    amax = torch.tensor([49.2755241394043, 49.818931579589844, 25.580204010009766], device=device)
    rows = torch.zeros(3, 16, device=device)
    rows[:, 5] = -amax
    scales = fp8.quantize(rows).scales.cpu()
    assert scales.tolist() == [0.10999000817537308, 0.11120297014713287, 0.057098668068647385]
    assert not torch.equal(scales, (amax.cpu() * torch.tensor(1 / 448.0)))  # the reciprocal's results differ


def test_zero_rows_get_scale_one_and_come_back_zero():
    quantized = fp8.quantize(torch.zeros(3, 8))
    assert torch.equal(quantized.scales, torch.ones(3))
    assert torch.equal(fp8.dequantize(quantized.codes, quantized.scales, torch.bfloat16), torch.zeros(3, 8, dtype=torch.bfloat16))


def test_rows_at_the_edge_of_the_range_never_become_nan():
    rows = torch.tensor([[448.0, -448.0, 1e-30], [3.4e38, 1.0, -2.0], [1e-40, 0.0, 0.0]])
    quantized = fp8.quantize(rows)
    assert not torch.isnan(quantized.codes.float()).any()
    back = fp8.dequantize(quantized.codes, quantized.scales, torch.float32)
    assert torch.equal(back[0, :2], rows[0, :2]) and back[1, 0] == rows[1, 0]
    assert back[1, 1] == 0  # 2^-18 of its row's largest entry: below e4m3's range, as for any per-row scale


# -- the layer ------------------------------------------------------------------------------------------

def test_held_bytes_are_at_most_0_52_of_bf16():
    keys, values, keep = random_layer_inputs(2, 8, 512, 128, dtype=torch.bfloat16)
    bf16 = FlatHeadwiseLayer(keys, values, keep, Config())
    fp8_rows = FlatHeadwiseLayer(keys, values, keep, Config(), kv_dtype=FP8)
    assert fp8_rows.row_bytes == 2 * (128 + 4) and bf16.row_bytes == 2 * 256
    assert fp8_rows.kv_bytes() == pytest.approx(0.516 * bf16.kv_bytes(), rel=1e-3)
    assert fp8_rows.held_bytes() <= 0.52 * bf16.held_bytes()
    assert fp8_rows.keys.dtype == FP8 and fp8_rows.dtype == torch.bfloat16 and fp8_rows.quantized
    assert fp8_rows.key_scales.shape == (fp8_rows.total_rows,) == fp8_rows.value_scales.shape


def assert_quantized_twin(reference, layer):
    """`layer` holds exactly the fp8 rounding of `reference`'s rows (each row quantized once, from the same values)."""
    assert torch.equal(layer.kept_counts(), reference.kept_counts())
    for exact, stored in zip(reference.dense_rows(), layer.dense_rows()):
        rounded = fp8.quantize(exact)
        assert torch.equal(stored, fp8.dequantize(rounded.codes, rounded.scales, exact.dtype))


def held_keep(layer, seed):
    return torch.rand(layer.held_view()[2].shape, generator=torch.Generator().manual_seed(seed)) < 0.6


OPERATIONS = {
    "reserve": lambda layer: layer.reserve(40),  # a re-layout with more slack
    "batch_select": lambda layer: layer.batch_select_indices(torch.tensor([1, 0, 1])),
    "fold": lambda layer: layer.fold_appended_into_context(
        torch.rand(2, 2, 3, generator=torch.Generator().manual_seed(5)) < 0.5),
    "keep_only": lambda layer: layer.keep_only(held_keep(layer, 6), slack=4),
    "truncate": lambda layer: layer.truncate(layer.context_length + 1),
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_rows_are_quantized_once_and_survive_every_relayout(operation):
    reference, layer = twin_layers(min_slack=4, batch=2, heads=2, seq_len=30, head_dim=16, seed=3)
    update_both([reference, layer], 2, 2, 3, 16, seed=4)
    assert_quantized_twin(reference, layer)
    for each in (reference, layer):
        OPERATIONS[operation](each)
    assert_quantized_twin(reference, layer)
    update_both([reference, layer], layer.batch_size, 2, 1, 16, seed=7)  # and appends go on behind them
    assert_quantized_twin(reference, layer)


def test_newest_rows_come_back_in_the_model_dtype():
    keys, values, keep = random_layer_inputs(1, 2, 20, 16, dtype=torch.bfloat16)
    layer = FlatHeadwiseLayer(keys, values, keep, Config(), kv_dtype=FP8)
    new = torch.randn(1, 2, 3, 16).to(torch.bfloat16)
    layer.update(new, new)
    newest_keys, _ = layer.newest_keys_values(3)
    assert newest_keys.dtype == torch.bfloat16
    torch.testing.assert_close(newest_keys.float(), new.float(), rtol=0.07, atol=1e-3)


def test_stacked_layers_carry_their_scales():
    for slacks in ((4, 4), (4, 9)):  # equal slack: the buffers are concatenated; unequal: rows are copied
        parts = [fp8_layer(batch=1 + index, seed=index, min_slack=slack)[0] for index, slack in enumerate(slacks)]
        stack = FlatHeadwiseLayer.stacked(parts)
        assert stack.quantized and stack.key_scales.shape == (stack.total_rows,)
        query = torch.randn(3, 4, 1, 16, generator=torch.Generator().manual_seed(8))
        expected = torch.cat([flat_attention(query[:1], parts[0], 0.25), flat_attention(query[1:], parts[1], 0.25)])
        assert torch.equal(flat_attention(query, stack, 0.25), expected)
    keys, values, keep = random_layer_inputs(1, 2, 40, 16)
    with pytest.raises(ValueError, match="kv_dtype"):
        FlatHeadwiseLayer.stacked([parts[0], FlatHeadwiseLayer(keys, values, keep, parts[0].config)])


# -- attention -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("query_length", [1, 5])
def test_attention_is_close_to_the_unquantized_cache(query_length):
    reference, layer = twin_layers(batch=2, heads=2, seq_len=200, head_dim=64, seed=9)
    update_both([reference, layer], 2, 2, query_length, 64, seed=10)
    query = torch.randn(2, 8, query_length, 64, generator=torch.Generator().manual_seed(11))
    exact = flat_attention(query, reference, 0.125, implementation="reference")
    segments = flat_attention(query, layer, 0.125)  # what CPU runs picks
    torch.testing.assert_close(flat_attention(query, layer, 0.125, implementation="reference"), segments)
    assert relative_error(segments, exact) < 0.05  # e4m3 keys and values: ~2-3 % per element


@triton_test
@pytest.mark.parametrize("query_length,group,splits", [(1, 4, None), (1, 8, 3), (7, 4, None), (33, 2, 2)])
def test_triton_kernels_read_fp8_like_the_reference(query_length, group, splits):
    torch.manual_seed(12)
    keys, values, keep = (t.to(TRITON_DEVICE) for t in random_layer_inputs(2, 2, 300, 64, seed=12))
    layer = FlatHeadwiseLayer(keys, values, keep, Config(), kv_dtype=FP8)
    new = torch.randn(2, 2, query_length, 64, device=TRITON_DEVICE)
    layer.update(new, torch.randn_like(new))
    query = torch.randn(2, 2 * group, query_length, 64, device=TRITON_DEVICE)
    expected = flat_attention(query, layer, 0.125, implementation="reference")
    actual = triton_decode.triton_flat_attention(query, layer, 0.125, num_splits=splits)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@triton_test
def test_the_triton_kernels_check_the_scales():
    keys, values, keep = (part.to(TRITON_DEVICE) for part in random_layer_inputs(2, 2, 40, 16, seed=0, keep_prob=0.5))
    layer = FlatHeadwiseLayer(keys, values, keep, CONFIG, kv_dtype=FP8)  # on the kernels' device (CUDA on a GPU)
    query = torch.randn(2, 4, 1, 16, device=TRITON_DEVICE)
    with pytest.raises(TypeError, match="float8_e4m3fn with scales"):
        triton_decode.split_kv_attention(query, layer.keys, layer.values, layer.offsets, layer.lengths, 2, 40, 0.25)
    with pytest.raises(ValueError, match="key_scales must be contiguous float32"):
        triton_decode.split_kv_attention(query, layer.keys, layer.values, layer.offsets, layer.lengths, 2, 40, 0.25,
                                         scales=(layer.key_scales[:3], layer.value_scales))  # fmt: skip


def empty_rows(rows, head_dim):
    return tuple(fp8.ScaledRows(torch.zeros(rows, head_dim, dtype=FP8, device=TRITON_DEVICE),
                                torch.zeros(rows, device=TRITON_DEVICE)) for _ in range(2))  # fmt: skip


@triton_test
@pytest.mark.parametrize("padded", [False, True])
def test_the_triton_append_writes_the_reference_codes_bit_for_bit(padded):
    sequences, tokens, head_dim = 12, 4, 128
    generator = torch.Generator().manual_seed(13)
    # magnitudes over 40 decades, so every row has entries in e4m3's subnormal range and rounding carries
    spread = torch.logspace(-20, 20, sequences * tokens).view(sequences, tokens, 1)
    new_keys = (torch.randn(sequences, tokens, head_dim, generator=generator) * spread).to(TRITON_DEVICE)
    new_values = (torch.randn(sequences, tokens, head_dim, generator=generator) ** 7).to(TRITON_DEVICE)
    offsets = torch.arange(sequences, device=TRITON_DEVICE) * 10
    lengths = torch.randint(0, 5, (sequences,), generator=generator).to(TRITON_DEVICE)
    first = torch.randint(0, tokens, (sequences,), generator=generator).to(TRITON_DEVICE) if padded else None
    expected, actual = empty_rows(10 * sequences, head_dim), empty_rows(10 * sequences, head_dim)
    expected_lengths, actual_lengths = lengths.clone(), lengths.clone()
    fp8.append_rows(expected, new_keys, new_values, offsets, expected_lengths, first)
    fp8_append.triton_append_rows(actual, new_keys, new_values.transpose(0, 1).contiguous().transpose(0, 1), offsets,
                                  actual_lengths, first)  # fmt: skip
    assert torch.equal(actual_lengths, expected_lengths)
    for want, got in zip(expected, actual):
        assert torch.equal(fp8.as_bytes(got.codes), fp8.as_bytes(want.codes)) and torch.equal(got.scales, want.scales)


# -- whole models ----------------------------------------------------------------------------------------

def question_logits(model, ids, press, question_length=6, max_new_tokens=10, **switches):
    """Logits of a question forward over the compressed context, the layers' kv dtypes, and greedy tokens."""
    context, question = ids[:, :-question_length], ids[:, -question_length:]
    with torch.no_grad(), press(model, **switches):
        cache = DynamicCache(config=model.config)
        model(context, past_key_values=cache)
        logits = model(question, past_key_values=cache).logits
        dtypes = {str(layer.keys.dtype) for layer in cache.layers}
        counts = kept_token_counts(cache)
        tokens = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return logits, dtypes, counts, tokens[:, ids.shape[1]:]


@pytest.mark.parametrize("press", [
    lambda **kv: P.AdaptivePress(P.SnapKVPress(0.5, window_size=8), **kv),
    lambda **kv: P.AdaptivePress(P.SnapKVPress(0.5, window_size=8), scope="model", **kv),
    lambda **kv: P.KnormPress(0.0, **kv),  # prunes nothing: the layers are stored in fp8 all the same
])  # fmt: skip
def test_a_model_decodes_from_fp8_close_to_its_own_dtype(press):
    model, ids = tiny_model("llama"), random_ids(batch=2, seq_len=64)
    logits, dtypes, counts, tokens = question_logits(model, ids, press())
    fp8_logits, fp8_dtypes, fp8_counts, fp8_tokens = question_logits(model, ids, press(kv_dtype="float8_e4m3fn"))
    assert dtypes != {"torch.float8_e4m3fn"} and fp8_dtypes == {"torch.float8_e4m3fn"}
    assert fp8_counts.keys() == {0, 1, 2}
    for layer, kept in counts.items():  # the same keep decisions (made before quantizing)
        assert torch.equal(fp8_counts[layer], kept)
    assert relative_error(fp8_logits, logits) < 0.02
    assert (fp8_tokens == tokens).float().mean() >= 0.8


def test_graphs_and_fusions_decode_fp8_as_eager_does():
    model, ids = tiny_model("llama"), random_ids(seq_len=64)
    press = P.AdaptivePress(P.SnapKVPress(0.5, window_size=8), kv_dtype="float8_e4m3fn")
    eager = question_logits(model, ids, press)
    graphed = question_logits(model, ids, press, cuda_graphs="emulate")
    joined = question_logits(model, ids, press, join_projections=True)
    assert torch.equal(graphed[3], eager[3]) and graphed[1] == {"torch.float8_e4m3fn"}
    torch.testing.assert_close(joined[0], eager[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(joined[3], eager[3])


def test_chunked_prefill_decoding_press_and_pipeline_store_fp8():
    import adakv
    from test_pipeline import CONTEXT, QUESTIONS, TASK, tiny_pair
    from transformers import pipeline

    model, tokenizer = tiny_pair()
    cache = DynamicCache(config=model.config)
    press = P.AdaptivePress(P.SnapKVPress(0.5, window_size=4), kv_dtype="float8_e4m3fn")
    answer = pipeline(TASK, model=model, tokenizer=tokenizer)(CONTEXT, question=QUESTIONS[0], press=press, cache=cache)
    assert isinstance(answer["answer"], str) and {layer.keys.dtype for layer in cache.layers} == {FP8}

    model, ids = tiny_model("llama"), random_ids(seq_len=48)
    press = P.SnapKVPress(0.5, window_size=4, kv_dtype="float8_e4m3fn")
    with torch.no_grad(), press(model):
        cache = adakv.prefill_in_chunks(model, press, ids, chunk_size=16)
    assert {layer.keys.dtype for layer in cache.layers} == {FP8}
    decoding = P.DecodingPress(P.KnormPress(), compression_interval=4, target_size=40, kv_dtype="float8_e4m3fn")
    with torch.no_grad(), decoding(model):
        model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        cache = DynamicCache(config=model.config)
        model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, past_key_values=cache)
    assert {layer.keys.dtype for layer in cache.layers} == {FP8}
    assert all(int(layer.kept_counts().max()) < 40 + 4 for layer in cache.layers)  # target + interval


# -- refusals ----------------------------------------------------------------------------------------------

def test_the_press_field_takes_fp8_or_none():
    assert P.SnapKVPress(0.5).kv_dtype is None
    with pytest.raises(ValueError, match=r"kv_dtype must be one of \('float8_e4m3fn',\) or None .*got 'fp8'"):
        P.SnapKVPress(0.5, kv_dtype="fp8")
    press = P.SnapKVPress(0.5)
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        press.kv_dtype = "bfloat16"
    wrapped = P.AdaptivePress(P.SnapKVPress(0.5, kv_dtype="float8_e4m3fn"))
    assert wrapped.explicit_kv_dtype == "float8_e4m3fn"  # a wrapper runs with the kv_dtype set inside it


@pytest.mark.parametrize("build", [
    lambda: P.SnapKVPress(0.5, backend="mask", kv_dtype="float8_e4m3fn"),
    lambda: P.AdaptivePress(P.SnapKVPress(0.5, kv_dtype="float8_e4m3fn"), backend="mask"),
    lambda: P.AdaptivePress(P.SnapKVPress(0.5, backend="mask"), kv_dtype="float8_e4m3fn"),
])  # fmt: skip
def test_the_mask_backend_refuses_fp8(build):
    with pytest.raises(ValueError, match="backend 'mask' keeps the dense cache .* cannot read fp8"):
        build()


def test_a_fallback_to_mask_refuses_fp8():
    model = tiny_model("llama")
    model.config.attn_logit_softcapping = 30.0  # a model the evict backend cannot serve
    with pytest.raises(ValueError, match="kv_dtype='float8_e4m3fn', which only the evict backend stores, but the model caps"):
        with P.SnapKVPress(0.5, kv_dtype="float8_e4m3fn")(model):
            pass


def test_layers_refuse_other_kv_dtypes_and_the_mask_layer():
    keys, values, keep = random_layer_inputs(1, 2, 10, 8)
    with pytest.raises(ValueError, match="kv_dtype must be None .* or torch.float8_e4m3fn, got torch.float16"):
        FlatHeadwiseLayer(keys, values, keep, Config(), kv_dtype=torch.float16)
    with pytest.raises(ValueError, match="backend 'mask'"):
        make_compressed_layer("mask", keys, values, keep, Config(), "float8_e4m3fn")
    with pytest.raises(ValueError, match=r"kv_dtype must be None \(the model's dtype\) or one of"):
        make_compressed_layer("evict", keys, values, keep, Config(), "int8")


@pytest.mark.parametrize("implementation", [name for name in IMPLEMENTATIONS if name not in ("reference", "segments", "triton")])
def test_paths_that_cannot_read_fp8_say_so(implementation):
    layer, _ = fp8_layer()
    query = torch.randn(2, 4, 1, 16)
    with pytest.raises(ValueError, match=rf"implementation='{implementation}': .* stores fp8 rows .* \('reference', 'segments', 'triton'\)"):
        flat_attention(query, layer, 0.25, implementation=implementation)
    with pytest.raises(ValueError, match=r"CUDA decode kernel \(csrc/flat_decode.cu\) .* fp8 rows"):
        cuda_flat.cuda_decode_flat_attention(query, layer, 0.25)


def test_gpus_below_compute_capability_8_9_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    refusal = fp8.fp8_refusal(torch.device("cuda", 0))
    assert "compute capability 8.9 or newer" in refusal and "NVIDIA A100 is 8.0" in refusal
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8.fp8_refusal(torch.device("cuda", 0)) is None and fp8.fp8_refusal(torch.device("cpu")) is None


def test_caches_of_fp8_presses_stack_with_their_scales():
    model, ids = tiny_model("llama"), random_ids(seq_len=40)
    caches = []
    for ratio in (0.25, 0.5):
        press = P.AdaptivePress(P.SnapKVPress(ratio, window_size=8), kv_dtype="float8_e4m3fn")
        with torch.no_grad(), press(model):
            cache = DynamicCache(config=model.config)
            model(ids, past_key_values=cache)
        caches.append(cache)
    stack = stacked_cache(caches)
    assert all(layer.quantized and layer.batch_size == 2 for layer in stack.layers)


# -- the evaluation ----------------------------------------------------------------------------------------

def test_the_evaluation_runs_and_records_the_kv_dtype(model, tokenizer, tmp_path):
    import json

    from adakv.evaluation.cli import build_parser, config_from_args
    from adakv.evaluation.runner import run_sweep
    from test_evaluation import small_config

    args = build_parser().parse_args(["run", "--kv-dtype", "float8_e4m3fn", "--out", str(tmp_path / "cli")])
    assert config_from_args(args).kv_dtype == "float8_e4m3fn"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--kv-dtype", "int8", "--out", str(tmp_path / "cli")])
    config = small_config(tasks=["niah_single"], presses=["none", "adakv_snapkv"], ratios=[0.5], kv_dtype="float8_e4m3fn",
                          batch_answers=True)  # fmt: skip
    out = str(tmp_path / "run")
    results = run_sweep(config, out, model=model, tokenizer=tokenizer, progress=False)
    assert len(results) == 2 and results.score.between(0, 1).all()
    written = json.load(open(f"{out}/config.json"))
    assert written["kv_dtype"] == "float8_e4m3fn" and written["provenance"][-1]["asked"]["kv_dtype"] == "float8_e4m3fn"
    with pytest.raises(ValueError, match="kv_dtype: folder has 'float8_e4m3fn', asked None"):
        run_sweep(small_config(tasks=["niah_single"], presses=["none", "adakv_snapkv"], ratios=[0.5]), out,
                  model=model, tokenizer=tokenizer, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="backend 'mask'"):
        small_config(backend="mask", kv_dtype="float8_e4m3fn").validate()
