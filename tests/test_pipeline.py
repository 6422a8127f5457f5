"""The "kv-press-text-generation" pipeline on tiny random models with a character-level tokenizer."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import DynamicCache, PreTrainedTokenizerFast, pipeline
from transformers.pipelines import PIPELINE_REGISTRY

import adakv
import adakv.runtimes.hf.acceleration as accelerate_module
from adakv import AdaptivePress, SnapKVPress, kept_token_counts
from adakv.pipeline import (
    TASK,
    KVPressTextGenerationPipeline,
    answer_from_cache,
    encode_prompt_parts,
    prefill_context,
    split_prompt,
    truncate_context,
)

from conftest import tiny_model

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CONTEXT = "Alice keeps a red kite in the shed; Bob keeps a blue boat by the lake. " * 2
QUESTIONS = ["Who has the kite?", "What colour is the boat?"]


def char_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (ids 3..98), small enough for the tiny models' 128 ids."""
    characters = ["\n"] + [chr(code) for code in range(32, 127)]
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + characters)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_pair(family: str = "llama", chat_template: str | None = CHAT_TEMPLATE):
    model = tiny_model(family)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model, char_tokenizer(chat_template)


def reference_answer(model, tokenizer, context, question, answer_prefix="", max_new_tokens=12) -> str:
    """model.generate's greedy continuation of the pipeline's own prompt tokens."""
    context_text, question_text = split_prompt(tokenizer, context, question, answer_prefix)
    context_ids, (question_ids,) = encode_prompt_parts(tokenizer, context_text, [question_text])
    prompt = torch.cat([context_ids, question_ids], dim=1)
    output = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, prompt.shape[1] :], skip_special_tokens=True).strip()


def context_length(tokenizer, context=CONTEXT, question=QUESTIONS[0]) -> int:
    context_text, _ = split_prompt(tokenizer, context, question)
    return encode_prompt_parts(tokenizer, context_text, [])[0].shape[1]


def test_importing_adakv_registers_the_task():
    assert adakv.KVPressTextGenerationPipeline is KVPressTextGenerationPipeline
    assert TASK in PIPELINE_REGISTRY.get_supported_tasks()
    model, tokenizer = tiny_pair()
    assert isinstance(pipeline(TASK, model=model, tokenizer=tokenizer), KVPressTextGenerationPipeline)


@pytest.mark.parametrize("chat_template", [CHAT_TEMPLATE, None], ids=["chat", "plain"])
def test_split_prompt_cuts_right_after_the_context(chat_template):
    tokenizer = char_tokenizer(chat_template)
    context_text, question_text = split_prompt(tokenizer, CONTEXT, QUESTIONS[0], "Answer:")
    assert context_text.endswith(CONTEXT)
    assert question_text.endswith("Answer:") and QUESTIONS[0] in question_text
    if chat_template is None:
        assert context_text == CONTEXT
    else:
        content = f"{CONTEXT}\n\n{QUESTIONS[0]}"
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        assert context_text + question_text == full + "Answer:"


def test_no_press_answer_equals_generate(family):
    model, tokenizer = tiny_pair(family)
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
    answer = pipe(CONTEXT, question=QUESTIONS[0], answer_prefix="A:", max_new_tokens=12)["answer"]
    assert answer == reference_answer(model, tokenizer, CONTEXT, QUESTIONS[0], "A:", 12)


def test_no_press_answer_equals_generate_without_chat_template():
    model, tokenizer = tiny_pair(chat_template=None)
    answer = pipeline(TASK, model=model, tokenizer=tokenizer)(CONTEXT, question=QUESTIONS[1])["answer"]
    assert answer == reference_answer(model, tokenizer, CONTEXT, QUESTIONS[1], max_new_tokens=50)


@pytest.mark.parametrize("press_factory", [SnapKVPress, lambda ratio: AdaptivePress(SnapKVPress(ratio))], ids=["snapkv", "adaptive"])
def test_press_compresses_the_context_only(press_factory):
    model, tokenizer = tiny_pair()
    cache = DynamicCache()
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
    result = pipe(CONTEXT, question=QUESTIONS[0], press=press_factory(0.5), cache=cache)
    assert isinstance(result["answer"], str)
    n_context = context_length(tokenizer)
    assert cache.get_seq_length() == n_context  # the question and answer were rolled back
    counts = kept_token_counts(cache)
    assert sorted(counts) == list(range(model.config.num_hidden_layers))
    for layer_counts in counts.values():  # every layer keeps half of the context in total
        assert int(layer_counts.sum()) == round(n_context * 0.5) * model.config.num_key_value_heads
    assert model.config._attn_implementation == "sdpa"  # the press's block was left


