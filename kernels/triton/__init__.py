"""Triton implementations, by op name: (forward launcher, backward launcher, unsupported(device, dtype, ...)).

`videobert.ops` imports this module on first use of the "triton" backend and registers what it lists.
"""
from videobert._kernels.triton import add_layer_norm, segment_attention

IMPLEMENTATIONS = {
    "add_layer_norm": (add_layer_norm.add_layer_norm_fwd, add_layer_norm.add_layer_norm_bwd,
                       add_layer_norm.unsupported),
    "segment_attention": (segment_attention.segment_attention_fwd, segment_attention.segment_attention_bwd,
                          segment_attention.unsupported),
}
