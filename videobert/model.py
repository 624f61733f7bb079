"""The VideoBERT encoder and its pretraining heads, built only from `videobert.ops` and plain linears.

Post-norm BERT layers over packed rows: `segment_ids` (B, L) says which sample each token belongs to
(negative = padding), so one row may hold several samples; positions restart per sample. Loads
Hugging Face BERT weights with `from_bert`.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from videobert.config import MODEL_TYPE, VideoBERTConfig, read_model_config
from videobert.ops import add_layer_norm, linear_cross_entropy, segment_attention, softmax_cross_entropy
from videobert.ops._checks import make_rng
from videobert.profiling import nvtx_range

IGNORE_INDEX = -100


class HeadPositions(NamedTuple):
    """Gather indices of the pretraining heads with static shapes, computed on the host by the data pipeline
    (`videobert.data.static_batch`): flat (B * L) positions of the masked text tokens, the masked visual tokens
    and the [CLS] tokens, each padded to a fixed capacity, and their true counts (3,). With them the forward has
    no data-dependent shape and no host sync (a fullgraph compile, CUDA-graph replay); entries past a count are
    ignored."""

    text: torch.Tensor
    visual: torch.Tensor
    cls: torch.Tensor
    counts: torch.Tensor

    def to(self, device) -> "HeadPositions":
        """The same positions on `device`."""
        return HeadPositions(*(t.to(device, non_blocking=True) for t in self))


class ModelOutput(dict):
    """The output contract of transformers' ModelOutput without importing transformers: a dict whose keys are also
    attributes, holding only the fields that are set; integer indexing and `to_tuple()` give them in order."""

    def __getattr__(self, name: str):
        if name in type(self).FIELDS:
            return self.get(name)
        raise AttributeError(name)

    def __getitem__(self, key):
        return self.to_tuple()[key] if isinstance(key, (int, slice)) else dict.__getitem__(self, key)

    def to_tuple(self) -> tuple:
        """The set fields, in order."""
        return tuple(self[name] for name in type(self).FIELDS if self.get(name) is not None)


class EncoderOutput(ModelOutput):
    """BaseModelOutputWithPooling's fields: last_hidden_state (B, L, hidden), pooler_output (B, hidden) from each
    row's first token, hidden_states (embeddings and every layer) when asked."""

    FIELDS = ("last_hidden_state", "pooler_output", "hidden_states")


class PretrainingOutput(ModelOutput):
    """The pretraining model's output: loss and, per objective (text_mlm, visual_mlm, vtm), <name>_loss,
    <name>_acc and <name>_count."""

    FIELDS = ("loss", *(f"{name}_{field}" for name in ("text_mlm", "visual_mlm", "vtm")
                        for field in ("loss", "acc", "count")))


