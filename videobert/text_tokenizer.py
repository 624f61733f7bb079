"""Text tokenizer: BERT WordPiece through Hugging Face `tokenizers`, from a BERT `vocab.txt` or trained on a
corpus' sentences. Its ids are the joint vocabulary's text ids [0, vocab_size); `config_overrides` and
`check_config` tie it to a `VideoBERTConfig` (the visual ids and `[>]`/`[FEAT]` follow the text ids there).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Union

from videobert.config import VideoBERTConfig

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_CONFIG_FIELDS = dict(zip(SPECIALS, ("pad_token_id", "unk_token_id", "cls_token_id", "sep_token_id",
                                     "mask_token_id")))


class TextTokenizer:
    """BERT WordPiece, lower-cased unless its vocabulary is cased; `encode` gives word-piece ids without
    specials."""

    def __init__(self, wordpiece, lowercase: bool = True):
        self._tok, self.lowercase = wordpiece, lowercase
        missing = [s for s in SPECIALS if wordpiece.token_to_id(s) is None]
        if missing:
            raise ValueError(f"the vocabulary lacks the special tokens {missing}")

    @classmethod
    def from_vocab(cls, path: Union[str, Path], lowercase: Optional[bool] = None) -> "TextTokenizer":
        """Load a BERT `vocab.txt` (one word piece per line). Lower-casing follows `lowercase`, else the
        `do_lower_case` of a `tokenizer_config.json` beside it (a Hugging Face checkpoint's: cased models say
        false), else True."""
        from tokenizers import BertWordPieceTokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file {path} does not exist")
        pieces = set(path.read_text(encoding="utf-8").splitlines())
        missing = [s for s in SPECIALS if s not in pieces]
        if missing:
            raise ValueError(f"{path}: the vocabulary lacks the special tokens {missing}")
        if lowercase is None:
            lowercase = _do_lower_case(path.parent / "tokenizer_config.json")
        return cls(BertWordPieceTokenizer(str(path), lowercase=lowercase), lowercase)

    @classmethod
    def train(cls, sentences: Iterable[str], vocab_size: int = 1000) -> "TextTokenizer":
        """A WordPiece vocabulary of at most `vocab_size` pieces from `sentences`, deterministically: the specials,
        every character seen (alone and as a "##" continuation, so any word stays encodable), then whole words
        by falling frequency (ties alphabetical). Hugging Face's trainer is not used: its merges break ties
        differently from run to run, and the ids must not change between runs of the same seed."""
        from collections import Counter

        from tokenizers import BertWordPieceTokenizer
        from tokenizers.normalizers import BertNormalizer
        from tokenizers.pre_tokenizers import BertPreTokenizer

        normalizer, pre = BertNormalizer(lowercase=True), BertPreTokenizer()
        words: Counter = Counter()
        for sentence in sentences:
            words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(sentence)))
        chars = sorted({c for w in words for c in w})
        pieces = list(SPECIALS) + chars + [f"##{c}" for c in chars]
        if len(pieces) > vocab_size:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(pieces)} specials and characters")
        ranked = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
        pieces += ranked[:vocab_size - len(pieces)]
        return cls(BertWordPieceTokenizer({p: i for i, p in enumerate(pieces)}, lowercase=True))

    @property
    def vocab_size(self) -> int:
        """Number of word pieces (specials included)."""
        return self._tok.get_vocab_size()

    def vocabulary(self) -> dict[str, int]:
        """Every word piece with its id."""
        return self._tok.get_vocab()

    def token_id(self, token: str) -> int:
        """Id of a word piece or special; KeyError when absent."""
        index = self._tok.token_to_id(token)
        if index is None:
            raise KeyError(token)
        return index

    def encode(self, text: str) -> list[int]:
        """Word-piece ids of `text`, without [CLS]/[SEP]."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of word-piece ids (specials dropped, pieces joined)."""
        return self._tok.decode(list(ids))

    def save(self, folder: Union[str, Path]) -> Path:
        """Write `vocab.txt` and `tokenizer_config.json` (do_lower_case) into `folder`; returns the vocabulary's
        path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save_model(str(folder))
        (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": self.lowercase}) + "\n")
        return folder / "vocab.txt"

    def config_overrides(self) -> dict:
        """`VideoBERTConfig` fields that make a config's text ids this vocabulary's."""
        return {"text_vocab_size": self.vocab_size, **{_CONFIG_FIELDS[s]: self.token_id(s) for s in SPECIALS}}

    def check_config(self, config: VideoBERTConfig) -> None:
        """Raise ValueError unless `config` uses this vocabulary's size and special ids."""
        wrong = {name: (getattr(config, name), value) for name, value in self.config_overrides().items()
                 if getattr(config, name) != value}
        if wrong:
            details = ", ".join(f"{name}={got} (tokenizer: {want})" for name, (got, want) in sorted(wrong.items()))
            raise ValueError(f"the model config does not match the text tokenizer: {details}")


def _do_lower_case(config_file: Path) -> bool:
    """A tokenizer config's `do_lower_case` (True when the file or the key is missing)."""
    if not config_file.is_file():
        return True
    try:
        value = json.loads(config_file.read_text(encoding="utf-8")).get("do_lower_case", True)
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{config_file}: not a JSON object ({exc})") from None
    if not isinstance(value, bool):
        raise ValueError(f"{config_file}: do_lower_case must be true or false, got {value!r}")
    return value
