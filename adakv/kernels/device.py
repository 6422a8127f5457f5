"""Device helpers shared by the kernels' launchers."""

from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache

import torch


def on_device_of(tensor: torch.Tensor):
    """Make the tensor's GPU the current CUDA device for the block. Triton launches its kernels on the
    current device, which is not the layer's when a model is split over GPUs (device_map): accelerate
    moves the tensors between layers but leaves the current device alone. On one GPU (the decode hot
    path) this costs one device-index read per layer."""
    if tensor.is_cuda and tensor.device.index != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return nullcontext()


@lru_cache(maxsize=None)
def multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
