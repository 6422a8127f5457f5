"""The CUDA decode attention kernel over the flat head-wise cache (csrc/flat_decode.cu via
adakv.kernels.cuda_flat.cuda_decode_attention) and its dispatch in adakv.cache.flat_attention.flat_attention.

GPU tests compare the kernel with the PyTorch reference in float64 on random layers with very unequal
head lengths (down to one row), appended tokens, slack rows poisoned with NaN, a NaN-poisoned split
workspace and allocator, queries with transformers' strides, fp16/bf16/fp32, several head_dims and GQA
groups, one split (direct write) and many (combine kernel). CPU tests cover the input checks and the
dispatch decisions that need no GPU."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import adakv.kernels.csrc
from adakv.kernels import cuda_flat as kernels, triton_decode
from adakv.cache.flat import FlatHeadwiseLayer
from adakv.cache.flat_attention import (
    CUDA_DECODE_MAX_BYTES,
    IMPLEMENTATIONS,
    choose_implementation,
    flat_attention,
    reference_flat_attention,
    segment_flat_attention,
)

# |out - expected| <= atol + rtol * |expected| against float64 (half precision: the output's own rounding)
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (1e-2, 1e-2)}


def gpu_test(function):
    """GPU-only test: marked `gpu` and skipped cleanly without CUDA."""
    needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.gpu(needs_cuda(function))


class Config:
    _attn_implementation = "adakv_sdpa"


# ----- helpers -------------------------------------------------------------------------------------------
def random_layer(batch, kv_heads, head_dim, context, dtype, appended=3, min_slack=16, one_row_head=True,
                 device="cuda"):  # fmt: skip
    """A flat layer with very unequal head lengths, `appended` tokens added one update at a time, and every
    row no sequence uses (slack) set to NaN, so that reading one shows in the output. With one_row_head the
    first head keeps no context row (length = appended; with appended=1 it attends to one row)."""
    keys = torch.randn(batch, kv_heads, context, head_dim, device=device).to(dtype)
    values = torch.randn_like(keys)
    keep_rate = torch.rand(batch, kv_heads, 1, device=device) ** 2  # some heads keep few rows, some many
    keep = torch.rand(batch, kv_heads, context, device=device) < keep_rate
    keep[-1, -1] = True  # one head keeps the whole context (the longest sequence)
    if one_row_head:
        keep[0, 0] = False
    layer = FlatHeadwiseLayer(keys, values, keep, Config(), min_slack=max(min_slack, appended + 8))
    for _ in range(appended):
        new = torch.randn(batch, kv_heads, 1, head_dim, device=device).to(dtype)
        layer.update(new, torch.randn_like(new))
    poison_slack(layer)
    return layer


def poison_slack(layer):
    rows = torch.arange(layer.total_rows, device=layer.device)
    sequence_of_row = torch.searchsorted(layer.offsets, rows, right=True) - 1
    used = rows - layer.offsets[sequence_of_row] < layer.lengths[sequence_of_row]
    assert (~used).any(), "the test needs slack rows to poison"
    if layer.dtype.is_floating_point:
        layer.keys[~used] = float("nan")
        layer.values[~used] = float("nan")


def transformers_query(batch, heads, head_dim, dtype):
    """(batch, heads, 1, head_dim) as a transformers attention module hands it over: a transposed view."""
    return torch.randn(batch, 1, heads, head_dim, device="cuda").to(dtype).transpose(1, 2)


def reference_float64(query, layer, scaling):
    clone = FlatHeadwiseLayer.__new__(FlatHeadwiseLayer)
    clone.__dict__.update(layer.__dict__)
    clone.keys, clone.values = layer.keys.double(), layer.values.double()
    return reference_flat_attention(query.double(), clone, scaling)


def poison_allocator():
    """Leave NaNs in the caching allocator's free blocks, so freshly allocated outputs start poisoned."""
    torch.full((64 * 2**20,), float("nan"), device="cuda")


def poison_workspace(layer):
    if layer.split_workspace.buffer is not None:
        layer.split_workspace.buffer.fill_(float("nan"))


