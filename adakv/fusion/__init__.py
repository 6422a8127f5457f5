"""Fewer, larger kernels per decode step, switched on for the duration of a block.

- `joined_projections` (joined_projections.py): each layer's q/k/v and gate/up as one matrix product each;
- `fused_elementwise` (elementwise.py, kernels in triton_elementwise.py): norms, rotary embeddings and SiLU
  gates as one kernel each.

`model_fusions(model, join_projections, fuse_elementwise)` enters the ones asked for; the presses' call and
the pipeline take the same two switches.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Generator

from torch import nn

from adakv.fusion.elementwise import fused_elementwise
from adakv.fusion.joined_projections import joined_projections


@contextmanager
def model_fusions(model: nn.Module, join_projections: bool = False, fuse_elementwise: bool = False) -> Generator[None, None, None]:
    with ExitStack() as stack:
        if join_projections:
            stack.enter_context(joined_projections(model))
        if fuse_elementwise:
            stack.enter_context(fused_elementwise(model))
        yield


__all__ = ["fused_elementwise", "joined_projections", "model_fusions"]
