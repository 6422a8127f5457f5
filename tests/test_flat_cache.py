"""FlatHeadwiseLayer: compaction, append, growth, rollback and memory against a dense oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adakv.kernels import cuda_flat as kernels, flat_reference as kernels_reference
from adakv.cache.flat import FlatHeadwiseLayer
from adakv.cache.flat_attention import flat_attention


class Config:
    _attn_implementation = "adakv_sdpa"


def random_layer_inputs(batch, heads, seq_len, head_dim, dtype=torch.float32, seed=0, keep_prob=0.5):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, seq_len, head_dim, generator=generator).to(dtype)
    values = torch.randn(batch, heads, seq_len, head_dim, generator=generator).to(dtype)
    keep = torch.rand(batch, heads, seq_len, generator=generator) < keep_prob
    return keys, values, keep


def dense_oracle_rows(keys, values, keep, appended_keys=(), appended_values=(), skip=None):
    """Per (batch, head): the list of kept rows followed by every appended row, as a (len, d) tensor.
    skip: (batch,) leading tokens of the first appended step that batch row leaves out (its padding)."""
    batch, heads = keep.shape[:2]
    expected = {}
    for b in range(batch):
        first = [0 if skip is None else int(skip[b])] + [0] * len(appended_keys)
        for h in range(heads):
            k = [keys[b, h, keep[b, h]]] + [step[b, h, first[i] :] for i, step in enumerate(appended_keys)]
            v = [values[b, h, keep[b, h]]] + [step[b, h, first[i] :] for i, step in enumerate(appended_values)]
            expected[b * heads + h] = (torch.cat(k), torch.cat(v))
    return expected


def layer_rows(layer):
    rows = {}
    for s in range(layer.num_sequences):
        start, length = int(layer.offsets[s]), int(layer.lengths[s])
        rows[s] = (layer.keys[start : start + length], layer.values[start : start + length])
    return rows


def assert_matches_oracle(layer, expected):
    actual = layer_rows(layer)
    assert actual.keys() == expected.keys()
    for s, (k, v) in expected.items():
        assert torch.equal(actual[s][0], k), f"keys of sequence {s} differ"
        assert torch.equal(actual[s][1], v), f"values of sequence {s} differ"
    # regions never overlap and stay inside the buffer
    ends = layer.offsets + layer.capacity
    assert torch.all(layer.lengths <= layer.capacity)
    assert torch.all(layer.offsets[1:] == ends[:-1])
    assert int(ends[-1]) == layer.total_rows


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 4),
    seq_len=st.integers(1, 40),
    keep_prob=st.floats(0.0, 1.0),
    steps=st.lists(st.integers(1, 9), max_size=6),
    min_slack=st.integers(0, 8),
    seed=st.integers(0, 10_000),
)
def test_compaction_and_appends_match_dense_oracle(batch, heads, seq_len, keep_prob, steps, min_slack, seed):
    keys, values, keep = random_layer_inputs(batch, heads, seq_len, 8, seed=seed, keep_prob=keep_prob)
    layer = FlatHeadwiseLayer(keys, values, keep, Config(), min_slack=min_slack)
    assert_matches_oracle(layer, dense_oracle_rows(keys, values, keep))
    added_k, added_v = [], []
    generator = torch.Generator().manual_seed(seed + 1)
    for new_tokens in steps:
        new_k = torch.randn(batch, heads, new_tokens, 8, generator=generator)
        new_v = torch.randn(batch, heads, new_tokens, 8, generator=generator)
        layer.update(new_k, new_v)
        added_k.append(new_k)
        added_v.append(new_v)
    assert_matches_oracle(layer, dense_oracle_rows(keys, values, keep, added_k, added_v))
    assert layer.get_seq_length() == seq_len + sum(steps)
    assert torch.equal(layer.kept_counts(), keep.sum(-1) + sum(steps))


@settings(max_examples=25, deadline=None)
@given(
    seq_len=st.integers(1, 30),
    steps=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    cut=st.integers(0, 40),
    seed=st.integers(0, 10_000),
)
def test_rollback_then_append_matches_oracle(seq_len, steps, cut, seed):
    keys, values, keep = random_layer_inputs(2, 2, seq_len, 4, seed=seed)
    layer = FlatHeadwiseLayer(keys, values, keep, Config(), min_slack=2)
    generator = torch.Generator().manual_seed(seed)
    added = [torch.randn(2, 2, n, 4, generator=generator) for n in steps]
    for step in added:
        layer.update(step, -step)
    total = seq_len + sum(steps)
    target = seq_len + min(cut, sum(steps))
    layer.truncate(target)
    assert layer.get_seq_length() == min(target, total)
    appended = torch.cat(added, dim=2)[:, :, : target - seq_len]
    extra = torch.randn(2, 2, 3, 4, generator=generator)
    layer.update(extra, -extra)
    expected = dense_oracle_rows(keys, values, keep, [appended, extra], [-appended, -extra])
    assert_matches_oracle(layer, expected)


def test_rollback_into_context_is_refused():
    keys, values, keep = random_layer_inputs(1, 2, 10, 4)
    layer = FlatHeadwiseLayer(keys, values, keep, Config())
    layer.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="compressed context holds 10"):
        layer.truncate(9)
    layer.crop(-3)
    assert layer.get_seq_length() == 10
    with pytest.raises(ValueError, match="compressed context"):
        layer.crop(-1)


def test_batch_mismatch_is_refused():
    keys, values, keep = random_layer_inputs(2, 2, 10, 4)
    layer = FlatHeadwiseLayer(keys, values, keep, Config())
    with pytest.raises(ValueError, match="batch=3.*batch=2"):
        layer.update(torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4))


def test_non_adakv_attention_cannot_read_the_layer():
    keys, values, keep = random_layer_inputs(1, 2, 10, 4)
    config = Config()
    layer = FlatHeadwiseLayer(keys, values, keep, config)
    config._attn_implementation = "sdpa"
    with pytest.raises(RuntimeError, match="backend 'evict'.*attn_implementation='sdpa'"):
        layer.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_memory_is_kept_rows_plus_bounded_slack(dtype):
    keys, values, keep = random_layer_inputs(2, 4, 200, 16, dtype=dtype, keep_prob=0.3)
    layer = FlatHeadwiseLayer(keys, values, keep, Config(), min_slack=8)
    row_bytes = 2 * 16 * torch.finfo(dtype).bits // 8
    kept = int(keep.sum())
    assert layer.row_bytes == row_bytes
    assert layer.kv_bytes() == (kept + 8 * layer.num_sequences) * row_bytes
    assert layer.keys.dtype == dtype
    for _ in range(100):  # decode 100 tokens: slack grows geometrically, stays bounded
        layer.update(torch.randn(2, 4, 1, 16).to(dtype), torch.randn(2, 4, 1, 16).to(dtype))
    used = kept + 100 * layer.num_sequences
    slack_rows = layer.total_rows - used
    assert slack_rows >= 0
    # slack is at most max(growth * appended, slack_fraction * mean length) per head
    mean_length = used / layer.num_sequences
    assert layer.slack <= max(2 * 100, 0.125 * mean_length + 1, 8 * 2)
    assert layer.held_bytes() - layer.kv_bytes() < 1024  # metadata: a few int64 per head


def test_appends_are_amortised():
    """Re-layouts happen a logarithmic number of times while decoding."""
    keys, values, keep = random_layer_inputs(1, 2, 64, 4)
    layer = FlatHeadwiseLayer(keys, values, keep, Config(), min_slack=4)
    relayouts, buffer = 0, layer.keys
    for _ in range(500):
        layer.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
        if layer.keys is not buffer:
            relayouts, buffer = relayouts + 1, layer.keys
    assert 1 <= relayouts <= 8


def test_batch_select_and_repeat():
    keys, values, keep = random_layer_inputs(3, 2, 12, 4)
    layer = FlatHeadwiseLayer(keys, values, keep, Config())
    new = torch.randn(3, 2, 2, 4)
    layer.update(new, -new)
    layer.batch_select_indices(torch.tensor([2, 0]))
    expected = dense_oracle_rows(keys[[2, 0]], values[[2, 0]], keep[[2, 0]], [new[[2, 0]]], [-new[[2, 0]]])
    assert_matches_oracle(layer, expected)
    layer.batch_repeat_interleave(2)
    index = [2, 2, 0, 0]
    expected = dense_oracle_rows(keys[index], values[index], keep[index], [new[index]], [-new[index]])
    assert_matches_oracle(layer, expected)
    assert layer.batch_size == 4


def test_heads_with_no_kept_context_still_attend_new_tokens():
    keys, values, keep = random_layer_inputs(1, 2, 6, 4)
    keep[0, 0] = False
    layer = FlatHeadwiseLayer(keys, values, keep, Config())
    new = torch.randn(1, 2, 1, 4)
    layer.update(new, new)
    out = flat_attention(torch.randn(1, 4, 1, 4), layer, 0.5)
    assert torch.allclose(out[0, 0, :2], new[0, 0, 0].expand(2, 4))  # one key: output = its value
    assert torch.isfinite(out).all()


def test_reference_attention_matches_masked_dense_attention():
    """Multi-token append (causal), GQA group 3, uneven head lengths, against dense SDPA with a mask."""
    batch, kv_heads, group, seq_len, new_tokens, head_dim = 2, 2, 3, 20, 5, 8
    keys, values, keep = random_layer_inputs(batch, kv_heads, seq_len, head_dim)
    layer = FlatHeadwiseLayer(keys, values, keep, Config(), min_slack=2)
    new_k, new_v = torch.randn(batch, kv_heads, new_tokens, head_dim), torch.randn(batch, kv_heads, new_tokens, head_dim)
    layer.update(new_k, new_v)
    query = torch.randn(batch, kv_heads * group, new_tokens, head_dim)
    out = flat_attention(query, layer, head_dim**-0.5)

    dense_k = torch.cat([keys, new_k], 2).repeat_interleave(group, 1)
    dense_v = torch.cat([values, new_v], 2).repeat_interleave(group, 1)
    causal = torch.ones(new_tokens, new_tokens, dtype=torch.bool).tril()
    mask = torch.cat([keep[:, :, None, :].expand(-1, -1, new_tokens, -1), causal.expand(batch, kv_heads, -1, -1)], -1)
    mask = mask.repeat_interleave(group, 1)
    expected = torch.nn.functional.scaled_dot_product_attention(query, dense_k, dense_v, attn_mask=mask)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- kernel wrappers


def test_reference_kernels_move_rows():
    src = torch.arange(20.0).view(10, 2)
    dst_k, dst_v = torch.zeros(6, 2), torch.zeros(6, 2)
    kernels.copy_rows(src, -src, dst_k, dst_v, torch.tensor([3, 7]), torch.tensor([5, 0]))
    assert torch.equal(dst_k[5], src[3]) and torch.equal(dst_v[0], -src[7])
    new = torch.ones(2, 2, 2)
    lengths = torch.tensor([0, 1])
    kernels_reference.append_rows(dst_k, dst_v, new, new, torch.tensor([1, 2]), lengths)
    assert dst_k[1:5].eq(1).all() and dst_k[0].eq(src[7]).all() and lengths.tolist() == [2, 3]
    padded = torch.arange(12.0).view(2, 3, 2)
    kernels_reference.append_rows(dst_k, dst_v, padded, -padded, torch.tensor([0, 3]), torch.tensor([0, 0]), torch.tensor([2, 1]))
    assert torch.equal(dst_k[0], padded[0, 2]) and torch.equal(dst_v[3:5], -padded[1, 1:])
    # without padding (one index_copy_) the same rows as the general path with zero padding
    rows = torch.randn(3, 4, 2)
    results = []
    for first_token in (None, torch.zeros(3, dtype=torch.long)):
        keys, values, lengths = torch.zeros(30, 2), torch.zeros(30, 2), torch.tensor([2, 0, 5])
        kernels_reference.append_rows(keys, values, rows, -rows, torch.tensor([0, 10, 20]), lengths, first_token)
        results.append((keys, values, lengths))
    for (keys, values, lengths), (other_keys, other_values, other_lengths) in zip(results, results[1:]):
        assert torch.equal(keys, other_keys) and torch.equal(values, other_values) and torch.equal(lengths, other_lengths)
    assert torch.equal(results[0][0][10:14], rows[1]) and results[0][2].tolist() == [6, 4, 9]


def test_cuda_kernel_wrappers_refuse_cpu_tensors():
    rows = torch.zeros(4, 8, dtype=torch.float16)
    index = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="need CUDA tensors.*cpu"):
        kernels.cuda_copy_rows(rows, rows, rows, rows, index, index)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        kernels.cuda_append_rows(rows, rows, rows.view(1, 4, 8), rows.view(1, 4, 8), index, index)


@pytest.mark.parametrize(
    "rows, indices, message",
    [
        ({"a": torch.zeros(4, 8, dtype=torch.float64)}, {}, "support dtypes"),
        ({"a": torch.zeros(4, 6, dtype=torch.float16)}, {}, "multiple of 16 bytes.*head_dim=6"),
        ({"a": torch.zeros(4, 8, dtype=torch.float16), "b": torch.zeros(8, 4, dtype=torch.float16).t()}, {}, "contiguous"),
        ({"a": torch.zeros(4, 8, dtype=torch.float16), "b": torch.zeros(4, 8)}, {}, "dtype torch.float32"),
        ({"a": torch.zeros(4, 8, dtype=torch.float16)}, {"i": torch.zeros(3, dtype=torch.int32)}, "1-D int64"),
    ],
)
def test_cuda_kernel_inputs_are_checked(rows, indices, message):
    with pytest.raises((TypeError, ValueError), match=message):
        kernels.check_kernel_inputs(rows, indices, require_cuda=False)


def test_device_lengths_follow_appends_rollbacks_and_relayouts():
    """The device lengths (which the kernels read) follow appends, a rollback and re-layouts, and the rows
    match the dense oracle."""
    keys, values, keep = random_layer_inputs(2, 3, 40, 8, keep_prob=0.5)
    layer = FlatHeadwiseLayer(keys, values, keep, Config(), min_slack=4)
    added = []
    for step in range(150):
        if step == 100:
            layer.truncate(layer.context_length + 70)
            added = [torch.cat(added, dim=2)[:, :, :70]]
        assert torch.equal(layer.seq_lengths, layer.context_kept + layer.appended)
        new = torch.randn(2, 3, 1 + step % 2, 8)
        layer.update(new, -new)
        added.append(new)
    appended = torch.cat(added, dim=2)
    assert_matches_oracle(layer, dense_oracle_rows(keys, values, keep, [appended], [-appended]))


def test_reserve_makes_room_once_and_later_appends_move_no_buffer():
    keys, values, keep = random_layer_inputs(1, 2, 30, 8, keep_prob=0.5)
    layer = FlatHeadwiseLayer(keys, values, keep, Config(), min_slack=4)
    layer.reserve(50)
    buffers = (layer.keys.data_ptr(), layer.values.data_ptr(), layer.seq_lengths.data_ptr())
    for _ in range(50):
        new = torch.randn(1, 2, 1, 8)
        layer.update(new, new)
    assert (layer.keys.data_ptr(), layer.values.data_ptr(), layer.seq_lengths.data_ptr()) == buffers
    layer.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))  # past the reserve: one re-layout
    assert layer.keys.data_ptr() != buffers[0]


def test_skipped_leading_tokens_are_never_written():
    """A padded append writes only each row's real tokens; lengths differ per batch row; a rollback to the
    context works, a rollback into the padded append is refused."""
    keys, values, keep = random_layer_inputs(2, 3, 20, 8, keep_prob=0.5)
    layer = FlatHeadwiseLayer(keys, values, keep, Config(), min_slack=4)
    new = torch.randn(2, 3, 5, 8)
    layer.skip_leading_tokens(torch.tensor([3, 0]))
    layer.update(new, -new)
    counts = layer.kept_counts()
    assert torch.equal(counts, keep.sum(-1) + torch.tensor([[2], [5]]))
    assert_matches_oracle(layer, dense_oracle_rows(keys, values, keep, [new], [-new], skip=torch.tensor([3, 0])))
    with pytest.raises(NotImplementedError, match="padded question batch"):
        layer.truncate(layer.context_length + 2)
    layer.truncate(layer.context_length)
    assert torch.equal(layer.kept_counts(), keep.sum(-1)) and not layer.padded_appends


def test_split_workspace_reuses_its_buffer_and_grows():
    from adakv.kernels.triton_decode import SplitWorkspace

    workspace = SplitWorkspace()
    out, lse, counters = workspace.take(10, 4, 6, torch.device("cpu"))
    assert out.numel() >= 40 and lse.numel() >= 10 and out.dtype == torch.float32
    assert counters.dtype == torch.int32 and counters.numel() >= 6 and not counters.any()
    assert workspace.take(10, 4, 6, torch.device("cpu"))[0] is out  # same sizes: same views
    buffer = workspace.buffer
    small_out, small_lse, small_counters = workspace.take(5, 4, 3, torch.device("cpu"))
    assert workspace.buffer is buffer and small_lse.data_ptr() == buffer.data_ptr() + 20 * 4
    assert small_counters is counters  # fewer counters: the same buffer (the kernels leave them at zero)
    workspace.take(100, 4, 20, torch.device("cpu"))
    assert workspace.buffer.numel() >= 500 and workspace.counters.numel() >= 20 and not workspace.counters.any()
