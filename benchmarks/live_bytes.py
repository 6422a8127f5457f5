"""Live tensor bytes on any device, CPU included: the peak of what a call holds, and who holds it.

`torch.cuda.max_memory_allocated` exists only on CUDA. `LiveBytes` is a TorchDispatchMode that sees every
tensor an aten op returns inside the block, keeps a weak reference to its storage (a storage is freed when
its last tensor or view goes) and after each op adds up the storages still alive: `peak` is the largest
such sum, `at_peak` the storages alive at that moment with the op and the source lines that allocated
them. Tensors that existed before the block (weights, inputs) are not counted, so `peak` compares with
`max_memory_allocated() - memory_allocated()` before the call on a GPU. Not counted either: an op's own
scratch memory (a kernel's workspace inside one aten op) and the caching allocator's rounding.

    with LiveBytes() as live:
        model.generate(ids, max_new_tokens=2)
    live.peak, live.summary()
"""

from __future__ import annotations

import traceback
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_SKIP_FILES = ("torch/", "live_bytes.py", "contextlib.py", "functools.py")


@dataclass
class Allocation:
    nbytes: int
    op: str
    where: str  # the innermost source lines outside torch that led to the op


def _where(depth: int = 3) -> str:
    frames = [f for f in traceback.extract_stack()[:-3] if not any(s in f.filename for s in _SKIP_FILES)]
    return " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}({f.name})" for f in reversed(frames[-depth:]))


class LiveBytes(TorchDispatchMode):
    """Peak live bytes of the tensors allocated inside the block (see the module docstring).

    where_depth: source lines recorded per allocation (0: none, faster)."""

    def __init__(self, where_depth: int = 3):
        super().__init__()
        self.where_depth = where_depth
        self._live: dict[int, tuple[StorageWeakRef, Allocation]] = {}
        self.current = 0
        self.peak = 0
        self.at_peak: list[Allocation] = []
        self.ops = 0

    def _prune(self) -> None:
        for key in [key for key, (ref, _) in self._live.items() if ref.expired()]:
            self.current -= self._live.pop(key)[1].nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        self.ops += 1
        self._prune()
        for leaf in tree_leaves(output):
            if not isinstance(leaf, torch.Tensor) or leaf.device.type == "meta":
                continue
            storage = leaf.untyped_storage()
            nbytes = storage.nbytes()
            ref = StorageWeakRef(storage)
            known = self._live.get(ref.cdata)
            if known is not None:
                if known[1].nbytes != nbytes:  # resized in place (an out= op)
                    self.current += nbytes - known[1].nbytes
                    known[1].nbytes = nbytes
                continue
            if nbytes == 0 or not self._allocated_here(leaf, args, kwargs):
                continue
            where = _where(self.where_depth) if self.where_depth else ""
            self._live[ref.cdata] = (ref, Allocation(nbytes, str(func.overloadpacket.__name__), where))
            self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
            self.at_peak = [allocation for _, allocation in self._live.values()]
        return output

    @staticmethod
    def _allocated_here(leaf, args, kwargs) -> bool:
        """False for an output that aliases an input the block did not allocate (a view of a weight)."""
        pointer = leaf.untyped_storage().data_ptr()
        for item in tree_leaves((args, kwargs)):
            if isinstance(item, torch.Tensor) and item.device == leaf.device and item.untyped_storage().data_ptr() == pointer:
                return False
        return True

    def summary(self, unit: int = 1, top: int = 12) -> list[tuple[float, int, str, str]]:
        """What was alive at the peak, grouped by (op, where): (bytes / unit, count, op, where), largest first."""
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for allocation in self.at_peak:
            groups[(allocation.op, allocation.where)].append(allocation.nbytes)
        rows = [(sum(sizes) / unit, len(sizes), op, where) for (op, where), sizes in groups.items()]
        return sorted(rows, reverse=True)[:top]


def one_pass_kernels(block_rows: int = 64):
    """`ElementwiseKernels` for CPU that hold memory as adakv's Triton kernels do: each operation allocates
    its outputs only (the torch reference's float32 temporaries exist for `block_rows` rows at a time).
    The values are the torch reference's (every operation is row-wise), so a CPU run of fuse_elementwise
    with these has the GPU run's live bytes."""
    from adakv.kernels import elementwise_reference as ref
    from adakv.runtimes.hf.fusion.elementwise import ElementwiseKernels

    def by_rows(function, out, *inputs):
        flat_out = out.view(-1, out.shape[-1])
        flat_inputs = [x.reshape(-1, x.shape[-1]) for x in inputs]
        for start in range(0, flat_out.shape[0], block_rows):
            flat_out[start : start + block_rows] = function(*(x[start : start + block_rows] for x in flat_inputs))
        return out

    def rms_norm(x, weight, eps, weight_offset, scale_in_fp32):
        dtype = x.dtype if scale_in_fp32 else torch.promote_types(weight.dtype, x.dtype)
        out = torch.empty(x.shape, dtype=dtype)
        return by_rows(lambda rows: ref.rms_norm(rows, weight, eps, weight_offset, scale_in_fp32), out, x)

    def add_rms_norm(residual, update, weight, eps, weight_offset, scale_in_fp32):
        total = torch.empty_like(residual)
        by_rows(torch.add, total, residual, update)
        return total, rms_norm(total, weight, eps, weight_offset, scale_in_fp32)

    def rotary(q, k, cos, sin):
        outputs = []
        for x in (q, k):
            out = torch.empty_like(x)
            for start in range(0, x.shape[2], block_rows):
                part = slice(start, start + block_rows)
                out[:, :, part] = ref.rotate(x[:, :, part], cos[:, part], sin[:, part])
            outputs.append(out)
        return tuple(outputs)

    def silu_mul(gate, up):
        return by_rows(ref.silu_mul, torch.empty(gate.shape, dtype=gate.dtype), gate, up)

    return ElementwiseKernels(rms_norm, add_rms_norm, rotary, silu_mul, None)
