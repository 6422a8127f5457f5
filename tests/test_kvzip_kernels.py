"""KVzip's Triton scoring (adakv/kernels/kvzip_scoring.py) equals its PyTorch statement
(`torch_max_attention`): GPU, or CPU under TRITON_INTERPRET=1 with triton installed."""

from __future__ import annotations

import pytest
import torch
from conftest import TRITON_DEVICE, triton_test

from adakv.kernels.kvzip_reference import torch_max_attention

pytestmark = [pytest.mark.gpu, triton_test]


def inputs(batch, heads, kv_heads, chunk, head_dim, context_length, chunk_start, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    # queries as a model makes them: (batch, chunk, heads, head_dim) transposed, so not contiguous
    queries = torch.randn(batch, chunk, heads, head_dim, generator=generator).transpose(1, 2)
    keys = torch.randn(batch, kv_heads, context_length + chunk_start + chunk, head_dim, generator=generator)
    running = torch.rand(batch, kv_heads, context_length, generator=generator) * 0.05  # earlier chunks' maxima
    return queries.to(TRITON_DEVICE, dtype), keys.to(TRITON_DEVICE, dtype), running.to(TRITON_DEVICE)


@pytest.mark.parametrize("heads, kv_heads", [(2, 2), (6, 2)])
@pytest.mark.parametrize("chunk, chunk_start, first_counted", [(7, 0, 3), (40, 5, 0), (70, 0, 9), (30, 4, 40)])
@pytest.mark.parametrize("head_dim", [16, 24])
def test_triton_scoring_equals_the_pytorch_statement(heads, kv_heads, chunk, chunk_start, first_counted, head_dim):
    from adakv.kernels.kvzip_scoring import triton_max_attention

    context_length = 83
    queries, keys, running = inputs(2, heads, kv_heads, chunk, head_dim, context_length, chunk_start, torch.float32, chunk)
    expected = running.clone()
    torch_max_attention(expected, queries, keys, 0.3, context_length, chunk_start, first_counted)
    triton_max_attention(running, queries, keys, 0.3, context_length, chunk_start, first_counted)
    torch.testing.assert_close(running, expected, rtol=1e-5, atol=1e-6)
    if first_counted >= chunk_start + chunk:  # only the repeat prompt: nothing counted, nothing changed
        assert torch.equal(running, inputs(2, heads, kv_heads, chunk, head_dim, context_length, chunk_start, torch.float32, chunk)[2])
    else:
        assert (running > expected.new_tensor(0.05)).any()  # the update did reach the running maximum


@pytest.mark.skipif(TRITON_DEVICE == "cpu", reason="the interpreter rounds bf16 differently from the GPU")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bf16_triton_scoring_is_within_rounding_of_pytorch(head_dim):
    from adakv.kernels.kvzip_scoring import triton_max_attention

    queries, keys, running = inputs(1, 12, 2, 512, head_dim, 1500, 256, torch.bfloat16, 0)
    expected = running.clone()
    torch_max_attention(expected, queries, keys, head_dim**-0.5, 1500, 256, 0)
    triton_max_attention(running, queries, keys, head_dim**-0.5, 1500, 256, 0)
    torch.testing.assert_close(running, expected, rtol=2e-3, atol=1e-5)


@pytest.mark.skipif(TRITON_DEVICE == "cpu", reason="the press takes the kernels on CUDA tensors only")
def test_kvzip_press_keeps_the_same_pairs_with_the_kernels_and_with_pytorch(monkeypatch):
    from conftest import random_ids, tiny_model

    from adakv import kept_token_counts
    from adakv import presses as P
    from adakv.kernels import kvzip_reference

    model = tiny_model("qwen2").cuda()
    ids = random_ids(1, 90).cuda()

    def compressed_tokens():
        press = P.AdaptivePress(P.KVzipPress(0.5, repeat_prompt_ids=(5, 6, 7), chunk_size=32), scope="model")
        with torch.no_grad(), press(model):
            tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        return tokens.sequences, kept_token_counts(tokens.past_key_values)

    from adakv.kernels import kvzip_scoring as kvzip_kernels

    launches = []
    kernels = kvzip_kernels.triton_max_attention
    monkeypatch.setattr(kvzip_kernels, "triton_max_attention", lambda *args: launches.append(1) or kernels(*args))
    fused_tokens, fused_counts = compressed_tokens()
    assert launches  # the kernels did score
    monkeypatch.setattr(kvzip_reference, "triton_available", lambda: False)
    tokens, counts = compressed_tokens()
    assert torch.equal(tokens, fused_tokens)
    assert counts.keys() == fused_counts.keys() and all(torch.equal(counts[i], fused_counts[i]) for i in counts)


@pytest.mark.parametrize("chunk, chunk_start, first_counted", [(7, 0, 3), (70, 0, 9), (30, 4, 40), (40, 5, 0)])
def test_maximum_probability_pass_with_given_normalisers_equals_the_pytorch_statement(chunk, chunk_start, first_counted):
    """The reconstruction's path on CUDA: its attention's log-sum-exps (here from flash_attention_split on the
    device's flash kernel) feed the second kernel alone; the scores are torch_max_attention's."""
    from adakv.kernels.kvzip_reference import flash_attend_and_score, torch_attend_and_score

    context_length = 83
    dtype = torch.float32 if TRITON_DEVICE == "cpu" else torch.bfloat16  # CUDA's flash kernel takes half precision
    queries, keys, running = inputs(2, 6, 2, chunk, 16, context_length, chunk_start, dtype, chunk)
    values = torch.randn_like(keys)
    expected = running.clone()
    torch_max_attention(expected, queries, keys, 0.3, context_length, chunk_start, first_counted)
    reference_running = running.clone()
    expected_output = torch_attend_and_score(reference_running, queries, keys, values, 0.3, context_length, chunk_start, first_counted)
    output = flash_attend_and_score(running, queries, keys, values, 0.3, context_length, chunk_start, first_counted)
    close = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(running, expected, **close)
    torch.testing.assert_close(output.float(), expected_output.float(), **(close if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)))
    if first_counted < chunk_start + chunk:
        assert (running > expected.new_tensor(0.05)).any()


