"""The evaluation's needle tasks answered from a compressed cache in vLLM and in adakv's transformers
runtime, with the same press, the same prompts and the same greedy decoding; optionally one OpenAI-style
request to `vllm serve` with the plugin.

Query-aware: the question is part of the prompt that is compressed (vLLM sees a request as one prompt).
Per sample: the answers of vLLM compressed, vLLM dense (the same engine, `compression_ratio` 0 for that
request) and the transformers runtime compressed (`ServingPress.build()`, the press vLLM runs), scored
by the evaluation's string match, and the share of the transformers runtime's kept (layer, KV head, token)
pairs that vLLM keeps too (`kept_overlap`). Writes a JSON with per-sample answers, scores, overlaps, the
seconds of each phase and provenance.

Run in the vLLM environment (vLLM and transformers both there; `bash scripts/setup_vllm.sh` on CPU):

    .venv-vllm/bin/python scripts/serve_vllm_needle.py --model ~/.cache/adakv/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M \
        --context-length 1024 --samples 8 --out benchmarks/results/serve_vllm_needle_cpu.json
    python scripts/serve_vllm_needle.py --model DIR --device cuda --context-length 16384 --samples 40 --server
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
# vLLM's CPU worker leaves one core to the front end by default; offline, the front end waits while the worker runs
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def build_samples(tokenizer, tasks: list[str], context_length: int, samples: int, seed: int) -> list[dict]:
    from adakv.evaluation.tasks import Haystack, generate
    from adakv.pipeline.text_generation import split_prompt

    haystack = Haystack(tokenizer)
    built = []
    for task in tasks:
        for index in range(samples):
            sample = generate(task, index, haystack, context_length, seed=seed, query_aware=True)
            context_text, question_text = split_prompt(tokenizer, sample.context, sample.question, sample.answer_prefix)
            ids = tokenizer(context_text + question_text, add_special_tokens=False).input_ids
            built.append(dict(task=task, index=index, ids=ids, answers=sample.answers, max_new_tokens=sample.max_new_tokens))
    return built


def recording_kept_sets(press, kept: list[dict]):
    """`press` with its `compress` wrapped to append, per call of a batch-1 prompt, {layer: per KV head the
    kept positions} into the dict `kept[-1]` (the caller appends one dict per sample)."""
    import torch

    compress = press.compress

    def recorded(context):
        keep = compress(context)
        mask = context.available if keep is None else keep
        kept[-1][context.layer_idx] = [torch.nonzero(head).flatten().tolist() for head in mask[0]]
        return keep

    press.compress = recorded
    return press


def transformers_answers(model_path: str, device: str, samples: list[dict], setting) -> tuple[list, list]:
    """Greedy answers of the transformers runtime with `setting`'s press, and the kept sets per sample."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    answers, kept = [], []
    with torch.no_grad():
        for sample in samples:
            ids = torch.tensor([sample["ids"]], device=device)
            kept.append({})
            with recording_kept_sets(setting.build(), kept)(model):
                out = model.generate(ids, max_new_tokens=sample["max_new_tokens"], do_sample=False)
            answers.append(out[0, ids.shape[1] :].tolist())
    del model
    return answers, kept


def cached_transformers_answers(args, samples: list[dict], setting) -> tuple[list, list, dict]:
    """`transformers_answers`, or what `args.transformers_cache` holds for the same prompts, press and device."""
    import hashlib

    key = dict(
        prompts=hashlib.sha256(json.dumps([s["ids"] for s in samples]).encode()).hexdigest(),
        model=args.model, device=args.device, press=args.press, ratio=args.ratio, window_size=args.window_size,
    )  # fmt: skip
    path = args.transformers_cache
    if path is not None and path.exists():
        cached = json.loads(path.read_text())
        if cached["key"] == key:
            kept = [{int(layer): heads for layer, heads in sample.items()} for sample in cached["kept"]]
            return cached["answers"], kept, {"transformers": cached["seconds"], "transformers_reused": True}
    started = time.perf_counter()
    answers, kept = transformers_answers(args.model, args.device, samples, setting)
    seconds = time.perf_counter() - started
    if path is not None:
        path.write_text(json.dumps(dict(key=key, answers=answers, kept=kept, seconds=seconds)))
    return answers, kept, {"transformers": seconds}


def shared_pairs(ours: dict, theirs: dict) -> float:
    """The share of `theirs` (layer -> per KV head kept positions) that `ours` keeps too."""
    shared = total = 0
    for layer, heads in theirs.items():
        for head, positions in enumerate(heads):
            shared += len(set(positions) & set(ours.get(layer, [[]] * len(heads))[head]))
            total += len(positions)
    return shared / max(total, 1)


def engine_dtype(device: str) -> str:
    """The engine's and the server's dtype: the transformers runtime's (the server's "auto" is bf16 on CPU too)."""
    return "bfloat16" if device == "cuda" else "float32"