def test_press_changes_the_answer_compared_to_no_press():
    model, tokenizer = tiny_pair()
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
    plain = [pipe(CONTEXT, question=q, max_new_tokens=20)["answer"] for q in QUESTIONS]
    pressed = [pipe(CONTEXT, question=q, max_new_tokens=20, press=SnapKVPress(0.9))["answer"] for q in QUESTIONS]
    assert plain != pressed


def test_questions_are_answered_from_one_compressed_context():
    model, tokenizer = tiny_pair()
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
    press = AdaptivePress(SnapKVPress(compression_ratio=0.6))
    cache = DynamicCache()
    questions = [QUESTIONS[0], QUESTIONS[1], QUESTIONS[0]]
    answers = pipe(CONTEXT, questions=questions, press=press, cache=cache, max_new_tokens=15)["answers"]
    assert len(answers) == 3 and answers[0] == answers[2]
    one_at_a_time = [pipe(CONTEXT, question=q, press=press, max_new_tokens=15)["answer"] for q in QUESTIONS]
    assert answers[:2] == one_at_a_time
    assert cache.get_seq_length() == context_length(tokenizer)


def test_answer_from_cache_rolls_back_to_the_context():
    model, tokenizer = tiny_pair()
    context_text, question_text = split_prompt(tokenizer, CONTEXT, QUESTIONS[0])
    context_ids, (question_ids,) = encode_prompt_parts(tokenizer, context_text, [question_text])
    press, cache = SnapKVPress(compression_ratio=0.5), DynamicCache()
    with press(model):
        prefill_context(model, cache, context_ids)
        before = {layer: counts.clone() for layer, counts in kept_token_counts(cache).items()}
        first = answer_from_cache(model, tokenizer, cache, question_ids, 10)
        assert cache.get_seq_length() == context_ids.shape[1]
        second = answer_from_cache(model, tokenizer, cache, question_ids, 10)
    assert first == second
    after = kept_token_counts(cache)
    assert all(torch.equal(before[layer], after[layer]) for layer in before)


def test_max_context_length_keeps_the_start_of_the_context():
    model, tokenizer = tiny_pair()
    assert truncate_context(tokenizer, CONTEXT, 20) == CONTEXT[:20]  # one token per character
    assert truncate_context(tokenizer, CONTEXT, 10_000) == CONTEXT
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
    truncated = pipe(CONTEXT, question=QUESTIONS[0], max_context_length=20)["answer"]
    assert truncated == pipe(CONTEXT[:20], question=QUESTIONS[0])["answer"]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(context=""), ValueError),
        (dict(context="   \n"), ValueError),
        (dict(context=None), TypeError),
        (dict(question="q", questions=["q"]), ValueError),
        (dict(questions="who?"), TypeError),
        (dict(questions=["who?", 3]), TypeError),
        (dict(questions=[]), ValueError),
        (dict(question=3), TypeError),
        (dict(press="snapkv"), TypeError),
        (dict(press=SnapKVPress), TypeError),
        (dict(max_new_tokens=0), ValueError),
        (dict(max_context_length=0), ValueError),
        (dict(cache="cache"), TypeError),
        (dict(temperature=0.7), TypeError),
    ],
    ids=lambda value: repr(value) if not isinstance(value, dict) else "-".join(value),
)
def test_bad_input_is_refused(kwargs, error):
    model, tokenizer = tiny_pair()
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
    kwargs = {"context": CONTEXT, **kwargs}
    with pytest.raises(error):
        pipe(kwargs.pop("context"), **kwargs)


@pytest.mark.parametrize("press", [None, SnapKVPress(compression_ratio=0.5)], ids=["no press", "default press"])
def test_an_empty_context_says_a_token_is_needed(press):
    model, tokenizer = tiny_pair()
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="context is empty: at least one token is needed"):
        pipe("", question=QUESTIONS[0], press=press)
    empty_ids = torch.zeros(1, 0, dtype=torch.long)  # e.g. a context that encodes to no token
    with pytest.raises(ValueError, match="at least one token is needed"):
        prefill_context(model, DynamicCache(), empty_ids, press)
    with pytest.raises(ValueError, match="at least one token is needed"):
        prefill_context(model, DynamicCache(), empty_ids, press, chunk_size=8)


def test_a_cache_that_is_not_empty_is_refused():
    model, tokenizer = tiny_pair()
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
    cache = DynamicCache()
    pipe(CONTEXT, question=QUESTIONS[0], cache=cache)
    with pytest.raises(ValueError, match="empty"):
        pipe(CONTEXT, question=QUESTIONS[0], cache=cache)


