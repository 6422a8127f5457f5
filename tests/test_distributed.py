"""Tensor parallelism on CPU: two spawned processes, a gloo process group.

1. The Ada-KV selection with a tensor-parallel reduction (adakv/selection/distributed.py, both exchanges) keeps
   exactly the set of the single-process `adaptive_keep_mask`, ties included; the model-wide one (every layer
   at once) the set of the single-process allocation over every (layer, head).
2. transformers' own tensor-parallel plan (tp_plan="auto") with presses: TP = 2 keeps the same
   (layer, head, token) set as one process and generates the same tokens, ordinary and chunked prefill
   (needs accelerate). The same test runs over NCCL on 2 GPUs (marked gpu, skipped with fewer).

Every worker destroys its process group in a `finally`, the parent joins with a timeout and kills
what is left, so a failing or hanging rank never outlives the test.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_presses import SCORERS

from adakv import AdaptivePress, CriticalKVPress, SnapKVPress
from adakv.selection.distributed import EXCHANGES, order_keys, tensor_parallel_reduction
from adakv.models import attention_modules, tensor_parallel_group
from adakv.selection import adaptive_budget_keep_mask, adaptive_keep_mask, kept_count, model_keep_masks

WORLD_SIZE = 2
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, function, out_dir: str, port: int, backend: str, args: tuple) -> None:
    """One rank: joins the group (gloo on CPU, nccl on GPU `rank`), runs `function(rank, *args)`, saves its
    result (on the CPU) or its traceback."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE), LOCAL_WORLD_SIZE=str(WORLD_SIZE),
    )  # fmt: skip
    torch.set_num_threads(1)
    result_path = Path(out_dir) / f"rank{rank}.pt"
    timeout = timedelta(seconds=TIMEOUT_S // 2)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
            os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
            dist.init_process_group("nccl", rank=rank, world_size=WORLD_SIZE, timeout=timeout, device_id=torch.device("cuda", rank))
        else:
            dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timeout)
        torch.save({"result": to_cpu(function(rank, *args))}, result_path)
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test with it
        torch.save({"error": traceback.format_exc()}, result_path)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(item) for item in value)
    return value


def run_on_ranks(function, tmp_path: Path, *args, backend: str = "gloo") -> list:
    """Run `function(rank, *args)` on WORLD_SIZE spawned processes; return every rank's result."""
    context = mp.start_processes(
        _worker, args=(function, str(tmp_path), free_port(), backend, args), nprocs=WORLD_SIZE, join=False,
        start_method="spawn",
    )  # fmt: skip
    finished, deadline = False, time.monotonic() + TIMEOUT_S
    try:
        # join returns whenever one rank exits (True once all have), and raises when a rank failed
        while not finished and time.monotonic() < deadline:
            finished = context.join(timeout=max(deadline - time.monotonic(), 0.1))
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        finished = True  # the rank's traceback is in its result file
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    assert finished, f"the ranks did not finish within {TIMEOUT_S} s (killed)"
    results = []
    for rank in range(WORLD_SIZE):
        path = tmp_path / f"rank{rank}.pt"
        assert path.exists(), f"rank {rank} wrote no result (killed or timed out after {TIMEOUT_S} s)"
        saved = torch.load(path, weights_only=False)
        assert "error" not in saved, f"rank {rank} failed:\n{saved['error']}"
        results.append(saved["result"])
    return results


# ----- 1. the selection exchange alone -------------------------------------------------------------


