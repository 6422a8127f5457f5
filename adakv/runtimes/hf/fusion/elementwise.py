"""The element-wise work of every decoder layer in one kernel per operation, for the duration of a block.

Measured on an H200 (Llama-3.1-8B shape, benchmarks/profile_decode_floor.py), one eager decode step runs
about 30 element-wise kernels per layer (981 in all, 1.59 ms of GPU time) against 12 matrix products:
transformers' RMSNorm is 7 small kernels, the rotary embedding of q and k 10, the MLP's activation 2.
Inside a CUDA graph their launch cost is gone, but each still costs a kernel's minimum time and a gap.

`fused_elementwise(model)` replaces, within the block:

- every RMSNorm module's forward (the layer norms, the final norm, Qwen3's and Gemma3's q/k norms) by one
  kernel per call;
- the modeling module's `apply_rotary_pos_emb` by one kernel for q and k together (full rotate-half
  rotations of 4-d q/k in one dtype; other calls go to the original function);
- the forward of every MLP with a SiLU gate (gate_proj/up_proj or Phi3's gate_up_proj) by the model's own
  projections around one fused silu(gate) * up kernel; where gemv_linears offers the joined gate/up product
  with silu(gate) * up as its epilogue (decode steps), by that one launch. Gemma3's tanh-GELU MLP is left
  as it is;
- the forward of every Llama-structured decoder layer (Llama, Mistral, Qwen2, Qwen3) by one that folds each
  residual add into the norm after it (adakv/runtimes/hf/fusion/residual_norms.py).

The kernels (adakv/kernels/triton_elementwise.py) round to the model's dtype where transformers' modules
round; measured on an H200 they stay within one bf16 step of the modules' arithmetic (a norm's reduction
order, the compiler's own rounding), and fp32 models give the same logits up to 1e-4. On exit every
module and function is the original again. CUDA models with Triton only; the module patching itself runs
with any `ElementwiseKernels` (the tests use the torch reference on CPU).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Generator

import torch
from torch import nn

from adakv.kernels import elementwise_reference
from adakv.runtimes.hf.fusion.joined_projections import joined_group_of
from adakv.runtimes.hf.fusion.residual_norms import LLAMA_STRUCTURED_LAYERS, NormsAhead, NormSpec, layer_forward
from adakv.models import attention_modules, check_parameters_on_cuda, forward_is_replaced

# RMSNorm classes of the supported families: (weight offset, scale in fp32). Llama style rounds the
# normalised row to the input dtype before the weight; Gemma style scales by (1 + weight) in fp32.
NORM_STYLES: dict[str, tuple[float, bool]] = {
    "LlamaRMSNorm": (0.0, False),
    "MistralRMSNorm": (0.0, False),
    "Qwen2RMSNorm": (0.0, False),
    "Qwen3RMSNorm": (0.0, False),
    "Phi3RMSNorm": (0.0, False),
    "Gemma3RMSNorm": (1.0, True),
}


@dataclass(frozen=True)
class ElementwiseKernels:
    """The fused operations (signatures of adakv/kernels/elementwise_reference.py) and the device they run on."""

    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rotary: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    silu_mul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    device_type: str | None  # None: any device


REFERENCE_KERNELS = ElementwiseKernels(
    elementwise_reference.rms_norm, elementwise_reference.add_rms_norm, elementwise_reference.rotary,
    elementwise_reference.silu_mul, None,
)


def triton_kernels() -> ElementwiseKernels:
    try:
        from adakv.kernels import triton_elementwise
    except ImportError as error:
        raise RuntimeError(f"fuse_elementwise needs Triton ({error}); use fuse_elementwise=False.") from error

    return ElementwiseKernels(
        triton_elementwise.rms_norm, triton_elementwise.add_rms_norm, triton_elementwise.rotary,
        triton_elementwise.silu_mul, "cuda",
    )


@dataclass
class FusedElementwise:
    """What `fused_elementwise` replaced: module counts and the modeling modules whose rotary it took over,
    and what it left unfused, with the reason."""

    norms: int = 0
    mlps: int = 0
    residual_layers: int = 0  # decoder layers whose residual adds are folded into the norms after them
    rotary_modules: list[str] = field(default_factory=list)
    left_unfused: list[str] = field(default_factory=list)


def norm_spec(norm: nn.Module) -> NormSpec:
    eps = norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps
    return NormSpec(norm, eps, *NORM_STYLES[type(norm).__name__])


def _norm_forward(norm: nn.Module, kernels: ElementwiseKernels, ahead: NormsAhead):
    spec = norm_spec(norm)

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        computed = ahead.take(norm, hidden_states)  # by the previous layer's last residual add
        if computed is not None:
            return computed
        _check_no_gradients(hidden_states, norm.weight)
        return kernels.rms_norm(hidden_states, *spec.arguments())

    return forward


def _gate_and_up(mlp: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(mlp, "gate_up_proj"):  # Phi3: one projection, gate first
        return mlp.gate_up_proj(x).chunk(2, dim=-1)
    return mlp.gate_proj(x), mlp.up_proj(x)


def _silu_gated_in_one_product(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up where gate_proj and up_proj are joined and their group offers the two in one
    product for x (gemv_linears' decode steps); else None."""
    group = joined_group_of(mlp.gate_proj) if hasattr(mlp, "gate_proj") else None
    if group is None or group.linears != [mlp.gate_proj, mlp.up_proj]:
        return None
    return group.silu_gated_output(x)


