"""Runs a tiny model in vLLM with adakv's plugin and writes what the tests check as JSON.

Run with the vLLM environment's Python (scripts/setup_vllm.sh): `python run_engine.py CASE.json OUT.json`.
CASE: {"model": dir, "engine": engine_args kwargs, "llm": other LLM kwargs, "requests": [{"prompt": [ids],
"max_tokens": n, "adakv": {...} or null, "logprobs": k (optional)}], "graphs": bool (default false:
enforce_eager)}. OUT: tokens per request (with "logprobs": per token, the k most likely {token id: log
probability}), the workers' packings and backend counters, the scheduler's most requests running at once
and its pool size.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the scheduler in this process, to read it

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    from adakv.runtimes.vllm import engine_args

    case = json.load(open(sys.argv[1]))
    engine = engine_args(**case["engine"]) if case["engine"] is not None else {}
    eager = not case.get("graphs", False)
    llm = LLM(model=case["model"], skip_tokenizer_init=True, enforce_eager=eager, **case["llm"], **engine)
    prompts, params = [], []
    for request in case["requests"]:
        prompts.append({"prompt_token_ids": request["prompt"]})
        extra = {"adakv": request["adakv"]} if request.get("adakv") is not None else None
        params.append(SamplingParams(
            max_tokens=request["max_tokens"], temperature=0, ignore_eos=True, extra_args=extra,
            logprobs=request.get("logprobs"),
        ))  # fmt: skip
    outputs = llm.generate(prompts, params, use_tqdm=False)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    result = {
        "tokens": [list(output.outputs[0].token_ids) for output in outputs],
        "request_ids": [output.request_id for output in outputs],
        "logprobs": [
            [{str(token): entry.logprob for token, entry in step.items()} for step in output.outputs[0].logprobs or []]
            for output in outputs
        ],
        "packings": llm.collective_rpc("adakv_packings")[0] if case["engine"] is not None else {},
        "stats": llm.collective_rpc("adakv_stats")[0] if case["engine"] is not None else {},
        "max_running": getattr(scheduler, "adakv_max_running", None),
        "num_blocks": scheduler.kv_cache_manager.block_pool.num_gpu_blocks,
        "preemptions": getattr(scheduler, "adakv_preemptions", None),
    }
    json.dump(result, open(sys.argv[2], "w"))
