"""Fewer, larger kernels per decode step, switched on for the duration of a block.

- `joined_projections` (joined_projections.py): each layer's q/k/v and gate/up as one matrix product each;
- `fused_elementwise` (elementwise.py, kernels in triton_elementwise.py): norms, rotary embeddings and SiLU
  gates as one kernel each;
- `gemv_linears` (gemv_linears.py, kernel in triton_gemv.py): decode-step linears (1 to 16 input rows) as
  a Triton matrix-vector product, the joined products included.

`model_fusions(model, join_projections, fuse_elementwise, gemv_linears)` enters the ones asked for; the
presses' call and the pipeline take the same three switches.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Generator

from torch import nn

from adakv.runtimes.hf.fusion.elementwise import fused_elementwise
from adakv.runtimes.hf.fusion.gemv_linears import gemv_linears as gemv_linears_block
from adakv.runtimes.hf.fusion.joined_projections import joined_projections


@contextmanager
def model_fusions(
    model: nn.Module, join_projections: bool = False, fuse_elementwise: bool = False, gemv_linears: bool = False
) -> Generator[None, None, None]:
    with ExitStack() as stack:
        groups = stack.enter_context(joined_projections(model)) if join_projections else []
        if fuse_elementwise:
            stack.enter_context(fused_elementwise(model))
        if gemv_linears:
            stack.enter_context(gemv_linears_block(model, groups))
        yield


__all__ = ["fused_elementwise", "gemv_linears_block", "joined_projections", "model_fusions"]
