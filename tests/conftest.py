"""Shared fixtures: tiny randomly initialised models of every supported family."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

# Triton kernels alone run on a GPU, or on CPU under TRITON_INTERPRET=1 with triton installed (fp32 there)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_test = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or (TRITON_DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton and a CUDA device (or TRITON_INTERPRET=1)",
)


# the vLLM environment (scripts/setup_vllm.sh: vLLM's CPU build, torch 2.11, Triton) that serving and kernel tests run in
VLLM_PYTHON = Path(os.environ.get("ADAKV_VLLM_PYTHON", Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"))


def vllm_python(needs: str) -> Path:
    """VLLM_PYTHON for a test that runs in the vLLM environment: skipped under ADAKV_SKIP_VLLM=1, saying what
    `needs` it; failed when the environment is missing."""
    if os.environ.get("ADAKV_SKIP_VLLM") == "1":
        pytest.skip(f"ADAKV_SKIP_VLLM=1: {needs}")
    if not VLLM_PYTHON.exists():
        pytest.fail(f"no vLLM environment at {VLLM_PYTHON}: run `bash scripts/setup_vllm.sh` (or set ADAKV_SKIP_VLLM=1)")
    return VLLM_PYTHON


def skip_bf16_when_interpreted(dtype: torch.dtype) -> None:
    if TRITON_DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter rounds bf16 differently from the GPU")


COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

FAMILY_CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
    "phi3": lambda: Phi3Config(**COMMON, pad_token_id=0),
    # Gemma3: layers 0 and 1 slide over 8 tokens, layer 2 attends to everything.
    "gemma3": lambda: Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3},
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    ),
}


def tiny_model(family: str = "llama", attn_implementation: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    config = FAMILY_CONFIGS[family]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


@pytest.fixture(params=sorted(FAMILY_CONFIGS))
def family(request) -> str:
    return request.param


def random_ids(batch: int = 1, seq_len: int = 48, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, COMMON["vocab_size"], (batch, seq_len), generator=generator)


def assert_backends_agree(mask_run, evict_run) -> None:
    """`mask_run` / `evict_run`: (list of logits, cache) of the same run with backend "mask" and "evict":
    the same logits (fp32 tolerance) and the same kept counts per compressed layer and head."""
    from adakv import kept_token_counts

    (mask_logits, mask_cache), (evict_logits, evict_cache) = mask_run, evict_run
    for expected, actual in zip(mask_logits, evict_logits):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    mask_counts, evict_counts = kept_token_counts(mask_cache), kept_token_counts(evict_cache)
    assert mask_counts.keys() == evict_counts.keys() and mask_counts
    for index in mask_counts:
        assert torch.equal(mask_counts[index], evict_counts[index])


def press_logits_and_tokens(model, ids, press=None, max_new_tokens: int = 12, **call_options):
    """Logits of `ids` and `max_new_tokens` greedy tokens, inside press(model, **call_options)
    (default press: AdaptivePress(SnapKV 0.5))."""
    logits, tokens, _ = press_run(model, ids, press, max_new_tokens, **call_options)
    return logits, tokens


def press_run(model, ids, press=None, max_new_tokens: int = 12, **call_options):
    """`press_logits_and_tokens` and the block's session (its graph_decoder counts captures and replays)."""
    from adakv import presses as P

    press = press or P.AdaptivePress(P.SnapKVPress(0.5, window_size=8))
    with torch.no_grad(), press(model, **call_options) as session:
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return logits, tokens, session
