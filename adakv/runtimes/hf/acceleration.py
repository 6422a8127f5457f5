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

from adakv.arguments import check_flag, check_model

from . import active
from .fusion import model_fusions
from .graph_decode import CUDA_GRAPH_OPTIONS, GraphDecoder, graph_decoder_for, graph_decoding_refusal

SPEED_SWITCHES = ("cuda_graphs", "join_projections", "fuse_elementwise", "gemv_linears")


def check_speed_switches(switches: dict, owner: str) -> None:
    """Every switch a known name with an allowed value (cuda_graphs: False, True or "emulate"; the others a bool)."""
    unknown = sorted(set(switches) - set(SPEED_SWITCHES))
    if unknown:
        raise TypeError(f"{owner} got unknown speed switch(es) {unknown}; the switches are {list(SPEED_SWITCHES)}.")
    for name, value in switches.items():
        check_flag(name, value, owner, CUDA_GRAPH_OPTIONS if name == "cuda_graphs" else (False, True))


@dataclass
class Acceleration:
    """An open `accelerate` block: its CUDA-graph decoder (None without cuda_graphs), kept after the block
    for inspection (captures, replays)."""

    graph_decoder: GraphDecoder | None


def accelerate(
    model: nn.Module,
    cuda_graphs: bool | str = False,
    join_projections: bool = False,
    fuse_elementwise: bool = False,
    gemv_linears: bool = False,
):
    """Switch on the requested speed-ups of `model` for the block (see the module docstring). The arguments are
    checked when this is called, the switches act when the block is entered."""
    check_model(model, "accelerate")
    switches = dict(cuda_graphs=cuda_graphs, join_projections=join_projections, fuse_elementwise=fuse_elementwise,
                    gemv_linears=gemv_linears)  # fmt: skip
    check_speed_switches(switches, "accelerate")
    return accelerated(model, **switches)


@contextmanager
def accelerated(
    model: nn.Module, cuda_graphs: bool | str, join_projections: bool, fuse_elementwise: bool, gemv_linears: bool
) -> Generator[Acceleration, None, None]:
    """The block of `accelerate`, its arguments checked."""
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
