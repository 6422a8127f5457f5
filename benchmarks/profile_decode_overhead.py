"""Per-layer CPU overhead of one evict decode step (CUDA only): the append (FlatHeadwiseLayer.update) and the
attention call (adakv.cache.flat_attention.flat_attention), eager and back to back as in a model forward, next to the dense
cache's concatenation and torch's SDPA over the same rows; plus a breakdown of the pieces of the attention and
append calls (allocation, checks, each launch alone). The attention is timed as flat_attention picks it
("evict_attention") and with each decode path forced: the Triton kernels ("..._triton") and the CUDA decode
kernel of csrc/flat_decode.cu ("..._cuda_decode", absent when the adakv in use has no such path).

Shapes: Llama-3.1-8B attention (8 KV heads, 32 query heads, head_dim 128), bf16, one new token.
Per figure: "cpu us" = host time to issue one call (perf_counter over N back-to-back calls, no sync inside);
"call us" = CUDA-event time of the same N calls / N (includes the GPU work; equals cpu us when CPU-bound).
Median of `--repeats` rounds of N calls. Runs on whichever adakv is importable, so the same script times
the code before and after a change:

    python benchmarks/profile_decode_overhead.py --label after --out profile_after.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from adakv.apps.provenance import provenance
from adakv.kernels import cuda_flat as kernels, triton_decode
from adakv.cache.flat import FlatHeadwiseLayer
from adakv.cache.flat_attention import flat_attention, reference_flat_attention

KV_HEADS, HEADS, HEAD_DIM, DTYPE, SCALE = 8, 32, 128, torch.bfloat16, 128**-0.5
HAS_CUDA_DECODE = hasattr(kernels, "cuda_decode_flat_attention")  # lets the script time older versions too
PATHS = ("triton", "cuda_decode") if HAS_CUDA_DECODE else ("triton",)


class Config:
    _attn_implementation = "adakv_sdpa"


def timed(fn, calls: int, repeats: int) -> dict:
    """Median over `repeats` rounds of (host us per call, event us per call) of `calls` back-to-back calls."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    cpu, event = [], []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(repeats):
        torch.cuda.synchronize()
        start.record()
        began = time.perf_counter()
        for _ in range(calls):
            fn()
        cpu.append((time.perf_counter() - began) * 1e6 / calls)
        end.record()
        end.synchronize()
        event.append(start.elapsed_time(end) * 1000 / calls)
    return dict(cpu_us=statistics.median(cpu), call_us=statistics.median(event))


def make_layers(batch: int, rows: int, copies: int, slack: int):
    shape = (batch, KV_HEADS, rows, HEAD_DIM)
    keep = torch.ones(shape[:3], device="cuda", dtype=torch.bool)
    layers, dense = [], []
    for _ in range(copies):
        keys = torch.randn(shape, device="cuda", dtype=DTYPE)
        values = torch.randn(shape, device="cuda", dtype=DTYPE)
        layers.append(FlatHeadwiseLayer(keys, values, keep, Config(), min_slack=slack))
        dense.append((keys, values))
    return layers, dense


