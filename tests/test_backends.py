"""Which backend a press uses: evict by default, mask on request or as a warned fallback, one rule for
composed presses; and the clear error for an input of 0 tokens."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import random_ids, tiny_model
from transformers import DynamicCache

from adakv import presses as P
from adakv.cache import BackendFallbackWarning, MaskedLayer, compressed_layers, evict_refusal
from adakv.cache.flat import FlatHeadwiseLayer


def compressed_layer_types(model, press, ids=None, attention_mask=None) -> set[type]:
    """Prefill `ids` inside `with press(model):`; the types of the layers the press compressed."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(random_ids(1, 40) if ids is None else ids, attention_mask=attention_mask, past_key_values=cache)
    return {type(layer) for layer in compressed_layers(cache).values()}


def softcapping_model():
    """Gemma3 (eager, which applies softcapping) with attention logits capped at 50."""
    model = tiny_model("gemma3", "eager")
    model.config.attn_logit_softcapping = 50.0
    return model


# ---------------------------------------------------------------- the default evicts


@pytest.mark.parametrize("make_press", [
    lambda: P.SnapKVPress(0.5, window_size=8),
    lambda: P.AdaptivePress(P.SnapKVPress(0.5, window_size=8)),
    lambda: P.ComposedPress([P.KnormPress(0.25), P.StreamingLLMPress(0.5)]),
], ids=["snapkv", "adaptive", "composed"])
def test_a_press_without_backend_evicts_on_every_family(family, make_press):
    press = make_press()
    assert press.backend is None and press.resolved_backend == "evict"
    model = tiny_model(family)
    ids = random_ids(2, 40)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :7] = 0  # a left-padded batch
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)  # no fallback on these models
        assert compressed_layer_types(model, press) == {FlatHeadwiseLayer}
        assert compressed_layer_types(model, press, ids, attention_mask) == {FlatHeadwiseLayer}


@pytest.mark.parametrize("make_press, ratio", [
    (lambda: P.SnapKVPress(0.75, window_size=8), 0.75),
    (lambda: P.AdaptivePress(P.SnapKVPress(0.75, window_size=8)), 0.75),
    (lambda: P.KnormPress(0.5), 0.5),
], ids=["snapkv", "adaptive", "knorm"])
def test_a_default_press_really_frees_memory(make_press, ratio):
    """Held bytes <= (1 - r) x dense + slack, where the slack allowance of each layer is what a
    freshly compressed FlatHeadwiseLayer adds on top of its kept rows: `min_slack` free rows per
    (batch, KV head) for later tokens, plus its metadata (4 int64 vectors of one entry per (batch, KV
    head)). Here (llama: 2 KV heads, head_dim 16, float32, batch 2, 1000 tokens) that is 64 x 4 rows x
    128 bytes + 128 bytes = 32896 bytes per layer against 512000 dense bytes, about 6.4%."""
    model = tiny_model("llama")
    ids = random_ids(2, 1000)
    dense = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=dense)
    dense_bytes = sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in dense.layers)

    cache = DynamicCache(config=model.config)
    with torch.no_grad(), make_press()(model):
        model(ids, past_key_values=cache)
    layers = list(compressed_layers(cache).values())
    assert len(layers) == len(dense.layers) and all(isinstance(layer, FlatHeadwiseLayer) for layer in layers)
    held = sum(layer.held_bytes() for layer in layers)
    allowance = sum(layer.min_slack * layer.num_sequences * layer.row_bytes + layer.metadata_bytes() for layer in layers)
    assert allowance == len(layers) * (64 * 4 * 128 + 4 * 4 * 8)
    assert held <= (1 - ratio) * dense_bytes + allowance
    assert held < (1 - ratio + 0.07) * dense_bytes  # the allowance is small next to what was freed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_default_press_frees_memory_on_cuda():
    from test_gpu import small_llama  # bf16 llama on CUDA

    model = small_llama()
    ids = torch.randint(3, 1000, (2, 2000), device="cuda")
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :100] = 0
    dense_bytes = 2 * 2 * 2000 * 2 * 64 * 2 * model.config.num_hidden_layers  # K+V, batch, seq, heads, dim, bf16
    press = P.AdaptivePress(P.SnapKVPress(0.75, window_size=32))
    with torch.no_grad(), press(model):
        output = model.generate(ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False,
                                pad_token_id=0, return_dict_in_generate=True)  # fmt: skip
    layers = list(compressed_layers(output.past_key_values).values())
    assert len(layers) == model.config.num_hidden_layers
    assert all(isinstance(layer, FlatHeadwiseLayer) and layer.device.type == "cuda" for layer in layers)
    allowance = sum(layer.slack * layer.num_sequences * layer.row_bytes + layer.metadata_bytes() for layer in layers)
    assert sum(layer.held_bytes() for layer in layers) <= 0.25 * dense_bytes + allowance


