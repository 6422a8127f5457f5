"""Where one sample of the evaluation's sweep spends its time: the runner's fast path one setting at a time (as
before batched answers) against batched answers, on the same sample and settings, with the answers compared.

Phases (seconds, the device synchronised around each):
- generate: building the sample's text (CPU: the tokenizer sizes the haystack);
- dense_prefill: the one prefill of the context (RecordingPress);
- one at a time, per setting: `compress` (the setting's cache from the dense prefill, inside its press block;
  "before" means without the score memo shared across ratios, KVzip's scores shared as they always were) and
  `answer` (question + greedy decode), with the forwards that produced logits (`forwards`: question and steps);
- batched: `compress` per setting (score memo on) and one `decode` of every setting that stacks, with its forwards.

    python benchmarks/profile_eval_sample.py --model smollm2 --context-length 2048 --threads 1        # CPU
    python benchmarks/profile_eval_sample.py --model qwen2.5-coder-1.5b --context-length 16384 --device cuda \\
        --cuda-graphs --fused-decode                                                                 # H200

Writes profile_eval_sample_<model>_<context>_<device>.json (every setting's row and the totals) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from adakv.evaluation import engine, registry, tasks  # noqa: E402
from adakv.evaluation.runner import load_model  # noqa: E402
from adakv.pipeline import answer_from_cache  # noqa: E402

# the sweep's presses (scripts/gpu_eval_sweep.py) and ratios
PRESSES = ["snapkv", "adakv_snapkv", "adakv_model_snapkv", "pyramidkv", "adakv_pyramidkv", "expected_attention",
           "streaming_llm", "kvzip", "adakv_kvzip", "adakv_model_kvzip", "cur", "adakv_cur", "keydiff", "adakv_keydiff"]
RATIOS = [0.5, 0.75, 0.875, 0.9375]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, function, *args):
    sync(device)
    start = time.perf_counter()
    result = function(*args)
    sync(device)
    return result, time.perf_counter() - start


class ForwardCounter:
    """Counts the model's forwards that compute logits (question prefills and decode steps, not KVzip's replay)."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.get_output_embeddings().register_forward_hook(self._hook)

    def _hook(self, *args):
        self.count += 1


def one_at_a_time(model, tokenizer, dense, settings, question_ids, max_new_tokens, args, device):
    rows = []
    counter = ForwardCounter(model)
    for name, ratio in settings:
        press = registry.build_press(name, ratio)
        # before the score memo: only KVzip's scores were shared across the settings of a prefill
        for key in [key for key in dense.memo if key[0] != "kvzip"]:
            del dense.memo[key]
        engine.attach_tokenizer(press, tokenizer)
        with engine.active(press, model, args.cuda_graphs, args.fused_decode):
            cache, compress = timed(device, engine.compressed_cache, dense, press)
            counter.count = 0
            answer, seconds = timed(device, answer_from_cache, model, tokenizer, cache, question_ids, max_new_tokens)
        rows.append({"press": name, "ratio": ratio, "compress_s": compress, "answer_s": seconds,
                     "forwards": counter.count, "answer": answer})
        del cache
    counter.handle.remove()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--context-length", type=int, default=2048)
    parser.add_argument("--task", default="niah_multivalue")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--fused-decode", action="store_true")
    parser.add_argument("--presses", nargs="+", default=PRESSES)
    parser.add_argument("--ratios", nargs="+", type=float, default=RATIOS)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    (model, tokenizer), load_s = timed(args.device, load_model, args.model, args.device, args.dtype)
    device = next(model.parameters()).device
    haystack = tasks.Haystack(tokenizer)
    settings = [(name, ratio) for name in args.presses for ratio in args.ratios]
    result = {"model": args.model, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              platform.machine(), "threads": torch.get_num_threads(), "context_length": args.context_length,
              "task": args.task, "cuda_graphs": args.cuda_graphs, "fused_decode": args.fused_decode,
              "load_s": load_s, "settings": len(settings)}
    with torch.no_grad():
        # on CUDA a warm-up sample (another index) first, so that first-use costs (kernels, captures) stay out
        for index, label in ((1, "warm-up"), (0, "timed")) if device.type == "cuda" else ((0, "timed"),):
            sample, generate_s = timed(device, tasks.generate, args.task, index, haystack, args.context_length, 0)
            context_ids, question_ids = engine.encode_prompt(tokenizer, sample, device)
            dense, prefill_s = timed(device, engine.dense_prefill, model, context_ids)
            none = one_at_a_time(model, tokenizer, dense, [("none", 0.0)], question_ids, sample.max_new_tokens, args,
                                 device)
            alone = one_at_a_time(model, tokenizer, dense, settings, question_ids, sample.max_new_tokens, args, device)
            dense = engine.dense_prefill(model, context_ids)  # a fresh memo: the batched path scores afresh
            presses = [registry.build_press(name, ratio) for name, ratio in settings]
            counter = ForwardCounter(model)
            (answers, compress, decode_s), batched_s = timed(
                device, engine.batched_fast_answers, model, tokenizer, dense, presses, question_ids,
                sample.max_new_tokens, args.cuda_graphs, args.fused_decode)  # fmt: skip
            counter.handle.remove()
            print(f"{label} sample done", flush=True)
        kvzip_first = next((row for row in alone if "kvzip" in row["press"]), None)
        result.update({
            "context_tokens": int(context_ids.shape[1]), "question_tokens": int(question_ids.shape[1]),
            "max_new_tokens": sample.max_new_tokens, "generate_s": generate_s, "dense_prefill_s": prefill_s,
            "none": none[0],
            "one_at_a_time": {
                "compress_s": sum(row["compress_s"] for row in alone), "answer_s": sum(row["answer_s"] for row in alone),
                "forwards": sum(row["forwards"] for row in alone),
                "kvzip_first_compress_s": None if kvzip_first is None else kvzip_first["compress_s"],
            },
            "batched": {"compress_s": sum(compress), "decode_s": decode_s, "forwards": counter.count,
                        "total_s": batched_s, "stacked": sum(answer is not None for answer in answers)},
            "answers_equal": [row["answer"] == answer for row, answer in zip(alone, answers)],
            "rows": [dict(row, batched_compress_s=c, batched_answer=a) for row, c, a in zip(alone, compress, answers)],
        })
    one, batch = result["one_at_a_time"], result["batched"]
    print(f"{args.model} {result['context_tokens']} tokens on {result['device']}: generate {generate_s:.3f} s, "
          f"dense prefill {prefill_s:.3f} s, none {none[0]['compress_s'] + none[0]['answer_s']:.3f} s")
    print(f"one at a time, {len(settings)} settings: compress {one['compress_s']:.2f} s (KVzip's first "
          f"{one['kvzip_first_compress_s'] or 0:.2f} s), answer {one['answer_s']:.2f} s, {one['forwards']} forwards")
    print(f"batched: compress {batch['compress_s']:.2f} s, decode {batch['decode_s']:.2f} s, {batch['forwards']} "
          f"forwards; answers equal {sum(result['answers_equal'])}/{len(settings)}")
    os.makedirs(args.out, exist_ok=True)
    name = f"profile_eval_sample_{args.model}_{args.context_length}_{device.type}.json"
    with open(os.path.join(args.out, name), "w") as handle:
        json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