def _mlp_forward(mlp: nn.Module, kernels: ElementwiseKernels):
    def forward(x: torch.Tensor) -> torch.Tensor:
        activated = _silu_gated_in_one_product(mlp, x)
        if activated is None:
            gate, up = _gate_and_up(mlp, x)
            _check_no_gradients(gate, up)
            activated = kernels.silu_mul(gate, up)
            del gate, up  # freed before down_proj, as `down(act(gate(x)) * up(x))` frees them
        return mlp.down_proj(activated)

    return forward


def _runs_here(kernels: ElementwiseKernels, tensor: torch.Tensor) -> bool:
    return kernels.device_type is None or tensor.device.type == kernels.device_type


def _check_no_gradients(*tensors: torch.Tensor) -> None:
    """The fused kernels have no backward: refuse a forward that records gradients instead of cutting them."""
    if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors):
        raise RuntimeError(
            "fuse_elementwise runs kernels without gradients; run the model under torch.no_grad() or "
            "torch.inference_mode() (generate and the pipeline do), or use fuse_elementwise=False when training."
        )


def _is_silu(activation: nn.Module | None) -> bool:
    return isinstance(activation, nn.SiLU) or type(activation).__name__ == "SiLUActivation"


def _check_not_wrapped(module: nn.Module, where: str) -> None:
    if forward_is_replaced(module):
        raise ValueError(
            f"fuse_elementwise: {where} already has its forward replaced (an accelerate offload hook or another "
            "wrapper). Use fuse_elementwise=False with this model."
        )


class _RotaryPatches:
    """Process-wide: a modeling module's `apply_rotary_pos_emb`, replaced while at least one block uses it."""

    def __init__(self):
        self._patched: dict[str, tuple[Callable, ElementwiseKernels, int]] = {}

    def acquire(self, module: ModuleType, kernels: ElementwiseKernels) -> None:
        name = module.__name__
        if name in self._patched:
            original, in_use, count = self._patched[name]
            if in_use != kernels:
                raise RuntimeError(f"fuse_elementwise: {name} is already fused with other kernels in another block.")
            self._patched[name] = (original, in_use, count + 1)
            return
        original = module.apply_rotary_pos_emb
        self._patched[name] = (original, kernels, 1)
        module.apply_rotary_pos_emb = _fused_rotary(original, kernels)

    def release(self, module: ModuleType) -> None:
        original, kernels, count = self._patched[module.__name__]
        if count > 1:
            self._patched[module.__name__] = (original, kernels, count - 1)
            return
        del self._patched[module.__name__]
        module.apply_rotary_pos_emb = original


ROTARY_PATCHES = _RotaryPatches()


def _fused_rotary(original: Callable, kernels: ElementwiseKernels) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = args[0] if args else kwargs.get("unsqueeze_dim", 1)
        if len(args) > 1 or set(kwargs) - {"unsqueeze_dim"} or not _rotary_fusable(q, k, cos, sin, unsqueeze_dim, kernels):
            return original(q, k, cos, sin, *args, **kwargs)
        _check_no_gradients(q, k)
        return kernels.rotary(q, k, cos, sin)

    return apply_rotary_pos_emb


def _rotary_fusable(q, k, cos, sin, unsqueeze_dim, kernels: ElementwiseKernels) -> bool:
    """Full rotate-half rotations of (batch, heads, tokens, head_dim) q and k by (batch or 1, tokens, head_dim)
    angles, all of one dtype on the kernels' device."""
    tensors = (q, k, cos, sin)
    return (
        unsqueeze_dim == 1
        and q.dim() == k.dim() == 4
        and q.shape[0] == k.shape[0]
        and cos.dim() == sin.dim() == 3
        and cos.shape == sin.shape
        and cos.shape[-1] == q.shape[-1] == k.shape[-1]
        and q.shape[-1] % 2 == 0
        and cos.shape[0] in (1, q.shape[0])
        and cos.shape[1] == q.shape[2] == k.shape[2]
        and len({tensor.dtype for tensor in tensors}) == 1
        and all(_runs_here(kernels, tensor) for tensor in tensors)
    )


