"""adakv's attention backend for vLLM: vLLM's own backend, plus compression of the requests that ask for it.

The metadata builder finds each batch row's compressed request (`ServedRequests.rows`); the impl runs
vLLM's attention for the whole batch, then `serve_layer` compresses the prompts that finish in this step
and recomputes the rows of compressed requests from their packed pairs. A batch without compressed rows
is vLLM's backend unchanged.

CPU: vLLM's CPU platform always picks CPU_ATTN, so the plugin registers `CPUCompressingBackend` under that
name; it is CPU_ATTN itself whenever no request is compressed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch
from vllm import _custom_ops as ops
from vllm.config import get_current_vllm_config
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from .compression import serve_layer
from .requests import ServedRequest, served_requests


def cpu_cache_views(kv_cache: torch.Tensor, keys_transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU_ATTN's (num_blocks, kv_heads, block_size, 2 * head_dim) pages as key and value views of shape
    (num_blocks, kv_heads, block_size, head_dim). Each block holds its keys, then its values; its vector
    kernels store a block's keys dimension-major, (head_dim, block_size)."""
    num_blocks, kv_heads, block_size, _ = kv_cache.shape
    keys, values = kv_cache.view(num_blocks, kv_heads, 2 * block_size, -1).chunk(2, dim=2)
    if keys_transposed:
        keys = keys.reshape(num_blocks, kv_heads, -1, block_size).transpose(-1, -2)
    return keys, values


@functools.lru_cache(maxsize=None)
def keys_stored_transposed(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> bool:
    """How CPU_ATTN's cache writer lays out a block's keys for this kernel choice, found by writing known
    keys with it; a layout that is neither position- nor dimension-major is refused."""
    kv_cache = torch.zeros(2, 1, block_size, 2 * head_size, dtype=dtype)
    key = torch.arange(block_size * head_size, dtype=torch.float32).view(block_size, 1, head_size).to(dtype)
    for transposed in (False, True):
        kv_cache.zero_()
        key_cache, value_cache = cpu_cache_views(kv_cache, transposed)
        slots = torch.arange(block_size) + block_size  # block 1
        ops.cpu_attn_reshape_and_cache(key, -key, *cpu_cache_views(kv_cache, False), slots, isa)
        if torch.equal(key_cache[1, 0], key[:, 0]) and torch.equal(value_cache[1, 0], -key[:, 0]):
            return transposed
    raise NotImplementedError(
        f"adakv cannot read CPU_ATTN's pages for its '{isa}' kernels (dtype {dtype}, block_size {block_size}): "
        "serve compressed requests in float32, or with a block size that is not a multiple of 32."
    )


@dataclass
class CompressingCPUMetadata(CPUAttentionMetadata):
    """CPU_ATTN's metadata plus, per batch row, its compressed request (None: dense)."""

    served_rows: list[ServedRequest | None] | None = None
    query_start_host: list[int] | None = None


class CPUCompressingBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        served = served_requests()
        if served is None or not served.by_id:
            return metadata
        num_reqs = common_attn_metadata.num_reqs
        rows = served.rows(common_attn_metadata.block_table_tensor[:num_reqs, 0].tolist())
        if not any(rows):
            return metadata
        values = {f.name: getattr(metadata, f.name) for f in fields(CPUAttentionMetadata)}
        return CompressingCPUMetadata(
            **values,
            served_rows=rows,
            query_start_host=common_attn_metadata.query_start_loc_cpu[: num_reqs + 1].tolist(),
        )


class CPUCompressingImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_layers = get_current_vllm_config().model_config.hf_text_config.num_hidden_layers

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if getattr(attn_metadata, "served_rows", None) is None:
            return output
        transposed = keys_stored_transposed(self.isa, kv_cache.dtype, kv_cache.shape[2], self.head_size)
        key_cache, value_cache = cpu_cache_views(kv_cache, transposed)
        serve_layer(
            attn_metadata.served_rows, attn_metadata.query_start_host, extract_layer_index(layer.layer_name),
            self.num_layers, query, output.view(query.shape[0], self.num_heads, -1), key_cache, value_cache,
            attn_metadata.block_table, self.scale,
        )  # fmt: skip
        return output


class CPUCompressingBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return CPUCompressingImpl

    @staticmethod
    def get_builder_cls():
        return CPUCompressingBuilder
