"""adakv inside vLLM, end to end: one engine serving requests compressed at the engine's ratio, one at its
own ratio, and one dense; prints each answer's tokens and how many (token, KV head) pairs each kept.

Runs with vLLM's CPU build (`bash scripts/setup_vllm.sh`, then `.venv-vllm/bin/python
scripts/serve_vllm_example.py`) or on a GPU with vLLM installed. Without `--model` it serves a tiny random
Llama built here (no download); with `--model PATH` any local checkpoint vLLM can load.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV pool on CPU


def tiny_llama(folder: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local checkpoint (default: a tiny random Llama)")
    parser.add_argument("--press", default="adakv_snapkv")
    parser.add_argument("--ratio", type=float, default=0.75)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    from adakv.runtimes.vllm import engine_args

    model = args.model or tiny_llama(tempfile.mkdtemp(prefix="tiny-llama-"))
    dtype = "float32" if not args.model else "auto"
    llm = LLM(
        model=model, skip_tokenizer_init=True, enforce_eager=True, max_model_len=2048, dtype=dtype,
        **engine_args(args.press, args.ratio, window_size=8, keep_finished=8),
    )  # fmt: skip
    generator = random.Random(0)
    prompts = [{"prompt_token_ids": [generator.randrange(1, 500) for _ in range(600)]} for _ in range(3)]
    overrides = [None, {"compression_ratio": 0.5}, {"compression_ratio": 0}]  # engine's ratio, 0.5, dense
    params = [
        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, extra_args=None if o is None else {"adakv": o})
        for o in overrides
    ]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    packings = llm.collective_rpc("adakv_packings")[0]
    for output, override in zip(outputs, overrides):
        packing = next((p for key, p in packings.items() if key.split("-")[0] == output.request_id), None)
        kept = "dense" if packing is None else sum(len(head) for heads in packing.values() for head in heads)
        setting = "engine" if override is None else override
        print(f"request {output.request_id} ({setting}): tokens {list(output.outputs[0].token_ids)}, kept pairs {kept}")


if __name__ == "__main__":
    main()
