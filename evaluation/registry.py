"""Press registry: command-line names -> presses at a given compression ratio.

Press classes are looked up in `adakv.presses` only when a press is built, so names whose class is
not in this installation are still listed, and fail with a clear message when used."""

from __future__ import annotations

import importlib

# name -> (press class, wrapped in AdaptivePress?)
PRESSES: dict[str, tuple[str, bool]] = {
    "snapkv": ("SnapKVPress", False),
    "adakv_snapkv": ("SnapKVPress", True),
    "pyramidkv": ("PyramidKVPress", False),
    "adakv_pyramidkv": ("PyramidKVPress", True),
    "expected_attention": ("ExpectedAttentionPress", False),
    "adakv_expected_attention": ("ExpectedAttentionPress", True),
    "knorm": ("KnormPress", False),
    "adakv_knorm": ("KnormPress", True),
    "keydiff": ("KeyDiffPress", False),
    "adakv_keydiff": ("KeyDiffPress", True),
    "tova": ("TOVAPress", False),
    "adakv_tova": ("TOVAPress", True),
    "observed_attention": ("ObservedAttentionPress", False),
    "adakv_observed_attention": ("ObservedAttentionPress", True),
    "streaming_llm": ("StreamingLLMPress", False),
    "random": ("RandomPress", False),
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
            press_class(PRESSES[name][0])
            if PRESSES[name][1]:
                press_class("AdaptivePress")


def build_press(name: str, compression_ratio: float, backend: str = "mask"):
    """The press registered as `name` at `compression_ratio`, or None for "none"."""
    check_press_names([name])
    if name == NO_PRESS:
        return None
    class_name, adaptive = PRESSES[name]
    inner = press_class(class_name)(compression_ratio=compression_ratio, backend=backend)
    if not adaptive:
        return inner
    return press_class("AdaptivePress")(inner, backend=backend)
