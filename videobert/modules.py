"""`nn.Module` forms of the fused ops for model authors who wire them in by hand, state-dict compatible with the
PyTorch modules they replace: `AddLayerNorm` (an `nn.LayerNorm`) and `LinearCrossEntropyLoss` (an `nn.Linear`)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from videobert.ops import add_layer_norm, linear_cross_entropy


class AddLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` (same parameters and state dict) whose forward fuses the residual add and dropout before it:
    forward(x, residual=None) = LayerNorm(residual + dropout(x)), dropout active in training mode only."""

    def __init__(self, normalized_shape: int, eps: float = 1e-12, dropout: float = 0.0, bias: bool = True,
                 backend: str = "auto", **kwargs):
        super().__init__(normalized_shape, eps=eps, bias=bias, **kwargs)
        if not (isinstance(normalized_shape, int) or len(self.normalized_shape) == 1):
            raise ValueError(f"normalized_shape must be one size (the hidden size), got {normalized_shape!r}")
        if not self.elementwise_affine:
            raise ValueError("AddLayerNorm needs elementwise_affine=True (its weight is the op's scale)")
        self.dropout, self.backend = float(dropout), backend

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """LayerNorm(residual + dropout(x)) over the last dimension, in x's dtype."""
        return add_layer_norm(x, residual, self.weight, self.bias, self.eps,
                              dropout_p=self.dropout if self.training else 0.0, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.dropout}"


class LinearCrossEntropyLoss(nn.Linear):
    """`nn.Linear(in_features, num_classes)` (same parameters and state dict) whose forward(hidden, labels) returns
    the cross-entropy of its logits without forming them (`linear_cross_entropy`): rows labelled `ignore_index`
    are skipped, `reduction` is "mean" (over the rest), "sum" or "none"."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, ignore_index: int = -100,
                 label_smoothing: float = 0.0, reduction: str = "mean", backend: str = "auto", **kwargs):
        super().__init__(in_features, num_classes, bias=bias, **kwargs)
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
        self.reduction, self.backend = reduction, backend

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of (hidden @ weight.T + bias) against labels, over the rows of `hidden` (any leading
        shape, flattened like `labels`)."""
        if hidden.shape[:-1] != labels.shape:
            raise ValueError(f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, got "
                             f"{tuple(labels.shape)}")
        loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.weight.to(hidden.dtype),
                                    labels.reshape(-1), None if self.bias is None else self.bias.to(hidden.dtype),
                                    ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                                    reduction=self.reduction, backend=self.backend)
        return loss.view(labels.shape) if self.reduction == "none" else loss
