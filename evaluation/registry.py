"""Press registry: command-line names -> presses at a given compression ratio.

Press classes are looked up in `adakv.presses` only when a press is built, so names whose class is
not in this installation are still listed, and fail with a clear message when used."""

from __future__ import annotations

import importlib

# name -> (scorer class, wrapper classes applied from the inside out); "Class:field=value" sets a field
PRESSES: dict[str, tuple[str, tuple[str, ...]]] = {
    "snapkv": ("SnapKVPress", ()),
    "adakv_snapkv": ("SnapKVPress", ("AdaptivePress",)),
    "adakv_model_snapkv": ("SnapKVPress", ("AdaptivePress:scope=model",)),
    "criticalkv_snapkv": ("SnapKVPress", ("CriticalKVPress",)),
    "adakv_criticalkv_snapkv": ("SnapKVPress", ("CriticalKVPress", "AdaptivePress")),
    "pyramidkv": ("PyramidKVPress", ()),
    "adakv_pyramidkv": ("PyramidKVPress", ("AdaptivePress",)),
    "expected_attention": ("ExpectedAttentionPress", ()),
    "adakv_expected_attention": ("ExpectedAttentionPress", ("AdaptivePress",)),
    "knorm": ("KnormPress", ()),
    "adakv_knorm": ("KnormPress", ("AdaptivePress",)),
    "keydiff": ("KeyDiffPress", ()),
    "adakv_keydiff": ("KeyDiffPress", ("AdaptivePress",)),
    "tova": ("TOVAPress", ()),
    "adakv_tova": ("TOVAPress", ("AdaptivePress",)),
    "observed_attention": ("ObservedAttentionPress", ()),
    "adakv_observed_attention": ("ObservedAttentionPress", ("AdaptivePress",)),
    "streaming_llm": ("StreamingLLMPress", ()),
    # KVzip uniform (per head); KVzipPress's own default is model-wide, the same as adakv_model_kvzip. Inside
    # AdaptivePress the wrapper allocates and budget_scope is not read; the same scorer spec pairs the three
    # in the report (adaptive_vs_uniform).
    "kvzip": ("KVzipPress:budget_scope=head", ()),
    "adakv_kvzip": ("KVzipPress:budget_scope=head", ("AdaptivePress",)),
    "adakv_model_kvzip": ("KVzipPress:budget_scope=head", ("AdaptivePress:scope=model",)),
    "random": ("RandomPress", ()),
    "chunkkv_snapkv": ("SnapKVPress", ("ChunkKVPress",)),
    "lagkv": ("LagKVPress", ()),
    "adakv_lagkv": ("LagKVPress", ("AdaptivePress",)),
    "simlayerkv": ("SimLayerKVPress", ()),
    "block_snapkv": ("SnapKVPress", ("BlockPress",)),
    "block_keydiff": ("KeyDiffPress", ("BlockPress",)),
    "cur": ("CURPress", ()),
    "adakv_cur": ("CURPress", ("AdaptivePress",)),
    "finch": ("FinchPress", ()),
    "adakv_finch": ("FinchPress", ("AdaptivePress",)),
    "duo_attention": ("DuoAttentionPress", ()),
    "headkv_snapkv": ("SnapKVPress", ("HeadKVPress",)),
    "think_snapkv": ("SnapKVPress", ("ThinKPress",)),
    "merge_snapkv": ("SnapKVPress", ("MergePress",)),
    "merge_streaming_llm": ("StreamingLLMPress", ("MergePress",)),
}
NO_PRESS = "none"


def known_press_names() -> list[str]:
    return [NO_PRESS, *PRESSES]


def check_press_names(names) -> None:
    unknown = [name for name in names if name not in PRESSES and name != NO_PRESS]
    if unknown:
        raise ValueError(f"Unknown press name(s) {unknown}. Known presses: {', '.join(known_press_names())}.")


def press_class(class_name: str):
    presses = importlib.import_module("adakv.presses")
    if not hasattr(presses, class_name):
        raise ValueError(f"This installation of adakv has no {class_name} (adakv.presses lacks it).")
    return getattr(presses, class_name)


def check_presses_available(names) -> None:
    """Fail before any work when a named press's class is missing."""
    check_press_names(names)
    for name in names:
        if name != NO_PRESS:
            scorer, wrappers = PRESSES[name]
            for spec in (scorer, *wrappers):
                press_class(class_and_fields(spec)[0])


def class_and_fields(spec: str) -> tuple[str, dict[str, str]]:
    """"AdaptivePress:scope=model" -> ("AdaptivePress", {"scope": "model"})."""
    class_name, _, options = spec.partition(":")
    return class_name, dict(option.split("=", 1) for option in options.split(",") if option)


def build_press(name: str, compression_ratio: float, backend: str | None = None, kv_dtype: str | None = None):
    """The press registered as `name` at `compression_ratio`, or None for "none". backend None leaves
    it unset (the presses' default: evict); kv_dtype None too (the model's dtype), set on every press of it."""
    check_press_names([name])
    if name == NO_PRESS:
        return None
    scorer, wrappers = PRESSES[name]
    class_name, fields = class_and_fields(scorer)
    press = press_class(class_name)(compression_ratio=compression_ratio, backend=backend, kv_dtype=kv_dtype, **fields)
    for wrapper in wrappers:
        class_name, fields = class_and_fields(wrapper)
        press = press_class(class_name)(press, backend=backend, kv_dtype=kv_dtype, **fields)
    return press
