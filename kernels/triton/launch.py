"""Host-side helpers shared by the Triton launchers: dropout arguments, the precision of fp32 dots, and log2(e)
(the kernels take exponentials as exp2, one MUFU instruction)."""
from __future__ import annotations

from typing import Optional

import torch

from videobert._kernels.reference import dropout_threshold

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E)


def dropout_args(dropout_p: float, rng: Optional[torch.Tensor]) -> dict:
    """Kernel arguments of `rng.dropout_keep`: seed, offset (its 32 bits as a signed int32), threshold and the
    1 / (1 - p) scale; zeros when there is no dropout."""
    seed, offset = (int(rng[0]), int(rng[1])) if (rng is not None and dropout_p > 0) else (0, 0)
    offset &= 0xFFFFFFFF
    return dict(seed=seed, offset=offset - 2**32 if offset >= 2**31 else offset,
                threshold=dropout_threshold(dropout_p), drop_scale=1.0 / (1.0 - dropout_p))


def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` of tl.dot: IEEE for fp32 inputs unless PyTorch allows TF32 (ignored for fp16/bf16)."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
