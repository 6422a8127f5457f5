"""A press session: one press running inside a transformers model for the duration of a block.

`with press(model):` opens a `PressSession`: two hooks on every attention layer, the model's attention
implementation switched to its adakv twin (attention.py); leaving the block (also by an exception) removes
the hooks and restores the implementation. After a layer's attention has run on the *context prefill*
(the first forward into an empty cache layer), the session builds a `PrefillContext`, asks the press for a
keep mask of shape (batch, kv_heads, seq) and hands it to the block's backend, which replaces the cache
layer. Later forwards (decode steps, question tokens) are never compressed, except by a press that
compresses during decoding (DecodingPress: decoding.py).

A chunked context prefill (chunked_prefill.py) runs its forwards inside `session.receiving_context_chunks()`:
every forward into a layer that already holds context is then a further *chunk* of the context, compressed
on its own (a PrefillContext of the chunk) and folded into the layer's compressed context.

Presses whose `compresses_after_prefill` is True (AdaptivePress(scope="model"), KVzipPress) need every layer
at once: the session records each compressed layer's PrefillContext (the dense keys/values stay in the
cache), and a forward hook on the model's decoder, after the last layer, hands them all to the press as a
`WholePrefill`, whose `replay` (ContextReplay, replay.py) lets KVzip run the model again over the context.
Every compressed layer is then replaced at once. The cost is peak memory: the dense cache of the whole
context is held until the end of the prefill. Of each layer's input hidden states and cos/sin only the newest
positions the tree reads are held, copied (`BasePress.layer_input_rows`: SnapKV's window; none for KVzip;
all for a tree with a ChunkPress).

All per-block state lives on the session, none on the press: one press object may serve several models.
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack, contextmanager
from typing import Generator

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from adakv.cache import (
    ADAKV_ATTENTION_PREFIX,
    DEFAULT_BACKEND,
    BackendFallbackWarning,
    CompressedLayer,
    evict_refusal,
    make_compressed_layer,
    newest_keys_values,
)
from adakv.arguments import check_model
from adakv.models import (
    SUPPORTED_ATTENTION_IMPLEMENTATIONS,
    attention_modules,
    cache_argument,
    is_full_attention_layer,
)
from adakv.presses.base import BasePress, PrefillContext, WholePrefill

from . import active
from .acceleration import Acceleration, accelerate, check_speed_switches
from .attention import (
    CACHE_ATTRIBUTE,
    note_appended_padding,
    real_token_mask,
    register_attention_functions,
    set_attention_implementation,
)
from .decoding import DecodingRecompression, decoding_policy
from .graph_decode import graph_decoding_refusal
from .mlp_rows import MLP_CHUNK_ROWS, check_mlp_chunk_rows, mlp_in_row_chunks
from .refusals import (
    EVICT_ATTENTIONS_WARNING,
    cache_refusal,
    guarded_generate,
    layer_refusal,
    no_cache_refusal,
    right_padding_refusal,
)
from .replay import CacheReplay


def block_backend(press: BasePress, config) -> str:
    """The backend `press` uses on a model with `config`: the explicit one, else "evict". With no backend
    set and a model the evict backend cannot serve, "mask" with one BackendFallbackWarning; an explicit
    "evict" raises, and so does a kv_dtype (which only the evict backend stores)."""
    backend, refusal = press.explicit_backend, evict_refusal(config)
    if refusal is None or backend == "mask" or getattr(press, "builds_no_layers", False):
        return backend or DEFAULT_BACKEND
    if backend == "evict":
        raise NotImplementedError(f"backend='evict' cannot serve this model: {refusal}. Use backend='mask'.")
    if press.explicit_kv_dtype is not None:
        raise ValueError(
            f"{type(press).__name__} has kv_dtype={press.explicit_kv_dtype!r}, which only the evict backend stores, "
            f"but {refusal}. Use kv_dtype=None (the mask backend then serves the model)."
        )
    warnings.warn(
        f"{type(press).__name__} has no backend set, so it would evict, but {refusal}; it falls back to "
        "backend='mask' (the dense cache is kept, no memory is freed). Pass backend='mask' to silence this.",
        BackendFallbackWarning,
        stacklevel=5,
    )
    return "mask"


def layer_from_keep(press: BasePress, context: PrefillContext, keep: torch.Tensor | None, backend: str | None):
    """The cache layer holding `context`'s keys/values as `keep` (batch, kv_heads, seq) says, in the press's
    kv_dtype, or None to keep the dense layer (keep None). With a kv_dtype set a layer the press leaves whole
    (keep None) is stored in it too, keeping every available position. backend: the block's (None: chosen now
    from the layer's config)."""
    kv_dtype = press.explicit_kv_dtype
    if keep is None and kv_dtype is None:
        return None
    config = context.module.config
    keep = context.available if keep is None else keep
    return make_compressed_layer(backend or block_backend(press, config), context.keys, context.values, keep, config, kv_dtype)


