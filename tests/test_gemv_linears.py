"""`gemv_linears=True` (adakv/runtimes/hf/fusion/gemv_linears.py): decode-step linears (1 to MAX_ROWS input rows) through
the GEMV, larger inputs through torch, the same outputs, every module restored on exit, clear refusals.

On CPU the routing runs with a counting torch product, so that a routed path that is never taken fails;
with TRITON_INTERPRET=1 (or on a GPU) the Triton GEMV itself runs whole models."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILY_CONFIGS, TRITON_DEVICE, press_logits_and_tokens, press_run, random_ids, tiny_model, triton_test
from torch import nn

from adakv import presses as P
from adakv.kernels import elementwise_reference
from adakv.runtimes.hf.fusion.elementwise import REFERENCE_KERNELS, fused_elementwise
from adakv.kernels.gemv_plan import MAX_ROWS, gemv_tiles
from adakv.runtimes.hf.fusion.gemv_linears import gemv_linears
from adakv.runtimes.hf.fusion.joined_projections import joined_projections

gpu_test = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class CountingProduct:
    """F.linear, recording the number of input rows of every call."""

    def __init__(self):
        self.rows: list[int] = []

    def __call__(self, x, weight, bias):
        self.rows.append(x.numel() // x.shape[-1])
        return F.linear(x, weight, bias)


def logits_and_tokens(model, ids, max_new_tokens=12):
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return logits, tokens


def no_forward_left(model) -> bool:
    return all("forward" not in module.__dict__ for module in model.modules())


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_decode_steps_go_through_the_gemv_and_prefills_through_torch(family):
    model = tiny_model(family)
    ids = random_ids(2, 40)
    expected_logits, expected_tokens = logits_and_tokens(model, ids)
    counting = CountingProduct()
    with gemv_linears(model, gemv=counting) as routed:
        logits, tokens = logits_and_tokens(model, ids)
    assert torch.equal(logits, expected_logits) and torch.equal(tokens, expected_tokens)
    assert routed.linears == sum(type(module) is nn.Linear for module in model.modules())
    assert routed.groups == 0 and routed.left_as_is == []
    # generate: the prefill (80 rows: torch's, but its lm_head sees the last position only), then 11 steps
    assert counting.rows == [2] * (1 + routed.linears * 11)
    assert no_forward_left(model)


def test_joined_groups_compute_their_joined_product_with_the_gemv():
    model = tiny_model("llama")
    ids = random_ids(1, 30)
    expected_logits, expected_tokens = logits_and_tokens(model, ids, max_new_tokens=5)
    counting = CountingProduct()
    with joined_projections(model) as groups, gemv_linears(model, groups, gemv=counting) as routed:
        assert all(group.product is not F.linear for group in groups)
        logits, tokens = logits_and_tokens(model, ids, max_new_tokens=5)
    assert all(group.product is F.linear for group in groups)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, expected_tokens)
    layers = model.config.num_hidden_layers
    assert routed.groups == 2 * layers and routed.left_as_is == []
    assert routed.linears == 2 * layers + 1  # o_proj, down_proj, lm_head; the siblings go through their group
    assert counting.rows == [1] * (1 + (2 * layers + routed.linears) * 4)  # the prefill's lm_head, 4 steps
    assert no_forward_left(model)


class CountingSiluGated:
    """silu(gate) * up of a joined gate/up product with torch operations, recording each call's input rows."""

    def __init__(self):
        self.rows: list[int] = []

    def __call__(self, x, weight, bias):
        self.rows.append(x.numel() // x.shape[-1])
        return elementwise_reference.silu_mul(*F.linear(x, weight, bias).chunk(2, dim=-1))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_mlps_take_silu_gate_and_up_in_one_product_at_decode_steps(family):
    model = tiny_model(family)
    ids = random_ids(2, 30)
    expected_logits, expected_tokens = logits_and_tokens(model, ids, max_new_tokens=5)
    gated = CountingSiluGated()
    with joined_projections(model) as groups, fused_elementwise(model, REFERENCE_KERNELS):
        with gemv_linears(model, groups, gemv=CountingProduct(), silu_gated=gated) as routed:
            logits, tokens = logits_and_tokens(model, ids, max_new_tokens=5)
        assert all(group.silu_gated_product is None for group in groups)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, expected_tokens)
    layers = model.config.num_hidden_layers
    assert routed.gated_groups == layers
    assert gated.rows == [2] * (layers * 4)  # the 4 decode steps; the prefills (60 rows) multiply separately
    assert no_forward_left(model)


