"""The vLLM runtime's pieces that need no vLLM: pair-slot packing, the reference decode attention over packed
pages, per-request settings and the engine checks (the engine itself: tests/test_vllm_engine.py)."""

from types import SimpleNamespace

import pytest
import torch

from adakv.kernels.paged_decode import EMPTY_ROW
from adakv.runtimes.vllm.layout import PackedLayer, compressed_attention, gather_prompt, pack_layer
from adakv.runtimes.vllm.requests import (
    DENSE_TABLE_ROW,
    ServedRequest,
    ServedRequests,
    decode_batch,
    uniform_decode_batch,
)
from adakv.runtimes.vllm.settings import (
    ServingPress,
    check_engine,
    engine_setting,
    full_decode_graphs,
    request_setting,
)
from adakv.selection.headwise import kept_count

KV_HEADS, BLOCK_SIZE, HEAD_DIM, NUM_HEADS = 2, 4, 8, 4


def paged_request(prompt_len: int, tail: int, seed: int = 0):
    """A pool of 16 blocks and one request's shuffled block table, its prompt and tail written as vLLM
    writes them (slot = position, lane = head); returns caches, table and the dense rows per head."""
    generator = torch.Generator().manual_seed(seed)
    key_cache = torch.randn(16, KV_HEADS, BLOCK_SIZE, HEAD_DIM, generator=generator)
    value_cache = torch.randn(16, KV_HEADS, BLOCK_SIZE, HEAD_DIM, generator=generator)
    blocks_needed = -(-(prompt_len + tail) // BLOCK_SIZE)
    block_table = torch.randperm(16, generator=generator)[:blocks_needed]
    dense_keys = gather_prompt(key_cache, block_table, prompt_len + tail).clone()
    dense_values = gather_prompt(value_cache, block_table, prompt_len + tail).clone()
    return key_cache, value_cache, block_table, dense_keys, dense_values


def random_keep(prompt_len: int, per_head_counts: list[int], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    keep = torch.zeros(KV_HEADS, prompt_len, dtype=torch.bool)
    for head, count in enumerate(per_head_counts):
        keep[head, torch.randperm(prompt_len, generator=generator)[:count]] = True
    return keep


def reference_attention(query, positions, dense_keys, dense_values, keep, prompt_len, scale):
    """Each query head attends its KV head's kept prompt rows and the tail up to its own position."""
    out = torch.empty_like(query)
    group = NUM_HEADS // KV_HEADS
    for n, position in enumerate(positions.tolist()):
        for head in range(NUM_HEADS):
            kv = head // group
            visible = torch.cat([keep[kv], torch.ones(position + 1 - prompt_len, dtype=torch.bool)])
            keys, values = dense_keys[kv, : position + 1][visible], dense_values[kv, : position + 1][visible]
            weights = (keys @ query[n, head] * scale).softmax(-1)
            out[n, head] = weights @ values
    return out


@pytest.mark.parametrize("per_head_counts", [[5, 5], [9, 1], [1, 9], [10, 0]])
def test_packed_attention_equals_attention_over_the_kept_rows(per_head_counts):
    prompt_len, tail = 13, 3
    key_cache, value_cache, block_table, dense_keys, dense_values = paged_request(prompt_len, tail)
    keep = random_keep(prompt_len, per_head_counts)
    slots = sum(per_head_counts) // KV_HEADS
    packed = pack_layer(key_cache, value_cache, block_table, keep, slots)
    assert packed.lengths.tolist() == per_head_counts
    query = torch.randn(tail, NUM_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(prompt_len, prompt_len + tail)
    got = compressed_attention(query, positions, key_cache, value_cache, block_table, packed, prompt_len, 0.3)
    want = reference_attention(query, positions, dense_keys, dense_values, keep, prompt_len, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packing_writes_only_the_first_slots():
    """The pages the scheduler frees (wholly past the kept slots) and the tail are left as they were."""
    prompt_len, tail = 13, 3
    key_cache, value_cache, block_table, _, _ = paged_request(prompt_len, tail)
    before = key_cache.clone()
    slots = 5
    pack_layer(key_cache, value_cache, block_table, random_keep(prompt_len, [5, 5]), slots)
    untouched = block_table[-(-slots // BLOCK_SIZE) :]
    assert torch.equal(key_cache[untouched], before[untouched])
    others = torch.ones(16, dtype=torch.bool)
    others[block_table] = False
    assert torch.equal(key_cache[others], before[others])


def test_packing_refuses_more_pairs_than_reserved():
    key_cache, value_cache, block_table, _, _ = paged_request(13, 0)
    with pytest.raises(RuntimeError, match="more than the 8 the scheduler reserved"):
        pack_layer(key_cache, value_cache, block_table, random_keep(13, [5, 5]), 4)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75, 0.875, 0.9375, 0.999])
def test_scheduler_count_is_the_selections(ratio):
    """The scheduler frees pages from the ratio alone: its count must be what the selection keeps."""
    for prompt_len in [1, 2, 3, 7, 64, 99, 100, 101, 4097]:
        want = int(kept_count(torch.tensor(prompt_len), ratio))
        assert ServingPress("snapkv", ratio).kept_per_head(prompt_len) == want


def test_recent_queries_are_the_rows_the_press_declares():
    """SnapKV (plain or inside AdaptivePress) reads its window's queries; StreamingLLM none."""
    assert ServingPress("snapkv", 0.5, {"window_size": 24}).recent_queries_needed == 24
    assert ServingPress("adakv_snapkv", 0.5).recent_queries_needed == ServingPress("snapkv", 0.5).build().window_size
    assert ServingPress("adakv_streaming_llm", 0.5).recent_queries_needed == 0


def test_settings_refuse_what_is_not_served():
    with pytest.raises(ValueError, match="serves the presses"):
        ServingPress("kvzip", 0.5)
    with pytest.raises(ValueError, match=r"compression_ratio must be a number in \[0, 1\)"):
        ServingPress("snapkv", 1.0)
    with pytest.raises(ValueError, match="unknown"):
        ServingPress("snapkv", 0.5, {"n_sink": 2})
    with pytest.raises(ValueError, match="window_size"):
        ServingPress("snapkv", 0.5, {"window_size": 0})


def test_per_request_overrides():
    engine = engine_setting({"adakv": {"press": "adakv_snapkv", "compression_ratio": 0.75, "window_size": 16}})
    dense = request_setting(engine, SimpleNamespace(extra_args={"adakv": {"compression_ratio": 0}}))
    assert not dense.compresses and dense.options == {"window_size": 16}
    other = request_setting(engine, SimpleNamespace(extra_args={"adakv": {"press": "streaming_llm"}}))
    assert other.build().n_sink == 4 and other.compression_ratio == 0.75
    assert request_setting(engine, SimpleNamespace(extra_args=None)) is engine
    with pytest.raises(ValueError, match="must be a dict"):
        request_setting(engine, SimpleNamespace(extra_args={"adakv": 0.5}))


def engine_config(**changes):
    values = {
        "additional_config": {"adakv": {"press": "snapkv", "compression_ratio": 0.5}},
        "scheduler_cls": "adakv.runtimes.vllm.scheduler.CompressingScheduler",
        "worker_cls": "adakv.runtimes.vllm.worker.CompressingCPUWorker",
        "enable_prefix_caching": False, "tensor_parallel_size": 1, "speculative_config": None,
    } | changes  # fmt: skip
    return SimpleNamespace(
        additional_config=values["additional_config"],
        scheduler_config=SimpleNamespace(scheduler_cls=values["scheduler_cls"]),
        parallel_config=SimpleNamespace(
            worker_cls=values["worker_cls"], tensor_parallel_size=values["tensor_parallel_size"],
            pipeline_parallel_size=1,
        ),
        cache_config=SimpleNamespace(enable_prefix_caching=values["enable_prefix_caching"]),
        speculative_config=values["speculative_config"],
    )  # fmt: skip


def test_engine_checks():
    assert check_engine(engine_config()).compression_ratio == 0.5
    with pytest.raises(ValueError, match="needs both its scheduler"):
        check_engine(engine_config(scheduler_cls=None))
    with pytest.raises(ValueError, match="needs both its scheduler"):
        check_engine(engine_config(worker_cls="auto"))
    with pytest.raises(ValueError, match="prefix caching"):
        check_engine(engine_config(enable_prefix_caching=True))
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        check_engine(engine_config(tensor_parallel_size=2))
    with pytest.raises(ValueError, match="without additional_config"):
        check_engine(engine_config(additional_config={}))


def scheduled(new=(), finished=()):
    """A SchedulerOutput with the fields ServedRequests reads: new requests (id, prompt length, first block)."""
    return SimpleNamespace(
        finished_req_ids=set(finished),
        scheduled_new_reqs=[
            SimpleNamespace(
                req_id=req_id, sampling_params=SimpleNamespace(extra_args=None), prompt_token_ids=[1] * prompt_len,
                block_ids=([block],), num_computed_tokens=0,
            )
            for req_id, prompt_len, block in new
        ],  # fmt: skip
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], num_computed_tokens=[], resumed_req_ids=set()),
        num_scheduled_tokens={req_id: prompt_len for req_id, prompt_len, _ in new},
    )


def test_offset_tables_hold_each_requests_packing_and_reuse_finished_rows():
    served = ServedRequests(ServingPress("snapkv", 0.5))
    served.allocate_offset_tables(num_layers=2, kv_heads=3, capacity=2, device="cpu")
    tables = served.offset_tables
    served.update(scheduled(new=[("a", 40, 3), ("b", 30, 7)]))
    a, b = served.by_id["a"], served.by_id["b"]
    assert DENSE_TABLE_ROW not in (a.table_row, b.table_row) and a.table_row != b.table_row
    packed = PackedLayer(
        lengths=torch.tensor([5, 0, 3]), offsets=torch.tensor([0, 5, 5]), kept_positions=torch.arange(8)
    )
    served.record_offsets(b, layer=1, packed=packed)
    assert served.offset_tables[1][b.table_row].tolist() == [0, 5, 5, 8]
    assert served.offset_tables.dtype == torch.int32 and served.offset_tables[:, DENSE_TABLE_ROW].eq(0).all()
    with pytest.raises(RuntimeError, match="offset tables are full"):
        served.update(scheduled(new=[("x", 20, 11)]))
    served.by_id.pop("x", None)
    a_row = a.table_row
    served.update(scheduled(new=[("c", 20, 9)], finished=["a"]))
    assert served.by_id["c"].table_row == a_row  # a finished request's row is reused
    assert served.rows([7, 9, 11]) == [b, served.by_id["c"], None]
    assert served.offset_tables is tables  # never reallocated: a CUDA graph reads it where it was captured


def test_preempted_requests_give_back_their_row_and_take_one_when_they_resume():
    served = ServedRequests(ServingPress("snapkv", 0.5))
    served.allocate_offset_tables(num_layers=1, kv_heads=2, capacity=1, device="cpu")
    served.update(scheduled(new=[("a", 40, 3)]))
    a = served.by_id["a"]
    assert a.table_row == 1
    step = scheduled(new=[])
    step.preempted_req_ids = {"a"}
    served.update(step)
    assert a.table_row == -1
    served.update(scheduled(new=[("b", 30, 7)]))  # the only row, free again
    served.update(scheduled(new=[], finished=["b"]))
    resumed = scheduled(new=[])
    resumed.scheduled_cached_reqs = SimpleNamespace(
        req_ids=["a"], num_computed_tokens=[0], resumed_req_ids={"a"}, new_block_ids=[([5],)]
    )
    served.update(resumed)
    assert a.table_row == 1 and a.first_block == 5


def test_without_offset_tables_requests_take_no_row_and_recording_offsets_is_refused():
    """The CPU backend reads no offset tables: none are allocated there."""
    served = ServedRequests(ServingPress("snapkv", 0.5))
    served.update(scheduled(new=[("a", 40, 3)]))
    assert served.by_id["a"].table_row == -1
    packed = PackedLayer(lengths=torch.tensor([1]), offsets=torch.tensor([0]), kept_positions=torch.arange(1))
    with pytest.raises(RuntimeError, match="no row in the offset tables"):
        served.record_offsets(served.by_id["a"], 0, packed)


def test_decode_batch_finds_the_rows_that_decode_from_packed_pages():
    """Rows: a dense one (None), a compressed request still in its prefill, one decoding after a prompt
    packed in both layers, one packed in a single layer (not yet decodable from pages), and another decoder."""
    setting = ServingPress("adakv_snapkv", 0.75)
    prefill = ServedRequest("a", setting, prompt_len=100, first_block=0, computed=40, scheduled=30)
    decoding = ServedRequest("b", setting, prompt_len=100, first_block=7, computed=103, scheduled=1, table_row=4)
    half = ServedRequest("c", setting, prompt_len=100, first_block=9, computed=100, scheduled=1)
    other = ServedRequest("d", setting, prompt_len=64, first_block=12, computed=64, scheduled=1, table_row=2)
    for request, layers in ((decoding, 2), (half, 1), (other, 2)):
        request.packed = {layer: None for layer in range(layers)}
    batch = decode_batch([None, prefill, decoding, half, other], num_layers=2, query_start=[0, 5, 35, 36, 37, 38])
    assert batch.decoding == [False, False, True, False, True]
    # (query token, batch row, prompt_len, offset-table row)
    assert batch.rows_info == [[35, 2, 100, 4], [37, 4, 64, 2]]
    assert decode_batch([None, prefill], 2, [0, 5, 35]).rows_info == []
    assert prefill.in_prompt and not decoding.in_prompt


def test_uniform_decode_batch_takes_every_row_dense_ones_as_tail_and_padding_empty():
    setting = ServingPress("adakv_snapkv", 0.75)
    decoding = ServedRequest("b", setting, prompt_len=100, first_block=7, computed=103, scheduled=1, table_row=4)
    batch = uniform_decode_batch([None, decoding, None], batch_rows=4)
    assert batch.decoding == [True] * 4
    assert batch.rows_info == [
        [0, 0, 0, DENSE_TABLE_ROW],
        [1, 1, 100, 4],
        [2, 2, 0, DENSE_TABLE_ROW],
        [3, 3, EMPTY_ROW, DENSE_TABLE_ROW],
    ]


def test_compresses_this_step_while_a_compressed_prompt_runs():
    served = ServedRequests(ServingPress("snapkv", 0.5))
    served.update(scheduled(new=[("a", 40, 3)]))
    assert served.compresses_this_step()
    served.by_id["a"].computed, served.by_id["a"].scheduled = 40, 1
    assert not served.compresses_this_step()


def test_full_decode_graphs_is_an_engine_switch_off_by_default():
    setting = {"press": "adakv_snapkv", "compression_ratio": 0.75}
    assert not full_decode_graphs({"adakv": setting}) and not full_decode_graphs(None)
    assert full_decode_graphs({"adakv": {**setting, "full_decode_graphs": True}})
    assert engine_setting({"adakv": {**setting, "full_decode_graphs": True}}).compression_ratio == 0.75
    with pytest.raises(ValueError, match="full_decode_graphs.*true or false"):
        full_decode_graphs({"adakv": {**setting, "full_decode_graphs": "yes"}})