def assert_close_to_reference(out, query, layer, scaling, case):
    batch, heads, _, head_dim = query.shape
    assert out.shape == (batch, 1, heads, head_dim) and out.dtype == query.dtype, f"{case}: {out.shape} {out.dtype}"
    assert out.is_contiguous(), case
    expected = reference_float64(query, layer, scaling)
    assert not out.isnan().any(), f"{case}: NaN in the output (unwritten element, slack row or workspace read)"
    difference = (out.double() - expected).abs()
    atol, rtol = TOLERANCE[query.dtype]
    excess = (difference - rtol * expected.abs()).max().item()
    lengths = layer.lengths.tolist()
    assert excess <= atol, (
        f"{case}: max abs error {difference.max().item():.3g} (atol {atol}, rtol {rtol}, worst excess "
        f"{excess:.3g}); lengths min {min(lengths)} max {max(lengths)}, appended {layer.appended}"
    )


def run_kernel(query, layer, scaling, num_splits):
    poison_workspace(layer)
    poison_allocator()
    return kernels.cuda_decode_flat_attention(query, layer, scaling, num_splits=num_splits)


# ----- GPU: equal to the reference --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 96])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("num_splits", [1, 7])
@pytest.mark.parametrize("batch", [1, 3])
@gpu_test
def test_kernel_equals_reference(dtype, head_dim, group, num_splits, batch):
    kv_heads = 2
    layer = random_layer(batch, kv_heads, head_dim, 900, dtype)
    query = transformers_query(batch, kv_heads * group, head_dim, dtype)
    out = run_kernel(query, layer, head_dim**-0.5, num_splits)
    case = f"dtype={dtype} head_dim={head_dim} group={group} batch={batch} num_splits={num_splits}"
    assert_close_to_reference(out, query, layer, head_dim**-0.5, case)