def segment_ids_from(attention_mask: Optional[torch.Tensor], position_ids: Optional[torch.Tensor], batch: int,
                     length: int, device: torch.device) -> torch.Tensor:
    """(B, L) int32 sample ids of a Hugging Face-style batch: a new sample wherever position_ids do not count up by
    one (packed rows, as transformers' padding-free collator lays them out), -1 where attention_mask is 0
    (padding); 0 everywhere for a plain batch. On the device, no sync."""
    if position_ids is None:
        seg = torch.zeros((batch, length), dtype=torch.int32, device=device)
    else:
        pos = position_ids.expand(batch, length)
        start = torch.ones_like(pos, dtype=torch.bool)
        start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        seg = start.cumsum(1, dtype=torch.int32) - 1
    if attention_mask is not None:
        seg = torch.where(attention_mask[:, -length:].bool(), seg, -1)
    return seg


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) position of each token within its own segment (0, 1, ... in row order); 0 on padding."""
    B, L = segment_ids.shape
    order = torch.argsort(segment_ids, dim=1, stable=True)
    sorted_ids = segment_ids.gather(1, order)
    index = torch.arange(L, device=segment_ids.device).expand(B, L)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    positions = torch.empty_like(index).scatter_(1, order, index - first)
    return torch.where(segment_ids >= 0, positions, torch.zeros_like(positions))


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor, residual: Optional[torch.Tensor], dropout_p: float,
                config: VideoBERTConfig, rng: Optional[torch.Tensor] = None) -> torch.Tensor:
    return add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps, dropout_p=dropout_p, rng=rng,
                          backend=config.backend)


class VideoBERTEmbeddings(nn.Module):
    """Joint word table (text, specials, visual tokens), learned positions, token types; optional clip features."""

    def __init__(self, config: VideoBERTConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.feature_proj = (nn.Linear(config.video_feature_dim, config.hidden_size)
                             if config.video_feature_dim else None)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids, token_type_ids, position_ids, video_features=None, inputs_embeds=None):
        """(B, L, hidden): LayerNorm(word (or inputs_embeds) + position + type) then dropout, as BERT."""
        emb = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if video_features is not None:
            feature_pos = (input_ids == self.config.feature_token_id)[..., None]
            emb = torch.where(feature_pos, self.feature_proj(video_features).to(emb.dtype), emb)
        emb = emb + self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        out = _layer_norm(self.norm, emb, None, 0.0, self.config)
        return F.dropout(out, self.config.hidden_dropout, self.training)


class VideoBERTLayer(nn.Module):
    """Post-norm BERT layer: fused QKV, segment attention, add+dropout+LayerNorm, GELU MLP, add+dropout+LayerNorm."""

    def __init__(self, config: VideoBERTConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.qkv = nn.Linear(h, 3 * h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(h, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def dropout_rates(self) -> tuple[float, float, float]:
        """The layer's dropout rates in the order it draws them: attention, then the two sublayer outputs."""
        cfg = self.config
        if not self.training:
            return 0.0, 0.0, 0.0
        return cfg.attention_dropout, cfg.hidden_dropout, cfg.hidden_dropout

    def forward(self, hidden, segment_ids, modality_ids=None, modality_rules=None, rngs=None):
        """(B, L, hidden) -> (B, L, hidden). `rngs`: the three dropout (seed, offset) pairs, drawn before the
        layer runs (gradient checkpointing recomputes it with the same masks); drawn inside otherwise."""
        cfg = self.config
        B, L, _ = hidden.shape
        p_attn, p_attn_out, p_ffn_out = self.dropout_rates()
        rng_attn, rng_attn_out, rng_ffn_out = rngs if rngs is not None else (None, None, None)
        q, k, v = self.qkv(hidden).view(B, L, 3, cfg.num_heads, cfg.head_dim).unbind(2)
        attn = segment_attention(q, k, v, segment_ids, modality_ids, modality_rules, dropout_p=p_attn,
                                 rng=rng_attn, backend=cfg.backend)
        attn = self.attn_out(attn.reshape(B, L, cfg.hidden_size))
        hidden = _layer_norm(self.attn_norm, attn, hidden.to(attn.dtype), p_attn_out, cfg, rng_attn_out)
        mlp = self.ffn_out(F.gelu(self.ffn_in(hidden)))
        return _layer_norm(self.ffn_norm, mlp, hidden.to(mlp.dtype), p_ffn_out, cfg, rng_ffn_out)