def test_rollback_restores_sliding_window_layers():
    # A cache built from Gemma3's config has sliding-window layers, which forget their oldest tokens.
    model, tokenizer = tiny_pair("gemma3")
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
    cache = DynamicCache(config=model.config)
    assert any(getattr(layer, "is_sliding", False) for layer in cache.layers)
    answers = pipe(CONTEXT, questions=[QUESTIONS[0], QUESTIONS[1], QUESTIONS[0]], cache=cache)["answers"]
    assert [layer.get_seq_length() for layer in cache.layers] == [context_length(tokenizer)] * len(cache.layers)
    fresh = DynamicCache(config=model.config)
    pipe(CONTEXT, question=QUESTIONS[0], cache=fresh)
    for layer, fresh_layer in zip(cache.layers, fresh.layers):
        assert torch.equal(layer.keys, fresh_layer.keys)
    assert answers[:2] == [pipe(CONTEXT, question=q)["answer"] for q in QUESTIONS]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_evict_and_mask_give_the_same_pipeline_answers(family):
    model, tokenizer = tiny_pair(family)
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
    answers = {}
    for backend in ("mask", "evict"):
        cache = DynamicCache()
        press = AdaptivePress(SnapKVPress(compression_ratio=0.6), backend=backend)
        answers[backend] = pipe(CONTEXT, questions=QUESTIONS, press=press, cache=cache, max_new_tokens=15)["answers"]
        assert cache.get_seq_length() == context_length(tokenizer)  # rolled back after every answer
    assert answers["evict"] == answers["mask"]


def test_graph_decoded_answers_equal_eager_answers(monkeypatch):
    """The pipeline's cuda_graphs switch (its CPU emulation here): the same answers, one capture serving every
    question (each answer is rolled back in place, so the layout and the captured step stay valid)."""
    model, tokenizer = tiny_pair()
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
    press = AdaptivePress(SnapKVPress(compression_ratio=0.6), backend="evict")
    questions = [QUESTIONS[0], QUESTIONS[1], QUESTIONS[0]]
    eager = pipe(CONTEXT, questions=questions, press=press, max_new_tokens=15)["answers"]
    graph_decoders = []  # the graph decoder of the pipeline's accelerate block
    make_decoder = accelerate_module.graph_decoder_for
    monkeypatch.setattr(accelerate_module, "graph_decoder_for", lambda *args: graph_decoders.append(make_decoder(*args)) or graph_decoders[-1])
    graphed = pipe(CONTEXT, questions=questions, press=press, max_new_tokens=15, cuda_graphs="emulate")["answers"]
    assert graphed == eager
    assert len(graph_decoders) == 1 and graph_decoders[0].captures == 1 and graph_decoders[0].replays > 20
    with pytest.raises(ValueError, match="pass a press too"):
        pipe(CONTEXT, question=QUESTIONS[0], cuda_graphs=True)


def test_joined_projections_give_the_same_answers_with_and_without_a_press():
    model, tokenizer = tiny_pair()
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
    press = AdaptivePress(SnapKVPress(compression_ratio=0.6), backend="evict")
    for with_press in (press, None):
        plain = pipe(CONTEXT, questions=QUESTIONS, press=with_press, max_new_tokens=15)["answers"]
        joined = pipe(CONTEXT, questions=QUESTIONS, press=with_press, max_new_tokens=15, join_projections=True)
        assert joined["answers"] == plain
    assert all("forward" not in module.__dict__ for module in model.modules())


@pytest.mark.parametrize("switch, message", [("fuse_elementwise", "Triton kernels on CUDA"), ("gemv_linears", "Triton kernel on CUDA")])
def test_triton_fusions_are_refused_on_a_cpu_model_with_and_without_a_press(switch, message):
    model, tokenizer = tiny_pair()
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer, device="cpu")  # (a GPU machine's default is CUDA)
    for with_press in (SnapKVPress(compression_ratio=0.5), None):
        with pytest.raises(ValueError, match=f"{switch} runs (a )?{message}"):
            pipe(CONTEXT, question=QUESTIONS[0], press=with_press, **{switch: True})
    assert all("forward" not in module.__dict__ for module in model.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_fusion_in_cuda_graphs_gives_the_eager_answers_on_the_gpu():
    model, tokenizer = tiny_pair()
    model = model.cuda()
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer, device=model.device)
    press = AdaptivePress(SnapKVPress(compression_ratio=0.6), backend="evict")
    eager = pipe(CONTEXT, questions=QUESTIONS, press=press, max_new_tokens=15)["answers"]
    fastest = pipe(CONTEXT, questions=QUESTIONS, press=press, max_new_tokens=15,
                   cuda_graphs=True, join_projections=True, fuse_elementwise=True, gemv_linears=True)["answers"]  # fmt: skip
    assert fastest == eager