def test_a_forward_that_records_gradients_is_refused_with_the_gated_product_too():
    """The gated product would compute the MLP without gradients for its weights: refused like the joined one."""
    model = tiny_model("llama")
    gated = CountingSiluGated()
    with joined_projections(model) as groups, fused_elementwise(model, REFERENCE_KERNELS):
        with gemv_linears(model, groups, gemv=CountingProduct(), silu_gated=gated):
            with pytest.raises(RuntimeError, match="join_projections computes the projections without gradients"):
                model.model.layers[0].mlp(torch.randn(1, 1, model.config.hidden_size))
    assert gated.rows == []


def test_inputs_the_gemv_cannot_take_go_to_torch():
    counting = CountingProduct()
    linear = nn.Linear(8, 4)
    with gemv_linears(linear, gemv=counting):
        assert linear(torch.randn(2, 8)).grad_fn is not None  # gradients for the weight: torch's product
        with torch.no_grad():
            linear(torch.randn(MAX_ROWS, 8))  # routed
            linear(torch.randn(MAX_ROWS + 1, 8))  # a prefill's worth of rows
            linear.weight.data = torch.randn(8, 4).t()  # a weight that is not contiguous
            linear(torch.randn(1, 8))
    assert counting.rows == [MAX_ROWS]


def test_a_wrapped_linear_is_left_as_it_is_and_listed():
    model = tiny_model("mistral")
    o_proj = model.model.layers[1].self_attn.o_proj
    wrapper = lambda hidden: type(o_proj).forward(o_proj, hidden)  # noqa: E731 - an accelerate-style hook
    o_proj.forward = wrapper
    counting = CountingProduct()
    with gemv_linears(model, gemv=counting) as routed:
        logits_and_tokens(model, random_ids(1, 20), max_new_tokens=2)
        assert o_proj.forward is wrapper
    assert routed.left_as_is == ["model.layers.1.self_attn.o_proj: its forward is already replaced by another wrapper"]
    assert o_proj.forward is wrapper
    assert len(counting.rows) == 1 + routed.linears  # the prefill's lm_head, one decode step


def test_a_linear_subclass_is_left_as_it_is_and_listed():
    class QuantizedLinear(nn.Linear):  # stands for a quantized layer that subclasses nn.Linear
        pass

    model = tiny_model("llama")
    layer = model.model.layers[0].mlp
    layer.down_proj = QuantizedLinear(layer.down_proj.in_features, layer.down_proj.out_features, bias=False)
    counting = CountingProduct()
    with gemv_linears(model, gemv=counting) as routed:
        logits_and_tokens(model, random_ids(1, 20), max_new_tokens=2)
    assert routed.left_as_is == ["model.layers.0.mlp.down_proj: a QuantizedLinear, not a plain nn.Linear (e.g. quantized)"]
    assert len(counting.rows) == 1 + routed.linears and "forward" not in layer.down_proj.__dict__


def test_a_linear_with_a_tensor_subclass_weight_is_left_as_it_is_and_listed():
    class ShardTensor(torch.Tensor):  # stands for a tensor-parallel DTensor
        pass

    model = tiny_model("llama")
    o_proj = model.model.layers[1].self_attn.o_proj
    o_proj.weight = nn.Parameter(o_proj.weight.detach().as_subclass(ShardTensor), requires_grad=False)
    with gemv_linears(model, gemv=CountingProduct()) as routed:
        assert "forward" not in o_proj.__dict__
    assert routed.left_as_is == ["model.layers.1.self_attn.o_proj: its weight is a ShardTensor (e.g. a tensor-parallel shard)"]


def test_a_cpu_model_is_refused_with_the_reason():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"Triton kernel on CUDA; this model has parameters on \['cpu'\]"):
        with P.SnapKVPress(0.5)(model, gemv_linears=True):
            pass
    assert no_forward_left(model)


