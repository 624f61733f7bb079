"""Triton implementations, by op name: (forward launcher, backward launcher, unsupported(device, dtype, ...)).

`videobert.ops` imports this module on first use of the "triton" backend and registers what it lists.
"""
from videobert._kernels.triton import segment_attention

IMPLEMENTATIONS = {
    "segment_attention": (segment_attention.segment_attention_fwd, segment_attention.segment_attention_bwd,
                          segment_attention.unsupported),
}
