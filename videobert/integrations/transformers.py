"""This project's kernels inside Hugging Face transformers' BERT-family models.

- `register()`: the attention implementation "videobert" (transformers' `AttentionInterface` and
  `AttentionMaskInterface`), so `BertModel.from_pretrained(path, attn_implementation="videobert")` runs
  `segment_attention`, on padded batches (attention_mask) and on padding-free packed rows (position_ids restarting
  at each sample, as `DataCollatorWithFlattening` lays them out). Importing this module registers it.
- `apply_videobert_kernels(model)`: one call, in the spirit of Liger's `apply_liger_kernel_to_*`, that switches a
  BERT or RoBERTa model (base or with its masked-LM / pre-training head) to that attention, fuses each sublayer's
  residual add + dropout + LayerNorm (`add_layer_norm`), and computes the masked-LM loss with `linear_cross_entropy`
  over the masked positions, never forming the logits when labels are given.
"""
from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn.functional as F

from videobert._kernels.reference import RULE_CAUSAL
from videobert.model import segment_ids_from
from videobert.ops import add_layer_norm, linear_cross_entropy, segment_attention

ATTENTION = "videobert"
_SUBLAYER_OUTPUTS = ("BertSelfOutput", "BertOutput", "RobertaSelfOutput", "RobertaOutput")


# The ids of the last batch, so that every layer of a forward (and its backward) passes the very same tensor and
# segment_attention reuses its block metadata (one metadata launch per batch, not one per layer).
_last_ids: list = [None]


def _cached_segment_ids(attention_mask, position_ids, batch, length, device) -> torch.Tensor:
    key = tuple((id(t), t._version) if t is not None else None for t in (attention_mask, position_ids))
    last = _last_ids[0]
    if last is not None and last[0] == key and last[1] == (batch, length, device) and all(
            a is b for a, b in zip(last[2], (attention_mask, position_ids))):
        return last[3]
    seg = segment_ids_from(attention_mask, position_ids, batch, length, device)
    _last_ids[0] = (key, (batch, length, device), (attention_mask, position_ids), seg)
    return seg


def videobert_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                                scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                                position_ids: Optional[torch.Tensor] = None, **kwargs):
    """transformers' attention-function contract: (B, H, L, D) query/key/value and the 2-D padding mask from the
    "videobert" mask interface -> ((B, L, H, D) output, None). Self-attention only (no cache, no GQA)."""
    B, H, L, D = query.shape
    if key.shape != query.shape or value.shape != query.shape:
        raise ValueError(f"the videobert attention takes self-attention with as many key/value heads as query "
                         f"heads and no cache: query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                         f"{tuple(value.shape)}")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"the videobert attention takes a 2-D padding mask (B, L), got shape "
                         f"{tuple(attention_mask.shape)}: build the model with attn_implementation='videobert'")
    seg = _cached_segment_ids(attention_mask, position_ids, B, L, query.device)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    rules = torch.tensor([[RULE_CAUSAL]], dtype=torch.int32, device=query.device) if causal else None
    out = segment_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), seg,
                            torch.zeros_like(seg) if causal else None, rules,
                            dropout_p=dropout if module.training else 0.0, softmax_scale=scaling)
    return out, None


