"""The press API: what a press is given (`PrefillContext`, `WholePrefill`) and what it answers (a keep mask).

A press is policy only. It turns what a runtime tells it about one layer's context prefill into a keep
decision, (batch, kv_heads, seq) bool: `compress(context)`. Presses that need every layer at once
(`compresses_after_prefill`: AdaptivePress(scope="model"), KVzipPress) answer for a whole prefill
(`compress_prefill`). A press registers no hooks, holds no per-call state and knows no graph or fusion:
the runtime that runs it (adakv.runtimes.hf for transformers) does all of that. `with press(model):` is a
thin front that opens that runtime's session for the press.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Iterator, Protocol

import torch
from torch import nn

from adakv.cache import BACKENDS, DEFAULT_BACKEND, KV_DTYPES, kv_dtype_refusal
from adakv.models import queries

from .attributes import check_known_attribute
from .fields import Check, FieldRule, OneOf


@dataclass
class PrefillContext:
    """What a press sees of one attention layer right after the context prefill (or, in a chunked
    prefill, right after one chunk of the context: then every field covers the chunk's tokens only and
    `attentions` is None).

    keys/values: (batch, kv_heads, seq, head_dim), rotated keys as stored in the cache.
    hidden_states: (batch, rows, hidden), the layer's input at the last `rows` positions (`input_rows`): rows =
        seq for a whole context, fewer where the runtime keeps only what the press tree reads (a whole prefill:
        `BasePress.layer_input_rows`; DecodingPress: its buffer). None where the runtime does not have it
        (vLLM's attention backend sees queries, keys and values only) or the press tree reads none of it.
    position_embeddings: (cos, sin), each (batch, rows, rotary_dim), the same positions; None with hidden_states.
    attentions: (batch, heads, seq, seq) or None (only eager attention returns weights).
    available: (batch, kv_heads, seq) bool, positions that may be kept (real tokens not yet pruned).
    module: the transformers attention module, None outside transformers.
    recent_queries: (batch, heads, n, head_dim), the rotated queries of the last n context positions when the
        runtime holds them (vLLM); None: `last_queries` recomputes them from hidden_states through `module`.
    scaling: the attention's softmax scale when there is no module to ask.
    """

    module: nn.Module | None
    hidden_states: torch.Tensor | None
    keys: torch.Tensor
    values: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    attentions: torch.Tensor | None
    available: torch.Tensor
    layer_idx: int
    num_layers: int
    # what presses computed from the whole prefill this context belongs to (shared by its layers'
    # contexts; e.g. KVzip's scores), None outside a whole prefill
    memo: dict | None = field(default=None, repr=False, compare=False)
    recent_queries: torch.Tensor | None = field(default=None, repr=False)
    scaling: float | None = None

    @property
    def seq_len(self) -> int:
        return self.keys.shape[-2]

    @property
    def softmax_scale(self) -> float:
        """The scale the layer's attention multiplies its logits by."""
        return self.module.scaling if self.scaling is None else self.scaling

    @property
    def input_rows(self) -> int:
        """How many of the newest positions `hidden_states` and `position_embeddings` cover (0 without them)."""
        return 0 if self.hidden_states is None else self.hidden_states.shape[-2]

    def newest_inputs(self, count: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """hidden_states (batch, count, hidden) and (cos, sin), each (batch, count, rotary_dim), of the last `count`
        positions. A ValueError when the context holds fewer: a press reads at most its `hidden_states_rows`."""
        held = self.input_rows
        if held < count:
            raise ValueError(
                f"this context holds the layer inputs (hidden states, cos/sin) of its last {held} positions, and "
                f"{count} were asked for. The runtime keeps only the rows the press tree declares it reads "
                "(BasePress.hidden_states_rows; None: all): a press that reads more must declare more."
            )
        cos, sin = self.position_embeddings
        start = held - count
        return self.hidden_states[:, start:], (cos[:, start:], sin[:, start:])

    def check_holds_every_input_row(self, reader: str) -> None:
        """Raise a ValueError unless the hidden states and cos/sin cover every position (`reader` needs them all)."""
        if self.input_rows != self.seq_len:
            raise ValueError(
                f"{reader} needs the layer inputs (hidden states, cos/sin) of every position, but this context holds "
                f"those of its last {self.input_rows} of {self.seq_len} positions. A press that reads them at other "
                "positions than the newest must declare hidden_states_rows None (all)."
            )

    def keeping_newest_inputs(self, rows: int | None) -> PrefillContext:
        """The context with the hidden states and cos/sin of its last `rows` positions only (None: all, this
        context; 0: none), copied, so the full tensors are not kept alive by a view of them."""
        if rows is None or rows >= self.input_rows:
            return self
        if rows == 0:
            return replace(self, hidden_states=None, position_embeddings=None)
        hidden_states, (cos, sin) = self.newest_inputs(rows)
        return replace(self, hidden_states=hidden_states.clone(), position_embeddings=(cos.clone(), sin.clone()))

    def last_queries(self, count: int) -> torch.Tensor:
        """(batch, heads, count, head_dim): the rotated queries of the last `count` context positions."""
        if self.recent_queries is not None:
            held = self.recent_queries.shape[-2]
            if held < count:
                raise ValueError(f"the runtime holds the last {held} queries of the context; {count} were asked for.")
            return self.recent_queries[..., held - count :, :]
        if self.hidden_states is None or self.module is None:
            raise ValueError("this runtime gives presses neither queries nor the hidden states to compute them from.")
        hidden_states, position_embeddings = self.newest_inputs(count)
        return queries(self.module, hidden_states, position_embeddings)

    def restrict(self, keep: torch.Tensor) -> PrefillContext:
        """The same context with only `keep` (batch, kv_heads, seq) still available."""
        return replace(self, available=self.available & keep)

    def slice(self, start: int, end: int) -> PrefillContext:
        """The context limited to positions [start, end), as if only those tokens had been prefilled."""
        self.check_holds_every_input_row("PrefillContext.slice")
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


class ContextReplay(Protocol):
    """What a runtime offers presses that run the model again over a prefilled context (KVzip).

    context_embeddings(): (batch, seq, hidden) the context's input embeddings.
    embed(token_ids): (n,) ids -> (n, hidden) input embeddings.
    replay(stream, chunk_size, attend): feed `stream` (batch, n, hidden) through the model behind the
    context, `chunk_size` tokens per forward, with attend(layer_idx, queries, keys, values, chunk_start,
    output_needed) as the attention of every compressed layer: queries (batch, heads, chunk, head_dim) of the
    chunk (rotated), keys/values (batch, kv_heads, context + stream so far, head_dim) of the layer. attend
    returns the attention output (batch, chunk, heads, head_dim), or None when output_needed is False: the
    last compressed layer, after which nothing of that forward runs. The cache is brought back to the
    context after.
    """

    def context_embeddings(self) -> torch.Tensor: ...

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor: ...

    def replay(
        self,
        stream: torch.Tensor,
        chunk_size: int,
        attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, int, bool], torch.Tensor | None],
    ) -> None: ...