def layer_scores(case: str, batch: int = 2, heads: int = 4, seq_len: int = 40, seed: int = 0):
    """(scores, available) of a whole layer; "ties" rounds scores to a few levels so many are equal."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, seq_len, generator=generator)
    if case == "ties":
        scores = torch.round(scores * 2) / 2
        scores[0, :, :5] = 0.0
        scores[0, 1, :3] = -0.0  # equal to 0.0 for a sort
    if case == "infinite":
        scores[:, 0, 10:20] = float("inf")
        scores[:, 2, :8] = float("-inf")
    available = torch.rand(batch, heads, seq_len, generator=generator) > 0.2
    available[1, :, :6] = False  # a padded row
    return scores, available


SELECTION_CASES = [(case, ratio, alpha) for case in ("random", "ties", "infinite") for ratio, alpha in [(0.5, 0.2), (0.8, 0.0), (0.3, 1.0)]]


def _selection_on_rank(rank: int, cases) -> dict:
    results = {}
    for case, ratio, alpha in cases:
        scores, available = layer_scores(case)
        heads = scores.shape[1] // WORLD_SIZE
        mine = slice(rank * heads, (rank + 1) * heads)
        for exchange in EXCHANGES:
            for radix_bits in ((1, 8) if exchange == "threshold_search" else (8,)):
                reduction = tensor_parallel_reduction(exchange=exchange, radix_bits=radix_bits)
                keep = adaptive_keep_mask(scores[:, mine], available[:, mine], ratio, alpha, reduction)
                results[(case, ratio, alpha, exchange, radix_bits)] = keep
    return results


def test_cross_rank_selection_equals_single_process(tmp_path):
    per_rank = run_on_ranks(_selection_on_rank, tmp_path, SELECTION_CASES)
    for key in per_rank[0]:
        case, ratio, alpha = key[:3]
        scores, available = layer_scores(case)
        expected = adaptive_keep_mask(scores, available, ratio, alpha)
        actual = torch.cat([result[key] for result in per_rank], dim=1)
        assert torch.equal(actual, expected), f"{key}: {int((actual != expected).sum())} pairs differ"
        assert int(expected.sum()) > 0


def model_scores(case: str, ratios=(0.5, 0.8, 0.3)):
    """Per layer (scores, available) of a 3-layer model (one seed per layer) and the layers' ratios."""
    layers = [layer_scores(case, seed=seed) for seed in range(len(ratios))]
    return [scores for scores, _ in layers], [available for _, available in layers], list(ratios)


def single_process_model_keep(case: str, alpha: float) -> torch.Tensor:
    """(batch, layers * heads, seq): AdaptivePress(scope="model")'s allocation in one process."""
    scores, available, ratios = model_scores(case)
    budget = sum(kept_count(a.sum(-1), ratio).sum(-1) for a, ratio in zip(available, ratios))
    return adaptive_budget_keep_mask(torch.cat(scores, 1), torch.cat(available, 1), budget, alpha)


def _model_selection_on_rank(rank: int, cases) -> dict:
    results = {}
    for case, alpha in cases:
        scores, available, ratios = model_scores(case)
        heads = scores[0].shape[1] // WORLD_SIZE
        mine = slice(rank * heads, (rank + 1) * heads)
        for exchange in EXCHANGES:
            for radix_bits in ((1, 8) if exchange == "threshold_search" else (8,)):
                results[(case, alpha, exchange, radix_bits)] = model_keep_masks(
                    [s[:, mine] for s in scores], [a[:, mine] for a in available], ratios, alpha,
                    tensor_parallel_reduction(exchange=exchange, radix_bits=radix_bits),
                )  # fmt: skip
    return results


def test_cross_rank_model_wide_selection_equals_single_process(tmp_path):
    cases = [(case, alpha) for case in ("random", "ties", "infinite") for alpha in (0.0, 0.2, 1.0)]
    per_rank = run_on_ranks(_model_selection_on_rank, tmp_path, cases)
    for key in per_rank[0]:
        case, alpha = key[:2]
        # every layer's heads of every rank, in the single-process order: layer, then rank, then head
        actual = torch.cat([torch.cat([result[key][layer] for result in per_rank], 1) for layer in range(3)], 1)
        expected = single_process_model_keep(case, alpha)
        assert torch.equal(actual, expected), f"{key}: {int((actual != expected).sum())} pairs differ"
        kept_per_layer = expected.view(2, 3, 4, -1).sum((-1, -2))
        assert (kept_per_layer > 0).all()


def test_order_keys_preserve_the_float_order():
    values = torch.tensor([float("-inf"), -3.5, -1e-30, 0.0, 1e-30, 2.0, 7.25, float("inf")])
    keys = order_keys(values)
    assert torch.equal(keys.argsort(), torch.arange(len(values)))
    assert int(keys.min()) >= 0 and int(keys.max()) < 2**32


def test_bad_exchange_names_the_allowed_ones():
    with pytest.raises(ValueError, match="exchange must be one of"):
        tensor_parallel_reduction(exchange="gossip")
    with pytest.raises(ValueError, match="radix_bits must be one of"):
        tensor_parallel_reduction(exchange="threshold_search", radix_bits=3)
    with pytest.raises(ValueError, match="exchange must be one of"):
        AdaptivePress(SnapKVPress(0.5), exchange="broadcast")
    scores, available, ratios = model_scores("random")
    with pytest.raises(ValueError, match="one scores, availability and ratio per compressed layer, got 3, 3 and 2"):
        model_keep_masks(scores, available, ratios[:2], 0.2, tensor_parallel_reduction())
    with pytest.raises(ValueError, match="of one shape"):
        model_keep_masks([scores[0], scores[1][:, :, :7]], available[:2], ratios[:2], 0.2, tensor_parallel_reduction())


