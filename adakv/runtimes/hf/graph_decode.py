"""CUDA-graph decoding over the flat head-wise cache (backend "evict").

An eager decode step of a transformers model launches hundreds of small kernels from Python; at batch 1
the GPU waits for the host most of the time. Inside `with adakv.accelerate(model, cuda_graphs=True):` the model's
decode steps (one new token per row, every cache layer a `FlatHeadwiseLayer`) are captured once in a
CUDA graph and replayed: the host copies the new token ids and positions into static buffers, replays
the graph and advances each layer's host counter, and that is all it does per step.

This works because a flat layer keeps what changes from step to step on the device: the append kernel
writes behind `seq_lengths` and advances it, and the attention kernels read it. What the host decided
at capture (buffer addresses, split counts, the kernels chosen) stays valid while the layer's layout
does, so before capturing the runner reserves slack for the tokens still to come (`max_new_tokens` of
the running `generate`, else RESERVE_TOKENS). When a step finds a layout changed (slack used up, a
batch reordered, a new cache), it re-lays out with more slack and captures again.

Decoding stays eager (with one warning saying why) when a cache layer is not flat: a layer a press left
uncompressed (ratio 0) or a sliding-window layer (backend "mask" is refused when the block opens). Other
forwards (prefill, questions, output_attentions) always run eagerly. The first graphable step runs eagerly
on a side stream as the warm-up that capturing needs.

`EmulatedGraph` runs the same runner on CPU for tests: "capture" runs the step once and undoes its
device effects, "replay" re-runs it with every host counter frozen at its capture-time value, as a real
graph would, so a code path that read host state instead of device state gives wrong tokens there too.
"""

from __future__ import annotations

import functools

import traceback
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn
from transformers.cache_utils import Cache

from adakv.cache import CompressedLayer
from adakv.models import cache_argument

RESERVE_TOKENS = 256  # slack reserved per capture when the number of tokens to come is unknown
EAGER_ONLY_KEYWORDS = ("inputs_embeds", "labels", "output_attentions", "output_hidden_states")


@lru_cache(maxsize=None)
def warm_up_stream(device_index: int) -> torch.cuda.Stream:
    """One side stream per device for every warm-up: libraries keep per-stream state (cuBLAS keeps a 32 MiB
    workspace per stream), so a new stream per warm-up would leave that behind each time."""
    return torch.cuda.Stream(device=device_index)