class PreTrainedMixin:
    """transformers' PreTrainedModel contract for this project's models, without importing transformers:
    `save_pretrained(dir)` (config.json + model.safetensors), `from_pretrained(dir)` (this project's folders,
    bit-exact; Hugging Face BERT folders converted), `gradient_checkpointing_enable()` / `_disable()`."""

    # The encoder's attribute name in models with heads (transformers' base_model_prefix).
    base_model_prefix = "bert"

    def save_pretrained(self, directory) -> None:
        """Write `directory/config.json` and `directory/model.safetensors` (the state dict, no pickle)."""
        from safetensors.torch import save_file

        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(folder, architecture=type(self).__name__)
        tmp = folder / "model.safetensors.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, tmp)
        tmp.replace(folder / "model.safetensors")

    @classmethod
    def from_pretrained(cls, directory, **config_overrides):
        """A model from a folder: one written by `save_pretrained` (an encoder's weights go into a model with
        heads, whose heads then start fresh; a model with heads gives its encoder to `VideoBERTModel`), or a
        Hugging Face BERT checkpoint folder (converted by `from_bert`; needs transformers). RoBERTa-family and
        other model types are refused: their position embeddings start at padding_idx + 1, which this encoder's
        positions (0 per sample) would silently misread."""
        data = read_model_config(directory)
        kind = data.get("model_type")
        if kind == "bert":
            from videobert._optional import require

            transformers = require("transformers", "hf", "loading a Hugging Face BERT checkpoint")
            source = transformers.BertForPreTraining.from_pretrained(directory)
            config = VideoBERTConfig.from_bert_config(source.config, **config_overrides)
            return cls.from_bert(source, config)
        if kind != MODEL_TYPE:
            raise ValueError(f"{Path(directory) / 'config.json'}: model_type {kind!r} is not supported (this "
                             f"project's 'videobert' folders and Hugging Face 'bert' checkpoints are; RoBERTa's "
                             f"positions start at padding_idx + 1 and are not converted)")
        from safetensors.torch import load_file

        model = cls(VideoBERTConfig.from_pretrained(directory, **config_overrides))
        weights = Path(directory) / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} does not exist")
        state = load_file(weights)
        prefix = cls.base_model_prefix + "."
        own = model.state_dict()
        if isinstance(model, VideoBERTModel) and not any(k in own for k in state):  # a model with heads
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        elif not isinstance(model, VideoBERTModel) and not any(k.startswith(prefix) for k in state):  # an encoder
            state = {**{k: v for k, v in own.items() if not k.startswith(prefix)},
                     **{prefix + k: v for k, v in state.items()}}
        model.load_state_dict(state, strict=True)
        return model

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        """Recompute each encoder layer in the backward instead of keeping its activations (the same gradients,
        dropout included: each layer's dropout draws are fixed before it runs)."""
        encoder = self if isinstance(self, VideoBERTModel) else getattr(self, self.base_model_prefix)
        encoder.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        """Keep activations again (the default)."""
        encoder = self if isinstance(self, VideoBERTModel) else getattr(self, self.base_model_prefix)
        encoder.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether `gradient_checkpointing_enable` is in effect."""
        encoder = self if isinstance(self, VideoBERTModel) else getattr(self, self.base_model_prefix)
        return encoder.gradient_checkpointing


class VideoBERTModel(PreTrainedMixin, nn.Module):
    """The encoder: embeddings, post-norm layers over padded or packed rows and BERT's pooler; called like
    Hugging Face's BertModel, returning an `EncoderOutput`."""

    def __init__(self, config: VideoBERTConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = VideoBERTEmbeddings(config)
        self.layers = nn.ModuleList(VideoBERTLayer(config) for _ in range(config.num_layers))
        # BERT's pooler (dense + tanh on a row's first token); the heads that own one (pretraining, fine-tuning)
        # create it themselves, in their order of initialisation.
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if add_pooling_layer else None
        self.gradient_checkpointing = False
        self.apply(lambda m: init_weights(m, config))

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, *, segment_ids: Optional[torch.Tensor] = None,
                modality_ids: Optional[torch.Tensor] = None, modality_rules: Optional[torch.Tensor] = None,
                video_features: Optional[torch.Tensor] = None):
        """Encode (B, L) ids (or inputs_embeds (B, L, hidden)) with BertModel's arguments: attention_mask (1 token,
        0 padding), token_type_ids, position_ids (restarting inside a row = packed samples, as transformers'
        padding-free collator lays them out). This project's own arguments are keyword-only: segment_ids (the
        sample of each token, -1 padding; when not given, from attention_mask and position_ids; one sample per
        row without either), modality_ids and modality_rules (modality_ids default to token_type_ids when rules
        are given), video_features. position_ids default to restarting per sample. Returns EncoderOutput
        (last_hidden_state, pooler_output, hidden_states with output_hidden_states), or its tuple with
        return_dict=False."""
        ids = _check_inputs(self.config, input_ids, inputs_embeds, attention_mask, token_type_ids, segment_ids,
                            position_ids, video_features)
        B, L = ids.shape[:2]
        device = ids.device
        if token_type_ids is None:
            token_type_ids = torch.zeros((B, L), dtype=torch.long, device=device)
        if segment_ids is None:
            segment_ids = segment_ids_from(attention_mask, position_ids, B, L, device)
        if position_ids is None:
            position_ids = segment_positions(segment_ids)
        position_ids = position_ids.expand(B, L)
        _check_ids("position_ids", position_ids, self.config.max_position_embeddings)
        if modality_rules is not None and modality_ids is None:
            modality_ids = token_type_ids
        hidden = self.embeddings(input_ids, token_type_ids, position_ids, video_features, inputs_embeds)
        if torch.is_autocast_enabled(hidden.device.type):
            # Keep the residual stream in the autocast dtype so every fused op sees one dtype.
            hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
        states = [hidden] if output_hidden_states else None
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for index, layer in enumerate(self.layers):
            with nvtx_range(f"layer{index}"):
                if checkpointing:  # the dropout draws first, so that the recomputation drops the same elements
                    rngs = tuple(make_rng(p, None, hidden.device) for p in layer.dropout_rates())
                    hidden = torch.utils.checkpoint.checkpoint(layer, hidden, segment_ids, modality_ids,
                                                               modality_rules, rngs, use_reentrant=False)
                else:
                    hidden = layer(hidden, segment_ids, modality_ids, modality_rules)
            if states is not None:
                states.append(hidden)
        out = EncoderOutput(last_hidden_state=hidden,
                            pooler_output=None if self.pooler is None else torch.tanh(self.pooler(hidden[:, 0])))
        if states is not None:
            out["hidden_states"] = tuple(states)
        return out if return_dict is not False else out.to_tuple()

    @classmethod
    def from_bert(cls, source, config: Optional[VideoBERTConfig] = None) -> "VideoBERTModel":
        """A VideoBERT encoder initialised from a transformers BertModel/BertForPreTraining (or its state dict,
        then with `config`); the visual rows of the word table keep their fresh initialisation."""
        config, state = _bert_source(source, config)
        model = cls(config)
        model.load_state_dict(_encoder_state(state, model), strict=True)
        return model


