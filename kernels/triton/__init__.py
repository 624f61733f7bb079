"""Triton implementations, by op name: (forward launcher, backward launcher, unsupported(device, dtype, ...)).

`videobert.ops` imports this module on first use of the "triton" backend and registers what it lists.
"""
from videobert._kernels.triton import add_layer_norm, cross_entropy, segment_attention

IMPLEMENTATIONS = {
    "linear_cross_entropy": (cross_entropy.linear_cross_entropy_fwd, cross_entropy.linear_cross_entropy_bwd,
                             cross_entropy.unsupported),
    "softmax_cross_entropy": (cross_entropy.softmax_cross_entropy_fwd, cross_entropy.softmax_cross_entropy_bwd,
                              cross_entropy.unsupported),
    "add_layer_norm": (add_layer_norm.add_layer_norm_fwd, add_layer_norm.add_layer_norm_bwd,
                       add_layer_norm.unsupported),
    "segment_attention": (segment_attention.segment_attention_fwd, segment_attention.segment_attention_bwd,
                          segment_attention.unsupported),
}
