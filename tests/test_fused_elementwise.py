"""`fuse_elementwise=True` (adakv/runtimes/hf/fusion/elementwise.py): norms, rotary embeddings and SiLU gates as one kernel
each, the same outputs, every module and function restored on exit, clear refusals.

On CPU the module patching runs with the torch reference of the kernels (elementwise_reference.py), counted
so that a fused path that is never taken fails; the GPU tests compare the Triton kernels with that reference
and run fused models, eager and in CUDA graphs."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
from conftest import (
    FAMILY_CONFIGS,
    TRITON_DEVICE,
    press_logits_and_tokens, press_run,
    random_ids,
    skip_bf16_when_interpreted,
    tiny_model,
    triton_test,
)
from torch import nn

from adakv import presses as P
from adakv.kernels import elementwise_reference as reference
from adakv.runtimes.hf.fusion.elementwise import NORM_STYLES, REFERENCE_KERNELS, ElementwiseKernels, fused_elementwise

gpu_test = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def randomized(model: nn.Module) -> nn.Module:
    """Norm weights away from their initial ones / zeros, so that the weight's place in the formula matters."""
    torch.manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ in NORM_STYLES:
                module.weight.normal_(0.5, 0.3)
    return model


class CountingKernels:
    """REFERENCE_KERNELS with a call count per operation."""

    def __init__(self, base: ElementwiseKernels = REFERENCE_KERNELS):
        self.calls = {"rms_norm": 0, "add_rms_norm": 0, "rotary": 0, "silu_mul": 0}  # ElementwiseKernels' order
        self.kernels = ElementwiseKernels(
            *(self._counted(name, getattr(base, name)) for name in self.calls), device_type=base.device_type
        )

    def _counted(self, name, operation):
        def counted(*args):
            self.calls[name] += 1
            return operation(*args)

        return counted


def modeling_module(model):
    return sys.modules[type(model.model.layers[0].self_attn).__module__]


def norm_count(model) -> int:
    return sum(type(module).__name__ in NORM_STYLES for module in model.modules())


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_reference_operations_are_transformers_arithmetic_bit_for_bit(family, dtype):
    model = randomized(tiny_model(family)).to(dtype)
    layer = model.model.layers[0]
    x = torch.randn(2, 5, model.config.hidden_size, dtype=dtype)
    offset, in_fp32 = NORM_STYLES[type(layer.input_layernorm).__name__]
    norm = layer.input_layernorm
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    assert torch.equal(reference.rms_norm(x, norm.weight, eps, offset, in_fp32), norm(x))
    update = torch.randn_like(x)
    total, normed = reference.add_rms_norm(x, update, norm.weight, eps, offset, in_fp32)
    assert torch.equal(total, x + update) and torch.equal(normed, norm(x + update))

    head_dim = 16
    q, k = torch.randn(2, 4, 5, head_dim, dtype=dtype), torch.randn(2, 2, 5, head_dim, dtype=dtype)
    cos, sin = torch.randn(2, 5, head_dim, dtype=dtype), torch.randn(2, 5, head_dim, dtype=dtype)
    expected_q, expected_k = modeling_module(model).apply_rotary_pos_emb(q, k, cos, sin)
    rotated_q, rotated_k = reference.rotary(q, k, cos, sin)
    assert torch.equal(rotated_q, expected_q) and torch.equal(rotated_k, expected_k)

    gate, up = torch.randn(3, 7, dtype=dtype), torch.randn(3, 7, dtype=dtype)
    assert torch.equal(reference.silu_mul(gate, up), nn.functional.silu(gate) * up)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_the_fused_model_gives_the_same_outputs_through_the_fused_path(family):
    model = randomized(tiny_model(family))
    ids = random_ids(2, 40)
    expected_logits, expected_tokens = press_logits_and_tokens(model, ids)
    original_rotary = modeling_module(model).apply_rotary_pos_emb
    counting = CountingKernels()
    with fused_elementwise(model, counting.kernels) as fused:
        assert modeling_module(model).apply_rotary_pos_emb is not original_rotary
        logits, tokens = press_logits_and_tokens(model, ids)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, expected_tokens)

    layers = model.config.num_hidden_layers
    assert fused.norms == norm_count(model) >= 2 * layers + 1
    assert fused.rotary_modules == [modeling_module(model).__name__]
    forwards = 1 + 12  # the logits forward, then the prefill and 11 decode steps of generate
    assert counting.calls["rotary"] == layers * forwards  # q and k in one call
    # (the press's scorer also runs Qwen3's and Gemma3's q_norm when it rebuilds the window's queries)
    assert counting.calls["rms_norm"] + counting.calls["add_rms_norm"] >= fused.norms * forwards
    if family in ("gemma3", "phi3"):  # their layers keep their residual adds, and say so
        assert fused.residual_layers == 0 and counting.calls["add_rms_norm"] == 0
        assert f"decoder layers {list(range(layers))}: residual adds kept separate" in fused.left_unfused[-1]
    else:  # each layer's two adds go with the norms after them: only the first layer's input norm stays
        assert fused.residual_layers == layers and counting.calls["add_rms_norm"] == 2 * layers * forwards
        q_k_norms = 2 * layers if family == "qwen3" else 0
        assert counting.calls["rms_norm"] >= (1 + q_k_norms) * forwards
        if family != "qwen3":
            assert counting.calls["rms_norm"] == forwards
    if family == "gemma3":  # tanh-GELU gates stay unfused, and say so
        assert fused.mlps == 0 and counting.calls["silu_mul"] == 0
        assert len(fused.left_unfused) == layers + 1 and "GELUTanh activation" in fused.left_unfused[0]
    else:
        assert fused.mlps == layers and counting.calls["silu_mul"] == layers * forwards

    assert modeling_module(model).apply_rotary_pos_emb is original_rotary
    assert all("forward" not in module.__dict__ for module in model.modules())


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bf16_logits_with_the_reference_operations_equal_transformers_bit_for_bit(family):
    """The restructured decoder layer (residual adds folded into the norms) is transformers' arithmetic."""
    model = randomized(tiny_model(family)).to(torch.bfloat16)
    ids = random_ids(2, 17)
    with torch.no_grad():
        expected = model(ids).logits
        with fused_elementwise(model, REFERENCE_KERNELS) as fused:
            logits = model(ids).logits
    assert fused.residual_layers == model.config.num_hidden_layers
    assert torch.equal(logits, expected)


