"""adakv inside vLLM: head-wise compression of each request's prompt, and its freed pages back to vLLM.

    from vllm import LLM, SamplingParams
    from adakv.runtimes.vllm import engine_args

    llm = LLM(model=..., **engine_args(press="adakv_snapkv", compression_ratio=0.75))
    llm.generate(prompts, SamplingParams(extra_args={"adakv": {"compression_ratio": 0.5}}))  # per request

`engine_args` returns vLLM's own engine arguments (`additional_config`, `scheduler_cls`, `worker_cls`,
`enable_prefix_caching=False`, on CUDA `attention_backend="CUSTOM"`); `vllm serve` takes the same as flags (`serve_flags`). The plugin
(entry point `vllm.general_plugins`) registers the attention backend. Importing this package does not
import vLLM.
"""

from __future__ import annotations

import json
from typing import Any

from .settings import CONFIG_KEY, CUDA_BACKEND, RUNTIME, SERVING_PRESSES, WORKERS, ServingPress

__all__ = ["SERVING_PRESSES", "ServingPress", "engine_args", "serve_flags"]


def engine_args(
    press: str = "adakv_snapkv",
    compression_ratio: float = 0.75,
    *,
    async_scheduling: bool | None = None,
    keep_finished: int = 0,
    full_decode_graphs: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """vLLM engine arguments that serve every request compressed with `press` at `compression_ratio`
    (a request's `SamplingParams.extra_args["adakv"]` overrides either). options: the press's fields
    (SnapKV: window_size, kernel_size; StreamingLLM: n_sink; adakv_*: alpha_safeguard).
    async_scheduling: vLLM's asynchronous scheduler (default: on CUDA, off on CPU).
    full_decode_graphs: on CUDA, decode steps replayed from full CUDA graphs (every row through adakv's
    kernel); off: piecewise graphs, attention eager (docs/SERVING.md says what each measured)."""
    ServingPress(press, compression_ratio, options)  # refuses a bad setting here, not in the engine process
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    if not on_cpu and not current_platform.is_cuda():
        raise NotImplementedError(
            f"adakv's vLLM runtime runs on CPU and CUDA; this platform is {current_platform.device_name!r}."
        )
    if async_scheduling is None:
        async_scheduling = not on_cpu
    if full_decode_graphs and on_cpu:
        raise ValueError("full_decode_graphs is for the CUDA backend: vLLM's CPU build runs no CUDA graphs")
    backend = {} if on_cpu else {"attention_backend": CUDA_BACKEND}
    scheduler = "CompressingAsyncScheduler" if async_scheduling else "CompressingScheduler"
    setting = {"press": press, "compression_ratio": compression_ratio, **options}
    if keep_finished:
        setting["keep_finished"] = keep_finished
    if full_decode_graphs:
        setting["full_decode_graphs"] = True
    return {
        "additional_config": {CONFIG_KEY: setting},
        "scheduler_cls": f"{RUNTIME}.scheduler.{scheduler}",
        "worker_cls": WORKERS["cpu" if on_cpu else "cuda"],
        "enable_prefix_caching": False,
        "async_scheduling": async_scheduling,
        **backend,
    }


def serve_flags(press: str = "adakv_snapkv", compression_ratio: float = 0.75, **options: Any) -> list[str]:
    """The same as `vllm serve` command-line flags."""
    args = engine_args(press, compression_ratio, **options)
    return [
        "--additional-config", json.dumps(args["additional_config"]),
        "--scheduler-cls", args["scheduler_cls"],
        "--worker-cls", args["worker_cls"],
        "--no-enable-prefix-caching",
        "--async-scheduling" if args["async_scheduling"] else "--no-async-scheduling",
    ] + (["--attention-backend", args["attention_backend"]] if "attention_backend" in args else [])  # fmt: skip
