"""Host-side helpers shared by the Triton launchers: grid arithmetic, dropout arguments, the precision of fp32 dots,
log2(e) (the kernels take exponentials as exp2, one MUFU instruction), the scratch allocator of on-device
tensor descriptors, and what Triton's interpreter lacks: the kernels' inline PTX and descriptor reductions."""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import triton

from videobert._kernels.reference import attention_dropout_scale, dropout_byte_threshold, dropout_threshold

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E)


# Plain-int versions of triton.cdiv and triton.next_power_of_2: those are constexpr functions whose host calls
# unwrap every argument (several microseconds each, on the path of every launch).
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def arch_major(device: torch.device) -> int:
    """The CUDA device's compute capability major (8: A100, 9: H100), cached per device: launchers ask per call."""
    return _capability_major(device.index if device.index is not None else torch.cuda.current_device())


def multiprocessors(device: torch.device) -> int:
    """The GPU's streaming multiprocessors (cached per device); 1 for CPU tensors (the interpreter)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 1


def dropout_args(dropout_p: float, rng: Optional[torch.Tensor], fallback: torch.Tensor,
                 byte_threshold: bool = False) -> dict:
    """Kernel arguments of `rng.load_seed` / `rng.dropout_keep`: Rng, the int64 (seed, offset) tensor on the
    kernel's device (`fallback`, any tensor, where there is no dropout: the kernel reads nothing then), the
    threshold and the 1 / (1 - p) scale; with `byte_threshold` (`rng.dropout_keep_bytes`, attention) the 8-bit
    threshold and the scale of the rate it draws. Nothing is read on the host."""
    if dropout_p == 0:
        return dict(Rng=fallback, threshold=0, drop_scale=1.0)
    if byte_threshold:
        return dict(Rng=rng, threshold=dropout_byte_threshold(dropout_p),
                    drop_scale=attention_dropout_scale(dropout_p))
    return dict(Rng=rng, threshold=dropout_threshold(dropout_p), drop_scale=1.0 / (1.0 - dropout_p))


def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` of tl.dot: IEEE for fp32 inputs unless PyTorch allows TF32 (ignored for fp16/bf16)."""
    if dtype != torch.float32:  # first: reading the TF32 flag costs microseconds
        return "tf32"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    """Global scratch memory for a launch (Triton's allocator protocol), from PyTorch's caching allocator on the
    current device: stream-ordered, and inside a CUDA graph capture taken from the graph's pool."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Give Triton an allocator for the scratch memory of kernels that build tensor descriptors on the device,
    unless the caller has set one (Triton keeps it per thread and context: set here on the launching thread)."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
    except ImportError:  # a Triton without the private names: set ours, as the public API allows
        triton.set_allocator(_scratch)
        return
    if isinstance(_allocator.get(), NullAllocator):
        triton.set_allocator(_scratch)


# Inline PTX the kernels use, keyed by its text: the numpy function that runs it under Triton's interpreter.
_INTERPRETED_ASM: dict = {}


def interpret_inline_asm(asm: str, emulate: Callable[..., tuple]) -> None:
    """Let Triton's interpreter run `tl.inline_asm_elementwise(asm, ...)` (it runs none) as
    `emulate(pack, *operands)`: the operands' numpy arrays (full blocks) in, a tuple of the outputs' arrays out."""
    _INTERPRETED_ASM[asm] = emulate


class _AsmResults(list):
    """The interpreter's stand-in for an inline-asm op: its results, read as `get_result(i)`."""

    def get_result(self, index: int):
        return self[index]


def _teach_interpreter() -> None:
    """Give Triton's interpreter what the kernels use and it lacks (3.6 to 3.9): the inline PTX registered with
    `interpret_inline_asm`, and the descriptor reductions (`desc.atomic_add`) with the TMA unit's semantics, an
    atomic add into the block's elements inside the tensor, the rest dropped (the attention backward's TMA path
    adds its dQ tiles so; a Triton that has them keeps its own)."""
    try:
        from triton._C.libtriton import ir
        from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    except ImportError:
        return
    unknown_asm = InterpreterBuilder.create_inline_asm

    def create_inline_asm(self, inlineAsm, constraints, values, type, isPure, pack):
        emulate = _INTERPRETED_ASM.get(inlineAsm)
        if emulate is None:
            return unknown_asm(self, inlineAsm, constraints, values, type, isPure, pack)
        outputs = emulate(pack, *(value.data for value in values))
        return _AsmResults(TensorHandle(out, ty.scalar) for out, ty in zip(outputs, type))

    InterpreterBuilder.create_inline_asm = create_inline_asm
    if hasattr(InterpreterBuilder, "create_descriptor_reduce"):
        return

    def create_descriptor_reduce(self, kind, desc, value, indices):
        if kind != ir.DESCRIPTOR_REDUCE_KIND.ADD:
            raise NotImplementedError(f"descriptor reduction {kind} under the interpreter (only add)")
        ptrs, mask = desc.materialize_pointers(indices)
        op = ir.ATOMIC_OP.FADD if value.dtype.scalar.is_floating() else ir.ATOMIC_OP.ADD
        self.create_atomic_rmw(op, ptrs, value, mask, ir.MEM_SEMANTIC.RELAXED, ir.MEM_SYNC_SCOPE.GPU)

    InterpreterBuilder.create_descriptor_reduce = create_descriptor_reduce


_teach_interpreter()