def test_nested_blocks_over_two_models_restore_the_rotary_only_at_the_last_exit():
    first, second = tiny_model("llama"), tiny_model("llama", seed=1)
    module = modeling_module(first)
    original = module.apply_rotary_pos_emb
    with fused_elementwise(first, REFERENCE_KERNELS):
        patched = module.apply_rotary_pos_emb
        with fused_elementwise(second, REFERENCE_KERNELS):
            assert module.apply_rotary_pos_emb is patched
        assert module.apply_rotary_pos_emb is patched
        with pytest.raises(RuntimeError, match="already fused with other kernels"):
            with fused_elementwise(second, CountingKernels().kernels):
                pass
        assert module.apply_rotary_pos_emb is patched
    assert module.apply_rotary_pos_emb is original


def test_rotations_the_kernel_does_not_cover_go_to_the_original_function():
    model = tiny_model("phi3")
    counting = CountingKernels()
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16)
    cos, sin = torch.randn(1, 3, 8), torch.randn(1, 3, 8)  # partial rotary: 8 of 16 dimensions
    expected = modeling_module(model).apply_rotary_pos_emb(q, k, cos, sin)
    with fused_elementwise(model, counting.kernels):
        rotated = modeling_module(model).apply_rotary_pos_emb(q, k, cos, sin)
        full = modeling_module(model).apply_rotary_pos_emb(q, k, torch.randn(1, 3, 16), torch.randn(1, 3, 16))
    assert all(torch.equal(a, b) for a, b in zip(rotated, expected))
    assert counting.calls["rotary"] == 1 and len(full) == 2  # only the full rotation was fused (q and k at once)


def test_emulated_graphs_with_every_fusion_give_the_eager_tokens():
    model = randomized(tiny_model("qwen3"))  # q/k norms and biases-free q/k/v
    ids = random_ids(1, 40)
    press = P.AdaptivePress(P.SnapKVPress(0.5, window_size=8), backend="evict")
    _, eager = press_logits_and_tokens(model, ids, press)
    with fused_elementwise(model, REFERENCE_KERNELS):
        _, graphed, session = press_run(model, ids, press, cuda_graphs="emulate", join_projections=True)
    assert torch.equal(graphed, eager)
    assert session.graph_decoder.captures == 1


def test_a_cpu_model_is_refused_with_the_reason():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"Triton kernels on CUDA; this model has parameters on \['cpu'\]"):
        with P.SnapKVPress(0.5)(model, fuse_elementwise=True):
            pass
    assert all("forward" not in module.__dict__ for module in model.modules())


def test_a_wrapped_norm_is_refused_and_nothing_is_replaced():
    model = tiny_model("mistral")
    original_rotary = modeling_module(model).apply_rotary_pos_emb
    norm = model.model.layers[2].post_attention_layernorm
    norm.forward = lambda hidden: type(norm).forward(norm, hidden)
    with pytest.raises(ValueError, match=r"model.layers.2.post_attention_layernorm already has its forward replaced"):
        with fused_elementwise(model, REFERENCE_KERNELS):
            pass
    del norm.forward
    assert modeling_module(model).apply_rotary_pos_emb is original_rotary
    assert all("forward" not in module.__dict__ for module in model.modules())


def test_a_forward_that_records_gradients_is_refused():
    model = tiny_model("llama")
    with fused_elementwise(model, REFERENCE_KERNELS), pytest.raises(RuntimeError, match="torch.no_grad"):
        model(random_ids(1, 9))
    with torch.no_grad(), fused_elementwise(model, REFERENCE_KERNELS):
        model(random_ids(1, 9))  # the same forward without gradients runs


# ----- GPU: the Triton kernels ----------------------------------------------------------------------------
def triton_kernels():
    from adakv.runtimes.hf.fusion.elementwise import triton_kernels as make

    return make()