def _modeling_modules(model: nn.Module) -> list[ModuleType]:
    names = {type(attention).__module__ for attention in attention_modules(model)}
    return [sys.modules[name] for name in sorted(names) if hasattr(sys.modules[name], "apply_rotary_pos_emb")]


def _replacements(model: nn.Module, kernels: ElementwiseKernels, report: FusedElementwise) -> list[tuple[nn.Module, Callable]]:
    """(module, its fused forward) for every norm, SiLU MLP and Llama-structured decoder layer of the model,
    checked before any is replaced."""
    replacements, ahead = [], NormsAhead()
    for name, module in model.named_modules():
        if type(module).__name__ in NORM_STYLES:
            _check_not_wrapped(module, name)
            replacements.append((module, _norm_forward(module, kernels, ahead)))
            report.norms += 1
        elif hasattr(module, "down_proj") and (hasattr(module, "gate_proj") or hasattr(module, "gate_up_proj")):
            activation = getattr(module, "act_fn", getattr(module, "activation_fn", None))
            if not _is_silu(activation):
                report.left_unfused.append(f"{name}: {type(activation).__name__} activation (only SiLU is fused)")
                continue
            _check_not_wrapped(module, name)
            replacements.append((module, _mlp_forward(module, kernels)))
            report.mlps += 1
    return replacements + _layer_replacements(model, kernels, report, ahead)


def _layer_replacements(model: nn.Module, kernels: ElementwiseKernels, report: FusedElementwise, ahead: NormsAhead):
    """(decoder layer, its forward with the residual adds folded into the norms) where the layer is
    Llama-structured, not wrapped, and the norm after it is a known RMSNorm on the layer's device."""
    decoder = model.get_decoder()
    layers = list(getattr(decoder, "layers", ()))
    replacements: list[tuple[nn.Module, Callable]] = []
    kept: dict[str, list[int]] = {}  # reason -> layer indices
    for index, layer in enumerate(layers):
        next_norm = layers[index + 1].input_layernorm if index + 1 < len(layers) else getattr(decoder, "norm", None)
        reason = _residual_refusal(layer, next_norm)
        if reason:
            kept.setdefault(reason, []).append(index)
            continue
        forward = layer_forward(
            layer, norm_spec(layer.post_attention_layernorm), norm_spec(next_norm), kernels.add_rms_norm, ahead,
            kernels.device_type,
        )  # fmt: skip
        replacements.append((layer, forward))
        report.residual_layers += 1
    for reason, indices in kept.items():
        report.left_unfused.append(f"decoder layers {indices}: residual adds kept separate ({reason})")
    return replacements


def _residual_refusal(layer: nn.Module, next_norm: nn.Module | None) -> str | None:
    if type(layer).__name__ not in LLAMA_STRUCTURED_LAYERS:
        return f"{type(layer).__name__} is not Llama-structured"
    if forward_is_replaced(layer):
        return "its forward is already replaced by another wrapper"
    if next_norm is None or type(next_norm).__name__ not in NORM_STYLES:
        return "no known RMSNorm follows it"
    if next_norm.weight.device != layer.post_attention_layernorm.weight.device:
        return "the next norm lives on another device"
    return None


@contextmanager
def fused_elementwise(model: nn.Module, kernels: ElementwiseKernels | None = None) -> Generator[FusedElementwise, None, None]:
    """Within the block the model's norms, rotary embeddings and SiLU gates run as one kernel each (Triton
    on CUDA by default). Yields what was fused and what was left unfused."""
    if kernels is None or kernels.device_type == "cuda":
        check_parameters_on_cuda(model, "fuse_elementwise", "Triton kernels")
    kernels = triton_kernels() if kernels is None else kernels
    report = FusedElementwise()
    replacements = _replacements(model, kernels, report)
    modeling_modules = _modeling_modules(model)
    patched_modules: list[ModuleType] = []
    try:
        for module, forward in replacements:
            module.forward = forward
        for modeling_module in modeling_modules:
            ROTARY_PATCHES.acquire(modeling_module, kernels)
            patched_modules.append(modeling_module)
            report.rotary_modules.append(modeling_module.__name__)
        yield report
    finally:
        for module, _ in replacements:
            module.__dict__.pop("forward", None)
        for modeling_module in patched_modules:
            ROTARY_PATCHES.release(modeling_module)