def test_heads_split_without_a_tensor_parallel_plan_are_refused():
    from conftest import tiny_model

    module = attention_modules(tiny_model("llama"))[0]  # 2 KV heads, plain weights
    assert tensor_parallel_group(module, local_heads=2) is None
    with pytest.raises(NotImplementedError, match="holds 1 of the layer's 2 KV heads"):
        tensor_parallel_group(module, local_heads=1)


# ----- 2. transformers' tensor-parallel plan end to end ---------------------------------------------

SEQ = 40
NEW_TOKENS = 4


def tp_presses():
    """(name, press factory by backend): uniform presses run rank-locally, AdaptivePress exchanges.
    Every sdpa scorer of the press matrix except RandomPress, whose numbers depend on how many heads
    one process draws them for (ObservedAttentionPress needs eager attention: covered on one process)."""
    cases = {
        name: lambda b, make=make: _with_backend(make(0.5), b) for name, make in SCORERS.items()
        if name not in ("random", "observed_attention")
    }
    cases["criticalkv"] = lambda b: CriticalKVPress(SnapKVPress(0.5, window_size=8), backend=b)
    for exchange in EXCHANGES:
        cases[f"adaptive_snapkv_{exchange}"] = lambda b, e=exchange: AdaptivePress(
            SnapKVPress(0.6, window_size=8), exchange=e, backend=b
        )
    cases["adaptive_criticalkv"] = lambda b: AdaptivePress(CriticalKVPress(SnapKVPress(0.5, window_size=8)), backend=b)
    for exchange in EXCHANGES:  # one allocation over every layer: exchanged once, after the prefill
        cases[f"adaptive_model_snapkv_{exchange}"] = lambda b, e=exchange: AdaptivePress(
            SnapKVPress(0.6, window_size=8), scope="model", exchange=e, backend=b
        )
    return cases


def _with_backend(press, backend: str):
    press.backend = backend
    return press


def save_tiny(family: str, path: Path) -> None:
    from conftest import tiny_model

    tiny_model(family).save_pretrained(path)  # 2 KV heads


def generate_with_presses(model, ids, names) -> dict:
    """{(press, backend): (generated tokens, {layer: context keep mask or kept counts})}."""
    from test_multi_gpu import chunked_run
    from transformers import DynamicCache

    from adakv import kept_token_counts
    from adakv.cache import compressed_layers

    results = {}
    presses = tp_presses()
    for name in names:
        for backend in ("mask", "evict"):
            press = presses[name](backend)
            cache = DynamicCache(config=model.config)
            with torch.no_grad(), press(model):
                out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, past_key_values=cache)
            layers = compressed_layers(cache)
            kept = {i: layer.context_keep if backend == "mask" else layer.kept_counts() for i, layer in layers.items()}
            results[(name, backend)] = (out[0, ids.shape[1] :].tolist(), kept)
    for exchange in EXCHANGES:  # chunked prefill: every chunk's selection is exchanged
        logits, cache = chunked_run(model, presses[f"adaptive_snapkv_{exchange}"]("evict"), ids, chunk_size=16)
        tokens = [int(step.argmax(-1)) for step in logits]
        results[(f"chunked_{exchange}", "evict")] = (tokens, kept_token_counts(cache))
    return results


# Llama's plan splits the KV heads (one per rank); Phi3's gathers its fused qkv output, so every rank holds
# both heads and selects locally (CriticalKV then needs the whole o_proj).
FAMILIES = {
    "llama": (1, tuple(tp_presses())),
    "phi3": (2, ("snapkv", "criticalkv", "adaptive_snapkv_all_gather", "adaptive_snapkv_threshold_search",
                 "adaptive_criticalkv", "adaptive_model_snapkv_all_gather")),
}