def compressed_layer(press: BasePress, context: PrefillContext, backend: str | None = None):
    """The cache layer that replaces the dense one of `context` after `press` compressed it, or None to keep
    it (see `layer_from_keep`)."""
    return layer_from_keep(press, context, press.compress(context), backend)


def compressed_layers_after_prefill(press: BasePress, prefill: WholePrefill, backend: str | None = None) -> list:
    """The cache layers (or None: keep the dense one) that replace those of `prefill.contexts`."""
    keeps = press.keep_masks_after_prefill(prefill)
    return [layer_from_keep(press, context, keep, backend) for context, keep in zip(prefill.contexts, keeps)]


def whole_prefill(contexts, cache: Cache, decoder: nn.Module, input_ids=None, inputs_embeds=None, memo=None) -> WholePrefill:
    """The WholePrefill of `contexts`, recorded over `cache` by `decoder` (`model.get_decoder()`)."""
    replay = CacheReplay(decoder, cache, contexts, input_ids, inputs_embeds)
    return WholePrefill(contexts, replay, {} if memo is None else memo)


class PressSession:
    """The hooks and per-block state of one `with press(model):` block (see the module docstring).

    backend: the block's backend, chosen once when it opens (by press_session already, before a CUDA-graph
    block's acceleration is entered). graph_decoder: the CUDA-graph decoder of the
    `adakv.accelerate` block around or inside this one (captures, replays), or None."""

    def __init__(self, press: BasePress, model: nn.Module):
        self.press, self.model = press, model
        self.backend: str | None = None
        self.acceleration: Acceleration | None = None
        self.decoding = None
        if press.compresses_during_decoding:
            self.decoding = DecodingRecompression(decoding_policy(press), kv_dtype=press.explicit_kv_dtype)
        self._receiving_chunks = False
        self._own_forwards = False
        self._prefill_parts: dict | None = None
        self._warned_attentions = False

    @property
    def graph_decoder(self):
        acceleration = self.acceleration or active.acceleration_of(self.model)
        return None if acceleration is None else acceleration.graph_decoder

    @property
    def receiving_chunks(self) -> bool:
        return self._receiving_chunks

    # ----- opening and closing --------------------------------------------------------------------------
    @contextmanager
    def opened(self) -> Generator[PressSession, None, None]:
        model, press = self.model, self.press
        if active.session_of(model) is not None:
            raise RuntimeError("This model is already inside a `with press(model):` block; presses do not nest.")
        press.check_fields()  # an inner press or a list field may have changed since construction
        modules = attention_modules(model)
        if not any(is_full_attention_layer(module) for module in modules):
            raise ValueError(
                "Every attention layer of this model uses a sliding window (config.sliding_window / layer_types), "
                "so a press would compress nothing. adakv compresses full-attention layers only."
            )
        if self.backend is None:  # press_session may have chosen it already (a CUDA-graph block's early check)
            self.backend = block_backend(press, model.config)
        acceleration = active.acceleration_of(model)
        if acceleration is not None and acceleration.graph_decoder is not None:
            refusal = graph_decoding_refusal(press, self.backend)
            if refusal is not None:
                raise ValueError(refusal)
        original_implementation = switch_attention_implementation(model)
        handles = []
        try:
            for module in modules:
                handles.append(module.register_forward_pre_hook(remember_cache, with_kwargs=True))
                if is_full_attention_layer(module):
                    handles.append(module.register_forward_pre_hook(self._before_attention, with_kwargs=True))
                    handles.append(module.register_forward_hook(self._after_attention, with_kwargs=True))
            if press.compresses_after_prefill:
                decoder_module = model.get_decoder()
                handles.append(decoder_module.register_forward_pre_hook(self._before_decoder, with_kwargs=True))
                handles.append(decoder_module.register_forward_hook(self._after_decoder, with_kwargs=True))
            active.register(active._sessions, model, self)
            with guarded_generate(model, type(press).__name__):
                yield self
        finally:
            active.unregister(active._sessions, model)
            for handle in handles:
                handle.remove()
            for module in modules:
                module.__dict__.pop(CACHE_ATTRIBUTE, None)
            self._prefill_parts = None
            set_attention_implementation(model, original_implementation)

    @contextmanager
    def receiving_context_chunks(self) -> Generator[None, None, None]:
        """Mark every forward run inside this block as one chunk of the context (chunked_prefill drives it).
        A forward into a layer that already holds context is then compressed too: the press sees the
        chunk's tokens only and the kept ones join the compressed context. Outside the block such forwards
        (questions, decode steps) are never compressed."""
        if self._receiving_chunks:
            raise RuntimeError("This press is already receiving context chunks; chunked prefills do not nest.")
        self._receiving_chunks = True
        try:
            yield
        finally:
            self._receiving_chunks = False

    @contextmanager
    def running_own_forwards(self) -> Generator[None, None, None]:
        """Forwards run inside this block belong to a press's own work (KVzip's replay): no hook acts on them."""
        previous, self._own_forwards = self._own_forwards, True
        try:
            yield
        finally:
            self._own_forwards = previous

    # ----- hooks -----------------------------------------------------------------------------------------
    def _before_decoder(self, module: nn.Module, args, kwargs) -> None:
        if self._own_forwards:
            return
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else (args[0] if args else None)
        self._prefill_parts = {"contexts": [], "input_ids": input_ids, "inputs_embeds": kwargs.get("inputs_embeds")}

    def _after_decoder(self, module: nn.Module, args, kwargs, output) -> None:
        parts, self._prefill_parts = self._prefill_parts, None
        if self._own_forwards or parts is None or not parts["contexts"]:
            return  # not a context prefill (a decode step, a question) or a press's own forward
        cache = parts.pop("cache")
        prefill = whole_prefill(parts["contexts"], cache, module, parts["input_ids"], parts["inputs_embeds"])
        with self.running_own_forwards():
            layers = compressed_layers_after_prefill(self.press, prefill, self.backend)
        for context, layer in zip(prefill.contexts, layers):
            if layer is not None:
                cache.layers[context.layer_idx] = layer

    def _before_attention(self, module: nn.Module, args, kwargs) -> None:
        """Refuse a forward the press cannot serve (no cache, another cache class, another model's compressed
        layer) before the layer runs; warn once that evicted layers return no attention weights."""
        cache = cache_argument(kwargs)
        if cache is None:
            raise ValueError(no_cache_refusal(type(self.press).__name__))
        refusal = cache_refusal(cache, type(self.press).__name__)
        layer = cache.layers[module.layer_idx] if module.layer_idx < len(cache.layers) else None
        if refusal is None and layer is not None:
            refusal = layer_refusal(layer, module)
        if refusal is not None:
            raise ValueError(refusal)
        if kwargs.get("output_attentions") and isinstance(layer, CompressedLayer) and layer.backend == "evict":
            if not self._warned_attentions:
                self._warned_attentions = True
                warnings.warn(EVICT_ATTENTIONS_WARNING, UserWarning, stacklevel=2)

    def _after_attention(self, module: nn.Module, args, kwargs, output) -> None:
        if self._own_forwards:
            return
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cache = cache_argument(kwargs)
        if cache is None:
            return
        layer = cache.layers[module.layer_idx]
        new_tokens = hidden_states.shape[1]
        first_context = type(layer) is DynamicLayer and layer.get_seq_length() == new_tokens
        if not (first_context or self._receiving_chunks):
            # a decode step or question tokens after the context (or a layer already compressed)
            if self.decoding is not None:
                self.decoding.after_appended_tokens(module, cache, hidden_states, kwargs, self.backend)
            return
        keys, values = newest_keys_values(layer, new_tokens)
        batch, kv_heads = keys.shape[:2]
        kv_length = layer.get_seq_length()
        real = real_token_mask(kwargs.get("attention_mask"), batch, kv_length, keys.device)  # (batch, kv_length)
        if kwargs.get("attention_mask") is not None:
            refusal = right_padding_refusal(real)
            if refusal is not None:
                raise ValueError(refusal)
        attentions = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        context = PrefillContext(
            module=module,
            hidden_states=hidden_states,
            keys=keys,
            values=values,
            position_embeddings=kwargs["position_embeddings"],
            attentions=attentions if first_context else None,  # a chunk's weights also cover earlier keys
            available=real[:, None, -new_tokens:].expand(batch, kv_heads, new_tokens),
            layer_idx=module.layer_idx,
            num_layers=module.config.num_hidden_layers,
        )
        if self.decoding is not None:
            self.decoding.remember_context(cache, context, new_context=first_context)
        if self.press.compresses_after_prefill:  # held until the prefill ends: only the input rows the tree reads
            context = context.keeping_newest_inputs(self.press.layer_input_rows)
            self._record_for_whole_prefill(context, cache, first_context)
            return
        if first_context:
            compressed = compressed_layer(self.press, context, self.backend)
        else:
            compressed = self._compress_chunk(context, layer, real[:, None, :-new_tokens].expand(batch, kv_heads, -1))
        if compressed is not None:
            cache.layers[module.layer_idx] = compressed

    def _record_for_whole_prefill(self, context: PrefillContext, cache, first_context: bool) -> None:
        if not first_context:
            raise ValueError(
                f"{type(self.press).__name__} compresses after the whole context prefill (it needs every layer at "
                "once), so it cannot compress a chunked prefill chunk by chunk. Prefill the context in one forward."
            )
        if self._prefill_parts is None:
            raise RuntimeError("The model's decoder ran without this press's decoder hook; call the model itself.")
        self._prefill_parts["contexts"].append(context)
        self._prefill_parts["cache"] = cache

    def _compress_chunk(self, context: PrefillContext, layer, earlier_real: torch.Tensor):
        """Compress a later chunk of the context, which `layer` holds as its newest tokens. Returns a
        layer that replaces `layer`, or None when `layer` was updated in place (or stays as it is).

        earlier_real: (batch, kv_heads, earlier) the real tokens before the chunk, for a layer that is
        still dense because every earlier chunk was left uncompressed (e.g. ratio 0)."""
        keep = self.press.compress(context)
        if isinstance(layer, CompressedLayer):
            layer.fold_appended_into_context(context.available if keep is None else keep)
            return None
        kv_dtype = self.press.explicit_kv_dtype
        if keep is None and kv_dtype is None:
            return None  # still nothing compressed in this layer: it stays dense
        keep = torch.cat([earlier_real, context.available if keep is None else keep], dim=-1)
        return make_compressed_layer(self.backend, layer.keys, layer.values, keep, context.module.config, kv_dtype)


