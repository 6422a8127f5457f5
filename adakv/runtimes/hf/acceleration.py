"""`adakv.accelerate(model, ...)`: the speed switches of decoding, for the duration of a block.

    with adakv.accelerate(model, cuda_graphs=True, join_projections=True, fuse_elementwise=True, gemv_linears=True):
        with press(model):
            model.generate(...)

- cuda_graphs=True replays decode steps from a CUDA graph (graph_decode.py; backend "evict", CUDA models;
  "emulate" runs its CPU emulation for tests);
- join_projections=True computes each layer's q/k/v and gate/up as one matrix product each (fusion/);
- fuse_elementwise=True runs the norms, rotary embeddings and SiLU gates as one Triton kernel each (CUDA);
- gemv_linears=True runs the decode steps' linear layers (1 to 16 input rows) as adakv's Triton GEMV (CUDA).

The four together give the fastest decode steps. `press(model, cuda_graphs=True, ...)` enters the same
block around its own. The block nests either way round with a press's block; a press that cannot decode
from graphs (backend "mask", compression during decoding) is refused when the second of the two opens.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generator

from torch import nn

from . import active
from .fusion import model_fusions
from .graph_decode import GraphDecoder, graph_decoder_for, graph_decoding_refusal


@dataclass
class Acceleration:
    """An open `accelerate` block: its CUDA-graph decoder (None without cuda_graphs), kept after the block
    for inspection (captures, replays)."""

    graph_decoder: GraphDecoder | None


@contextmanager
def accelerate(
    model: nn.Module,
    cuda_graphs: bool | str = False,
    join_projections: bool = False,
    fuse_elementwise: bool = False,
    gemv_linears: bool = False,
) -> Generator[Acceleration, None, None]:
    """Switch on the requested speed-ups of `model` for the block (see the module docstring)."""
    if active.acceleration_of(model) is not None:
        raise RuntimeError("This model is already inside an `adakv.accelerate` block; the blocks do not nest.")
    decoder = graph_decoder_for(model, cuda_graphs)
    session = active.session_of(model)
    if decoder is not None and session is not None:
        refusal = graph_decoding_refusal(session.press, session.backend)
        if refusal is not None:
            raise ValueError(refusal)
    acceleration = Acceleration(decoder)
    with model_fusions(model, join_projections, fuse_elementwise, gemv_linears):
        active.register(active._accelerations, model, acceleration)
        if decoder is not None:
            decoder.install()
        try:
            yield acceleration
        finally:
            if decoder is not None:
                decoder.uninstall()
            active.unregister(active._accelerations, model)
