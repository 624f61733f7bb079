"""CUDA C++ implementations, by op name: (forward launcher, backward launcher, unsupported(device, dtype, ...)).

Loads the compiled library `_C` (built by setup.py when nvcc is present), which registers the
`videobert_cuda::*` ops; importing this module fails with ImportError saying how to build it otherwise.
`videobert.ops` imports it on first use of the "cuda" backend and registers what it lists.
"""
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
_LIBRARIES = sorted(_HERE.glob("_C*.so"))
if not _LIBRARIES:
    raise ImportError("the CUDA extension is not built: install with nvcc on PATH "
                      "(pip install --no-build-isolation -e .) or set VIDEOBERT_BUILD_CUDA=1 to make that an error")
try:
    torch.ops.load_library(str(_LIBRARIES[0]))
except OSError as exc:
    raise ImportError(f"the CUDA extension {_LIBRARIES[0].name} does not load: {exc}") from exc

from videobert._kernels.cuda import add_layer_norm, softmax_cross_entropy  # noqa: E402  (needs the ops above)

IMPLEMENTATIONS = {
    "add_layer_norm": (add_layer_norm.add_layer_norm_fwd, add_layer_norm.add_layer_norm_bwd,
                       add_layer_norm.unsupported),
    "softmax_cross_entropy": (softmax_cross_entropy.softmax_cross_entropy_fwd,
                              softmax_cross_entropy.softmax_cross_entropy_bwd, softmax_cross_entropy.unsupported),
}