def test_emulated_graphs_with_the_gemv_routing_give_the_eager_tokens():
    model = tiny_model("qwen2")  # q/k/v biases
    ids = random_ids(1, 40)
    press = P.AdaptivePress(P.SnapKVPress(0.5, window_size=8), backend="evict")
    _, eager = press_logits_and_tokens(model, ids, press)
    counting = CountingProduct()
    with gemv_linears(model, gemv=counting):
        _, graphed, session = press_run(model, ids, press, cuda_graphs="emulate")
    assert torch.equal(graphed, eager)
    assert session.graph_decoder.captures == 1 and 1 in counting.rows


@triton_test
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_the_triton_gemv_runs_whole_models(family):
    """The GEMV and the SiLU-gated GEMV inside a model with every fusion (on CPU under the interpreter)."""
    from adakv.runtimes.hf.fusion.elementwise import triton_kernels
    from adakv.kernels.triton_gemv import gemv, silu_gated_gemv

    model = tiny_model(family).to(TRITON_DEVICE)
    ids = random_ids(2, 24).to(TRITON_DEVICE)
    expected_logits, expected_tokens = logits_and_tokens(model, ids, max_new_tokens=4)
    kernels = dataclasses.replace(triton_kernels(), device_type=None if TRITON_DEVICE == "cpu" else "cuda")
    with joined_projections(model) as groups, fused_elementwise(model, kernels):
        with gemv_linears(model, groups, gemv=gemv, silu_gated=silu_gated_gemv) as routed:
            logits, tokens = logits_and_tokens(model, ids, max_new_tokens=4)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens, expected_tokens)
    assert routed.gated_groups == (0 if family == "phi3" else model.config.num_hidden_layers)  # phi3: gate_up_proj


def test_the_tile_plan_is_within_three_percent_of_the_fastest_measured_setting():
    """Against the committed H200 sweep (bench_gemv.py: the 8B shape's weights, 1 and 8 rows); gemv_tiles is
    a pure function, so this runs without a GPU."""
    sweep = json.loads((Path(__file__).parents[1] / "benchmarks/results/gemv_NVIDIA_H200.json").read_text())
    for shape in sweep["shapes"]:
        n_features = {"qkv_joined": 6144, "o_proj": 4096, "gate_up_joined": 28672, "down_proj": 4096, "lm_head": 128256}[shape["shape"]]
        planned = gemv_tiles(shape["rows"], n_features, 132)
        timed = [setting for setting in shape["settings"] if "us" in setting]
        (us,) = [setting["us"] for setting in timed if all(setting[key] == value for key, value in planned.items())]
        assert us <= 1.03 * min(setting["us"] for setting in timed), (shape["rows"], shape["shape"], planned)


@pytest.mark.parametrize("element_bytes", [2, 4])
@pytest.mark.parametrize("rows", [1, 2, 16])
@pytest.mark.parametrize("n_features", [1024, 4096, 6144, 28672, 128256])
def test_planned_tiles_fit_in_an_h100s_shared_memory(element_bytes, rows, n_features):
    """Pipelined loads stage (x tile + weight tile) x num_stages in shared memory: at most 227 KiB per
    program on an H100 or H200, for 2-byte and 4-byte (fp32) values alike."""
    tiles = gemv_tiles(rows, n_features, 132, element_bytes)
    x_rows = 1 if rows == 1 else 16
    staged = tiles["num_stages"] * (x_rows + tiles["BLOCK_N"]) * tiles["BLOCK_K"] * element_bytes
    assert staged <= 227 * 1024, tiles


@pytest.mark.gpu
@gpu_test
@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_cuda_graphs_with_every_fusion_give_the_eager_tokens(family):
    model = tiny_model(family).cuda()
    ids = random_ids(2, 40).cuda()
    press = P.AdaptivePress(P.SnapKVPress(0.5, window_size=8), backend="evict")
    _, eager = press_logits_and_tokens(model, ids, press)
    fusions = dict(join_projections=True, fuse_elementwise=True, gemv_linears=True)
    _, graphed, session = press_run(model, ids, press, cuda_graphs=True, **fusions)
    assert torch.equal(graphed, eager)
    assert session.graph_decoder.captures == 1


@pytest.mark.gpu
@gpu_test
def test_bf16_gemv_logits_are_within_rounding_of_torch():
    model = tiny_model("llama").cuda().to(torch.bfloat16)
    ids = random_ids(1, 1).cuda()
    with torch.no_grad():
        plain = model(ids).logits.float()
        with gemv_linears(model):
            routed = model(ids).logits.float()
    assert (routed - plain).abs().max() <= 0.02 * plain.abs().max()