class CudaGraph:
    """One captured decode step (torch.cuda.CUDAGraph) in its own memory pool. A pool is not shared with
    the graph a re-capture replaces: that graph is gone by then, and PyTorch's allocator asserts when a
    capture begins in the pool of a destroyed graph."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, step, layers):
        with torch.cuda.graph(self.graph):
            return step()

    def replay(self) -> None:
        self.graph.replay()


class EmulatedGraph:
    """CPU stand-in of `CudaGraph` with the same host-state semantics (see the module docstring)."""

    def capture(self, step, layers):
        self.step, self.layers = step, layers
        self.frozen_appended = [layer.appended for layer in layers]
        output = step()
        for layer in layers:  # a real capture executes nothing: undo the append on the device side
            layer.seq_lengths -= 1
        self.logits = output.logits
        return output

    def replay(self) -> None:
        current = [layer.appended for layer in self.layers]
        for layer, frozen in zip(self.layers, self.frozen_appended):
            layer.appended = frozen
        self.logits.copy_(self.step().logits)
        for layer, appended in zip(self.layers, current):
            layer.appended = appended


@dataclass
class CapturedStep:
    """A captured decode step: its graph, static inputs and output, and the layout it is valid for."""

    graph: CudaGraph | EmulatedGraph
    inputs: dict[str, torch.Tensor]  # input_ids (batch, 1), position_ids (batch, 1), cache_position (1,)
    output: object  # the model's output object; its logits (batch, 1, vocab) are rewritten by every replay
    key: tuple


class GraphDecoder:
    """Replaces `model.forward` (and wraps `model.generate`, to learn `max_new_tokens`) for the duration of
    an `adakv.accelerate` block. emulate=True uses `EmulatedGraph` (CPU tests)."""

    def __init__(self, model: nn.Module, emulate: bool = False):
        self.model = model
        self.emulate = emulate
        self.eager_forward = model.forward
        self.step: CapturedStep | None = None
        self.warmed_up = False
        self.planned_tokens: int | None = None
        self.captures = 0
        self.replays = 0
        self.disabled_reason: str | None = None
        self._warned: set[str] = set()
        self._saved: dict = {}  # the model's own forward/generate instance attributes, if it had any
        self._reserved_layouts: set[int] = set()

    # ----- installing ---------------------------------------------------------------------------------
    def install(self) -> None:
        model = self.model
        self._saved = {name: model.__dict__[name] for name in ("forward", "generate") if name in model.__dict__}
        original_generate = model.generate

        # the model's own signature: generate passes `logits_to_keep=1` only to a forward that declares it,
        # and without it the prefill computes logits for every prompt position (8 GiB at 32k tokens, 8B vocab)
        @functools.wraps(self.eager_forward)
        def forward(*args, **kwargs):
            return self.forward(*args, **kwargs)

        model.forward = forward

        def generate(*args, **kwargs):
            config = kwargs.get("generation_config") or model.generation_config
            self.planned_tokens = kwargs.get("max_new_tokens") or getattr(config, "max_new_tokens", None)
            try:
                return original_generate(*args, **kwargs)
            finally:
                self.planned_tokens = None

        model.generate = generate

    def uninstall(self) -> None:
        """Restore the model's methods and drop the graph, its static buffers and its memory pool."""
        for name in ("forward", "generate"):
            self.model.__dict__.pop(name, None)
        self.model.__dict__.update(self._saved)
        self.step = None

    # ----- one forward ---------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if len(args) > 1:
            return self.eager_forward(*args, **kwargs)
        if args:
            kwargs = {**kwargs, "input_ids": args[0]}
        layers = self._flat_layers(kwargs)
        if layers is None:
            return self.eager_forward(**kwargs)
        inputs = self._static_inputs(kwargs, layers)
        key = self._layout_key(kwargs, layers, inputs)
        if self.step is not None and self.step.key == key and all(layer.appended < layer.slack for layer in layers):
            return self._replay(inputs, layers)
        if self._reserve(layers) or not self.warmed_up:
            self.warmed_up = True  # a fresh layout is warmed up eagerly too (its lazy host values, new kernels)
            return self._run_on_side_stream(kwargs)
        return self._capture_and_replay(kwargs, inputs, layers)

    def _flat_layers(self, kwargs) -> list[CompressedLayer] | None:
        """The cache's layers when this forward is a decode step that can be graphed, else None."""
        input_ids = kwargs.get("input_ids")
        cache = cache_argument(kwargs)
        if (
            self.disabled_reason is not None
            or input_ids is None
            or input_ids.dim() != 2
            or input_ids.shape[1] != 1
            or kwargs.get("use_cache") is False
            or any(kwargs.get(name) not in (None, False) for name in EAGER_ONLY_KEYWORDS)
        ):
            return None
        if not isinstance(cache, Cache):
            return None
        layers = cache.layers
        if not layers or layers[0].get_seq_length() == 0:
            return None  # the prefill of a one-token prompt
        for index, layer in enumerate(layers):
            if not (isinstance(layer, CompressedLayer) and layer.replays_decode_steps):
                self._warn_once(
                    f"layer {index} of the cache is a {type(layer).__name__}, not a FlatHeadwiseLayer (backend "
                    "'mask', a layer left uncompressed, or a sliding-window layer)"
                )
                return None
        if layers[0].batch_size != input_ids.shape[0]:
            return None  # let the eager path raise its clear batch-mismatch error
        return list(layers)

    def _static_inputs(self, kwargs, layers) -> dict[str, torch.Tensor]:
        input_ids = kwargs["input_ids"]
        cache_position = kwargs.get("cache_position")
        if cache_position is None:
            cache_position = torch.tensor([layers[0].get_seq_length()], device=input_ids.device)
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = cache_position.view(1, -1).expand(input_ids.shape[0], -1)
        return {"input_ids": input_ids, "position_ids": position_ids, "cache_position": cache_position}

    @staticmethod
    def _layout_key(kwargs, layers, inputs) -> tuple:
        """What a captured step depends on besides the device state: the cache, every layer's buffers and
        split workspace, the input shapes and the logits kept."""
        workspaces = tuple(
            tuple(None if buffer is None else buffer.data_ptr() for buffer in (workspace.buffer, workspace.counters))
            for workspace in (layer.split_workspace for layer in layers)
        )
        shapes = tuple((tuple(tensor.shape), tensor.dtype, tensor.device) for tensor in inputs.values())
        layouts = tuple(layer.layout_id for layer in layers)
        return (id(cache_argument(kwargs)), layouts, workspaces, shapes, kwargs.get("logits_to_keep", 0))

    def _reserve(self, layers) -> bool:
        """Before a capture: room for the tokens to come in every layer, reserved once per layout (a layout
        this decoder reserved is kept while it has a free row). True when a layer had to be re-laid out."""
        tokens = max(self.planned_tokens or RESERVE_TOKENS, 1)
        layouts = [layer.layout_id for layer in layers]
        for layer in layers:
            if layer.layout_id not in self._reserved_layouts or layer.appended >= layer.slack:
                layer.reserve(tokens)
                self._reserved_layouts.add(layer.layout_id)
            layer.max_context_kept  # noqa: B018 - computed now: reading it inside a capture would wait for the GPU
        return layouts != [layer.layout_id for layer in layers]

    def _run_on_side_stream(self, kwargs):
        """The warm-up step: eager, on a side stream (lazy initialisation happens outside any capture)."""
        if self.emulate:
            return self.eager_forward(**kwargs)
        stream = warm_up_stream(torch.cuda.current_device())
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            output = self.eager_forward(**kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        return output

    def _capture_and_replay(self, kwargs, inputs, layers):
        static = {name: tensor.clone() for name, tensor in inputs.items()}
        step_kwargs = {**kwargs, **static, "attention_mask": None}  # flat layers ignore a decode step's mask
        appended = [layer.appended for layer in layers]
        graph = EmulatedGraph() if self.emulate else CudaGraph()
        self.step = None
        try:
            output = graph.capture(lambda: self.eager_forward(**step_kwargs), layers)
        except Exception as error:  # noqa: BLE001 - decoding goes on eagerly, with the reason in a warning
            for layer, count in zip(layers, appended):
                layer.appended = count
            where = traceback.extract_tb(error.__traceback__)[-1]
            self.disabled_reason = (
                f"capturing the decode step failed at {where.filename}:{where.lineno} ({where.name}): "
                f"{type(error).__name__}: {str(error).splitlines()[0]}"
            )
            self._warn_once(self.disabled_reason)
            return self.eager_forward(**kwargs)
        self.captures += 1
        # the capture ran the step's Python once (host counters advanced); the key is taken after it
        self.step = CapturedStep(graph, static, output, self._layout_key(kwargs, layers, inputs))
        self._copy_inputs(inputs)
        graph.replay()
        self.replays += 1
        return self._output()

    def _replay(self, inputs, layers):
        self._copy_inputs(inputs)
        self.step.graph.replay()
        self.replays += 1
        for layer in layers:
            layer.advance_after_replay(1)
        return self._output()

    def _copy_inputs(self, inputs) -> None:
        for name, tensor in inputs.items():
            self.step.inputs[name].copy_(tensor)

    def _output(self):
        """A fresh output object; the logits are copied because the next replay overwrites the static ones."""
        output = self.step.output
        return type(output)(logits=output.logits.clone(), past_key_values=output.past_key_values)

    def _warn_once(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"CUDA-graph decoding is off for this step: {reason}; decoding eagerly.", stacklevel=4)


CUDA_GRAPH_OPTIONS = (False, True, "emulate")


def graph_decoder_for(model: nn.Module, cuda_graphs) -> GraphDecoder | None:
    """The decoder a press installs for `cuda_graphs` (False: none; True: CUDA graphs, CUDA models only;
    "emulate": the CPU emulation used by the tests)."""
    if cuda_graphs not in CUDA_GRAPH_OPTIONS or not isinstance(cuda_graphs, (bool, str)):
        raise ValueError(f"cuda_graphs must be one of {CUDA_GRAPH_OPTIONS}, got {cuda_graphs!r}.")
    if cuda_graphs is False:
        return None
    devices = {parameter.device for parameter in model.parameters()}
    device = next(iter(devices))
    if cuda_graphs is True and len(devices) > 1:
        raise ValueError(
            f"cuda_graphs=True needs the whole model on one GPU, but its parameters are on {sorted(map(str, devices))}. "
            "Decode eagerly (cuda_graphs=False) with layers split across devices."
        )
    if cuda_graphs is True and device.type != "cuda":
        raise ValueError(
            f"cuda_graphs=True needs a model on a CUDA device, but this model is on {device}. "
            "Decode eagerly (cuda_graphs=False, the default) on other devices."
        )
    return GraphDecoder(model, emulate=cuda_graphs == "emulate")


def graph_decoding_refusal(press, backend: str) -> str | None:
    """Why `press` cannot decode from CUDA graphs with `backend`, or None when it can."""
    if backend != "evict":
        return (
            f"cuda_graphs needs backend 'evict' (graphs replay decode steps over the flat cache), but "
            f"{type(press).__name__} runs with backend {backend!r} on this model."
        )
    if press.compresses_during_decoding:
        return (
            f"{type(press).__name__} acts on every decode step from a hook, which a replayed CUDA graph would skip; "
            "use cuda_graphs=False with presses that compress during decoding."
        )
    return None