@pytest.mark.parametrize(
    "dtype, head_dim, group, kv_heads",
    [
        (torch.bfloat16, 64, 3, 3),  # SmolLM2-135M: 9 query heads over 3 KV heads
        (torch.float16, 64, 3, 3),
        (torch.bfloat16, 256, 2, 4),  # 32 lanes per row, one row per warp load
        (torch.float32, 256, 4, 2),  # fp32 rows of 1 KiB: two vectors per lane
        (torch.float32, 192, 5, 2),  # 48 vectors per row: padded second vector on half the lanes
        (torch.bfloat16, 32, 4, 2),  # 4 lanes per row, 8 rows per warp load
        (torch.float32, 16, 4, 2),  # 64-byte rows in fp32
        (torch.bfloat16, 80, 7, 2),  # 10 vectors per row (6 padding lanes), group of 7
        (torch.float16, 128, 16, 2),  # the largest group
        (torch.bfloat16, 128, 12, 1),  # a group inside the 16 bucket
    ],
    ids=str,
)
@pytest.mark.parametrize("num_splits", [1, 5])
@gpu_test
def test_other_shapes_equal_reference(dtype, head_dim, group, kv_heads, num_splits):
    for batch in (1, 3):
        layer = random_layer(batch, kv_heads, head_dim, 700, dtype, appended=2)
        query = transformers_query(batch, kv_heads * group, head_dim, dtype)
        out = run_kernel(query, layer, 0.1, num_splits)
        case = f"dtype={dtype} head_dim={head_dim} group={group} kv_heads={kv_heads} batch={batch} splits={num_splits}"
        assert_close_to_reference(out, query, layer, 0.1, case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@gpu_test
def test_long_heads_at_batch_one_use_many_splits(dtype):
    """The shape the kernel is for: batch 1, 8 KV heads of up to 20000 rows, GQA 4, automatic split count
    (> 1, so the combine kernel runs), one head of a single row (appended=1, no context kept)."""
    layer = random_layer(1, 8, 128, 20000, dtype, appended=1, min_slack=64)
    splits = triton_decode.choose_num_splits(layer.max_length, 8, triton_decode.multiprocessor_count(0))
    assert splits > 1 and layer.lengths.min().item() == 1
    query = transformers_query(1, 32, 128, dtype)
    poison_workspace(layer)
    out = kernels.cuda_decode_flat_attention(query, layer, 128**-0.5)
    assert_close_to_reference(out, query, layer, 128**-0.5, f"dtype={dtype} 1x8x20000 auto splits={splits}")
    for num_splits in (1, 128):  # one split over 20000 keys; 128 splits (short heads: mostly empty)
        out = run_kernel(query, layer, 128**-0.5, num_splits)
        assert_close_to_reference(out, query, layer, 128**-0.5, f"dtype={dtype} 1x8x20000 splits={num_splits}")


@gpu_test
def test_query_strides():
    """Contiguous, transposed (transformers), head-sliced and non-unit last stride queries give one result."""
    layer = random_layer(2, 4, 64, 1200, torch.bfloat16)
    base = torch.randn(2, 1, 16, 64, device="cuda").to(torch.bfloat16)
    transposed = base.transpose(1, 2)
    wide = torch.zeros(2, 24, 1, 128, device="cuda", dtype=torch.bfloat16)
    wide[:, 4:20, :, ::2] = transposed
    variants = {
        "contiguous": transposed.contiguous(),
        "transposed": transposed,
        "sliced heads, strided last dim": wide[:, 4:20, :, ::2],
    }
    results = {}
    for name, query in variants.items():
        for num_splits in (1, 4):
            results[name, num_splits] = run_kernel(query, layer, 0.125, num_splits)
            assert_close_to_reference(results[name, num_splits], query, layer, 0.125, f"{name} splits={num_splits}")
    for (name, num_splits), out in results.items():
        assert torch.equal(out, results["contiguous", num_splits]), f"{name} splits={num_splits} differs"


@gpu_test
def test_decode_loop_matches_reference_and_reruns_are_bitwise_equal():
    """Steps that append one token, then attend (as a model does), while the automatic split count
    changes with the length; each step equals the reference, and a rerun with a fresh workspace is
    bitwise equal (fixed reduction order)."""
    layer = random_layer(1, 8, 128, 2000, torch.bfloat16, appended=1, min_slack=600)
    splits_seen = set()
    for step in range(30):
        for _ in range(17):  # lengths cross several MIN_KEYS_PER_SPLIT boundaries over the loop
            new = torch.randn(1, 8, 1, 128, device="cuda").to(torch.bfloat16)
            layer.update(new, -new)
        query = transformers_query(1, 32, 128, torch.bfloat16)
        poison_workspace(layer)
        reused = kernels.cuda_decode_flat_attention(query, layer, 0.09)
        fresh = kernels.cuda_decode_attention(
            query, layer.keys, layer.values, layer.offsets, layer.seq_lengths, 0.09,
            layer.max_length,
        )  # fmt: skip
        assert torch.equal(reused, fresh), f"step {step}: reused workspace differs from a fresh one"
        splits_seen.add(triton_decode.choose_num_splits(layer.max_length, 8, triton_decode.multiprocessor_count(0)))
        if step % 10 == 0:
            assert_close_to_reference(reused, query, layer, 0.09, f"decode step {step}")
    assert len(splits_seen) > 1


@gpu_test
@pytest.mark.parametrize("context", [200, 2000])  # one split (no partial buffers) and several
def test_an_eager_step_reserves_the_counters_a_captured_triton_step_merges_with(context):
    """Eager decode steps run this kernel, a CUDA graph captures the Triton ones, which merge with the
    workspace's counters: the eager step allocates and zeroes them, so the Triton call (as in a capture)
    reuses them instead of zeroing new ones in every replay."""
    if not triton_decode.triton_available():
        pytest.skip("needs triton")
    layer = random_layer(2, 8, 128, context, torch.bfloat16, appended=1)
    query = transformers_query(2, 32, 128, torch.bfloat16)
    kernels.cuda_decode_flat_attention(query, layer, 0.09)
    counters = layer.split_workspace.counters
    assert counters is not None and counters.numel() >= 2 * 32 and not counters.any()
    triton_decode.triton_flat_attention(query, layer, 0.09)
    assert layer.split_workspace.counters is counters and not counters.any()


@gpu_test
def test_close_to_triton():
    if not triton_decode.triton_available():
        pytest.skip("needs triton")
    layer = random_layer(3, 8, 128, 3000, torch.bfloat16)
    query = transformers_query(3, 32, 128, torch.bfloat16)
    ours = kernels.cuda_decode_flat_attention(query, layer, 0.088).float()
    theirs = triton_decode.triton_flat_attention(query, layer, 0.088).float()
    error = (ours - theirs).abs().max().item()
    assert error < 1e-2, f"max abs difference to the Triton kernel {error:.3g}"


# ----- GPU: dispatch and refusals ---------------------------------------------------------------------------
@gpu_test
def test_flat_attention_uses_the_cuda_kernel_for_decode(monkeypatch):
    monkeypatch.delenv("ADAKV_KERNELS", raising=False)
    layer = random_layer(1, 2, 64, 300, torch.bfloat16)
    query = transformers_query(1, 8, 64, torch.bfloat16)
    assert choose_implementation(query, layer.num_heads) == "cuda_decode"
    fast = flat_attention(query, layer, 0.125)
    assert torch.equal(fast, kernels.cuda_decode_flat_attention(query, layer, 0.125))
    assert torch.equal(flat_attention(query, layer, 0.125, implementation="cuda_decode"), fast)
    # more than one new token, a group above the kernel's limit, or ADAKV_KERNELS=reference: not this kernel
    assert choose_implementation(torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16), 2) != "cuda_decode"
    assert choose_implementation(torch.randn(1, 34, 1, 64, device="cuda", dtype=torch.bfloat16), 2) != "cuda_decode"
    monkeypatch.setenv("ADAKV_KERNELS", "reference")
    assert choose_implementation(query, layer.num_heads) != "cuda_decode"


