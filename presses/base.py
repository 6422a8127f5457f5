"""BasePress: the hook machinery shared by every press.

`with press(model):` registers two hooks on every attention layer and switches the model's
attention implementation to its adakv twin; leaving the block (also by an exception) removes the
hooks and restores the implementation. After a layer's attention has run on the *context prefill*
(the first forward into an empty cache layer), the forward hook builds a `PrefillContext`, asks the
press for a keep mask of shape (batch, kv_heads, seq) and hands it to the backend, which replaces
the cache layer. Decode steps and later question tokens go to `after_appended_tokens`, which does
nothing for presses that compress the context only; DecodingPress overrides it to re-compress the
cache as generation goes on.

The one exception is a chunked context prefill (adakv/chunked_prefill.py): it runs its forwards inside
`press.receiving_context_chunks()`, and while that block is open every forward into a layer that
already holds context is a further *chunk* of the context. The hook then compresses the chunk's
tokens alone (a `PrefillContext` of the chunk: its keys, hidden states and positions) and folds the
kept ones into the layer's compressed context.

Presses whose `compresses_after_prefill` is True (AdaptivePress(scope="model"), KVzipPress) need every
layer at once, so they compress only after the *whole* context prefill: the attention hooks record each
full-attention layer's `PrefillContext` (its dense keys/values stay in the cache), and a forward hook
on the model's decoder, after the last layer, hands them all to `compressed_layers_after_prefill`, which
replaces every compressed layer's cache entry at once. The cost is peak memory: the dense cache of the
whole context, and each layer's input hidden states (batch, seq, hidden), are held until the end of the
prefill; backend "evict" then frees the pruned rows of every layer at once.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import ClassVar, Generator, Iterator

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from adakv.attention import CACHE_ATTRIBUTE, allowed_positions, note_appended_padding, register_attention_functions
from adakv.cache import (
    ADAKV_ATTENTION_PREFIX,
    BACKENDS,
    DEFAULT_BACKEND,
    BackendFallbackWarning,
    evict_refusal,
    make_compressed_layer,
    newest_keys_values,
)
from adakv.flat.graph_decode import graph_decoder_for
from adakv.fusion import model_fusions
from adakv.models import (
    SUPPORTED_ATTENTION_IMPLEMENTATIONS,
    attention_modules,
    cache_argument,
    is_full_attention_layer,
)

@dataclass
class PrefillContext:
    """What a press sees of one attention layer right after the context prefill (or, in a chunked
    prefill, right after one chunk of the context: then every field covers the chunk's tokens only and
    `attentions` is None).

    keys/values: (batch, kv_heads, seq, head_dim), rotated keys as stored in the cache.
    hidden_states: (batch, seq, hidden), the layer's input.
    position_embeddings: (cos, sin), each (batch, seq, rotary_dim).
    attentions: (batch, heads, seq, seq) or None (only eager attention returns weights).
    available: (batch, kv_heads, seq) bool, positions that may be kept (real tokens not yet pruned).
    """

    module: nn.Module
    hidden_states: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    attentions: torch.Tensor | None
    available: torch.Tensor
    layer_idx: int
    num_layers: int

    @property
    def seq_len(self) -> int:
        return self.keys.shape[-2]

    def restrict(self, keep: torch.Tensor) -> PrefillContext:
        """The same context with only `keep` (batch, kv_heads, seq) still available."""
        return replace(self, available=self.available & keep)

    def slice(self, start: int, end: int) -> PrefillContext:
        """The context limited to positions [start, end), as if only those tokens had been prefilled."""
        cos, sin = self.position_embeddings
        return replace(
            self,
            hidden_states=self.hidden_states[:, start:end],
            keys=self.keys[:, :, start:end],
            values=self.values[:, :, start:end],
            position_embeddings=(cos[:, start:end], sin[:, start:end]),
            attentions=None if self.attentions is None else self.attentions[..., start:end, start:end],
            available=self.available[..., start:end],
        )


@dataclass
class WholePrefill:
    """A whole context prefill, for presses that compress only after it (`compresses_after_prefill`).

    contexts: the PrefillContext of every full-attention layer, in layer order (the same tokens in each).
    cache: the model's cache; every layer still holds the dense context.
    decoder: the model's decoder (`model.get_decoder()`), to run further forwards over the cache.
    input_ids: (batch, seq) the context's token ids, or None when the model got inputs_embeds.
    inputs_embeds: (batch, seq, hidden) or None when the model got input_ids.
    memo: what presses computed from this prefill and may reuse (e.g. KVzip's scores, which do not
    depend on the compression ratio; the evaluation compresses one prefill at several ratios).
    """

    contexts: list[PrefillContext]
    cache: Cache
    decoder: nn.Module
    input_ids: torch.Tensor | None = None
    inputs_embeds: torch.Tensor | None = None
    memo: dict = field(default_factory=dict)

    def embeddings(self) -> torch.Tensor:
        """(batch, seq, hidden) the context's input embeddings, as the decoder's first layer received them."""
        if self.inputs_embeds is not None:
            return self.inputs_embeds
        if self.input_ids is None:
            raise ValueError("This prefill has neither input_ids nor inputs_embeds.")
        return self.decoder.get_input_embeddings()(self.input_ids)

    def restrict(self, keeps: list[torch.Tensor | None]) -> WholePrefill:
        """The same prefill with only `keeps[i]` still available in layer i (None: unchanged)."""
        contexts = [c if keep is None else c.restrict(keep) for c, keep in zip(self.contexts, keeps)]
        return replace(self, contexts=contexts)


def check_compression_ratio(ratio: float) -> None:
    if not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"compression_ratio must be a number in [0, 1), got {ratio!r}.")


def check_fraction_fields(press, names: tuple[str, ...]) -> None:
    """Raise ValueError unless each named field of `press` is a number (not a bool) in [0, 1]."""
    for name in names:
        value = getattr(press, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")


def check_integer_fields(press, minimums: dict[str, int]) -> None:
    """Raise ValueError unless each named field of `press` is an integer (not a bool) >= its minimum."""
    for name, minimum in minimums.items():
        value = getattr(press, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def check_is_press(press, wrapper: str) -> None:
    if not isinstance(press, BasePress):
        raise TypeError(f"{wrapper} wraps a press (a BasePress instance), got {type(press).__name__}.")


def real_token_mask(attention_mask: torch.Tensor | None, batch: int, kv_length: int, device) -> torch.Tensor:
    """(batch, kv_length) True for real tokens. Padding keys are those the last query may not attend."""
    if attention_mask is None:  # no padding (and no need to build a seq x seq causal mask)
        return torch.ones(batch, kv_length, dtype=torch.bool, device=device)
    last_query = attention_mask[:, :, -1:]
    return allowed_positions(last_query, 1, kv_length, device)[:, 0, -1].expand(batch, kv_length)


def describe_backend(press: BasePress) -> str:
    return f"{type(press).__name__}(backend={press.backend!r})"


@dataclass
class BasePress:
    """Base of every press. Subclasses implement `compress(context) -> keep mask`.

    backend: how the keep mask is applied. None (not set, the default) evicts: "evict" semantics,
    except on a model the evict backend cannot serve (`adakv.cache.evict_refusal`), where the press
    falls back to "mask" with one BackendFallbackWarning. "evict" gathers the kept rows into a flat
    per-head cache and frees the rest (and raises where it cannot serve the model); "mask" keeps the
    dense cache and excludes pruned positions per head inside attention (works everywhere, saves no
    memory). A press that wraps others runs with the one backend set anywhere in it (`explicit_backend`).
    """

    backend: str | None = field(default=None, kw_only=True)
    # True only inside `receiving_context_chunks()`; a class default, not a dataclass field.
    _receiving_context_chunks: ClassVar[bool] = False
    # The backend chosen for the model inside `with press(model):` (see `backend_for`); None outside.
    _backend_in_use: ClassVar[str | None] = None
    # True while `compressed_layers_after_prefill` runs (its own forwards, e.g. KVzip's, are not prefills).
    _compressing_prefill: ClassVar[bool] = False

    def __post_init__(self):
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None (not set: evict), got {self.backend!r}.")
        _ = self.explicit_backend  # conflicting backends between this press and the presses it wraps fail here

    def inner_presses(self) -> tuple[BasePress, ...]:
        """The presses this one wraps directly (none for a plain press)."""
        return ()

    def press_tree(self) -> Iterator[BasePress]:
        """This press and every press it wraps, depth first."""
        yield self
        for inner in self.inner_presses():
            if isinstance(inner, BasePress):  # wrappers check their inner presses' types themselves
                yield from inner.press_tree()

    @property
    def explicit_backend(self) -> str | None:
        """The backend set on this press or on any press inside it, or None when none is set.

        The rule for composed presses: a wrapper with no backend takes the one set inside it, an inner
        press with no backend runs with its wrapper's, and two different backends set in one composed
        press (wrapper vs inner, or two members of a ComposedPress) raise a ValueError naming both."""
        chosen = None
        for press in self.press_tree():
            if press.backend is None:
                continue
            if chosen is not None and press.backend != chosen.backend:
                raise ValueError(
                    f"{type(self).__name__} holds presses with conflicting backends: {describe_backend(chosen)} "
                    f"and {describe_backend(press)}. A composed press runs with one backend: set it on one of "
                    "them (e.g. the outermost) or give them all the same."
                )
            chosen = chosen or press
        return None if chosen is None else chosen.backend

    @property
    def resolved_backend(self) -> str:
        """The backend this press uses on a model the evict backend can serve: the explicit one, else "evict"."""
        return self.explicit_backend or DEFAULT_BACKEND

    def backend_for(self, config) -> str:
        """The backend this press uses on a model with `config`. With no backend set and a model the
        evict backend cannot serve, "mask" with one BackendFallbackWarning; an explicit "evict" raises."""
        backend, refusal = self.explicit_backend, evict_refusal(config)
        if refusal is None or backend == "mask":
            return backend or DEFAULT_BACKEND
        if backend == "evict":
            raise NotImplementedError(f"backend='evict' cannot serve this model: {refusal}. Use backend='mask'.")
        warnings.warn(
            f"{type(self).__name__} has no backend set, so it would evict, but {refusal}; it falls back to "
            "backend='mask' (the dense cache is kept, no memory is freed). Pass backend='mask' to silence this.",
            BackendFallbackWarning,
            stacklevel=4,
        )
        return "mask"

    def compress(self, context: PrefillContext) -> torch.Tensor | None:
        """Return the keep mask (batch, kv_heads, seq) bool, or None to leave the layer as it is."""
        raise NotImplementedError

    @property
    def compresses_after_prefill(self) -> bool:
        """True for presses that need every layer at once; they compress after the whole context prefill."""
        return False

    def prepare_prefill(self, prefill: WholePrefill) -> None:
        """Called on every press of the tree before `compress_prefill` (KVzipPress scores here)."""

    def release_prefill(self) -> None:
        """Called on every press of the tree after `compress_prefill`, also on errors."""

    def compress_prefill(self, prefill: WholePrefill) -> list[torch.Tensor | None]:
        """Keep masks (batch, kv_heads, seq) or None, one per context of `prefill`. By default each layer
        on its own; AdaptivePress(scope="model") allocates across layers."""
        return [self.compress(context) for context in prefill.contexts]

    def compressed_layers_after_prefill(self, prefill: WholePrefill) -> list:
        """The cache layers (or None: keep the dense one) that replace those of `prefill.contexts`."""
        parts = list(self.press_tree())
        self._compressing_prefill = True
        try:
            for part in parts:
                part.prepare_prefill(prefill)
            keeps = self.compress_prefill(prefill)
        finally:
            for part in parts:
                part.release_prefill()
            del self._compressing_prefill  # back to the class default, False
        return [
            None if keep is None else make_compressed_layer(self._backend(c), c.keys, c.values, keep, c.module.config)
            for c, keep in zip(prefill.contexts, keeps)
        ]

    @contextmanager
    def __call__(
        self,
        model: PreTrainedModel,
        cuda_graphs: bool | str = False,
        join_projections: bool = False,
        fuse_elementwise: bool = False,
        gemv_linears: bool = False,
    ) -> Generator[None, None, None]:
        """Hook the press onto `model` for the block. cuda_graphs=True replays decode steps from a CUDA graph
        (adakv/flat/graph_decode.py; backend "evict", CUDA models; "emulate" runs its CPU emulation for tests).
        join_projections=True computes each layer's q/k/v and gate/up as one matrix product each within the
        block (adakv/fusion/joined_projections.py): fewer, larger products, the same memory.
        fuse_elementwise=True runs the norms, rotary embeddings and SiLU gates as one Triton kernel each
        (adakv/fusion/elementwise.py; CUDA models). gemv_linears=True runs the decode steps' linear layers
        (1 to 16 input rows) as adakv's Triton matrix-vector product (adakv/fusion/gemv_linears.py; CUDA
        models). The four together give the fastest decode steps."""
        modules = attention_modules(model)
        if not any(is_full_attention_layer(module) for module in modules):
            raise ValueError(
                "Every attention layer of this model uses a sliding window (config.sliding_window / layer_types), "
                "so a press would compress nothing. adakv compresses full-attention layers only."
            )
        backend = self.backend_for(model.config)
        decoder = self._graph_decoder(model, cuda_graphs, backend)
        with model_fusions(model, join_projections, fuse_elementwise, gemv_linears):
            original_implementation = _switch_attention_implementation(model)
            handles, parts = [], list(self.press_tree())
            for part in parts:  # every press of the tree builds its layers with the block's backend
                part._backend_in_use = backend
            try:
                for module in modules:
                    handles.append(module.register_forward_pre_hook(_remember_cache, with_kwargs=True))
                    if is_full_attention_layer(module):
                        handles.append(module.register_forward_hook(self._after_attention, with_kwargs=True))
                if decoder is not None:
                    decoder.install()
                if self.compresses_after_prefill:
                    decoder_module = model.get_decoder()
                    handles.append(decoder_module.register_forward_pre_hook(self._before_decoder, with_kwargs=True))
                    handles.append(decoder_module.register_forward_hook(self._after_decoder, with_kwargs=True))
                yield
            finally:
                if decoder is not None:
                    decoder.uninstall()
                for handle in handles:
                    handle.remove()
                for module in modules:
                    module.__dict__.pop(CACHE_ATTRIBUTE, None)
                self.__dict__.pop("_prefill_parts", None)
                _set_attention_implementation(model, original_implementation)
                for part in parts:
                    part.__dict__.pop("_backend_in_use", None)  # back to the class default, None

    def _graph_decoder(self, model: PreTrainedModel, cuda_graphs: bool | str, backend: str):
        """The CUDA-graph decoder of this block, or None; kept on the press after the block for inspection
        (captures, replays). Graphs replay decode steps over flat layers, without running any hook."""
        refusal = self.graph_decoding_refusal(backend) if cuda_graphs else None
        if refusal is not None:
            raise ValueError(refusal)
        self.graph_decoder = graph_decoder_for(model, cuda_graphs)
        return self.graph_decoder

    def graph_decoding_refusal(self, backend: str) -> str | None:
        """Why this press cannot decode from CUDA graphs with `backend`, or None when it can."""
        if backend != "evict":
            return (
                f"cuda_graphs needs backend 'evict' (graphs replay decode steps over the flat cache), but "
                f"{type(self).__name__} runs with backend {backend!r} on this model."
            )
        if type(self).after_appended_tokens is not BasePress.after_appended_tokens:
            return (
                f"{type(self).__name__} acts on every decode step from a hook, which a replayed CUDA graph would skip; "
                "use cuda_graphs=False with presses that compress during decoding."
            )
        return None

    def is_active_on(self, model: PreTrainedModel) -> bool:
        """True inside `with self(model):` (this press's hook sits on the model's attention layers)."""
        return any(
            getattr(hook, "__self__", None) is self
            for module in attention_modules(model)
            for hook in module._forward_hooks.values()
        )

    @contextmanager
    def receiving_context_chunks(self) -> Generator[None, None, None]:
        """Mark every forward run inside this block as one chunk of the context (adakv.chunked_prefill
        drives it). A forward into a layer that already holds context is then compressed too: the
        press sees the chunk's tokens only and the kept ones join the compressed context. Outside the
        block such forwards (questions, decode steps) are never compressed."""
        if self._receiving_context_chunks:
            raise RuntimeError("This press is already receiving context chunks; chunked prefills do not nest.")
        self._receiving_context_chunks = True
        try:
            yield
        finally:
            del self._receiving_context_chunks  # back to the class default, False

    def _before_decoder(self, module: nn.Module, args, kwargs) -> None:
        if self._compressing_prefill:
            return  # a forward of the press itself
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else (args[0] if args else None)
        self._prefill_parts = {"contexts": [], "input_ids": input_ids, "inputs_embeds": kwargs.get("inputs_embeds")}

    def _after_decoder(self, module: nn.Module, args, kwargs, output) -> None:
        parts = self.__dict__.pop("_prefill_parts", None)
        if self._compressing_prefill or parts is None or not parts["contexts"]:
            return  # not a context prefill (a decode step, a question) or a forward of the press itself
        cache = parts.pop("cache")
        prefill = WholePrefill(decoder=module, cache=cache, **parts)
        for context, layer in zip(prefill.contexts, self.compressed_layers_after_prefill(prefill)):
            if layer is not None:
                cache.layers[context.layer_idx] = layer

    def _after_attention(self, module: nn.Module, args, kwargs, output) -> None:
        if self._compressing_prefill:
            return  # a forward of the press itself (KVzip's reconstruction)
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cache = cache_argument(kwargs)
        if cache is None:
            return
        layer = cache.layers[module.layer_idx]
        new_tokens = hidden_states.shape[1]
        first_context = type(layer) is DynamicLayer and layer.get_seq_length() == new_tokens
        if not (first_context or self._receiving_context_chunks):
            # a decode step or question tokens after the context (or a layer already compressed)
            self.after_appended_tokens(module, cache, hidden_states, kwargs)
            return
        keys, values = newest_keys_values(layer, new_tokens)
        batch, kv_heads = keys.shape[:2]
        kv_length = layer.get_seq_length()
        real = real_token_mask(kwargs.get("attention_mask"), batch, kv_length, keys.device)  # (batch, kv_length)
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
        if self.compresses_after_prefill:
            self._record_for_whole_prefill(context, cache, first_context)
            return
        if first_context:
            compressed = self.compressed_layer(context)
        else:
            compressed = self._compress_chunk(context, layer, real[:, None, :-new_tokens].expand(batch, kv_heads, -1))
        if compressed is not None:
            cache.layers[module.layer_idx] = compressed

    def _record_for_whole_prefill(self, context: PrefillContext, cache, first_context: bool) -> None:
        if not first_context:
            raise ValueError(
                f"{type(self).__name__} compresses after the whole context prefill (it needs every layer at once), "
                "so it cannot compress a chunked prefill chunk by chunk. Prefill the context in one forward."
            )
        parts = getattr(self, "_prefill_parts", None)
        if parts is None:
            raise RuntimeError("The model's decoder ran without this press's decoder hook; call the model itself.")
        parts["contexts"].append(context)
        parts["cache"] = cache

    def after_appended_tokens(self, module: nn.Module, cache, hidden_states: torch.Tensor, kwargs: dict) -> None:
        """Extension point for compression after the context: called once per full-attention layer after its
        attention ran on tokens added behind the context (decode steps, question tokens; not context chunks).
        The default does nothing. A press that overrides it may replace `cache.layers[module.layer_idx]` or
        change it in place (MaskedLayer.restrict_to, FlatHeadwiseLayer.recompress); see DecodingPress.

        hidden_states: (batch, new_tokens, hidden), the layer's input; kwargs: the attention module's keyword
        arguments (position_embeddings (cos, sin) each (batch, new_tokens, rotary_dim), attention_mask, ...)."""

    def _compress_chunk(self, context: PrefillContext, layer, earlier_real: torch.Tensor):
        """Compress a later chunk of the context, which `layer` holds as its newest tokens. Returns a
        layer that replaces `layer`, or None when `layer` was updated in place (or stays as it is).

        earlier_real: (batch, kv_heads, earlier) the real tokens before the chunk, for a layer that is
        still dense because every earlier chunk was left uncompressed (e.g. ratio 0)."""
        keep = self.compress(context)
        if hasattr(layer, "fold_appended_into_context"):  # MaskedLayer or FlatHeadwiseLayer
            layer.fold_appended_into_context(context.available if keep is None else keep)
            return None
        if keep is None:
            return None  # still nothing compressed in this layer: it stays dense
        keep = torch.cat([earlier_real, keep], dim=-1)
        return make_compressed_layer(self._backend(context), layer.keys, layer.values, keep, context.module.config)

    def compressed_layer(self, context: PrefillContext):
        """The cache layer that replaces the dense one after compression, or None to keep it."""
        keep = self.compress(context)
        if keep is None:
            return None
        return make_compressed_layer(self._backend(context), context.keys, context.values, keep, context.module.config)

    def _backend(self, context: PrefillContext) -> str:
        """The backend chosen at `with press(model):`, or (called outside such a block) chosen now."""
        return self.backend_for_module(context.module)

    def backend_for_module(self, module: nn.Module) -> str:
        """The backend to build `module`'s compressed cache layer with: the one chosen when the block that
        holds this press opened, or (outside such a block) chosen now from the module's config."""
        return self._backend_in_use or self.backend_for(module.config)