class PressBlock:
    """What `press(model, mlp_chunk_rows=..., **speed_switches)` returns: the arguments are checked at once (a
    model, known switches with allowed values, mlp_chunk_rows a positive int or None), the session opens when the
    block is entered (`with`). A block is entered once; `press(model)` never entered compresses nothing, so
    dropping such an object warns (NotEnteredWarning).

    mlp_chunk_rows: a prefill of more token rows runs each decoder layer's MLP over this many rows at a time
    (mlp_rows.py: the same outputs, a smaller peak); None runs the MLPs over all rows at once."""

    def __init__(self, press: BasePress, model: nn.Module, speed_switches: dict):
        owner = f"{type(press).__name__}(...)(model)"
        check_model(model, owner)
        speed_switches = dict(speed_switches)
        self.mlp_chunk_rows = speed_switches.pop("mlp_chunk_rows", MLP_CHUNK_ROWS)
        check_mlp_chunk_rows(self.mlp_chunk_rows, owner)
        check_speed_switches(speed_switches, owner)
        self.press, self.model, self.speed_switches = press, model, speed_switches
        self._block = None

    def __enter__(self) -> PressSession:
        if self._block is not None:
            raise RuntimeError(
                "This press block was entered already; a block opens once. Call press(model) again for a new one."
            )
        self._block = press_session(self.press, self.model, self.mlp_chunk_rows, **self.speed_switches)
        return self._block.__enter__()

    def __exit__(self, *exception) -> bool | None:
        return self._block.__exit__(*exception)

    def __del__(self) -> None:
        if getattr(self, "_block", True) is not None:  # entered, or never built
            return
        try:
            warnings.warn(NOT_ENTERED_WARNING.format(press=type(self.press).__name__), NotEnteredWarning, stacklevel=2)
        except (TypeError, AttributeError):  # at interpreter exit the module's names may already be None
            pass