@gpu_test
def test_bad_input_is_refused_on_gpu():
    layer = random_layer(1, 2, 64, 100, torch.bfloat16)
    query = transformers_query(1, 8, 64, torch.bfloat16)
    with pytest.raises(TypeError, match="one dtype"):
        kernels.cuda_decode_flat_attention(query.half(), layer, 0.1)
    with pytest.raises(ValueError, match="one decode token"):
        kernels.cuda_decode_flat_attention(torch.randn(1, 8, 2, 64, device="cuda").bfloat16(), layer, 0.1)
    with pytest.raises(ValueError, match="cannot be grouped"):
        kernels.cuda_decode_flat_attention(query[:, :7], layer, 0.1)
    with pytest.raises(ValueError, match="num_splits"):
        kernels.cuda_decode_flat_attention(query, layer, 0.1, num_splits=129)
    with pytest.raises(ValueError, match="on cpu"):
        kernels.cuda_decode_attention(
            query, layer.keys, layer.values, layer.offsets.cpu(), layer.seq_lengths, 0.1, layer.max_length
        )
    extension = kernels.load_extension()  # the binding's own checks (direct calls skip the Python ones)
    with pytest.raises(RuntimeError, match="split workspace"):
        extension.decode_attention(query, layer.keys, layer.values, layer.offsets, layer.seq_lengths, 0.1, 4)
    with pytest.raises(RuntimeError, match="int64"):
        extension.decode_attention(query, layer.keys, layer.values, layer.offsets.int(), layer.seq_lengths, 0.1, 1)
    # a GQA group above the kernel's limit is refused by the Python wrapper before the binding (a direct
    # binding call with group 17 crashed the process on an H200 instead of raising; not yet understood)
    wide = torch.randn(1, 34, 1, 64, device="cuda").bfloat16()
    with pytest.raises(ValueError, match="16 query heads per KV head"):
        kernels.cuda_decode_attention(wide, layer.keys, layer.values, layer.offsets, layer.seq_lengths, 0.1, 200)


# ----- CPU: checks and dispatch -----------------------------------------------------------------------------
def cpu_layer(dtype=torch.float32, head_dim=64, kv_heads=2):
    return random_layer(1, kv_heads, head_dim, 50, dtype, appended=1, device="cpu")


def test_decode_supported_limits():
    assert kernels.decode_supported(torch.bfloat16, 128, 4)
    for head_dim in (32, 64, 80, 96, 128, 256):
        assert kernels.decode_supported(torch.float16, head_dim, 1), head_dim
    assert kernels.decode_supported(torch.float32, 16, 8)  # 64-byte rows
    assert not kernels.decode_supported(torch.bfloat16, 16, 4)  # 32-byte rows
    assert not kernels.decode_supported(torch.float16, 68, 4)  # 136 bytes: not a multiple of 16
    assert not kernels.decode_supported(torch.float32, 260, 1)
    assert not kernels.decode_supported(torch.bfloat16, 512, 1)
    assert not kernels.decode_supported(torch.float64, 64, 1)
    assert not kernels.decode_supported(torch.bfloat16, 128, 17)
    assert not kernels.decode_supported(torch.bfloat16, 128, 0)