@dataclass
class WholePrefill:
    """A whole context prefill, for presses that compress only after it (`compresses_after_prefill`).

    contexts: the PrefillContext of every compressed layer, in layer order (the same tokens in each).
    replay: the runtime's way to run the model again over this context (see ContextReplay), or None.
    memo: what presses computed from this prefill and may reuse (e.g. KVzip's scores, which do not depend
    on the compression ratio; the evaluation compresses one prefill at several ratios). Every context's
    `memo` is this dict.
    """

    contexts: list[PrefillContext]
    replay: ContextReplay | None = None
    memo: dict = field(default_factory=dict)

    def __post_init__(self):
        self.contexts = [replace(context, memo=self.memo) for context in self.contexts]

    def restrict(self, keeps: list[torch.Tensor | None]) -> WholePrefill:
        """The same prefill with only `keeps[i]` still available in layer i (None: unchanged)."""
        contexts = [c if keep is None else c.restrict(keep) for c, keep in zip(self.contexts, keeps)]
        return replace(self, contexts=contexts)


def check_is_press(press, wrapper: str) -> None:
    if not isinstance(press, BasePress):
        raise TypeError(f"{wrapper} wraps a press (a BasePress instance), got {type(press).__name__}.")


def describe_field(press: BasePress, name: str) -> str:
    return f"{type(press).__name__}({name}={getattr(press, name)!r})"


def placement_refusal(wrapper: BasePress, inner: BasePress) -> str | None:
    """Why `wrapper` cannot hold `inner`, or None: a press that compresses during decoding, or one that must be
    outermost, anywhere inside it would be ignored, or would run on keys it has already moved."""
    outer = type(wrapper).__name__
    for part in inner.press_tree():
        name = type(part).__name__
        if wrapper.allows_inside(inner, part):
            continue
        if part.compresses_during_decoding:
            return (
                f"{outer} cannot hold a {name}: the runtime drives a press that compresses during decoding only when "
                f"it is the press of the block (or PrefillDecodingPress's decoding_press), so inside {outer} it would "
                "never run and nothing generated would be compressed. Use PrefillDecodingPress(prefill_press=..., "
                "decoding_press=DecodingPress(...)) as the block's press."
            )
        if part.outermost_only is not None:
            fix = f"use one {name}, outermost" if name == outer else f"wrap the {outer} in the {name}: {name}({outer}(...))"
            return f"{outer} cannot hold a {name}: {part.outermost_only}. Instead {fix}."
    return None