class VideoBERTForPretraining(PreTrainedMixin, nn.Module):
    """Encoder + masked text / masked visual token heads (tied to the word table) + video-text matching."""

    def __init__(self, config: VideoBERTConfig):
        super().__init__()
        self.config = config
        self.bert = VideoBERTModel(config, add_pooling_layer=False)
        h = config.hidden_size
        self.mlm_transform = nn.Linear(h, h)
        self.mlm_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.bert.pooler = nn.Linear(h, h)  # here, so that every parameter draws its init as it always has
        self.vtm_head = nn.Linear(h, 2)  # class 1 = video and text belong together
        for module in (self.mlm_transform, self.mlm_norm, self.bert.pooler, self.vtm_head):
            module.apply(lambda m: init_weights(m, config))
        self._register_load_state_dict_pre_hook(_pooler_moved)

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None, *,
                segment_ids: Optional[torch.Tensor] = None, mlm_labels: Optional[torch.Tensor] = None,
                vtm_labels: Optional[torch.Tensor] = None, modality_ids: Optional[torch.Tensor] = None,
                modality_rules: Optional[torch.Tensor] = None, video_features: Optional[torch.Tensor] = None,
                head_positions: Optional[HeadPositions] = None, nce_pairs: Optional[torch.Tensor] = None
                ) -> PretrainingOutput:
        """Losses and accuracies (a PretrainingOutput: a dict whose keys are attributes too). The encoder's
        arguments are BertModel's (positional: input_ids, attention_mask, token_type_ids, position_ids); the rest
        are keyword-only. With labels and no `head_positions`, one host sync (the numbers of masked and [CLS]
        positions); with `head_positions`, none and static shapes.

        mlm_labels (B, L): joint-vocabulary target id at masked positions, -100 elsewhere; text positions
        (token type 0) are scored over the word pieces, video positions over the visual tokens.
        vtm_labels: 1 matched / 0 mismatched / -100 ignored for each sample, in the order of the samples'
        [CLS] tokens in the flattened (B * L) rows: (S,) for the S samples, or with `head_positions` padded with
        -100 to its [CLS] capacity.
        nce_pairs (P, 2): [CLS] indices (in that order) of matched pairs' text-only and video-only samples: with
        config.nce_weight > 0, in-batch InfoNCE between their pooled encodings, both directions ("nce").
        """
        cfg = self.config
        if mlm_labels is not None and mlm_labels.shape != input_ids.shape:
            raise ValueError(f"mlm_labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(mlm_labels.shape)}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        hidden = self.bert(input_ids, attention_mask, token_type_ids, position_ids, segment_ids=segment_ids,
                           modality_ids=modality_ids, modality_rules=modality_rules,
                           video_features=video_features).last_hidden_state
        flat = hidden.flatten(0, 1)
        out = PretrainingOutput()
        total = flat.new_zeros((), dtype=torch.float32)
        if head_positions is not None:
            text_pos, visual_pos, cls_pos, counts = head_positions
        elif mlm_labels is not None or vtm_labels is not None:
            text_pos, visual_pos, cls_pos = _head_positions(input_ids, token_type_ids, mlm_labels,
                                                            cfg.cls_token_id)
            counts = None
        if mlm_labels is not None:
            masked = torch.cat([text_pos, visual_pos])
            h = self.mlm_hidden(flat[masked])
            labels = mlm_labels.flatten()[masked]
            weight = self.bert.embeddings.word_embeddings.weight.to(h.dtype)
            bias = self.mlm_bias.to(h.dtype)
            text_vocab, vis = slice(0, cfg.text_vocab_size), slice(cfg.visual_offset, cfg.vocab_size)
            n = text_pos.numel()
            for index, (name, rows, vocab, shift, w) in enumerate((
                    ("text_mlm", slice(0, n), text_vocab, 0, cfg.text_mlm_weight),
                    ("visual_mlm", slice(n, None), vis, cfg.visual_offset, cfg.visual_mlm_weight))):
                targets = labels[rows] - shift
                if counts is None:
                    count = torch.tensor(targets.numel())  # a CPU count: no sync
                else:  # capacity past the count: ignored rows, which the fused loss skips
                    count = counts[index]
                    valid = torch.arange(targets.numel(), device=targets.device) < count
                    targets = torch.where(valid, targets, IGNORE_INDEX)
                res = linear_cross_entropy(h[rows], weight[vocab], targets, bias[vocab], return_stats=True,
                                           backend=cfg.backend)
                total = total + w * res.loss
                _record(out, name, res, count)
        if vtm_labels is not None:
            if vtm_labels.shape != cls_pos.shape:
                raise ValueError(f"vtm_labels must have one entry per [CLS] token ({cls_pos.numel()}), "
                                 f"got shape {tuple(vtm_labels.shape)}")
            res = softmax_cross_entropy(self.match_logits(flat[cls_pos]), vtm_labels, return_stats=True,
                                        backend=cfg.backend)
            total = total + cfg.vtm_weight * res.loss
            _record(out, "vtm", res, (vtm_labels != IGNORE_INDEX).sum())
        if nce_pairs is not None and cfg.nce_weight > 0:
            if mlm_labels is None and vtm_labels is None and head_positions is None:
                cls_pos = (input_ids.flatten() == cfg.cls_token_id).nonzero().flatten()
            total = total + cfg.nce_weight * self._nce(out, flat[cls_pos], nce_pairs)
        out["loss"] = total
        return out

    def _nce(self, out: dict, cls_hidden: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """In-batch InfoNCE of the pairs' pooled, normalised text and video encodings (each text against every
        video of the batch and back); records nce_loss, nce_acc (the right partner ranked first) and nce_count."""
        pooled = F.normalize(torch.tanh(self.bert.pooler(cls_hidden[pairs.flatten()])).float(), dim=-1)
        text, video = pooled[0::2], pooled[1::2]
        logits = text @ video.T / self.config.nce_temperature
        target = torch.arange(logits.shape[0], device=logits.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2 if target.numel() \
            else logits.sum()
        count = torch.tensor(target.numel())
        out["nce_loss"] = loss
        out["nce_acc"] = (logits.argmax(-1) == target).float().sum() / count.clamp_min(1)
        out["nce_count"] = count
        return loss

    def mlm_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) encoder states -> the masked-token head's input to the tied decoder (dense, GELU, LayerNorm)."""
        return _layer_norm(self.mlm_norm, F.gelu(self.mlm_transform(hidden)), None, 0.0, self.config)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, text_vocab_size) fp32 word-piece logits of the masked-token head at N encoder states (for a few
        positions: decoding, zero-shot scoring; training uses the fused loss, which never forms logits)."""
        h = self.mlm_hidden(hidden)
        vocab = slice(0, self.config.text_vocab_size)
        weight = self.bert.embeddings.word_embeddings.weight[vocab]
        return F.linear(h.float(), weight.float(), self.mlm_bias[vocab].float())

    def visual_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, num_visual_tokens) fp32 visual-token logits of the masked-token head at N encoder states (for a few
        positions: text-to-video generation, forecasting)."""
        h = self.mlm_hidden(hidden)
        vocab = slice(self.config.visual_offset, self.config.vocab_size)
        weight = self.bert.embeddings.word_embeddings.weight[vocab]
        return F.linear(h.float(), weight.float(), self.mlm_bias[vocab].float())

    def match_logits(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        """(S, 2) video-text matching logits from S samples' [CLS] states (class 1: they belong together)."""
        return self.vtm_head(torch.tanh(self.bert.pooler(cls_hidden)))

    @classmethod
    def from_bert(cls, source, config: Optional[VideoBERTConfig] = None) -> "VideoBERTForPretraining":
        """Initialised from a transformers BertForPreTraining (or BertModel: heads stay fresh) or a state dict."""
        config, state = _bert_source(source, config)
        model = cls(config)
        model.bert.load_state_dict(_encoder_state(state, model.bert), strict=True)
        heads = _head_state(state, model)
        model.load_state_dict({**model.state_dict(), **heads}, strict=True)
        return model


def _head_positions(input_ids: torch.Tensor, token_type_ids: torch.Tensor, mlm_labels: Optional[torch.Tensor],
                    cls_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat positions (in row order) of the masked text tokens, the masked visual tokens and the [CLS] tokens,
    with one host sync for their three counts (each `nonzero` would be one)."""
    ids = input_ids.flatten()
    if mlm_labels is None:
        group = torch.full_like(ids, 2)
    else:  # 0 masked text, 1 masked visual, 2 neither
        group = torch.where(mlm_labels.flatten() == IGNORE_INDEX, 2, (token_type_ids.flatten() != 0).long())
    is_cls = ids == cls_token_id
    counts = torch.stack([(group == 0).sum(), (group == 1).sum(), is_cls.sum()]).tolist()
    by_group = torch.argsort(group, stable=True)  # stable: row order within each group
    cls_first = torch.argsort((~is_cls).to(torch.uint8), stable=True)
    text, visual = by_group[:counts[0]], by_group[counts[0]:counts[0] + counts[1]]
    return text, visual, cls_first[:counts[2]]


def _record(out: dict, name: str, res, count: torch.Tensor) -> None:
    out[f"{name}_loss"] = res.loss
    out[f"{name}_acc"] = res.num_correct / count.clamp_min(1)
    out[f"{name}_count"] = count


def init_weights(module: nn.Module, config: VideoBERTConfig) -> None:
    """BERT's initialisation: N(0, initializer_range) weights, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _check_inputs(config, input_ids, inputs_embeds, attention_mask, token_type_ids, segment_ids, position_ids,
                  video_features) -> torch.Tensor:
    """Validate an encoder call; returns the tensor that fixes (B, L) (input_ids, or inputs_embeds)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be an integer (B, L) tensor, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        ids = input_ids
    else:
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.shape[-1:] != (config.hidden_size,) \
                or inputs_embeds.dim() != 3:
            raise ValueError(f"inputs_embeds must be a (B, L, {config.hidden_size}) tensor, got "
                             f"{getattr(inputs_embeds, 'shape', type(inputs_embeds).__name__)}")
        if video_features is not None:
            raise ValueError("video_features go with input_ids (their [FEAT] positions), not inputs_embeds")
        ids = inputs_embeds
    shape = tuple(ids.shape[:2])
    for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                    ("segment_ids", segment_ids)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape):
            raise ValueError(f"{name} must have the shape of input_ids {shape}, got "
                             f"{tuple(getattr(t, 'shape', ())) or type(t).__name__}")
    if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[1] != shape[1]
                                     or position_ids.shape[0] not in (1, shape[0])):
        raise ValueError(f"position_ids must have the shape of input_ids {shape} (or (1, L)), got "
                         f"{tuple(position_ids.shape)}")
    if attention_mask is not None and segment_ids is not None:
        raise ValueError("pass attention_mask or segment_ids (which marks padding as -1), not both")
    if video_features is not None:
        if config.video_feature_dim is None:
            raise ValueError("video_features given but the config has no video_feature_dim")
        want = (*shape, config.video_feature_dim)
        if tuple(video_features.shape) != want:
            raise ValueError(f"video_features must have shape {want}, got {tuple(video_features.shape)}")
    _check_ids("input_ids", input_ids, config.vocab_size)
    _check_ids("token_type_ids", token_type_ids, config.type_vocab_size)
    _check_ids("attention_mask", attention_mask, 2)  # 0 or 1, as transformers' masks
    return ids


def _pooler_moved(state: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: checkpoints written before the pooler moved into the encoder keep it as
    "<prefix>pooler.*"; it is now "<prefix>bert.pooler.*"."""
    for name in ("weight", "bias"):
        old, new = f"{prefix}pooler.{name}", f"{prefix}bert.pooler.{name}"
        if old in state and new not in state:
            state[new] = state.pop(old)


def _check_ids(name: str, t: Optional[torch.Tensor], high: int) -> None:
    """Range check of embedding indices, on CPU only (on the GPU it would cost a host sync)."""
    if t is None or t.device.type != "cpu" or t.numel() == 0 or torch.compiler.is_compiling():
        return
    if bool(((t < 0) | (t >= high)).any()):
        hint = " (a sample is longer than max_position_embeddings?)" if name == "position_ids" else ""
        raise ValueError(f"{name} values must lie in [0, {high}), found {int(t.min())}..{int(t.max())}{hint}")


# ---------------------------------------------------------------- Hugging Face BERT weights

def _bert_source(source, config: Optional[VideoBERTConfig]) -> tuple[VideoBERTConfig, dict]:
    if isinstance(source, nn.Module):
        if config is None:
            config = VideoBERTConfig.from_bert_config(source.config)
        state = source.state_dict()
    elif isinstance(source, dict):
        if config is None:
            raise ValueError("config is required when loading from a state dict")
        state = source
    else:
        raise TypeError(f"source must be a transformers BERT model or a state dict, got {type(source).__name__}")
    # BertForPreTraining nests the encoder under "bert."; old TF-converted checkpoints use gamma/beta.
    state = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
             for k, v in state.items()}
    if any(k.startswith("bert.") for k in state):
        state = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in state.items()}
    return config, state


