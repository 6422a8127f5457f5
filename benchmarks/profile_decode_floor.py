"""Where a graph-captured decode step spends its time (CUDA only; Llama-3.1-8B shape, random bf16 weights).

bench_decode_limit.py compares each decode step with the bandwidth limit (weight + KV bytes / copy bandwidth).
This script separates the model's own share of the gap from the KV cache's, in one process:

- copy: the device-to-device copy bandwidth (the limit's denominator);
- linear-graph: every nn.Linear of the model (the lm_head included) applied to a [batch, in] input, in forward
  order, captured in one CUDA graph: the floor of any decode step that uses torch's matmuls;
- linear-graph-fused: the same with q/k/v and gate/up concatenated into one matrix each (fewer, larger GEMVs);
- adaptive-graph: a whole AdaptivePress(SnapKV) evict decode step in `press(model, cuda_graphs=True)` at
  `--context` tokens (r = 0.75), and the same with the norms and MLPs of every layer run through
  `torch.compile` (fused elementwise kernels) to see what fusion outside attention would buy, and with
  `join_projections=True` (q/k/v and gate/up as one product each), with `fuse_elementwise=True` as well
  (norms, rotary embeddings and SiLU gates as one Triton kernel each), and with `gemv_linears=True` as well
  (the linears as adakv's Triton GEMV, the MLP's SiLU gate as the gate/up GEMV's epilogue), and the same
  without that epilogue (separate_gate: the gate/up GEMV, then the silu_mul kernel);
- kernels: one eager step (plain, and joined + fused) and one graph replay (joined + fused, without and with
  the GEMV) under the profiler:
  number of CUDA kernels and their summed GPU time by kind (matmul, attention and cache, elementwise), so that
  graph time - kernel time = gaps between kernels. Eager and graph steps differ in the attention kernel
  (eagerly the CUDA decode kernel up to 48 MiB per layer, in a graph always the Triton ones).

    python benchmarks/profile_decode_floor.py --batches 1 8 --context 8192 [--skip-compiled]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode_limit import FUSIONS, greedy_step, measured_setup, prefill, step_timings  # noqa: E402

from adakv import presses as P  # noqa: E402
import adakv.runtimes.hf.fusion.gemv_linears as gemv_linears_module  # noqa: E402


def graph_ms(work, repeats: int = 64) -> float:
    """Median CUDA-event ms of replaying `work` captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            work()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()
    return statistics.median(step_timings(lambda token: (graph.replay(), token)[1], None, 8, repeats))


def linear_weights(model, fused: bool) -> list[torch.Tensor]:
    """The [out, in] weights a decode step multiplies by, in forward order (optionally q/k/v and gate/up joined)."""
    weights = []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        qkv = [attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]
        gate_up = [mlp.gate_proj.weight, mlp.up_proj.weight]
        weights += [torch.cat(qkv)] if fused else qkv
        weights.append(attention.o_proj.weight)
        weights += [torch.cat(gate_up)] if fused else gate_up
        weights.append(mlp.down_proj.weight)
    weights.append(model.lm_head.weight)
    return weights


def linear_floor_ms(model, batch: int, fused: bool) -> tuple[float, int]:
    weights = linear_weights(model, fused)
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], device="cuda", dtype=w.dtype) for w in weights}

    def work():
        for weight in weights:
            torch.nn.functional.linear(inputs[weight.shape[1]], weight)

    milliseconds = graph_ms(work)
    read = sum(w.numel() * w.element_size() for w in weights)
    weights.clear()  # frees the joined copies before the next measurement
    torch.cuda.empty_cache()
    return milliseconds, read


def compile_norms_and_mlps(model) -> list:
    """torch.compile each layer's norms and MLP in place; returns the modules, for `uncompile`."""
    modules = [model.model.norm]
    for layer in model.model.layers:
        modules += [layer.input_layernorm, layer.post_attention_layernorm, layer.mlp]
    for module in modules:
        module.compile(fullgraph=True, dynamic=False)
    return modules


def uncompile(modules) -> None:
    for module in modules:
        module._compiled_call_impl = None


def adaptive_graph_ms(model, ids, steps: int, **fusions) -> float:
    press = P.AdaptivePress(P.SnapKVPress(0.75), backend="evict")
    cache = DynamicCache(config=model.config)
    prefill(model, ids, cache, press)
    with torch.no_grad(), press(model, cuda_graphs=True, **fusions) as session:
        step = greedy_step(model, cache)
        token = step(step(ids[:, -1:]))
        timings = step_timings(step, token, 8, steps)
        assert session.graph_decoder.disabled_reason is None, session.graph_decoder.disabled_reason
    return statistics.median(timings)