@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="the interpreter's stand-in for the CUDA path (CUDA runs it for real)")
def test_the_cuda_path_through_a_replay_keeps_todays_scores(monkeypatch):
    """The press's CUDA route (split flash attention + the given-normaliser pass, the two-kernel pass in the
    last layer) end to end on CPU: torch's CPU flash kernel and the Triton interpreter, in float32."""
    from conftest import random_ids, tiny_model
    from test_kvzip_cost import press_scores, statement_scores

    from adakv.kernels import kvzip_reference

    model, ids = tiny_model("llama"), random_ids(2, 45, seed=3)
    expected = statement_scores(model, ids, 16)
    monkeypatch.setattr(kvzip_reference, "fused_scoring", lambda queries, keys: True)
    monkeypatch.setattr(kvzip_reference, "flash_attention_takes", lambda queries: True)
    launches = []
    kernels = kvzip_reference.flash_attend_and_score
    monkeypatch.setattr(kvzip_reference, "flash_attend_and_score", lambda *args: launches.append(1) or kernels(*args))
    actual = press_scores(model, ids, 16)
    assert launches
    for index in expected:
        torch.testing.assert_close(actual[index], expected[index], rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(TRITON_DEVICE == "cpu", reason="torch's CUDA flash attention (bf16)")
def test_bf16_replay_on_cuda_flash_scores_like_pytorch(monkeypatch):
    """The press's CUDA route in bf16 (flash attention + the given-normaliser pass) against its PyTorch route:
    the same scores within bf16 rounding (the replayed hidden states round differently, so not bit for bit)."""
    from conftest import random_ids, tiny_model
    from test_kvzip_cost import press_scores

    from adakv.kernels import kvzip_reference

    model, ids = tiny_model("llama").to("cuda", torch.bfloat16), random_ids(1, 200, seed=3).cuda()
    launches = []
    kernels = kvzip_reference.flash_attend_and_score
    monkeypatch.setattr(kvzip_reference, "flash_attend_and_score", lambda *args: launches.append(1) or kernels(*args))
    fused = press_scores(model, ids, 64)
    assert launches
    monkeypatch.setattr(kvzip_reference, "fused_scoring", lambda queries, keys: False)
    reference = press_scores(model, ids, 64)
    for index in reference:
        torch.testing.assert_close(fused[index], reference[index], rtol=5e-2, atol=1e-3)
