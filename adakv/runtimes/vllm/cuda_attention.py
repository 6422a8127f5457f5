"""adakv's attention backend for vLLM on CUDA: FlashAttention, plus compression and packed-page decode.

Registered as vLLM's CUSTOM backend (the plugin) and picked by `engine_args` (`attention_backend`), so
engines without adakv keep vLLM's own. Per step, the metadata builder takes one of two paths:

- with `full_decode_graphs` (an engine setting, off by default), *one new token per row* (a decode step,
  the only kind vLLM then replays from full CUDA graphs): every row, compressed or dense, goes through
  `packed_decode_attention` (Triton), whose inputs live in persistent buffers (rows, offset tables, vLLM's
  seq_lens and block table) and whose grid depends on the batch size only; FlashAttention is skipped.
  The worker keeps vLLM from replaying a full graph in a step where a compressed request runs part of
  its prompt (`cuda_worker.py`).
- *other steps* (prefill chunks, the compression step, a recomputation after preemption): the rows of
  compressed requests that decode after a packed prompt go through the kernel, FlashAttention seeing a
  sequence of one key for them (its output is overwritten); the others go through `serve_layer` in torch,
  after FlashAttention ran over their dense pages; a step whose every row decodes after a packed prompt
  skips FlashAttention. These steps run piecewise CUDA graphs (everything but attention replayed).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from vllm.config import get_current_vllm_config
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)

from adakv.kernels.device import multiprocessor_count
from adakv.kernels.paged_decode import (
    ROW_FIELDS,
    DecodePlan,
    decode_plan,
    packed_decode_attention,
    packed_decode_reference,
)

from .compression import serve_layer
from .requests import DecodeBatch, ServedRequest, decode_batch, served_requests, uniform_decode_batch
from .settings import full_decode_graphs

# tests: every decode launch also runs the torch reference and records the largest difference (slow)
CHECK_DECODE = os.environ.get("ADAKV_VLLM_CHECK_DECODE") == "1"


@dataclass
class DecodeRows:
    """The step's rows for the packed-page kernel.

    rows_info: (rows, 4) int32 on the device (adakv.kernels.paged_decode's columns); seq_lens: vLLM's
    (batch rows,) int32 lengths on the device; plan: its programs per row; only_decode: no other row in the batch
    (FlashAttention is skipped); compressed: some row reads packed pairs."""

    rows_info: torch.Tensor
    seq_lens: torch.Tensor
    plan: DecodePlan
    only_decode: bool
    compressed: bool


@dataclass
class CompressingFlashMetadata(FlashAttentionMetadata):
    """FlashAttention's metadata plus the step's compressed rows (None where a row is dense or decodes
    from packed pages) and its decode rows."""

    served_rows: list[ServedRequest | None] | None = None
    query_start_host: list[int] | None = None
    decode_rows: DecodeRows | None = None


class CompressingFlashBuilder(FlashAttentionMetadataBuilder):
    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        if full_decode_graphs(vllm_config.additional_config):
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.full_decode_graphs = full_decode_graphs(vllm_config.additional_config)
        self.num_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
        self.num_sms = multiprocessor_count(torch.device(device).index or 0)
        max_num_seqs = vllm_config.scheduler_config.max_num_seqs
        # a full graph reads its rows where they were at capture: one buffer for every batch size
        self.rows_buffer = torch.zeros(
            max(max_num_seqs, self.max_cudagraph_size or 0), ROW_FIELDS, dtype=torch.int32, device=device
        )
        served = served_requests()
        if served is None:
            raise RuntimeError("adakv's CUDA attention backend runs with adakv's worker (engine_args sets both)")
        # finished requests reach the worker a step late: rows for twice the requests that can run at once
        served.allocate_offset_tables(self.num_layers, self.num_heads_kv, 2 * max_num_seqs, device)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        served = served_requests()
        num_reqs = common_attn_metadata.num_reqs
        rows = served.rows_of_batch(num_reqs)
        uniform_decode = common_attn_metadata.max_query_len == 1 and not any(row and row.in_prompt for row in rows)
        if self.full_decode_graphs and uniform_decode:
            return self._build_uniform_decode(common_prefix_len, common_attn_metadata, fast_build, rows)
        if not any(rows):
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        query_start = common_attn_metadata.query_start_loc_cpu[: num_reqs + 1].tolist()
        batch = decode_batch(rows, self.num_layers, query_start)
        seq_lens = common_attn_metadata.seq_lens
        if batch.rows_info:
            common_attn_metadata = self._one_key_for(common_attn_metadata, batch.decoding)
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        others = [None if decodes else request for request, decodes in zip(rows, batch.decoding)]
        return CompressingFlashMetadata(
            **self._fields_of(metadata),
            served_rows=others if any(others) else None,
            query_start_host=query_start,
            decode_rows=self._decode_rows(batch, seq_lens, only_decode=False) if batch.rows_info else None,
        )

    def _build_uniform_decode(self, common_prefix_len, common, fast_build, rows):
        """One new token per row: every row through the kernel (padding rows empty), from the persistent
        rows buffer."""
        num_reqs = common.num_reqs  # the step's requests (`rows`, recorded by the worker) and the padding;
        # at a graph's capture `rows` are whatever was last: nothing captured depends on the rows' values
        batch = uniform_decode_batch(rows, num_reqs)
        metadata = super().build(common_prefix_len, common, fast_build)
        return CompressingFlashMetadata(
            **self._fields_of(metadata),
            decode_rows=self._decode_rows(batch, common.seq_lens, only_decode=True, buffer=self.rows_buffer),
        )

    @staticmethod
    def _fields_of(metadata: FlashAttentionMetadata) -> dict:
        return {f.name: getattr(metadata, f.name) for f in dataclasses.fields(FlashAttentionMetadata)}

    def _one_key_for(self, common, decoding: list[bool]):
        """The batch with a sequence of one key for each decode row: FlashAttention reads its first
        slot only (a packed pair), not pages the scheduler has freed."""
        mask = torch.tensor(decoding, dtype=torch.bool).pin_memory().to(self.device, non_blocking=True)
        seq_lens = torch.where(mask, torch.ones_like(common.seq_lens[: len(decoding)]), common.seq_lens[: len(decoding)])
        max_seq_len = common.max_seq_len
        if common.seq_lens_cpu_upper_bound is not None:
            dense = [int(n) for n, d in zip(common.seq_lens_cpu_upper_bound.tolist(), decoding) if not d]
            max_seq_len = max(dense, default=1)
        return dataclasses.replace(common, seq_lens=seq_lens, max_seq_len=max_seq_len)

    def _decode_rows(self, batch: DecodeBatch, seq_lens, only_decode: bool, buffer=None) -> DecodeRows:
        """The rows on the device, with a plan that depends on the number of rows only."""
        plan = decode_plan(len(batch.rows_info), self.num_heads_kv, self.num_sms)
        host = torch.tensor(batch.rows_info, dtype=torch.int32).pin_memory()
        if buffer is None:
            rows_info = host.to(self.device, non_blocking=True)
        else:
            rows_info = buffer[: len(batch.rows_info)]
            rows_info.copy_(host, non_blocking=True)
        compressed = any(info[2] > 0 for info in batch.rows_info)
        return DecodeRows(
            rows_info=rows_info, seq_lens=seq_lens, plan=plan, only_decode=only_decode, compressed=compressed
        )


class CompressingFlashImpl(FlashAttentionImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_layers = get_current_vllm_config().model_config.hf_text_config.num_hidden_layers

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        decode = getattr(attn_metadata, "decode_rows", None)
        served_rows = getattr(attn_metadata, "served_rows", None)
        if decode is None or not decode.only_decode:
            output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if decode is None and served_rows is None:
            return output
        layer_index = extract_layer_index(layer.layer_name)
        key_cache, value_cache = kv_cache.split(self.head_size, dim=-1)  # (blocks, kv_heads, block_size, D)
        heads_out = output.view(output.shape[0], self.num_heads, self.head_size)
        served = served_requests()
        if served_rows is not None:
            serve_layer(
                served_rows, attn_metadata.query_start_host, layer_index, self.num_layers, query, heads_out,
                key_cache, value_cache, attn_metadata.block_table, self.scale, offsets_for=served,
            )  # fmt: skip
        if decode is not None:
            offsets = served.offset_tables[layer_index]
            packed_decode_attention(
                query, key_cache, value_cache, attn_metadata.block_table, decode.seq_lens, decode.rows_info, offsets,
                self.scale, heads_out, decode.plan,
            )  # fmt: skip
            if decode.compressed and not torch.cuda.is_current_stream_capturing():  # graph replays count nothing
                served.decode_launches += 1
                if CHECK_DECODE:
                    block_table = attn_metadata.block_table
                    self._check_decode(query, key_cache, value_cache, block_table, decode, offsets, heads_out)
        return output

    def _check_decode(self, query, key_cache, value_cache, block_table, decode, offsets, heads_out) -> None:
        reference = torch.zeros_like(heads_out)
        packed_decode_reference(
            query, key_cache, value_cache, block_table, decode.seq_lens, decode.rows_info, offsets, self.scale,
            reference,
        )
        tokens = decode.rows_info[decode.rows_info[:, 2] > 0, 0].long()  # the compressed rows
        ours, theirs = heads_out[tokens].float(), reference[tokens].float()
        # relative to the launch's largest output: bf16 rounds each output to 2^-8 of itself
        difference = (ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-6)
        served_requests().decode_differences.append(float(difference))


class CUDACompressingBackend(FlashAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return CompressingFlashImpl

    @staticmethod
    def get_builder_cls():
        return CompressingFlashBuilder
