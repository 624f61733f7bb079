"""The fused ops of VideoBERT: each takes `backend="auto" | "torch" | "triton" | "cuda"`.

`"auto"` (overridden by the VIDEOBERT_BACKEND environment variable) picks the fastest implementation
available for the inputs' device and dtype; on CPU that is the PyTorch reference. Every op is a
`torch.library` custom op with a fake implementation and an autograd formula, so it works under
`torch.compile(fullgraph=True)`. Dropout draws on a GPU come from a generator state kept on the device
(`manual_seed`, `get_dropout_states` / `set_dropout_states` for checkpoints): no host read, CUDA-graph safe.
"""
from videobert.ops._backend import BackendUnavailableError, available_backends
from videobert.ops._checks import get_dropout_states, manual_seed, set_dropout_states
from videobert.ops.attention import segment_attention, segment_attention_varlen
from videobert.ops.cross_entropy import CrossEntropyResult, linear_cross_entropy, softmax_cross_entropy
from videobert.ops.layer_norm import add_layer_norm

__all__ = [
    "segment_attention",
    "segment_attention_varlen",
    "add_layer_norm",
    "linear_cross_entropy",
    "softmax_cross_entropy",
    "CrossEntropyResult",
    "BackendUnavailableError",
    "available_backends",
    "manual_seed",
    "get_dropout_states",
    "set_dropout_states",
]