def test_python_limits_match_the_cuda_source():
    source = (Path(adakv.kernels.csrc.__file__).parent / "flat_decode_limits.h").read_text()
    assert f"constexpr int kMaxGroup = {kernels.DECODE_MAX_GROUP};" in source
    assert f"constexpr int kMaxSplits = {kernels.DECODE_MAX_SPLITS};" in source
    assert kernels.DECODE_MAX_SPLITS >= triton_decode.MAX_SPLITS  # automatic split counts always fit
    assert "flat_decode.cu" in kernels.SOURCES
    binding = (Path(adakv.kernels.csrc.__file__).parent / "flat_cache_binding.cpp").read_text()
    assert re.search(r'm\.def\("decode_attention"', binding)


def test_checks_refuse_cpu_tensors_with_a_clear_error():
    layer = cpu_layer()
    query = torch.randn(1, 8, 1, 64)
    with pytest.raises(ValueError, match="needs CUDA tensors, but query is on cpu"):
        kernels.cuda_decode_flat_attention(query, layer, 0.1)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        kernels.cuda_decode_attention(
            query, layer.keys, layer.values, layer.offsets, layer.seq_lengths, 0.1, layer.max_length
        )
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        flat_attention(query, layer, 0.1, implementation="cuda_decode")


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(query=torch.randn(1, 8, 1, 64).double()), TypeError, "supports dtypes"),
        (dict(query=torch.randn(1, 8, 1, 64).half()), TypeError, "one dtype"),
        (dict(query=torch.randn(1, 8, 3, 64)), ValueError, "one decode token"),
        (dict(query=torch.randn(1, 8, 1, 32)), ValueError, "buffers"),
        (dict(query=torch.randn(1, 7, 1, 64)), ValueError, "cannot be grouped"),
        (dict(query=torch.randn(1, 34, 1, 64)), ValueError, "up to 16 query heads"),
        (dict(offsets=torch.zeros(2, dtype=torch.int32)), TypeError, "int64"),
        (dict(lengths=torch.zeros(3, dtype=torch.int64)), ValueError, "batch \\* kv_heads"),
        (dict(num_splits=0), ValueError, "num_splits"),
    ],
)
def test_checks_name_the_problem(change, error, message):
    layer = cpu_layer()
    arguments = dict(
        query=torch.randn(1, 8, 1, 64), keys=layer.keys, values=layer.values, offsets=layer.offsets,
        lengths=layer.seq_lengths, num_splits=None,
    )  # fmt: skip
    arguments.update(change)
    with pytest.raises(error, match=message):
        kernels.check_decode_inputs(**arguments)


def test_checks_refuse_unsupported_head_dims():
    for dtype, head_dim in ((torch.bfloat16, 16), (torch.float16, 72 + 4), (torch.float32, 512)):
        layer = cpu_layer(dtype, head_dim)
        query = torch.randn(1, 8, 1, head_dim).to(dtype)
        with pytest.raises(ValueError, match="supports head_dim"):
            kernels.check_decode_inputs(
                query, layer.keys, layer.values, layer.offsets, layer.seq_lengths, None
            )


def test_dispatch_on_cpu_reads_each_sequence_in_place():
    layer = cpu_layer()
    query = torch.randn(1, 8, 1, 64)
    assert choose_implementation(query, layer.num_heads) == "segments"
    torch.testing.assert_close(flat_attention(query, layer, 0.1), reference_flat_attention(query, layer, 0.1))
    with pytest.raises(ValueError, match="cuda_decode"):
        flat_attention(query, layer, 0.1, implementation="bogus")
    assert "cuda_decode" in IMPLEMENTATIONS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, query_length", [(1, 1), (3, 1), (2, 5)])
