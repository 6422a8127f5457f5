"""`mlp_in_row_chunks(model, rows)`: a long forward runs each decoder layer's MLP over at most `rows` token rows
at a time, for the duration of a block.

Why: in a prefill of S tokens the MLP's intermediate products (gate, activation, up: three of
(S, intermediate_size)) are the largest tensors alive. At 1 x 128k on the Llama-3.1-8B shape they take about
10.5 GiB, more than the 12 GiB of KV a press at r = 0.75 frees, so a compressed prefill peaked at dense's
peak minus the freed KV at best (docs/MEMORY.md). The MLP is computed row by row (each token's output depends
on that token's input only), so running it over slices of rows gives the same outputs, bit for bit wherever
the matrix products of a slice round as those of the whole (measured on CPU; a GPU test checks CUDA's), and
its intermediates shrink to three of (rows, intermediate_size).

What it touches: the dense MLPs of `model.get_decoder().layers` (a module at `layer.mlp` with a `down_proj`:
Llama, Mistral, Qwen2/3, Gemma, Phi3), only while a decoder forward has more than `rows` token rows (batch x
tokens): a pre-forward hook on the decoder puts a `RowChunkedMLP` in each layer's `mlp` slot and a forward
hook (run also when the forward raises) puts the MLPs back. Decode steps and short prompts run as before, and
modules replaced by fusions (adakv.accelerate) stay as they are: the chunks call whatever forward `layer.mlp`
has.

`with press(model):` enters it with `MLP_CHUNK_ROWS` unless `press(model, mlp_chunk_rows=None)`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Generator

import torch
from torch import nn

MLP_CHUNK_ROWS = 8192  # the 8B shape's intermediates at 8192 rows: 0.66 GiB; a product of 8192 rows is still large


class RowChunkedMLP(nn.Module):
    """Stands in a decoder layer's `mlp` slot during one long forward: runs `mlp` over at most `rows` rows of
    its input at a time. The MLP is held outside the module tree (no parameters here, names unchanged)."""

    def __init__(self, mlp: nn.Module, rows: int):
        super().__init__()
        object.__setattr__(self, "mlp", mlp)
        self.rows = rows

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (..., hidden) -> (..., hidden), each row the MLP's output of that row."""
        leading = hidden_states.shape[:-1]
        total = leading.numel()
        if total <= self.rows:
            return self.mlp(hidden_states)
        flat = hidden_states.reshape(total, hidden_states.shape[-1])
        out = None
        for start in range(0, total, self.rows):
            part = self.mlp(flat[start : start + self.rows])
            if out is None:  # allocated once; the slices' outputs are copied in (no list of parts, no cat)
                out = part.new_empty((total, part.shape[-1]))
            out[start : start + part.shape[0]] = part
            del part
        return out.reshape(*leading, out.shape[-1])


def chunkable_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of `model` whose `mlp` is a dense MLP (it has a `down_proj`)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        return []
    return [layer for layer in layers if _is_dense_mlp(getattr(layer, "mlp", None))]


def _is_dense_mlp(module) -> bool:
    return isinstance(module, nn.Module) and hasattr(module, "down_proj")


def check_mlp_chunk_rows(rows, owner: str) -> None:
    """rows: a positive int, or None (no chunking)."""
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise ValueError(
            f"{owner}: mlp_chunk_rows must be a positive int (the most token rows an MLP runs over at once) or None "
            f"(run each MLP over all rows), got {rows!r}."
        )


def _forward_rows(args, kwargs) -> int:
    """Token rows (batch x tokens) of a decoder forward, from its input_ids or inputs_embeds."""
    for name in ("input_ids", "inputs_embeds"):
        if kwargs.get(name) is not None:
            return kwargs[name].shape[:2].numel()
    if args and isinstance(args[0], torch.Tensor):
        return args[0].shape[:2].numel()
    return 0


class _Swaps:
    """The decoder hooks' state: which forward (by nesting depth) put the chunked MLPs in, to take them out."""

    def __init__(self, layers: list[nn.Module], rows: int):
        self.layers, self.rows = layers, rows
        self.depth = 0
        self.swapped_at: int | None = None
        self.originals: list[nn.Module] = []

    def before(self, module, args, kwargs) -> None:
        self.depth += 1
        if self.swapped_at is None and _forward_rows(args, kwargs) > self.rows:
            self.originals = [layer.mlp for layer in self.layers]
            for layer, mlp in zip(self.layers, self.originals):
                layer._modules["mlp"] = RowChunkedMLP(mlp, self.rows)
            self.swapped_at = self.depth

    def after(self, module, args, kwargs, output) -> None:
        if self.swapped_at == self.depth:
            self.restore()
        self.depth -= 1

    def restore(self) -> None:
        for layer, mlp in zip(self.layers, self.originals):
            layer._modules["mlp"] = mlp
        self.originals, self.swapped_at = [], None


@contextmanager
def mlp_in_row_chunks(
    model: nn.Module, rows: int | None = MLP_CHUNK_ROWS, required: bool = True
) -> Generator[int, None, None]:
    """For the block, every decoder forward of more than `rows` token rows runs each dense MLP over at most
    `rows` rows at a time (module docstring). Yields how many layers it chunks. rows None: does nothing.
    required: refuse a model with no dense MLP to chunk (False: a press session's default, which then does
    nothing on such a model)."""
    check_mlp_chunk_rows(rows, "mlp_in_row_chunks")
    layers = [] if rows is None else chunkable_layers(model)
    if rows is not None and not layers and required:
        raise ValueError(
            f"mlp_in_row_chunks: {type(model).__name__} has no decoder layer with a dense MLP (`model.get_decoder()"
            ".layers[i].mlp` with a `down_proj`), so there is nothing to run in row chunks. Pass mlp_chunk_rows=None."
        )
    if not layers:
        yield 0
        return
    swaps = _Swaps(layers, rows)
    decoder = model.get_decoder()
    handles = [
        decoder.register_forward_pre_hook(swaps.before, with_kwargs=True),
        decoder.register_forward_hook(swaps.after, with_kwargs=True, always_call=True),
    ]
    try:
        yield len(layers)
    finally:
        for handle in handles:
            handle.remove()
        if swaps.swapped_at is not None:
            swaps.restore()