def register() -> None:
    """Register the "videobert" attention implementation with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTENTION, videobert_attention_forward)
    # Like flash-attention's: the 2-D padding mask (or None), from which the sample ids are built.
    AttentionMaskInterface.register(ATTENTION, flash_attention_mask)


def _fused_sublayer_output(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
    """BertSelfOutput / BertOutput (and RoBERTa's): LayerNorm(input + dropout(dense(hidden))), fused."""
    norm = self.LayerNorm
    return add_layer_norm(self.dense(hidden_states), input_tensor.to(hidden_states.dtype), norm.weight, norm.bias,
                          norm.eps, dropout_p=self.dropout.p if self.training else 0.0)


def _mlm_head(model):
    """(transform, decoder) of a BERT or RoBERTa masked-LM head: transform maps encoder states to the decoder's
    input; the decoder's weight and bias give the logits."""
    if hasattr(model, "cls") and hasattr(model.cls, "predictions"):  # BERT: BertLMPredictionHead
        head = model.cls.predictions
        return head.transform, head.decoder
    if hasattr(model, "lm_head"):  # RoBERTa: dense, GELU, LayerNorm, decoder
        head = model.lm_head
        return (lambda h: head.layer_norm(F.gelu(head.dense(h)))), head.decoder
    raise TypeError(f"{type(model).__name__} has no BERT or RoBERTa masked-LM head")


def _fused_mlm_loss(model, sequence_output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the MLM head at the labelled positions (-100 elsewhere), as the unpatched models
    compute it over every position, without the logits (one host sync: the number of labelled positions)."""
    transform, decoder = _mlm_head(model)
    flat = labels.reshape(-1)
    rows = (flat != -100).nonzero().squeeze(1)
    h = transform(sequence_output.reshape(-1, sequence_output.shape[-1])[rows])
    return linear_cross_entropy(h, decoder.weight.to(h.dtype), flat[rows],
                                None if decoder.bias is None else decoder.bias.to(h.dtype))


def _masked_lm_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                       inputs_embeds=None, labels=None, **kwargs):
    """BertForMaskedLM / RobertaForMaskedLM forward: with labels, the loss from `linear_cross_entropy` and no
    logits (None); without, the unpatched forward."""
    if labels is None:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids, position_ids=position_ids,
                                  inputs_embeds=inputs_embeds, **kwargs)
    from transformers.modeling_outputs import MaskedLMOutput

    base = getattr(self, self.base_model_prefix)
    outputs = base(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                   position_ids=position_ids, inputs_embeds=inputs_embeds, return_dict=True, **kwargs)
    loss = _fused_mlm_loss(self, outputs.last_hidden_state, labels.to(outputs.last_hidden_state.device))
    return MaskedLMOutput(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                          attentions=outputs.attentions)


def _pretraining_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                         inputs_embeds=None, labels=None, next_sentence_label=None, **kwargs):
    """BertForPreTraining forward: with both labels, MLM loss from `linear_cross_entropy` (no prediction logits)
    plus the next-sentence loss; otherwise the unpatched forward."""
    if labels is None or next_sentence_label is None:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids, position_ids=position_ids,
                                  inputs_embeds=inputs_embeds, labels=labels,
                                  next_sentence_label=next_sentence_label, **kwargs)
    from transformers.models.bert.modeling_bert import BertForPreTrainingOutput

    outputs = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        position_ids=position_ids, inputs_embeds=inputs_embeds, return_dict=True, **kwargs)
    seq_relationship = self.cls.seq_relationship(outputs.pooler_output)
    loss = (_fused_mlm_loss(self, outputs.last_hidden_state, labels)
            + F.cross_entropy(seq_relationship.view(-1, 2).float(), next_sentence_label.view(-1)))
    return BertForPreTrainingOutput(loss=loss, prediction_logits=None, seq_relationship_logits=seq_relationship,
                                    hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def apply_videobert_kernels(model, attention: bool = True, layer_norm: bool = True, mlm_loss: bool = True):
    """Switch a transformers BERT or RoBERTa model (BertModel, BertForMaskedLM, BertForPreTraining, RobertaModel,
    RobertaForMaskedLM, and their other task heads for the encoder parts) to this project's kernels, in place;
    returns it. Outputs, losses and gradients are the unpatched model's (up to rounding; dropout draws its masks
    from this project's generator), except that with labels the masked-LM logits are not formed (None)."""
    if attention:
        register()
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(ATTENTION)
        else:
            model.config._attn_implementation = ATTENTION
    if layer_norm:
        for module in model.modules():
            if type(module).__name__ in _SUBLAYER_OUTPUTS:
                module.forward = types.MethodType(_fused_sublayer_output, module)
    if mlm_loss:
        name = type(model).__name__
        if name in ("BertForMaskedLM", "RobertaForMaskedLM"):
            model.forward = types.MethodType(_masked_lm_forward, model)
        elif name == "BertForPreTraining":
            model.forward = types.MethodType(_pretraining_forward, model)
    return model




def register_auto() -> None:
    """Register model type "videobert" with transformers' AutoConfig, AutoModel and AutoModelForPreTraining
    (idempotent): `AutoModel.from_pretrained(dir)` of a folder written by `save_pretrained` gives this project's
    VideoBERTModel (AutoModelForPreTraining: VideoBERTForPretraining); AutoConfig gives a PretrainedConfig holding
    the VideoBERTConfig fields. The models stay this project's classes (plain nn.Modules with transformers'
    save/load contract), so importing videobert never needs transformers."""
    from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, PretrainedConfig, PreTrainedModel

    from videobert.config import MODEL_TYPE
    from videobert.model import VideoBERTForPretraining, VideoBERTModel

    if MODEL_TYPE in getattr(AutoConfig, "_registered", set()):
        return

    class VideoBERTHFConfig(PretrainedConfig):
        """transformers' view of a VideoBERTConfig: its fields as attributes."""

        model_type = MODEL_TYPE

    def loader(ours):
        class Loader(PreTrainedModel):
            """Stand-in that AutoModel resolves to: its from_pretrained returns this project's model."""

            config_class = VideoBERTHFConfig

            @classmethod
            def from_pretrained(cls, directory, *args, **kwargs):
                return ours.from_pretrained(directory)
        Loader.__name__ = Loader.__qualname__ = f"Auto{ours.__name__}"
        return Loader

    AutoConfig.register(MODEL_TYPE, VideoBERTHFConfig, exist_ok=True)
    AutoModel.register(VideoBERTHFConfig, loader(VideoBERTModel), exist_ok=True)
    AutoModelForPreTraining.register(VideoBERTHFConfig, loader(VideoBERTForPretraining), exist_ok=True)
    AutoConfig._registered = getattr(AutoConfig, "_registered", set()) | {MODEL_TYPE}


try:  # registered on import when transformers is there; apply_videobert_kernels registers in any case
    register()
    register_auto()
except ImportError:
    pass
