"""Kernel sources, installed as `videobert._kernels`: PyTorch references, Triton kernels, CUDA C++.

Nothing here is public API; `videobert.ops` validates inputs, picks a backend and calls in.
"""