def vllm_answers(model_path: str, samples: list[dict], args) -> tuple[list[list[int]], list[dict], list[list[int]]]:
    """vLLM's greedy answers compressed (the engine's ratio) with each sample's kept sets, and dense (the
    same engine, ratio 0 per request); the engine is shut down before returning."""
    from vllm import LLM, SamplingParams

    from adakv.runtimes.vllm import engine_args

    longest = max(len(s["ids"]) + s["max_new_tokens"] for s in samples)
    chunking = {} if args.max_num_batched_tokens is None else {"max_num_batched_tokens": args.max_num_batched_tokens}
    llm = LLM(
        model=model_path, max_model_len=longest + 64, enforce_eager=args.device == "cpu",
        dtype=engine_dtype(args.device), **chunking,
        **engine_args(args.press, args.ratio, window_size=args.window_size, keep_finished=len(samples)),
    )  # fmt: skip
    prompts = [{"prompt_token_ids": s["ids"]} for s in samples]

    def run(ratio: float):
        params = [
            SamplingParams(max_tokens=s["max_new_tokens"], temperature=0, extra_args={"adakv": {"compression_ratio": ratio}})
            for s in samples
        ]
        return llm.generate(prompts, params, use_tqdm=False)

    outputs = run(args.ratio)
    packings = llm.collective_rpc("adakv_packings")[0]
    kept = []
    for output in outputs:
        (packing,) = [value for key, value in packings.items() if key.split("-")[0] == output.request_id]
        kept.append({int(layer): heads for layer, heads in packing.items()})
    compressed = [list(o.outputs[0].token_ids) for o in outputs]
    dense = [list(o.outputs[0].token_ids) for o in run(0.0)]
    llm.llm_engine.engine_core.shutdown()
    return compressed, kept, dense


def served_answer(model_path: str, prompt_ids: list[int], max_tokens: int, args) -> str:
    """Starts `vllm serve` with the plugin's flags, sends one completion request (the prompt as token ids,
    chat template already applied), stops the server."""
    from adakv.runtimes.vllm import serve_flags

    port = 8765
    flags = serve_flags(args.press, args.ratio, window_size=args.window_size)
    length = str(len(prompt_ids) + max_tokens + 64)
    # the server `vllm serve` runs (the CPU build's `vllm` command asks for a distribution named vllm;
    # it is installed as vllm-cpu)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path, "--port", str(port),
               "--max-model-len", length, "--dtype", engine_dtype(args.device), *flags]  # fmt: skip
    if args.device == "cpu":
        command.append("--enforce-eager")
    if args.max_num_batched_tokens is not None:
        command += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    log = open(Path(tempfile.gettempdir()) / "adakv_vllm_serve.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            if server.poll() is not None:
                raise RuntimeError(f"`vllm serve` exited with {server.returncode}: see {log.name}")
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        body = json.dumps({"model": model_path, "temperature": 0, "max_tokens": max_tokens, "prompt": prompt_ids}).encode()
        request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(request, timeout=600).read())["choices"][0]["text"]
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local checkpoint folder (e.g. adakv-eval build-model's)")
    parser.add_argument("--tasks", nargs="+", default=["niah_single", "niah_multikey", "niah_multivalue"])
    parser.add_argument("--context-length", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=8, help="per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--press", default="adakv_snapkv")
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--window-size", type=int, default=64)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--server", action="store_true", help="also one OpenAI-style request to `vllm serve`")
    parser.add_argument(
        "--max-num-batched-tokens", type=int,
        help="vLLM's prefill chunk (default: vLLM's); on CPU a small one also shortens the engine's warm-up forward",
    )  # fmt: skip
    parser.add_argument(
        "--transformers-cache", type=Path,
        help="a JSON of the transformers runtime's answers and kept sets: reused when it holds these prompts and "
        "settings, else written after that phase (a long CPU run that stops later need not repeat it)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from adakv.apps.provenance import provenance
    from adakv.evaluation.metrics import string_match
    from adakv.runtimes.vllm import ServingPress

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    samples = build_samples(tokenizer, args.tasks, args.context_length, args.samples, args.seed)
    setting = ServingPress(args.press, args.ratio, {"window_size": args.window_size})
    hf, hf_kept, seconds = cached_transformers_answers(args, samples, setting)
    started = time.perf_counter()
    compressed, vllm_kept, dense = vllm_answers(args.model, samples, args)
    seconds["vllm"] = time.perf_counter() - started
    rows = []
    for sample, ours, theirs, plain, our_kept, their_kept in zip(samples, compressed, hf, dense, vllm_kept, hf_kept):
        texts = {name: tokenizer.decode(ids, skip_special_tokens=True) for name, ids in
                 (("vllm", ours), ("transformers", theirs), ("vllm_dense", plain))}  # fmt: skip
        rows.append(dict(
            task=sample["task"], index=sample["index"], prompt_tokens=len(sample["ids"]), answers=sample["answers"],
            **{f"{name}_answer": text for name, text in texts.items()},
            **{f"{name}_score": string_match(text, sample["answers"]) for name, text in texts.items()},
            same_tokens=ours == theirs, kept_pairs=sum(map(len, (h for heads in their_kept.values() for h in heads))),
            kept_overlap=shared_pairs(our_kept, their_kept),
        ))  # fmt: skip
    summary = {
        name: sum(row[f"{name}_score"] for row in rows) / len(rows) for name in ("vllm", "transformers", "vllm_dense")
    }
    summary["same_tokens"] = sum(row["same_tokens"] for row in rows) / len(rows)
    summary["kept_overlap_min"] = min(row["kept_overlap"] for row in rows)
    settings = {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()}
    result = dict(meta=dict(provenance(args.device), settings=settings, seconds=seconds), summary=summary, rows=rows)
    print(json.dumps(summary), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))  # before the server's run, which may fail on its own
    if args.server:
        first, served_started = samples[0], time.perf_counter()
        answer = served_answer(args.model, first["ids"], first["max_new_tokens"], args)
        result["served"] = dict(answer=answer, answers=first["answers"], score=string_match(answer, first["answers"]))
        seconds["served"] = time.perf_counter() - served_started
        print(json.dumps(result["served"]))
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
    os._exit(0)


if __name__ == "__main__":
    main()
