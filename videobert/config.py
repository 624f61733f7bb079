"""`VideoBERTConfig`: encoder sizes, the joint text + visual vocabulary layout, and objective weights.

Joint vocabulary: ids [0, text_vocab_size) are BERT's word pieces (its own [PAD] [UNK] [CLS] [SEP]
[MASK] included), then VideoBERT's extra specials ([>] joins text and video, [FEAT] marks a position
embedded from a continuous clip feature), then the visual tokens of the hierarchical k-means.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

EXTRA_SPECIAL_TOKENS = ("[>]", "[FEAT]")
PRESETS = ("tiny", "base", "large")  # the VideoBERTConfig classmethods of these names


@dataclass
class VideoBERTConfig:
    """Sizes and vocabulary of a VideoBERT encoder; `tiny()`, `base()` and `large()` are the presets."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    text_vocab_size: int = 30522
    num_visual_tokens: int = 12**4  # hierarchical k-means, 4 levels x 12 clusters
    video_feature_dim: Optional[int] = None  # set to embed [FEAT] positions from clip features
    pad_token_id: int = 0
    unk_token_id: int = 100
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103
    text_mlm_weight: float = 1.0
    visual_mlm_weight: float = 1.0
    vtm_weight: float = 1.0
    nce_weight: float = 0.0  # in-batch InfoNCE between pooled text-only and video-only encodings (CBT, UniVL)
    nce_temperature: float = 0.07
    backend: str = "auto"  # backend of every fused op in the model

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings",
                     "type_vocab_size", "text_vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_visual_tokens < 0:
            raise ValueError(f"num_visual_tokens must be >= 0, got {self.num_visual_tokens}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("pad_token_id", "unk_token_id", "cls_token_id", "sep_token_id", "mask_token_id"):
            if not 0 <= getattr(self, name) < self.text_vocab_size:
                raise ValueError(f"{name} must be a word-piece id in [0, {self.text_vocab_size}), "
                                 f"got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.hidden_size // self.num_heads

    @property
    def join_token_id(self) -> int:
        """Id of `[>]`, the token between the text and the video of a sample."""
        return self.text_vocab_size + EXTRA_SPECIAL_TOKENS.index("[>]")

    @property
    def feature_token_id(self) -> int:
        """Id of `[FEAT]`, a position embedded from `video_features` instead of the word table."""
        return self.text_vocab_size + EXTRA_SPECIAL_TOKENS.index("[FEAT]")

    @property
    def visual_offset(self) -> int:
        """Joint-vocabulary id of visual token 0."""
        return self.text_vocab_size + len(EXTRA_SPECIAL_TOKENS)

    @property
    def vocab_size(self) -> int:
        """Size of the joint word table."""
        return self.visual_offset + self.num_visual_tokens

    @classmethod
    def tiny(cls, **overrides) -> "VideoBERTConfig":
        """A 2-layer, 128-wide encoder that trains on a laptop CPU."""
        return cls(**{**dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512), **overrides})

    @classmethod
    def base(cls, **overrides) -> "VideoBERTConfig":
        """BERT-base: 12 layers, 768 wide, 12 heads."""
        return cls(**overrides)

    @classmethod
    def large(cls, **overrides) -> "VideoBERTConfig":
        """VideoBERT as published: BERT-large, 24 layers, 1024 wide, 16 heads."""
        return cls(**{**dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096), **overrides})

    @classmethod
    def preset(cls, name: str, **overrides) -> "VideoBERTConfig":
        """The preset called `name` (one of PRESETS: "tiny", "base" or "large")."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(map(repr, PRESETS))}, got {name!r}")
        return getattr(cls, name)(**overrides)

    def to_dict(self) -> dict:
        """Plain-dict form (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "VideoBERTConfig":
        """Inverse of `to_dict`; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown VideoBERTConfig fields: {sorted(unknown)}")
        return cls(**values)

    def to_json(self) -> str:
        """JSON form, as stored next to checkpoints."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, directory, architecture: Optional[str] = None) -> None:
        """Write `directory/config.json` as transformers does (model_type "videobert", the fields, and the model
        class under "architectures")."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        data = {"model_type": MODEL_TYPE, **({"architectures": [architecture]} if architecture else {}),
                **self.to_dict()}
        (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory, **overrides) -> "VideoBERTConfig":
        """Read `directory/config.json` written by `save_pretrained` (transformers' own keys are skipped)."""
        data = read_model_config(directory)
        if data.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{Path(directory) / 'config.json'}: model_type is {data.get('model_type')!r}, not "
                             f"{MODEL_TYPE!r} (a BERT checkpoint loads through VideoBERTModel.from_pretrained)")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls.from_dict({**{k: v for k, v in data.items() if k in known or k not in _HF_KEYS}, **overrides})

    @classmethod
    def from_bert_config(cls, bert_config, **overrides) -> "VideoBERTConfig":
        """Sizes from a transformers `BertConfig`, with VideoBERT's visual vocabulary added."""
        if getattr(bert_config, "hidden_act", "gelu") != "gelu":
            raise ValueError(f"only BERT models with hidden_act='gelu' are supported, got {bert_config.hidden_act!r}")
        return cls(**{**dict(
            hidden_size=bert_config.hidden_size, num_layers=bert_config.num_hidden_layers,
            num_heads=bert_config.num_attention_heads, intermediate_size=bert_config.intermediate_size,
            max_position_embeddings=bert_config.max_position_embeddings,
            type_vocab_size=bert_config.type_vocab_size, layer_norm_eps=bert_config.layer_norm_eps,
            hidden_dropout=bert_config.hidden_dropout_prob,
            attention_dropout=bert_config.attention_probs_dropout_prob,
            initializer_range=bert_config.initializer_range, text_vocab_size=bert_config.vocab_size,
            pad_token_id=bert_config.pad_token_id or 0), **overrides})


MODEL_TYPE = "videobert"
# Keys transformers writes into a config.json besides a model's own fields.
_HF_KEYS = {"model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "auto_map",
            "_name_or_path", "_attn_implementation_autoset"}


def read_model_config(directory) -> dict:
    """`directory/config.json` as a dict (FileNotFoundError / ValueError naming the file otherwise)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a saved model folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data