def _take(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise KeyError(f"BERT state dict has no {key!r}")
    return state[key]


def _encoder_state(state: dict, model: VideoBERTModel) -> dict:
    """Our encoder's state dict filled from BERT's parameter names."""
    ours = model.state_dict()
    words = _take(state, "embeddings.word_embeddings.weight")
    if words.shape[0] != model.config.text_vocab_size or words.shape[1] != model.config.hidden_size:
        raise ValueError(f"BERT word table is {tuple(words.shape)}, expected ({model.config.text_vocab_size}, "
                         f"{model.config.hidden_size}) from the config")
    table = ours["embeddings.word_embeddings.weight"].clone()
    table[: words.shape[0]] = words
    new = {"embeddings.word_embeddings.weight": table}
    for ours_name, bert_name in (("position_embeddings.weight", "position_embeddings.weight"),
                                 ("token_type_embeddings.weight", "token_type_embeddings.weight"),
                                 ("norm.weight", "LayerNorm.weight"), ("norm.bias", "LayerNorm.bias")):
        new[f"embeddings.{ours_name}"] = _take(state, f"embeddings.{bert_name}")
    if model.embeddings.feature_proj is not None:  # not in BERT: keeps its fresh initialisation
        for name in ("weight", "bias"):
            new[f"embeddings.feature_proj.{name}"] = ours[f"embeddings.feature_proj.{name}"]
    for name in ("weight", "bias"):  # BERT's pooler (a checkpoint without one leaves ours fresh)
        new[f"pooler.{name}"] = state.get(f"pooler.dense.{name}", ours[f"pooler.{name}"])
    for i in range(model.config.num_layers):
        src, dst = f"encoder.layer.{i}.", f"layers.{i}."
        for name in ("weight", "bias"):
            new[dst + f"qkv.{name}"] = torch.cat([_take(state, src + f"attention.self.{p}.{name}")
                                                  for p in ("query", "key", "value")])
            for ours_name, bert_name in (("attn_out", "attention.output.dense"),
                                         ("attn_norm", "attention.output.LayerNorm"),
                                         ("ffn_in", "intermediate.dense"), ("ffn_out", "output.dense"),
                                         ("ffn_norm", "output.LayerNorm")):
                new[dst + f"{ours_name}.{name}"] = _take(state, src + f"{bert_name}.{name}")
    return new


def _head_state(state: dict, model: VideoBERTForPretraining) -> dict:
    """Pretraining-head parameters that the BERT checkpoint has (MLM transform and bias, NSP)."""
    heads = {}
    for name in ("weight", "bias"):
        for ours_name, bert_name in (("mlm_transform", "cls.predictions.transform.dense"),
                                     ("mlm_norm", "cls.predictions.transform.LayerNorm")):
            if f"{bert_name}.{name}" in state:
                heads[f"{ours_name}.{name}"] = state[f"{bert_name}.{name}"]
        if f"cls.seq_relationship.{name}" in state:
            # BERT's NSP class 0 means "is next" (belongs together); our VTM class 1 does: swap the rows.
            heads[f"vtm_head.{name}"] = state[f"cls.seq_relationship.{name}"].flip(0)
    if "cls.predictions.bias" in state:
        bias = model.mlm_bias.detach().clone()
        bert_bias = state["cls.predictions.bias"]
        bias[: bert_bias.shape[0]] = bert_bias
        heads["mlm_bias"] = bias
    return heads