@contextmanager
def separate_silu_gate():
    """gemv_linears without its SiLU-gated product: the MLP's gate/up GEMV, then the silu_mul kernel (what
    the gated epilogue saves, measured in the same run)."""
    original = gemv_linears_module.triton_products
    gemv_linears_module.triton_products = lambda: (original()[0], None)
    try:
        yield
    finally:
        gemv_linears_module.triton_products = original


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    if any(word in lowered for word in ("gemv", "gemm", "cutlass", "sm90_xmma", "nvjet", "splitk")):
        return "matmul"
    if any(word in lowered for word in ("flat", "decode", "append", "attention", "combine_splits", "flash", "fmha", "_attn")):
        return "attention_and_cache"
    return "elementwise_and_other"


def step_kernels(model, ids, **press_options) -> dict:
    """Kernels of one AdaptivePress evict decode step (eager, or a graph replay with cuda_graphs=True):
    count and summed GPU ms by kind, and the most frequent kernel names of each kind (what a further
    fusion would target). A replay's kernels are listed only where the profiler traces graph nodes."""
    press = P.AdaptivePress(P.SnapKVPress(0.75), backend="evict")
    cache = DynamicCache(config=model.config)
    prefill(model, ids, cache, press)
    with torch.no_grad(), press(model, **press_options):
        step = greedy_step(model, cache)
        token = step(step(step(ids[:, -1:])))  # with graphs: warm-up, capture, one replay
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
            step(token)
            torch.cuda.synchronize()
    kinds: dict[str, dict] = {}
    for event in profiler.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kind = kinds.setdefault(kernel_kind(event.name), {"kernels": 0, "gpu_ms": 0.0, "names": {}})
        kind["kernels"] += 1
        kind["gpu_ms"] += event.device_time_total / 1000
        kind["names"][event.name[:120]] = kind["names"].get(event.name[:120], 0) + 1
    for kind in kinds.values():
        kind["top_names"] = sorted(kind.pop("names").items(), key=lambda item: -item[1])[:12]
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--skip-compiled", action="store_true", help="skip the torch.compile norms/MLPs experiment")
    parser.add_argument("--tag", default="", help="suffix of the result file")
    args = parser.parse_args()

    model, bandwidth, weights, result = measured_setup(args.layers)
    result.update(context=args.context, rows=[])
    device = result["device"]
    print({k: v for k, v in result.items() if k != "rows"}, flush=True)
    for batch in args.batches:
        row = dict(batch=batch, weight_limit_ms=weights / bandwidth * 1000)
        for fused in (False, True):
            milliseconds, read = linear_floor_ms(model, batch, fused)
            name = "linear_graph_fused" if fused else "linear_graph"
            row[f"{name}_ms"] = milliseconds
            row[f"{name}_tb_s"] = read / milliseconds / 1e9
        ids = torch.randint(10, 128000, (batch, args.context), device="cuda")
        row["adaptive_graph_ms"] = adaptive_graph_ms(model, ids, args.steps)
        for name, fusions in FUSIONS.items():
            row[f"adaptive_graph_{name.replace('-', '_')}_ms"] = adaptive_graph_ms(model, ids, args.steps, **fusions)
        with separate_silu_gate():
            row["adaptive_graph_joined_fused_gemv_separate_gate_ms"] = adaptive_graph_ms(
                model, ids, args.steps, **FUSIONS["joined-fused-gemv"]
            )  # fmt: skip
        profiles = {
            "eager_kernels": {},
            "eager_kernels_joined_fused": FUSIONS["joined-fused"],
            "graph_kernels_joined_fused": dict(FUSIONS["joined-fused"], cuda_graphs=True),
            "graph_kernels_joined_fused_gemv": dict(FUSIONS["joined-fused-gemv"], cuda_graphs=True),
        }
        for name, options in profiles.items():
            try:
                row[name] = step_kernels(model, ids, **options)
            except Exception as error:  # noqa: BLE001 - profiler support varies by torch version: report and go on
                row[f"{name}_error"] = f"{type(error).__name__}: {error}"[:500]
        if not args.skip_compiled:
            compiled = compile_norms_and_mlps(model)
            try:
                row["adaptive_graph_compiled_norms_mlps_ms"] = adaptive_graph_ms(model, ids, args.steps)
            except Exception as error:  # noqa: BLE001 - an experiment: report why it failed and go on
                row["adaptive_graph_compiled_norms_mlps_error"] = f"{type(error).__name__}: {error}"[:500]
            uncompile(compiled)
            torch._dynamo.reset()
        result["rows"].append(row)
        print(row, flush=True)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"decode_floor_{device.replace(' ', '_')}{args.tag}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