def _remember_cache(module: nn.Module, args, kwargs) -> None:
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if hidden_states.shape[1] == 0:
        raise ValueError(
            "The model was given 0 tokens (an empty prompt or context?): at least one token is needed, "
            "both to run the model and for a press to compress."
        )
    setattr(module, CACHE_ATTRIBUTE, cache_argument(kwargs))
    note_appended_padding(module, hidden_states, kwargs.get("attention_mask"))


def _set_attention_implementation(model: PreTrainedModel, implementation: str) -> None:
    configs = {id(model.config): model.config}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None:
            configs[id(config)] = config
    for config in configs.values():
        config._attn_implementation = implementation


def _switch_attention_implementation(model: PreTrainedModel) -> str:
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
    _set_attention_implementation(model, ADAKV_ATTENTION_PREFIX + current)
    return current


@dataclass
class WrapperPress(BasePress):
    """A press around one inner press. `compression_ratio` reads and sets the inner press's."""

    press: BasePress

    def __post_init__(self):
        super().__post_init__()
        check_is_press(self.press, type(self).__name__)

    def inner_presses(self) -> tuple[BasePress, ...]:
        return (self.press,)

    @property
    def compression_ratio(self) -> float:
        return self.press.compression_ratio

    @compression_ratio.setter
    def compression_ratio(self, value: float) -> None:
        check_compression_ratio(value)
        self.press.compression_ratio = value

    @property
    def compresses_after_prefill(self) -> bool:
        return self.press.compresses_after_prefill
