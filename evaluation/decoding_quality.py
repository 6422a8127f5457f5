"""Quality of compression during decoding on a long-answer task (the embedded SmolLM2, CPU is enough).

SmolLM2 summarises ~400 tokens of Paul Graham essays "paragraph by paragraph" and writes --answer tokens
greedily with the full cache. Each decoding press then reads that same answer back token by token
(teacher forcing) while it compresses the cache as it would during generation, and we report the mean
negative log-likelihood of the answer's tokens and how often its greedy pick equals them (1.0 = it would
have written the same answer). A press that loses nothing matters scores the full cache's figures.

    python -m adakv.evaluation.decoding_quality --answer 200 --out evaluation/results/decoding_quality.json
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import DynamicCache

from adakv import AdaptivePress, DecodingPress, SnapKVPress, StreamingLLMPress, load_default_model
from adakv.apps.demo import haystack

INSTRUCTION = "\n\nSummarise the essay above in detail, paragraph by paragraph."


def decoding_presses(interval: int, targets: list[int]) -> dict:
    presses = {"none": None}
    for target in targets:
        for name, scorer in (
            ("ada_snapkv", AdaptivePress(SnapKVPress(window_size=16))),
            ("snapkv", SnapKVPress(window_size=16)),
            ("streaming_llm", StreamingLLMPress()),
        ):
            presses[f"decoding_{name}_t{target}"] = DecodingPress(
                scorer, compression_interval=interval, target_size=target, backend="evict"
            )
    return presses


def read_back(model, prompt_ids: torch.Tensor, answer: torch.Tensor, press) -> dict:
    """Feed `answer` (n,) after the prompt under `press`; mean NLL of its tokens and greedy agreement."""
    cache = DynamicCache(config=model.config)
    nll, agree = 0.0, 0
    with torch.no_grad(), (press(model) if press is not None else nullcontext()):
        logits = model(prompt_ids, past_key_values=cache, logits_to_keep=1).logits[0, -1]
        for token in answer:
            log_probs = logits.float().log_softmax(-1)
            nll -= log_probs[token].item()
            agree += int(log_probs.argmax() == token)
            logits = model(token.view(1, 1), past_key_values=cache).logits[0, -1]
    return dict(nll=nll / len(answer), agreement=agree / len(answer), final_length=cache.get_seq_length())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=400, help="essay tokens")
    parser.add_argument("--answer", type=int, default=200, help="answer tokens written with the full cache")
    parser.add_argument("--interval", type=int, default=32)
    parser.add_argument("--targets", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--out", type=Path, default=Path("evaluation/results/decoding_quality.json"))
    args = parser.parse_args()
    model, tokenizer = load_default_model()
    messages = [{"role": "user", "content": haystack(tokenizer, args.context, needle="") + INSTRUCTION}]
    prompt_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).input_ids
    with torch.no_grad():
        output = model.generate(prompt_ids, max_new_tokens=args.answer, min_new_tokens=args.answer, do_sample=False)
    answer = output[0, prompt_ids.shape[1] :]
    results = dict(
        config=dict(vars(args), out=str(args.out), prompt_tokens=prompt_ids.shape[1]),
        answer=tokenizer.decode(answer),
        presses={},
    )
    for name, press in decoding_presses(args.interval, args.targets).items():
        start = time.perf_counter()
        results["presses"][name] = read_back(model, prompt_ids, answer, press)
        results["presses"][name]["seconds"] = round(time.perf_counter() - start, 1)
        print(name, results["presses"][name], flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
