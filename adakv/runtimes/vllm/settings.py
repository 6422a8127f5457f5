"""What a user asks of the vLLM runtime: which press, at which ratio, for the engine and for one request.

Engine-wide: `additional_config={"adakv": {"press": "adakv_snapkv", "compression_ratio": 0.75}}` (the same
JSON after `vllm serve --additional-config`). Per request: `SamplingParams(extra_args={"adakv": {...}})`
with the same keys, overriding the engine's (`{"compression_ratio": 0}` serves one request dense).
Nothing here imports vLLM: the scheduler, the worker and the tests share it.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping

CONFIG_KEY = "adakv"
RUNTIME = "adakv.runtimes.vllm"
WORKERS = {"cpu": f"{RUNTIME}.worker.CompressingCPUWorker", "cuda": f"{RUNTIME}.cuda_worker.CompressingCUDAWorker"}
# the attention backend adakv's CUDA worker needs (the plugin registers it under vLLM's CUSTOM name)
CUDA_BACKEND = "CUSTOM"
# engine-level keys that are not the press's: how many finished requests' packings a worker keeps for
# inspection through `LLM.collective_rpc("adakv_packings")` (tests, checks against the HF runtime), and
# whether the CUDA backend lets vLLM replay decode steps from full CUDA graphs (`full_decode_graphs`)
ENGINE_KEYS = ("keep_finished", "full_decode_graphs")

# press name -> (scorer class in adakv.presses, wrapped in AdaptivePress (layer scope, Ada-KV's allocation))
SERVING_PRESSES: dict[str, tuple[str, bool]] = {
    "snapkv": ("SnapKVPress", False),
    "adakv_snapkv": ("SnapKVPress", True),
    "streaming_llm": ("StreamingLLMPress", False),
    "adakv_streaming_llm": ("StreamingLLMPress", True),
}
# fields a user may set, per scorer; AdaptivePress adds alpha_safeguard
SCORER_FIELDS: dict[str, tuple[str, ...]] = {
    "SnapKVPress": ("window_size", "kernel_size"),
    "StreamingLLMPress": ("n_sink",),
}
NOT_SERVED = (
    "the other presses need what vLLM's attention does not keep (hidden states, the attention module, every "
    "layer at once, or attention weights)"
)


@dataclass(frozen=True)
class ServingPress:
    """One request's compression: the press name, its ratio and the scorer's own fields.

    compression_ratio: fraction of the prompt's (token, KV head) pairs evicted, in [0, 1); 0 = dense.
    options: scorer / wrapper fields, e.g. {"window_size": 32} for SnapKV, {"alpha_safeguard": 0.2}.
    """

    press: str = "adakv_snapkv"
    compression_ratio: float = 0.0
    options: Mapping[str, Any] = field(default_factory=dict)

    KEYS: ClassVar[tuple[str, ...]] = ("press", "compression_ratio")

    def __post_init__(self):
        if self.press not in SERVING_PRESSES:
            raise ValueError(
                f"adakv in vLLM serves the presses {sorted(SERVING_PRESSES)}; got press={self.press!r}: {NOT_SERVED}."
            )
        ratio = self.compression_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= float(ratio) < 1.0:
            raise ValueError(f"compression_ratio must be a number in [0, 1), got {ratio!r}.")
        object.__setattr__(self, "compression_ratio", float(ratio))
        allowed = self.allowed_options()
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            raise ValueError(f"press {self.press!r} takes the options {list(allowed)}; got unknown {unknown}.")
        self.build()  # the press's own checks of its fields, with its messages

    @property
    def compresses(self) -> bool:
        return self.compression_ratio > 0

    def allowed_options(self) -> tuple[str, ...]:
        scorer, adaptive = SERVING_PRESSES[self.press]
        return SCORER_FIELDS[scorer] + (("alpha_safeguard",) if adaptive else ())

    def build(self):
        """The adakv press this request runs (a fresh object: presses are stateless, so it could be shared)."""
        import adakv.presses as presses

        scorer_name, adaptive = SERVING_PRESSES[self.press]
        scorer_options = {k: v for k, v in self.options.items() if k in SCORER_FIELDS[scorer_name]}
        scorer = getattr(presses, scorer_name)(compression_ratio=self.compression_ratio, **scorer_options)
        if not adaptive:
            return scorer
        wrapper_options = {k: v for k, v in self.options.items() if k == "alpha_safeguard"}
        return presses.AdaptivePress(scorer, **wrapper_options)

    @functools.cached_property
    def recent_queries_needed(self) -> int:
        """How many of the prompt's last queries the press reads (SnapKV's window), 0 if none: the newest
        positions whose layer inputs it declares it reads (`BasePress.layer_input_rows`), whose queries are
        what the transformers runtime computes from them."""
        rows = self.build().layer_input_rows
        if rows is None:  # every press of SERVING_PRESSES declares its rows
            raise ValueError(f"{self.press} may read every prompt position's queries; vLLM's runtime keeps the last few")
        return rows

    def kept_per_head(self, prompt_len: int) -> int:
        """Pairs a layer keeps per KV head on average: round((1 - ratio) * prompt_len), at least 1; the
        layer keeps exactly kv_heads times this (uniform: every head; Ada-KV: the layer's total)."""
        if not self.compresses:
            return prompt_len
        return min(max(round(prompt_len * (1.0 - self.compression_ratio)), 1), prompt_len)

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> ServingPress:
        """This setting with a request's `extra_args["adakv"]` applied (unknown keys refused)."""
        if not overrides:
            return self
        if not isinstance(overrides, Mapping):
            raise ValueError(f'extra_args["{CONFIG_KEY}"] must be a dict, got {type(overrides).__name__}.')
        base = {"press": self.press, "compression_ratio": self.compression_ratio, **self.options}
        if "press" in overrides and overrides["press"] != self.press:  # another press: its defaults, not ours
            base = {"press": overrides["press"], "compression_ratio": self.compression_ratio}
        return ServingPress.from_mapping({**base, **overrides})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ServingPress:
        values = dict(values)
        known = {f.name for f in fields(cls)} - {"options"}
        return cls(**{k: values.pop(k) for k in list(values) if k in known}, options=values)


def engine_setting(additional_config: Any) -> ServingPress | None:
    """The engine-wide setting from vLLM's `additional_config`, None when adakv is not asked for."""
    if not isinstance(additional_config, Mapping) or CONFIG_KEY not in additional_config:
        return None
    values = additional_config[CONFIG_KEY]
    if not isinstance(values, Mapping):
        raise ValueError(f'additional_config["{CONFIG_KEY}"] must be a dict, got {type(values).__name__}.')
    return ServingPress.from_mapping({k: v for k, v in values.items() if k not in ENGINE_KEYS})


def full_decode_graphs(additional_config: Any) -> bool:
    """Whether the engine asked for full CUDA graphs of decode steps (`engine_args(full_decode_graphs=True)`;
    off by default: their agreement with piecewise steps is still to be shown on a GPU, docs/SERVING.md)."""
    values = additional_config.get(CONFIG_KEY) if isinstance(additional_config, Mapping) else None
    flag = values.get("full_decode_graphs", False) if isinstance(values, Mapping) else False
    if not isinstance(flag, bool):
        raise ValueError(
            f'additional_config["{CONFIG_KEY}"]["full_decode_graphs"] must be true or false, got {flag!r}.'
        )
    return flag


def request_setting(engine: ServingPress, sampling_params) -> ServingPress:
    """The setting of one request: the engine's, with the request's `extra_args["adakv"]` applied."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    return engine.with_overrides(extra.get(CONFIG_KEY))


def qualified_name(class_or_name) -> str:
    """'module.Class' of a class given as itself or by name ('' for None)."""
    if isinstance(class_or_name, type):
        return f"{class_or_name.__module__}.{class_or_name.__qualname__}"
    return str(class_or_name or "")


def check_engine(vllm_config) -> ServingPress:
    """The engine's setting; refuses what compressed requests cannot be served with."""
    setting = engine_setting(vllm_config.additional_config)
    if setting is None:
        raise ValueError(
            f"adakv's scheduler runs an engine without additional_config['{CONFIG_KEY}']: build the engine "
            "with adakv.runtimes.vllm.engine_args(...)."
        )
    scheduler = qualified_name(vllm_config.scheduler_config.scheduler_cls)
    worker = qualified_name(vllm_config.parallel_config.worker_cls)
    if not scheduler.startswith(RUNTIME + ".scheduler.") or worker not in WORKERS.values():
        raise ValueError(
            "adakv needs both its scheduler (which frees a compressed prompt's pages) and its worker (which "
            f"compresses): got scheduler_cls={scheduler or None!r}, worker_cls={worker or None!r}. Build the "
            "engine with adakv.runtimes.vllm.engine_args(...) (or `vllm serve` with serve_flags(...))."
        )
    check_attention_backend(vllm_config, worker)
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        raise ValueError(
            "adakv's vLLM runtime serves one GPU (or CPU) per engine so far: tensor_parallel_size and "
            "pipeline_parallel_size must be 1."
        )
    if vllm_config.cache_config.enable_prefix_caching:
        raise ValueError(
            "prefix caching cannot share a compressed prompt (which pairs a head keeps depends on the whole "
            "prompt): pass enable_prefix_caching=False (engine_args does)."
        )
    if vllm_config.speculative_config is not None:
        raise ValueError("adakv's vLLM runtime does not serve speculative decoding yet: leave speculative_config unset.")
    return setting


def check_attention_backend(vllm_config, worker: str) -> None:
    """On CUDA the engine must run adakv's attention backend (vLLM would otherwise pick its own, which
    knows nothing of packed pages)."""
    if worker != WORKERS["cuda"]:
        return
    backend = getattr(vllm_config.attention_config, "backend", None)
    name = getattr(backend, "name", backend)
    if name != CUDA_BACKEND:
        raise ValueError(
            f"adakv's CUDA worker needs its attention backend: pass attention_backend={CUDA_BACKEND!r} "
            f"(engine_args does), got {name!r}."
        )