class NotEnteredWarning(UserWarning):
    """`press(model)` was called but its block never entered: nothing was compressed."""


NOT_ENTERED_WARNING = (
    "{press}(...)(model) was called but never entered, so nothing was compressed: the press acts only inside "
    "`with press(model):`."
)


@contextmanager
def press_session(
    press: BasePress, model: nn.Module, mlp_chunk_rows: int | None, **speed_switches
) -> Generator[PressSession, None, None]:
    """The block of `with press(model, mlp_chunk_rows, **speed_switches):` (PressBlock): a PressSession, inside
    an `adakv.accelerate(model, **speed_switches)` block when any switch is on, around `mlp_in_row_chunks`
    (entered after the session, so that its decoder hook puts the MLPs back after a whole-prefill press's)."""
    session = PressSession(press, model)
    with ExitStack() as stack:
        if any(speed_switches.values()):
            if speed_switches.get("cuda_graphs"):  # refused before anything is switched on, as the block would
                session.backend = block_backend(press, model.config)  # chosen once: the session keeps it
                refusal = graph_decoding_refusal(press, session.backend)
                if refusal is not None:
                    raise ValueError(refusal)
            session.acceleration = stack.enter_context(accelerate(model, **speed_switches))
        opened = stack.enter_context(session.opened())
        stack.enter_context(mlp_in_row_chunks(model, mlp_chunk_rows, required=False))
        yield opened


