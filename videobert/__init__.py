"""VideoBERT: fused kernels and a BERT-compatible encoder for joint video-and-text pretraining.

Public surface: `VideoBERTConfig`, `VideoBERTModel`, `VideoBERTForPretraining` here, and the fused ops
in `videobert.ops`.
"""
from videobert.config import VideoBERTConfig
from videobert.model import VideoBERTForPretraining, VideoBERTModel, segment_positions

__version__ = "0.1.0"
__all__ = ["VideoBERTConfig", "VideoBERTModel", "VideoBERTForPretraining", "segment_positions", "__version__"]