@dataclass
class BasePress:
    """Base of every press. Subclasses implement `compress(context) -> keep mask`.

    backend: how the keep mask is applied. None (not set, the default) evicts: "evict" semantics,
    except on a model the evict backend cannot serve (`adakv.cache.evict_refusal`), where the press
    falls back to "mask" with one BackendFallbackWarning. "evict" gathers the kept rows into a flat
    per-head cache and frees the rest (and raises where it cannot serve the model); "mask" keeps the
    dense cache and excludes pruned positions per head inside attention (works everywhere, saves no
    memory). A press that wraps others runs with the one backend set anywhere in it (`explicit_backend`).

    kv_dtype: the dtype the compressed cache stores kept keys and values in. None (not set, the default): the
    model's dtype. "float8_e4m3fn": e4m3 codes plus one float32 scale per (token, head), 0.516 of the bf16 bytes
    at head_dim 128 (adakv.cache.flat); the evict backend only, on CPU or a GPU of compute capability >= 8.9. Every
    full-attention layer then goes into the fp8 flat cache, also one the press prunes nothing from. A wrapper
    and the presses inside it must agree, as for backends (`explicit_kv_dtype`).

    `with press(model, **speed_switches):` runs the press inside transformers (adakv.runtimes.hf.session)
    and yields the session; the speed switches enter `adakv.accelerate` for the block.
    """

    backend: str | None = field(default=None, kw_only=True)
    kv_dtype: str | None = field(default=None, kw_only=True)
    # True for presses that act after the context, on the tokens appended to it (DecodingPress): the runtime
    # then hands them every later forward of each layer, which a replayed CUDA graph could not.
    compresses_during_decoding = False
    # why a press must be the outermost one (KeyRerotationPress), or None: wrappers refuse to hold it
    outermost_only: ClassVar[str | None] = None
    # what each field takes (presses/fields.py), checked on every assignment; a subclass's rules join its bases'
    field_rules: ClassVar[dict[str, FieldRule]] = {
        "backend": OneOf(BACKENDS, optional=True, note=" (not set: evict)"),
        "kv_dtype": OneOf(KV_DTYPES, optional=True, note=" (not set: the model's dtype)"),
    }
    # whether compress/score read PrefillContext.hidden_states or position_embeddings at all (False: the press
    # itself reads none, `hidden_states_rows` 0); a press that reads some says how many in `hidden_states_rows`
    reads_hidden_states: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        rules: dict[str, FieldRule] = {}
        for klass in reversed(cls.__mro__):
            rules.update(vars(klass).get("field_rules", {}))
        cls.field_rules = rules

    def __setattr__(self, name: str, value: Any) -> None:
        check_known_attribute(self, name)  # a misspelt field raises instead of becoming a new attribute
        rule = type(self).field_rules.get(name)
        if rule is not None:
            value = rule.check(name, value, type(self).__name__)
        super().__setattr__(name, value)

    def __post_init__(self):
        self.check_combination()

    def check_combination(self) -> None:
        """Raise on values that are fine field by field but not together (fields of this press, or this press
        and the presses inside it). Run at construction and, for the whole press tree, by `check_fields`."""
        # conflicting backends or kv_dtypes between this press and the presses it wraps fail here
        refusal = kv_dtype_refusal(self.explicit_backend, self.explicit_kv_dtype)
        if refusal is not None:
            raise ValueError(refusal)
        for inner in self.inner_presses():
            refusal = placement_refusal(self, inner) if isinstance(inner, BasePress) else None
            if refusal is not None:
                raise TypeError(refusal)

    def allows_inside(self, inner: BasePress, part: BasePress) -> bool:
        """True when `part`, a press of the tree of `inner` (one of this press's inner presses), may sit there
        although it compresses during decoding or must be outermost (PrefillDecodingPress: its two presses)."""
        return False

    def check_fields(self) -> None:
        """Check every field of every press of the tree again, alone and together: an inner press, or a list
        field changed in place, may have changed since construction (a press block runs this when it opens)."""
        for press in self.press_tree():
            for name, rule in type(press).field_rules.items():
                rule.check(name, getattr(press, name), type(press).__name__)
            press.check_combination()

    def inner_presses(self) -> tuple[BasePress, ...]:
        """The presses this one wraps directly (none for a plain press)."""
        return ()

    @property
    def hidden_states_rows(self) -> int | None:
        """How many of a context's newest positions this press itself reads the hidden states and cos/sin of: 0
        none, None possibly all (the default for a press that reads them). A wrapper answers for what it reads
        itself; its inner presses answer for theirs on the context it hands them, so one that hands them other
        positions than the newest of its own context (ChunkPress's slices, BlockPress's blocks) says None."""
        return None if self.reads_hidden_states else 0

    @property
    def layer_input_rows(self) -> int | None:
        """The newest positions of each layer's context whose hidden states and cos/sin this press tree reads:
        the largest `hidden_states_rows` of its presses, None when one of them may read all. A press that compresses
        after the whole prefill has the runtime hold only these until the prefill ends."""
        rows = [press.hidden_states_rows for press in self.press_tree()]
        return None if None in rows else max(rows)

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
        return self.explicit_field("backend", "backends")

    @property
    def explicit_kv_dtype(self) -> str | None:
        """The kv_dtype set on this press or on any press inside it, or None; the rule of `explicit_backend`."""
        return self.explicit_field("kv_dtype", "kv_dtypes")

    def explicit_field(self, name: str, plural: str) -> str | None:
        """The value of field `name` set (not None) anywhere in this press tree, or None; two different values
        raise a ValueError naming both presses."""
        chosen = None
        for press in self.press_tree():
            if getattr(press, name) is None:
                continue
            if chosen is not None and getattr(press, name) != getattr(chosen, name):
                raise ValueError(
                    f"{type(self).__name__} holds presses with conflicting {plural}: {describe_field(chosen, name)} "
                    f"and {describe_field(press, name)}. A composed press runs with one {name}: set it on one of "
                    "them (e.g. the outermost) or give them all the same."
                )
            chosen = chosen or press
        return None if chosen is None else getattr(chosen, name)

    @property
    def resolved_backend(self) -> str:
        """The backend this press uses on a model the evict backend can serve: the explicit one, else "evict"."""
        return self.explicit_backend or DEFAULT_BACKEND

    def compress(self, context: PrefillContext) -> torch.Tensor | None:
        """Return the keep mask (batch, kv_heads, seq) bool, or None to leave the layer as it is."""
        raise NotImplementedError

    @property
    def compresses_after_prefill(self) -> bool:
        """True for presses that need every layer at once; they compress after the whole context prefill."""
        return False

    def prepare_prefill(self, prefill: WholePrefill) -> None:
        """Called on every press of the tree before `compress_prefill` (KVzipPress scores here, into
        `prefill.memo`)."""

    def compress_prefill(self, prefill: WholePrefill) -> list[torch.Tensor | None]:
        """Keep masks (batch, kv_heads, seq) or None, one per context of `prefill`. By default each layer
        on its own; AdaptivePress(scope="model") allocates across layers."""
        return [self.compress(context) for context in prefill.contexts]

    def keep_masks_after_prefill(self, prefill: WholePrefill) -> list[torch.Tensor | None]:
        """`prepare_prefill` on every press of the tree, then this press's `compress_prefill`."""
        for part in self.press_tree():
            part.prepare_prefill(prefill)
        return self.compress_prefill(prefill)

    def __call__(self, model: nn.Module, **speed_switches):
        """`with press(model):` hooks the press onto a transformers model for the block and yields the
        session (adakv.runtimes.hf.session.PressSession). speed_switches: cuda_graphs, join_projections,
        fuse_elementwise, gemv_linears, as `adakv.accelerate` takes them, entered for the same block; and
        mlp_chunk_rows, the most token rows a prefill's MLP runs over at once (8192 unless given; None: all,
        as transformers does; adakv.runtimes.hf.mlp_rows). The arguments are checked here; nothing acts until
        the block is entered (a block never entered warns)."""
        from adakv.runtimes.hf.session import PressBlock  # the runtime sits above the presses

        return PressBlock(self, model, speed_switches)


@dataclass
class WrapperPress(BasePress):
    """A press around one inner press. `compression_ratio` reads and sets the inner press's."""

    press: BasePress

    field_rules = {"press": Check(check_is_press)}

    def inner_presses(self) -> tuple[BasePress, ...]:
        return (self.press,)

    @property
    def compression_ratio(self) -> float:
        return self.press.compression_ratio

    @compression_ratio.setter
    def compression_ratio(self, value: float) -> None:
        if not hasattr(self.press, "compression_ratio"):
            raise AttributeError(
                f"{type(self).__name__} wraps a {type(self.press).__name__}, which has no compression_ratio: "
                "set the ratios of the presses inside it."
            )
        self.press.compression_ratio = value

    @property
    def compresses_after_prefill(self) -> bool:
        return self.press.compresses_after_prefill