def profile_case(batch: int, rows: int, calls: int, repeats: int) -> dict:
    copies = 4
    appends_needed = (2 + len(PATHS)) * (10 + calls * repeats) + 16  # the append timings below
    layers, dense = make_layers(batch, rows, copies, slack=appends_needed // copies + 64)
    query = torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda", dtype=DTYPE)
    new = torch.randn(batch, KV_HEADS, 1, HEAD_DIM, device="cuda", dtype=DTYPE)
    counter = iter(range(10**9))

    def next_layer():
        return layers[next(counter) % copies]

    def dense_pair():
        return dense[next(counter) % copies]

    row = dict(batch=batch, rows_per_head=rows)
    # correctness first: the fast paths equal the reference (bf16 tolerance) before anything is timed
    expected = reference_flat_attention(query.float(), _float_copy(layers[0]), SCALE)
    actual = flat_attention(query, layers[0], SCALE).float()
    row["max_abs_error_vs_fp32_reference"] = (actual - expected).abs().max().item()
    for path in PATHS:
        actual = flat_attention(query, layers[0], SCALE, implementation=path).float()
        row[f"max_abs_error_vs_fp32_reference_{path}"] = (actual - expected).abs().max().item()

    row["evict_append"] = timed(lambda: next_layer().update(new, new), calls, repeats)
    row["evict_attention"] = timed(lambda: flat_attention(query, next_layer(), SCALE), calls, repeats)
    for path in PATHS:
        row[f"evict_attention_{path}"] = timed(
            lambda path=path: flat_attention(query, next_layer(), SCALE, implementation=path), calls, repeats
        )

    def evict_step(implementation=None):
        layer = next_layer()
        layer.update(new, new)
        flat_attention(query, layer, SCALE, implementation=implementation)

    row["evict_append_plus_attention"] = timed(evict_step, calls, repeats)
    for path in PATHS:
        row[f"evict_append_plus_attention_{path}"] = timed(lambda path=path: evict_step(path), calls, repeats)

    def dense_step():
        keys, values = dense_pair()
        torch.cat([keys, new], dim=-2), torch.cat([values, new], dim=-2)
        F.scaled_dot_product_attention(query, keys, values, scale=SCALE, enable_gqa=True)

    row["dense_cat"] = timed(lambda: [torch.cat([t, new], dim=-2) for t in dense_pair()], calls, repeats)
    row["dense_sdpa"] = timed(
        lambda: F.scaled_dot_product_attention(query, *dense_pair(), scale=SCALE, enable_gqa=True), calls, repeats
    )
    row["dense_cat_plus_sdpa"] = timed(dense_step, calls, repeats)
    row["breakdown"] = breakdown(layers[0], query, new, calls, repeats)
    del layers, dense
    return row


def _float_copy(layer: FlatHeadwiseLayer):
    """A CPU-free fp32 view of the layer for the reference (same rows, fp32 buffers)."""

    class View:
        pass

    view = View()
    for name in ("num_heads", "num_sequences", "offsets", "context_kept", "appended", "max_context_kept", "slack", "device"):
        setattr(view, name, getattr(layer, name))
    view.keys, view.values = layer.keys.float(), layer.values.float()
    view.lengths = layer.lengths
    view.dense_rows = lambda: FlatHeadwiseLayer.dense_rows(view)
    return view


def breakdown(layer: FlatHeadwiseLayer, query: torch.Tensor, new: torch.Tensor, calls: int, repeats: int) -> dict:
    """The pieces of one attention call and one append, each alone (the same calls both before and after)."""
    k = triton_decode._kernels()
    sequences = layer.num_sequences
    group = HEADS // KV_HEADS
    sizes = triton_decode.block_sizes(group, HEAD_DIM, DTYPE)
    splits = triton_decode.choose_num_splits(
        layer.max_length, sequences, triton_decode.multiprocessor_count(query.device.index)
    )
    slots = sequences * splits * group
    buffer = torch.empty(slots * (HEAD_DIM + 1), device="cuda", dtype=torch.float32)
    partial_out, partial_lse = buffer[: slots * HEAD_DIM], buffer[slots * HEAD_DIM :]
    output = query.new_empty(query.shape[0], 1, HEADS, HEAD_DIM)

    def partial():
        k.partial_attention[(sequences, splits, 1)](
            query, layer.keys, layer.values, layer.keys, layer.values, layer.offsets, layer.seq_lengths,
            partial_out, partial_lse, output, buffer,
            query.stride(0), query.stride(1), query.stride(2), layer.keys.stride(0),
            output.stride(0), output.stride(1), output.stride(2), SCALE * 1.4426950408889634, 0, KV_HEADS, 1, splits,
            GROUP=group, HEAD_DIM=HEAD_DIM, DOT_PRECISION="tf32", COMBINE_IN_LAST=False, SCALED=False, **sizes,
        )  # fmt: skip

    def combine():
        k.combine_splits[(sequences, 1)](
            partial_out, partial_lse, output, output.stride(0), output.stride(1), output.stride(2),
            KV_HEADS, 1, splits, GROUP=group, HEAD_DIM=HEAD_DIM, BLOCK_M=sizes["BLOCK_M"], BLOCK_D=sizes["BLOCK_D"],
        )  # fmt: skip

    new_rows = new.reshape(sequences, 1, HEAD_DIM)
    scratch_k, scratch_v = torch.empty_like(layer.keys[: 2 * sequences]), torch.empty_like(layer.values[: 2 * sequences])
    start = torch.arange(0, 2 * sequences, 2, device="cuda")
    scratch_lengths = torch.zeros(sequences, dtype=torch.int64, device="cuda")
    extension = kernels.load_extension()
    parts = {
        "triton_partial_attention_launch": partial,
        "triton_combine_splits_launch": combine,
        "workspace_torch_empty": lambda: torch.empty(slots * (HEAD_DIM + 1), device="cuda", dtype=torch.float32),
        "output_new_empty": lambda: query.new_empty(query.shape[0], 1, HEADS, HEAD_DIM),
        "check_inputs": lambda: triton_decode.check_inputs(query, layer.keys, layer.values, KV_HEADS),
        "check_kernel_inputs": lambda: kernels.check_kernel_inputs(
            {"a": layer.keys, "b": layer.values, "c": new_rows, "d": new_rows},
            {"o": layer.offsets, "l": layer.seq_lengths},
        ),
        "append_extension_call": lambda: extension.append_rows(
            scratch_k, scratch_v, new_rows, new_rows, start, scratch_lengths.zero_()
        ),
    }
    if HAS_CUDA_DECODE:
        parts["cuda_decode_extension_call"] = lambda: extension.decode_attention(
            query, layer.keys, layer.values, layer.offsets, layer.seq_lengths, SCALE, splits, partial_out, partial_lse,
        )  # fmt: skip
        parts["cuda_decode_extension_call_one_split"] = lambda: extension.decode_attention(
            query, layer.keys, layer.values, layer.offsets, layer.seq_lengths, SCALE, 1
        )
        parts["cuda_decode_flat_attention"] = lambda: kernels.cuda_decode_flat_attention(query, layer, SCALE)
    return {name: timed(fn, calls, repeats) for name, fn in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--label", default="current")
    parser.add_argument("--cases", nargs="+", default=["1x8192", "1x32768", "8x8192"], help="BATCHxROWS")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode_overhead.py needs a CUDA device.")
    results = []
    for case in args.cases:
        batch, rows = (int(x) for x in case.split("x"))
        results.append(profile_case(batch, rows, args.calls, args.repeats))
        print(json.dumps(results[-1]), flush=True)
    meta = dict(provenance("cuda"), label=args.label, device=torch.cuda.get_device_name(), torch=torch.__version__)
    if args.out:
        args.out.write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    print(f"\n{args.label} on {meta['device']}: cpu us / call us per call")
    names = ["evict_append", "evict_attention", *(f"evict_attention_{path}" for path in PATHS),
             "evict_append_plus_attention", *(f"evict_append_plus_attention_{path}" for path in PATHS),
             "dense_cat", "dense_sdpa", "dense_cat_plus_sdpa"]  # fmt: skip
    print("| batch | rows | " + " | ".join(names) + " |")
    for r in results:
        cells = [f"{r[n]['cpu_us']:.1f} / {r[n]['call_us']:.1f}" for n in names]
        print(f"| {r['batch']} | {r['rows_per_head']} | " + " | ".join(cells) + " |")
    print("breakdown (first case): " + ", ".join(f"{n} {v['cpu_us']:.1f}" for n, v in results[0]["breakdown"].items()))


if __name__ == "__main__":
    main()