# ---------------------------------------------------------------- fallback and explicit evict


def test_evict_refusal_names_softcapping():
    assert evict_refusal(tiny_model("gemma3").config) is None
    assert "attn_logit_softcapping=50.0" in evict_refusal(softcapping_model().config)


@pytest.mark.parametrize("make_press", [
    lambda: P.SnapKVPress(0.5, window_size=8),
    lambda: P.AdaptivePress(P.SnapKVPress(0.5, window_size=8)),
], ids=["snapkv", "adaptive"])
def test_an_unset_backend_falls_back_to_mask_with_one_warning(make_press):
    model = softcapping_model()
    ids = random_ids(1, 40)
    press = make_press()
    with pytest.warns(BackendFallbackWarning) as record:
        with torch.no_grad(), press(model):
            output = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    fallbacks = [item for item in record if issubclass(item.category, BackendFallbackWarning)]
    assert len(fallbacks) == 1
    message = str(fallbacks[0].message)
    assert type(press).__name__ in message and "attn_logit_softcapping" in message and "backend='mask'" in message
    layers = compressed_layers(output.past_key_values)
    assert layers and all(isinstance(layer, MaskedLayer) for layer in layers.values())

    press.backend = "mask"  # the same press asking for masks: the same answer, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        with torch.no_grad(), press(model):
            reference = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(output.sequences, reference)


def test_an_explicit_evict_is_refused_before_any_forward():
    model = softcapping_model()
    forwards = []
    handle = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    press = P.AdaptivePress(P.SnapKVPress(0.5), backend="evict")
    with pytest.raises(NotImplementedError, match="backend='evict' cannot serve this model.*softcapping"):
        with press(model):
            model(random_ids(1, 40))
    handle.remove()
    assert forwards == [] and model.config._attn_implementation == "eager"


# ---------------------------------------------------------------- one backend per composed press


WRAPPERS = {
    "adaptive": lambda inner, **kw: P.AdaptivePress(inner, **kw),
    "critical": lambda inner, **kw: P.CriticalKVPress(inner, **kw),
    "chunk": lambda inner, **kw: P.ChunkPress(inner, chunk_length=16, **kw),
    "key_rerotation": lambda inner, **kw: P.KeyRerotationPress(inner, **kw),
    "per_layer": lambda inner, **kw: P.PerLayerCompressionPress(inner, [0.5, 0.5, 0.5], **kw),
    "composed": lambda inner, **kw: P.ComposedPress([P.KnormPress(0.25), inner], **kw),
    "adaptive_critical": lambda inner, **kw: P.AdaptivePress(P.CriticalKVPress(inner), **kw),
}
EXPECTED_LAYER = {"mask": MaskedLayer, "evict": FlatHeadwiseLayer}


@pytest.mark.parametrize("backend", ["mask", "evict"])
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_a_wrapper_without_backend_takes_the_inner_one(wrapper, backend):
    press = WRAPPERS[wrapper](P.SnapKVPress(0.5, window_size=8, backend=backend))
    assert press.backend is None and press.explicit_backend == backend
    assert compressed_layer_types(tiny_model("llama"), press) == {EXPECTED_LAYER[backend]}