def _tensor_parallel_on_rank(rank: int, model_path: str, family: str) -> dict:
    from transformers import AutoModelForCausalLM, DistributedConfig

    from conftest import random_ids

    model = AutoModelForCausalLM.from_pretrained(
        model_path, distributed_config=DistributedConfig(tp_plan="auto"), attn_implementation="sdpa", dtype=torch.float32
    )
    heads_per_rank, names = FAMILIES[family]
    split = [tensor_parallel_group(module, heads_per_rank) is not None for module in attention_modules(model)]
    assert all(split) if heads_per_rank == 1 else not any(split), f"heads split: {split}"
    if heads_per_rank == 1:  # sharded projections cannot be joined into one matrix: refused, model untouched
        from adakv.runtimes.hf.fusion.joined_projections import joined_projections

        with pytest.raises(ValueError, match="tensor subclass"):
            with joined_projections(model):
                pass
    results = generate_with_presses(model.eval(), random_ids(1, SEQ).to(model.device), names)
    held = {kept.shape[1] for _, layers in results.values() for kept in layers.values()}
    assert held == {heads_per_rank}, f"expected {heads_per_rank} KV heads per rank, got {held}"
    # fused norms, rotary and SiLU gates work on each rank's shards: the same tokens as unfused
    from adakv.runtimes.hf.fusion.elementwise import REFERENCE_KERNELS, fused_elementwise

    kernels = None if model.device.type == "cuda" else REFERENCE_KERNELS  # Triton on GPUs
    with fused_elementwise(model, kernels) as fused:
        fused_results = generate_with_presses(model, random_ids(1, SEQ).to(model.device), ["adaptive_snapkv_all_gather"])
    assert fused.norms > 0 and fused.rotary_modules
    for key, (tokens, _) in fused_results.items():
        assert tokens == results[key][0], f"{key}: fused elementwise kernels changed the tokens under tensor parallelism"
    return results


GPU_COUNT = torch.cuda.device_count() if torch.cuda.is_available() else 0
BACKENDS = [
    pytest.param("gloo", id="cpu-gloo"),
    pytest.param(
        "nccl", id="gpu-nccl",
        marks=[pytest.mark.gpu, pytest.mark.skipif(GPU_COUNT < 2, reason=f"needs 2 CUDA devices, found {GPU_COUNT}")],
    ),
]  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_parallel_keeps_the_single_process_set(tmp_path, backend, family):
    pytest.importorskip("accelerate", reason="transformers' tp_plan loading needs accelerate (pip install adakv[multi])")
    from transformers import AutoModelForCausalLM

    from conftest import random_ids

    save_tiny(family, tmp_path / "model")
    per_rank = run_on_ranks(_tensor_parallel_on_rank, tmp_path, str(tmp_path / "model"), family, backend=backend)
    device = "cuda:0" if backend == "nccl" else "cpu"
    single = AutoModelForCausalLM.from_pretrained(tmp_path / "model", attn_implementation="sdpa", dtype=torch.float32)
    ids = random_ids(1, SEQ).to(device)
    expected = to_cpu(generate_with_presses(single.to(device).eval(), ids, FAMILIES[family][1]))
    heads_per_rank = FAMILIES[family][0]
    for key, (tokens, kept) in expected.items():
        assert per_rank[0][key][0] == tokens and per_rank[1][key][0] == tokens, f"{key}: generated tokens differ"
        assert kept, f"{key}: nothing was compressed"
        for layer, expected_kept in kept.items():
            if heads_per_rank == 1:  # each rank holds one head: together they hold the layer
                actual = torch.cat([result[key][1][layer] for result in per_rank], dim=1)
            else:  # every rank holds every head and must select the same
                assert torch.equal(per_rank[0][key][1][layer], per_rank[1][key][1][layer]), f"{key}: ranks differ"
                actual = per_rank[0][key][1][layer]
            assert torch.equal(actual, expected_kept), f"{key}, layer {layer}: kept set differs"


# ----- 3. the 2-GPU benchmark's command line -----------------------------------------------------------


def test_multi_gpu_benchmark_parses_its_arguments():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_multi_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_multi_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert os.environ["NCCL_NVLS_ENABLE"] == "0" and os.environ["NVSHMEM_DISABLE_NVLS"] == "1"
    args = bench.parse_args([])
    assert args.contexts == [131072, 262144, 524288] and args.ratios == [0.75, 0.875] and args.layers == 32
    assert bench.parse_args(["--tiny"]).contexts == [512, 1024]
    with pytest.raises(SystemExit):
        bench.parse_args(["--ratios", "1.5"])
    with pytest.raises(SystemExit, match="torchrun"):
        bench.start_process_group() if "RANK" not in os.environ else pytest.skip("running under torchrun")