def test_segment_attention_equals_the_reference(dtype, batch, query_length):
    """Unequal heads, a head of one row, NaN in every slack row (reading one would show), appends causal."""
    layer = random_layer(batch, 2, 64, 50, dtype, appended=query_length + 2, device="cpu")
    query = torch.randn(batch, 8, query_length, 64).to(dtype)
    out = segment_flat_attention(query, layer, 0.125)
    assert not out.isnan().any()
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, reference_flat_attention(query, layer, 0.125), **tolerance)


def fake_cuda_query(batch, heads, query_length, head_dim, dtype=torch.bfloat16):
    """What choose_implementation reads of a query, for a machine without a GPU."""
    return SimpleNamespace(is_cuda=True, shape=torch.Size((batch, heads, query_length, head_dim)), dtype=dtype)


def test_dispatch_decisions(monkeypatch):
    monkeypatch.delenv("ADAKV_KERNELS", raising=False)
    assert choose_implementation(fake_cuda_query(1, 32, 1, 128), 8) == "cuda_decode"
    assert choose_implementation(fake_cuda_query(3, 9, 1, 64), 3) == "cuda_decode"  # SmolLM2
    assert choose_implementation(fake_cuda_query(1, 8, 1, 64, torch.float32), 2) == "cuda_decode"
    not_ours = [
        fake_cuda_query(1, 32, 2, 128),  # two new tokens: Triton / varlen paths
        fake_cuda_query(1, 64, 1, 128),  # group 32 with 2 KV heads
        fake_cuda_query(1, 8, 1, 512),  # head_dim above the kernel's
        fake_cuda_query(1, 8, 1, 16),  # 32-byte bf16 rows
        fake_cuda_query(1, 8, 1, 64, torch.float64),
    ]
    for query in not_ours:
        assert choose_implementation(query, 2 if query.shape[1] != 32 else 8) != "cuda_decode", query.shape
    assert choose_implementation(fake_cuda_query(1, 32, 1, 128)) != "cuda_decode"  # KV heads unknown
    # long caches: the Triton kernels read memory faster, which outweighs their host cost
    large = CUDA_DECODE_MAX_BYTES + 1
    assert choose_implementation(fake_cuda_query(1, 32, 1, 128), 8, CUDA_DECODE_MAX_BYTES) == "cuda_decode"
    assert choose_implementation(fake_cuda_query(1, 32, 1, 128), 8, large) != "cuda_decode"
    # inside a CUDA graph capture only GPU time counts, where the Triton kernels are faster
    monkeypatch.setattr("adakv.cache.flat_attention.capturing_cuda_graph", lambda: True)
    assert choose_implementation(fake_cuda_query(1, 32, 1, 128), 8) != "cuda_decode"
    monkeypatch.setattr("adakv.cache.flat_attention.capturing_cuda_graph", lambda: False)
    monkeypatch.setenv("ADAKV_KERNELS", "reference")
    assert choose_implementation(fake_cuda_query(1, 32, 1, 128), 8) != "cuda_decode"


def test_decode_plan_picks_settings_within_one_percent_of_the_fastest_measured():
    """Against the committed H200 sweep (benchmarks/results/tune_decode_attention_NVIDIA_H200.json: 132 SMs,
    8 KV heads, GQA 4, head_dim 128, bf16); decode_plan is a pure function, so this runs without a GPU."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "tune_decode_attention_NVIDIA_H200.json"
    for case in json.loads(path.read_text())["cases"]:
        sizes, splits = triton_decode.decode_plan(case["rows_per_head"], case["batch"] * 8, 4, 128, torch.bfloat16, 132)
        picked = [
            setting for setting in case["settings"]
            if (setting["BLOCK_N"], setting["num_warps"], setting["num_stages"], setting["num_splits"])
            == (sizes["BLOCK_N"], sizes["num_warps"], sizes["num_stages"], splits)
        ]  # fmt: skip
        where = f"batch {case['batch']} x {case['rows_per_head']} rows"
        assert len(picked) == 1, f"{where}: the sweep did not measure {sizes} with {splits} splits"
        assert picked[0]["us"] <= 1.01 * case["best"]["us"], f"{where}: picked {picked[0]}, fastest {case['best']}"
    wide_sizes, _ = triton_decode.decode_plan(8192, 8, 4, 256, torch.bfloat16, 132)
    assert wide_sizes["BLOCK_N"] == 32  # 512-byte rows keep small key steps