@pytest.mark.parametrize("backend", ["mask", "evict"])
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_an_inner_press_without_backend_runs_with_the_wrapper_one(wrapper, backend):
    press = WRAPPERS[wrapper](P.SnapKVPress(0.5, window_size=8), backend=backend)
    assert press.explicit_backend == backend
    assert compressed_layer_types(tiny_model("llama"), press) == {EXPECTED_LAYER[backend]}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_conflicting_backends_name_both_presses(wrapper):
    with pytest.raises(ValueError, match=r"conflicting backends: .*Press\(backend='mask'\) and .*Press\(backend='evict'\)"):
        WRAPPERS[wrapper](P.SnapKVPress(0.5, backend="evict"), backend="mask")


def test_the_issue_example_names_both():
    with pytest.raises(ValueError, match=r"AdaptivePress\(backend='mask'\) and SnapKVPress\(backend='evict'\)"):
        P.AdaptivePress(P.SnapKVPress(compression_ratio=0.5, backend="evict"), backend="mask")


def test_composed_members_that_disagree_are_refused():
    with pytest.raises(ValueError, match=r"KnormPress\(backend='evict'\) and SnapKVPress\(backend='mask'\)"):
        P.ComposedPress([P.KnormPress(0.25, backend="evict"), P.SnapKVPress(0.5, backend="mask")])
    agreeing = P.ComposedPress([P.KnormPress(0.25, backend="mask"), P.SnapKVPress(0.5, window_size=8)])
    assert agreeing.explicit_backend == "mask"
    assert compressed_layer_types(tiny_model("llama"), agreeing) == {MaskedLayer}


def test_the_same_backend_at_every_level_is_no_conflict():
    press = P.KeyRerotationPress(P.AdaptivePress(P.SnapKVPress(0.5, backend="mask"), backend="mask"), backend="mask")
    assert press.explicit_backend == "mask"


def test_a_conflict_made_after_construction_is_refused_at_the_block():
    inner = P.SnapKVPress(0.5)
    press = P.AdaptivePress(inner, backend="mask")
    inner.backend = "evict"
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="conflicting backends"):
        with press(model):
            pass
    assert model.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------- 0 tokens


@pytest.mark.parametrize("backend", [None, "mask"])
def test_an_empty_prompt_inside_a_press_says_a_token_is_needed(backend):
    model = tiny_model("llama")
    press = P.SnapKVPress(0.5, backend=backend)
    empty = torch.zeros(1, 0, dtype=torch.long)
    with torch.no_grad(), press(model):
        with pytest.raises(ValueError, match="0 tokens.*at least one token is needed"):
            model(empty, past_key_values=DynamicCache(config=model.config))
        with pytest.raises(ValueError, match="at least one token is needed"):
            model.generate(empty, max_new_tokens=2)
        # the block still works after the refusal
        model(random_ids(1, 20), past_key_values=DynamicCache(config=model.config))
    assert model.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------- the demo and the evaluation follow the default


def test_demo_and_evaluation_leave_the_backend_unset():
    import argparse

    from adakv.apps.demo import add_arguments, demo_presses
    from adakv.evaluation import registry
    from adakv.evaluation.cli import build_parser, config_from_args

    demo_parser = argparse.ArgumentParser()
    add_arguments(demo_parser)
    demo_backend = demo_parser.parse_args([]).backend
    assert demo_backend is None
    assert all(press.resolved_backend == "evict" for _, _, press in demo_presses([0.5], demo_backend) if press)
    config = config_from_args(build_parser().parse_args(["run", "--out", "unused"]))
    assert config.backend is None
    press = registry.build_press("adakv_snapkv", 0.5, config.backend)
    assert press.backend is None and press.press.backend is None and press.resolved_backend == "evict"
    assert registry.build_press("adakv_snapkv", 0.5, "mask").explicit_backend == "mask"
