"""adakv's attention backend for vLLM on CUDA: FlashAttention, plus compression and packed-page decode.

Registered as vLLM's CUSTOM backend (the plugin) and picked by `engine_args` (`attention_backend`), so
engines without adakv keep vLLM's own. Per step, the metadata builder splits the batch rows of
compressed requests in two:

- *decode rows* (one token after a prompt packed in every layer): FlashAttention sees a sequence of one
  key for them (its output is overwritten), and `packed_decode_attention` (Triton) attends their query
  over the packed pairs and tail tokens, from `rows_info` built on the host (no device round trip);
- the others (prefill chunks, the compression step, a recomputation after preemption) go through
  `serve_layer` in torch, after FlashAttention ran over their dense pages.

A step whose every row is a decode row skips FlashAttention. The builder declares no full CUDA graph
support (its metadata is rebuilt per step), so vLLM runs piecewise graphs: everything but attention is
replayed from graphs.
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
from adakv.kernels.paged_decode import DecodePlan, decode_plan, packed_decode_attention, packed_decode_reference
from adakv.kernels.triton_decode import block_sizes

from .compression import serve_layer
from .requests import DecodeBatch, ServedRequest, decode_batch, served_requests

# tests: every decode launch also runs the torch reference and records the largest difference (slow)
CHECK_DECODE = os.environ.get("ADAKV_VLLM_CHECK_DECODE") == "1"


@dataclass
class DecodeRows:
    """The step's decode rows of compressed requests, for the packed-page kernel.

    rows_info: (rows, 5) int32 on the device (query token, block-table row, prompt_len, seq_len,
    offset-table row); plan: its split of the keys; only_decode: no other row in the batch."""

    rows_info: torch.Tensor
    plan: DecodePlan
    only_decode: bool


@dataclass
class CompressingFlashMetadata(FlashAttentionMetadata):
    """FlashAttention's metadata plus the step's compressed rows (None where a row is dense or decodes
    from packed pages) and its decode rows."""

    served_rows: list[ServedRequest | None] | None = None
    query_start_host: list[int] | None = None
    decode_rows: DecodeRows | None = None


class CompressingFlashBuilder(FlashAttentionMetadataBuilder):
    _cudagraph_support = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.num_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
        group = self.num_heads_q // self.num_heads_kv
        self.block_n = block_sizes(group, self.headdim, vllm_config.model_config.dtype)["BLOCK_N"]
        self.num_sms = multiprocessor_count(torch.device(device).index or 0)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        served = served_requests()
        if served is None or not served.by_id:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        num_reqs = common_attn_metadata.num_reqs
        rows = served.rows_of_batch(num_reqs)
        if not any(rows):
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        query_start = common_attn_metadata.query_start_loc_cpu[: num_reqs + 1].tolist()
        batch = decode_batch(rows, self.num_layers, query_start)
        if batch.rows_info:
            common_attn_metadata = self._one_key_for(common_attn_metadata, batch.decoding)
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        values = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(FlashAttentionMetadata)}
        others = [None if decodes else request for request, decodes in zip(rows, batch.decoding)]
        return CompressingFlashMetadata(
            **values,
            served_rows=others if any(others) else None,
            query_start_host=query_start,
            decode_rows=self._decode_rows(batch) if batch.rows_info else None,
        )

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

    def _decode_rows(self, batch: DecodeBatch) -> DecodeRows:
        rows = len(batch.rows_info)
        plan = decode_plan(rows, self.num_heads_kv, batch.mean_length, batch.max_length, self.num_sms, self.block_n)
        rows_info = torch.tensor(batch.rows_info, dtype=torch.int32).pin_memory().to(self.device, non_blocking=True)
        return DecodeRows(rows_info=rows_info, plan=plan, only_decode=all(batch.decoding))


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
                query, key_cache, value_cache, attn_metadata.block_table, decode.rows_info, offsets, self.scale,
                heads_out, decode.plan,
            )  # fmt: skip
            served.decode_launches += 1
            if CHECK_DECODE:
                self._check_decode(query, key_cache, value_cache, attn_metadata.block_table, decode, offsets, heads_out)
        return output

    def _check_decode(self, query, key_cache, value_cache, block_table, decode, offsets, heads_out) -> None:
        reference = torch.zeros_like(heads_out)
        packed_decode_reference(query, key_cache, value_cache, block_table, decode.rows_info, offsets, self.scale, reference)
        tokens = decode.rows_info[:, 0].long()
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