@triton_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", [(0.0, False), (1.0, True)])
def test_triton_rms_norm_matches_the_reference(dtype, style):
    skip_bf16_when_interpreted(dtype)
    kernels = triton_kernels()
    rows = torch.randn(3, 7, 2 * 4096, device=TRITON_DEVICE, dtype=dtype)[..., :4096]  # strided rows
    weight = torch.randn(4096, device=TRITON_DEVICE, dtype=dtype)
    out = kernels.rms_norm(rows, weight, 1e-5, *style)
    expected = reference.rms_norm(rows, weight, 1e-5, *style)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3  # reduction order: at most one bf16 step apart
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    half_weight = weight.float()  # Llama style with fp32 weights promotes the output to fp32
    assert kernels.rms_norm(rows, half_weight, 1e-5, 0.0, False).dtype == torch.promote_types(dtype, torch.float32)
    update = torch.randn(3, 7, 4096, device=TRITON_DEVICE, dtype=dtype)
    total, normed = kernels.add_rms_norm(rows, update, weight, 1e-5, *style)
    expected_total, expected_normed = reference.add_rms_norm(rows, update, weight, 1e-5, *style)
    assert torch.equal(total, expected_total)  # one rounding of an exact fp32 sum, as torch's add
    torch.testing.assert_close(normed, expected_normed, rtol=tolerance, atol=tolerance)


@triton_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("angle_batch", [1, 2])
def test_triton_rotary_matches_the_reference_on_transposed_heads(dtype, angle_batch):
    skip_bf16_when_interpreted(dtype)
    kernels = triton_kernels()
    q = torch.randn(2, 5, 8, 128, device=TRITON_DEVICE, dtype=dtype).transpose(1, 2)  # as q_proj(x).view().transpose()
    k = torch.randn(2, 5, 3 * 128, device=TRITON_DEVICE, dtype=dtype)[..., 128:].view(2, 5, 2, 128).transpose(1, 2)
    cos = torch.randn(angle_batch, 5, 128, device=TRITON_DEVICE, dtype=dtype)
    sin = torch.randn(angle_batch, 5, 128, device=TRITON_DEVICE, dtype=dtype)
    tolerance = 1e-6 if dtype == torch.float32 else 2**-7  # bf16: at most one rounding step apart
    for out, expected in zip(kernels.rotary(q, k, cos, sin), reference.rotary(q, k, cos, sin)):
        assert out.stride() == expected.stride()  # the layout torch's arithmetic gives
        torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)


@triton_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_silu_mul_matches_the_reference_on_joined_views(dtype):
    skip_bf16_when_interpreted(dtype)
    kernels = triton_kernels()
    joined = torch.randn(2, 3, 2 * 14336, device=TRITON_DEVICE, dtype=dtype)
    gate, up = joined[..., :14336], joined[..., 14336:]
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3  # exp may differ in the last fp32 bit
    torch.testing.assert_close(kernels.silu_mul(gate, up), reference.silu_mul(gate, up), rtol=tolerance, atol=tolerance)


@triton_test
@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_the_triton_kernels_run_whole_models(family):
    """Every Triton kernel inside a model (on CPU under the interpreter: fp32, the same module patching)."""
    model = randomized(tiny_model(family)).to(TRITON_DEVICE)
    ids = random_ids(2, 12).to(TRITON_DEVICE)
    with torch.no_grad():
        expected = model(ids).logits
        kernels = dataclasses.replace(triton_kernels(), device_type=None if TRITON_DEVICE == "cpu" else "cuda")
        with fused_elementwise(model, kernels) as fused:
            logits = model(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert fused.residual_layers == (0 if family == "phi3" else model.config.num_hidden_layers)


@gpu_test
@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_fused_cuda_models_give_the_same_outputs_eager_and_in_graphs(family):
    model = randomized(tiny_model(family)).cuda()
    ids = random_ids(2, 40).cuda()
    expected_logits, expected_tokens = press_logits_and_tokens(model, ids)
    counting = CountingKernels(triton_kernels())
    with fused_elementwise(model, counting.kernels):
        logits, tokens = press_logits_and_tokens(model, ids)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens, expected_tokens)
    assert counting.calls["rotary"] > 0 and counting.calls["rms_norm"] > 0
    if family == "gemma3":
        return  # sliding-window layers: no graph decoding
    press = P.AdaptivePress(P.SnapKVPress(0.5, window_size=8), backend="evict")
    _, eager = press_logits_and_tokens(model, ids, press, fuse_elementwise=True)
    _, graphed, session = press_run(model, ids, press, cuda_graphs=True, join_projections=True, fuse_elementwise=True)
    assert torch.equal(graphed, eager)
    assert session.graph_decoder.captures == 1


@gpu_test
def test_bf16_fused_logits_are_within_rounding_of_the_unfused_ones():
    model = randomized(tiny_model("llama")).cuda().to(torch.bfloat16)
    ids = random_ids(2, 40).cuda()
    with torch.no_grad():
        plain = model(ids).logits.float()
        with fused_elementwise(model):
            fused = model(ids).logits.float()
    assert (fused - plain).abs().max() <= 0.02 * plain.abs().max()