def remember_cache(module: nn.Module, args, kwargs) -> None:
    """The pre-forward hook of every attention layer: keeps the forward's cache on the module for adakv's
    attention functions, and tells a flat layer about left padding in the tokens it is about to receive."""
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if hidden_states.shape[1] == 0:
        raise ValueError(
            "The model was given 0 tokens (an empty prompt or context?): at least one token is needed, "
            "both to run the model and for a press to compress. (generate() given a cache feeds only the input_ids "
            "after the tokens the cache holds: pass the cached ids followed by the new ones.)"
        )
    setattr(module, CACHE_ATTRIBUTE, cache_argument(kwargs))
    note_appended_padding(module, hidden_states, kwargs.get("attention_mask"))


def switch_attention_implementation(model: nn.Module) -> str:
    """Switch to the adakv twin of the current implementation; return the original name."""
    current = model.config._attn_implementation
    if current.startswith(ADAKV_ATTENTION_PREFIX):
        raise RuntimeError("This model is already inside a `with press(model):` block; presses do not nest.")
    if current not in SUPPORTED_ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={current!r} is not supported by adakv presses. "
            f"Load the model with one of {SUPPORTED_ATTENTION_IMPLEMENTATIONS}."
        )
    register_attention_functions()
    set_attention_implementation(model, ADAKV_ATTENTION_PREFIX + current)
    return current


def active_session(model: nn.Module) -> PressSession | None:
    """The PressSession open on `model` (or on its decoder), or None."""
    return active.session_of(model)
