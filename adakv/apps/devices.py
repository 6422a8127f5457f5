"""The `--device` option of the command lines (`adakv demo`, `adakv-eval run`): a device this machine has, checked
before any model is loaded, so a typo or a GPU that is not there is one line of error, not a torch traceback."""

from __future__ import annotations

import torch

RUNS_ON = "cpu or cuda (cuda:N for the N-th GPU)"


def check_device(
    text, option: str = "--device", kinds: tuple[str, ...] = ("cpu", "cuda"), who: str = "adakv's command lines run"
) -> torch.device:
    """The torch device `text` names (a str or a torch.device) when its kind is one of `kinds` and, for CUDA, this
    machine has it; else a ValueError naming `option`, what was given and what is allowed (`who` runs there)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{option} {text!r} is not a device; use {RUNS_ON}.") from None
    if device.type not in kinds:
        allowed = RUNS_ON if kinds == ("cpu", "cuda") else ", ".join(kinds)
        raise ValueError(f"{option} {text!r}: {who} on {allowed}, not {device.type}.")
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise ValueError(f"{option} {text!r}: CUDA is not available here ({why}, torch {torch.__version__}); use --device cpu.")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"{option} {text!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}.")
    return device
