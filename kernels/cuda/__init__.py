"""CUDA C++ implementations, by op name: (forward launcher, backward launcher, unsupported(device, dtype, ...)).

Loads the compiled library `libvideobert_kernels.so` with ctypes (`library`; built by setup.py when nvcc is
present, with no dependence on the torch build); importing this module fails with ImportError saying how to
build it otherwise. `videobert.ops` imports it on first use of the "cuda" backend and registers what it lists.
"""
from videobert._kernels.cuda import add_layer_norm, softmax_cross_entropy

IMPLEMENTATIONS = {
    "add_layer_norm": (add_layer_norm.add_layer_norm_fwd, add_layer_norm.add_layer_norm_bwd,
                       add_layer_norm.unsupported),
    "softmax_cross_entropy": (softmax_cross_entropy.softmax_cross_entropy_fwd,
                              softmax_cross_entropy.softmax_cross_entropy_bwd, softmax_cross_entropy.unsupported),
}
