"""`join_projections=True` (adakv/runtimes/hf/fusion/joined_projections.py): q/k/v and gate/up as one matrix product each,
the same outputs and memory, every parameter restored on exit, clear refusals."""

from __future__ import annotations

import weakref

import pytest
import torch
from conftest import FAMILY_CONFIGS, press_logits_and_tokens, press_run, random_ids, tiny_model
from torch import nn

from adakv import presses as P
from adakv.runtimes.hf.fusion.joined_projections import JOINED_MAX_ROWS, joined_projections, sibling_groups

JOINED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")  # Phi3 stores qkv_proj / gate_up_proj joined


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_joined_projections_give_the_same_outputs_and_restore_every_parameter(family):
    model = tiny_model(family)
    ids = random_ids(2, 40)
    before = snapshot(model)
    expected_logits, expected_tokens = press_logits_and_tokens(model, ids)
    logits, tokens = press_logits_and_tokens(model, ids, join_projections=True)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, expected_tokens)
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, parameter in model.named_parameters():
        assert torch.equal(after[name], before[name]), name
        assert parameter.is_contiguous() and parameter.untyped_storage().nbytes() == parameter.numel() * parameter.element_size(), name
    assert all("forward" not in module.__dict__ for module in model.modules())


@pytest.mark.parametrize("family", JOINED_FAMILIES)
def test_within_the_block_siblings_share_one_matrix_and_one_product(family):
    model = tiny_model(family)
    groups = sibling_groups(model)
    assert len(groups) == 2 * model.config.num_hidden_layers
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    calls = []
    with joined_projections(model) as joined:
        for group in joined:
            storages = {linear.weight.untyped_storage().data_ptr() for linear in group.linears}
            assert storages == {group.weight.untyped_storage().data_ptr()}
        # memory does not grow: every parameter is a view, the joined matrices are the only storages
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
        assert sum(storages.values()) == parameter_bytes
        original_linear = torch.nn.functional.linear
        recording = lambda *args: calls.append(args[1]) or original_linear(*args)  # noqa: E731
        torch.nn.functional.linear = recording  # what the unjoined nn.Linear modules call
        for group in joined:
            assert group.product is original_linear
            group.product = recording
        try:
            with torch.no_grad():
                model(random_ids(1, 9))
        finally:
            torch.nn.functional.linear = original_linear
        used = [id(weight) for weight in calls]
        assert all(used.count(id(group.weight)) == 1 for group in joined)  # one product per group
        sibling_weights = {id(linear.weight) for group in joined for linear in group.linears}
        assert not sibling_weights & set(used)  # and none per sibling


def test_phi3_has_nothing_to_join():
    assert sibling_groups(tiny_model("phi3")) == []


def test_the_joined_product_is_dropped_when_its_input_is_freed():
    model = tiny_model("llama")
    with torch.no_grad(), joined_projections(model) as joined:
        model(random_ids(1, 9))
        assert all(group._last_output is None for group in joined)
        inputs = torch.randn(1, 5, model.config.hidden_size)
        attention = model.model.layers[0].self_attn
        queries = attention.q_proj(inputs)
        keys = attention.k_proj(inputs)  # the same input: served from the product computed for q_proj
        torch.testing.assert_close(queries, inputs @ attention.q_proj.weight.T)
        torch.testing.assert_close(keys, inputs @ attention.k_proj.weight.T)
        assert joined[0]._last_output is not None
        del inputs
        assert joined[0]._last_output is None
        joined_matrices = [weakref.ref(group.weight) for group in joined]
    # the joined matrices are freed on exit although the caller still holds the groups
    assert all(matrix() is None for matrix in joined_matrices) and len(joined) == 6


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: biases on q/k/v
def test_long_inputs_take_each_siblings_own_product_bit_for_bit(family):
    """A prefill (more than JOINED_MAX_ROWS rows) multiplies sibling by sibling: the unjoined model's
    products exactly, and no joined product holding every sibling's output at once."""
    model = tiny_model(family)
    ids = random_ids(2, JOINED_MAX_ROWS // 2 + 1)  # 2 x 65 rows
    with torch.no_grad():
        expected = model(ids).logits
        with joined_projections(model) as joined:
            weights = []
            for group in joined:
                group.product = lambda x, weight, bias: weights.append(weight) or torch.nn.functional.linear(x, weight, bias)
            logits = model(ids).logits
            joined_weights = {id(group.weight) for group in joined}
            assert weights and not joined_weights & {id(weight) for weight in weights}  # never the joined matrix
            assert all(group._last_input is None for group in joined)
    assert torch.equal(logits, expected)


def test_eager_and_emulated_graph_decoding_agree_with_joined_projections():
    model = tiny_model("qwen2")  # biases on q/k/v
    ids = random_ids(1, 40)
    press = P.AdaptivePress(P.SnapKVPress(0.5, window_size=8), backend="evict")
    _, eager = press_logits_and_tokens(model, ids, press)
    _, graphed, session = press_run(model, ids, press, cuda_graphs="emulate", join_projections=True)
    assert torch.equal(graphed, eager)
    assert session.graph_decoder.captures == 1


def test_a_wrapped_projection_is_refused_and_the_model_left_as_it_was():
    model = tiny_model("llama")
    before = snapshot(model)
    wrapped = model.model.layers[1].mlp.up_proj
    wrapped.forward = lambda inputs: nn.Linear.forward(wrapped, inputs)
    with pytest.raises(ValueError, match=r"layer 1's mlp.gate_proj/up_proj .*forward replaced.*join_projections=False"):
        with P.SnapKVPress(0.5)(model, join_projections=True):
            pass
    del wrapped.forward
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad(), P.SnapKVPress(0.5)(model):  # the model still works with a press
        model(random_ids(1, 9))


def test_mismatched_siblings_are_refused():
    model = tiny_model("llama")
    attention = model.model.layers[0].self_attn
    attention.v_proj.bias = nn.Parameter(torch.zeros(attention.v_proj.out_features))
    with pytest.raises(ValueError, match=r"layer 0's self_attn.q_proj/k_proj/v_proj has a bias where a sibling has none"):
        with joined_projections(model):
            pass


def test_a_forward_that_records_gradients_is_refused():
    model = tiny_model("llama")
    with joined_projections(model), pytest.raises(RuntimeError, match="torch.no_grad"):
        model(random_ids(1, 9))
