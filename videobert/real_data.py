"""Real videos on disk, as the paper prepared them: clip features (one vector per 1.5 s clip) or visual tokens,
and time-stamped sentences. Streams one video at a time; never holds the corpus in memory.

Layout of a data folder:

    features/<id>.npy   float32 (clips, F) clip features (from `videobert extract-features`)
    tokens/<id>.npy     int64 (clips,) visual tokens (from `videobert tokenize-video`); preferred when present
    text/<id>.jsonl     one {"start": s, "end": s, "text": "..."} per line, or text/<id>.srt / text/<id>.vtt
                        (a video without one, or with an empty one, gives video-only samples)
    thumbnails/<id>.npy uint8 (clips, S, S, 3) one picture per clip (from `extract-features`)
    token_clips.json    per visual token, the clip nearest its centroid (from `tokenize-video`)
    vocab.txt           the text vocabulary (from `videobert build-vocab`)

Video ids are the stems under `tokens/` (else `features/`), sorted. Every error names the file (and line).
Subtitles with rolling cues (YouTube's automatic captions: each cue repeats the previous cue's line, then adds
one) give each line once.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch

from videobert.corpus import Sentence, Video

_LOG = logging.getLogger("videobert")
_TIME = re.compile(r"(?:(\d+):)?(\d{1,2}):(\d{2})[.,](\d{3})")


class DataError(ValueError):
    """Bad data on disk; the message names the file (and line)."""


def _seconds(stamp: str, where: str) -> float:
    match = _TIME.fullmatch(stamp.strip())
    if match is None:
        raise DataError(f"{where}: bad timestamp {stamp.strip()!r} (expected [hh:]mm:ss.mmm)")
    hours, minutes, seconds, millis = match.groups()
    return int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds) + int(millis) / 1000


def _check_times(sentences: list[Sentence], path: Path) -> list[Sentence]:
    previous_end = 0.0
    for index, s in enumerate(sentences):
        where = f"{path}: sentence {index + 1} ({s.text[:30]!r})"
        if s.start < 0 or s.end <= s.start:
            raise DataError(f"{where}: needs 0 <= start < end, got start={s.start}, end={s.end}")
        if s.start < previous_end - 1e-6:
            raise DataError(f"{where}: starts at {s.start}, before the previous sentence ends ({previous_end})")
        previous_end = s.end
    return sentences


def read_sentences(path: Union[str, Path]) -> list[Sentence]:
    """Time-stamped sentences of a `.jsonl`, `.srt` or `.vtt` file, in time order, checked."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: sentence file does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    sentences: list[Sentence] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                sentences.append(Sentence(float(record["start"]), float(record["end"]), str(record["text"]).strip()))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{path}:{number}: expected {{\"start\": s, \"end\": s, \"text\": ...}} "
                                f"({type(exc).__name__}: {exc})") from exc
    elif path.suffix in (".srt", ".vtt"):
        lines = text.splitlines()
        previous: list[str] = []  # the last cue's lines: a rolling cue repeats them before its new one
        for number, line in enumerate(lines, 1):
            if "-->" not in line:
                continue
            left, right = line.split("-->", 1)
            where = f"{path}:{number}"
            start, end = _seconds(left, where), _seconds(right.split()[0] if right.split() else "", where)
            cue = []
            for following in lines[number:]:
                cleaned = re.sub(r"<[^>]+>", "", following).strip()
                if not cleaned and (cue or not following):  # YouTube's cues open with a line of one space
                    break
                if cleaned:
                    cue.append(cleaned)
            new = [c for c in cue if c not in previous]
            previous = cue
            if new:
                sentences.append(Sentence(start, end, " ".join(new)))
    else:
        raise DataError(f"{path}: unknown sentence format (use .jsonl, .srt or .vtt)")
    return _check_times(sentences, path)


def _load_array(path: Path, what: str) -> np.ndarray:
    """The array of a .npy file; DataError naming the file when it is missing, truncated or not a plain array."""
    if not path.is_file():
        raise DataError(f"{path}: {what} file does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise DataError(f"{path}: not a readable numeric .npy array ({type(exc).__name__}: {exc})") from None


def read_features(path: Path, feature_dim: Optional[int] = None) -> np.ndarray:
    """(clips, F) float32 clip features of a .npy file, all finite; F must equal `feature_dim` when given."""
    array = _load_array(path, "feature")
    if array.ndim != 2 or array.shape[0] == 0 or not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{path}: expected a non-empty float (clips, F) array, got {array.dtype} {array.shape}")
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        raise DataError(f"{path}: clip {int(np.argmin(finite))} holds NaN or inf features")
    if feature_dim is not None and array.shape[1] != feature_dim:
        raise DataError(f"{path}: feature dimension {array.shape[1]}, expected {feature_dim} "
                        "(as the other videos / the visual tokenizer)")
    return array.astype(np.float32, copy=False)


class VideoFolder:
    """The videos of a data folder (layout in the module docstring), loaded one at a time and checked when read
    (a bad file raises DataError naming it). `num_visual_tokens` bounds the visual tokens (the model's visual
    vocabulary); with `skip_bad`, `videos()` leaves out a video whose files are bad, logging it once."""

    def __init__(self, root: Union[str, Path], feature_dim: Optional[int] = None, with_features: bool = False,
                 num_visual_tokens: Optional[int] = None, skip_bad: bool = False):
        self.root = Path(root)
        self.with_features = with_features  # attach clip features (the continuous-feature mode)
        self.num_visual_tokens, self.skip_bad = num_visual_tokens, skip_bad
        self.skipped: dict[str, str] = {}  # video id -> why it was left out
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data folder does not exist")
        source = self.root / "tokens" if (self.root / "tokens").is_dir() else self.root / "features"
        if not source.is_dir():
            raise DataError(f"{self.root}: neither tokens/ nor features/ exists")
        self.uses_tokens = source.name == "tokens"
        self.ids = sorted(p.stem for p in source.glob("*.npy"))
        if not self.ids:
            raise DataError(f"{source}: no .npy files")
        self.feature_dim = feature_dim

    def __len__(self) -> int:
        return len(self.ids)

    def sentence_file(self, video_id: str) -> Optional[Path]:
        """The sentence file of a video (jsonl, srt or vtt), None when it has none."""
        for suffix in (".jsonl", ".srt", ".vtt"):
            path = self.root / "text" / f"{video_id}{suffix}"
            if path.is_file():
                return path
        return None

    def features(self, video_id: str) -> np.ndarray:
        """(clips, F) float32 features of a video, checked against the folder's feature dimension."""
        array = read_features(self.root / "features" / f"{video_id}.npy", self.feature_dim)
        self.feature_dim = array.shape[1]
        return array

    def tokens(self, video_id: str) -> list[int]:
        """Visual tokens of a video (from tokens/)."""
        path = self.root / "tokens" / f"{video_id}.npy"
        array = _load_array(path, "token (run `videobert tokenize-video`)")
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer) or (array < 0).any():
            raise DataError(f"{path}: expected a 1-D array of non-negative integers, got {array.dtype} {array.shape}")
        if self.num_visual_tokens is not None and array.size and int(array.max()) >= self.num_visual_tokens:
            clip = int(np.argmax(array >= self.num_visual_tokens))
            raise DataError(f"{path}: visual token {int(array[clip])} at clip {clip} is outside the model's visual "
                            f"vocabulary [0, {self.num_visual_tokens}) (tokenized with another visual tokenizer?)")
        return array.astype(np.int64).tolist()

    def video(self, index: int) -> Video:
        """Video `index` with its visual tokens (or, with_features, its clip features) and sentences (none without a
        sentence file)."""
        video_id = self.ids[index]
        path = self.sentence_file(video_id)
        sentences = read_sentences(path) if path is not None else []
        if self.with_features:
            features = torch.from_numpy(self.features(video_id))
            # The continuous mode reads no visual tokens; the clip count is what the samples use.
            tokens = self.tokens(video_id) if self.uses_tokens else [0] * features.shape[0]
            return Video(video_id, tokens, sentences, features=features)
        if not self.uses_tokens:
            raise DataError(f"{self.root}: tokens/ is missing; tokenize the features first (videobert tokenize-video)")
        return Video(video_id, self.tokens(video_id), sentences)

    def videos(self, start: int, stop: int) -> list[Video]:
        """Videos [start, stop) (the `videos` callable of `PretrainingStream`), less the bad ones with skip_bad."""
        if not self.skip_bad:
            return [self.video(i) for i in range(start, min(stop, len(self.ids)))]
        found = []
        for i in range(start, min(stop, len(self.ids))):
            try:
                found.append(self.video(i))
            except DataError as exc:
                if self.ids[i] not in self.skipped:
                    _LOG.warning("skipping video %s (--on-bad-data skip): %s", self.ids[i], exc)
                self.skipped[self.ids[i]] = str(exc)
        return found


def held_out_videos(total: int, requested: int, share: float, per_batch: int, world: int, where: str
                    ) -> tuple[int, str]:
    """(videos held out, a line saying so) of a folder of `total` videos: `requested` when > 0, else the `share`
    of them but at least one batch of `per_batch`; ValueError when what remains is less than a batch per rank."""
    if not 0 < share < 1:
        raise ValueError(f"--eval-share must lie in (0, 1), got {share}")
    held = requested or max(per_batch, round(share * total))
    if total - held < per_batch * world:
        if requested:
            raise ValueError(f"{where}: {total} videos leave too few for training after {held} held out")
        raise ValueError(f"{where}: {total} videos cannot give a held-out batch and a training batch per rank of "
                         f"--videos-per-batch {per_batch} (that needs {per_batch * (world + 1)}); lower "
                         "--videos-per-batch")
    how = "--eval-videos" if requested else f"{share:g} of them, at least one batch of --videos-per-batch {per_batch}"
    return held, f"{where}: {held} of {total} videos held out for evaluation ({how})"


def folder_sentences(root: Union[str, Path]) -> Iterator[str]:
    """Every sentence text of a data folder's videos (to train a vocabulary on)."""
    folder = VideoFolder(root)
    for video_id in folder.ids:
        path = folder.sentence_file(video_id)
        if path is not None:
            yield from (s.text for s in read_sentences(path))


def build_vocab(root: Union[str, Path], size: int = 8000, from_bert: Optional[Union[str, Path]] = None) -> Path:
    """Write ROOT/vocab.txt (and tokenizer_config.json): WordPiece trained on the folder's sentences (at most
    `size` pieces), or `from_bert`'s vocabulary copied (a Hugging Face BERT folder); returns its path."""
    import shutil

    from videobert.text_tokenizer import TextTokenizer

    root = Path(root)
    if from_bert is not None:
        source = Path(from_bert)
        TextTokenizer.from_vocab(source / "vocab.txt")  # checked before anything is replaced
        shutil.copyfile(source / "vocab.txt", root / "vocab.txt")
        if (source / "tokenizer_config.json").is_file():
            shutil.copyfile(source / "tokenizer_config.json", root / "tokenizer_config.json")
        else:
            (root / "tokenizer_config.json").unlink(missing_ok=True)
        return root / "vocab.txt"
    sentences = list(folder_sentences(root))
    if not sentences:
        raise DataError(f"{root / 'text'}: no sentences to train a vocabulary on; pass --from-bert DIR instead")
    return TextTokenizer.train(sentences, vocab_size=size).save(root)


def folder_tokenizer(root: Union[str, Path]):
    """The TextTokenizer of a data folder's vocab.txt; DataError saying how to make one when it is missing."""
    from videobert.text_tokenizer import TextTokenizer

    path = Path(root) / "vocab.txt"
    if not path.is_file():
        raise DataError(f"{path}: no vocabulary; make one with `videobert build-vocab {root}` (WordPiece on the "
                        f"folder's sentences) or `videobert build-vocab {root} --from-bert DIR`")
    return TextTokenizer.from_vocab(path)


def check_bert_vocabulary(root: Union[str, Path], bert_dir: Union[str, Path], bert_tokenizer) -> None:
    """ValueError when a data folder has a vocab.txt other than BERT's (pretraining from BERT reads BERT's word
    pieces, and zero-shot would later read the folder's), saying which one to use."""
    path = Path(root) / "vocab.txt"
    if not path.is_file():
        return
    from videobert.text_tokenizer import TextTokenizer

    own = TextTokenizer.from_vocab(path)
    if own.vocabulary() != bert_tokenizer.vocabulary():
        raise ValueError(f"--init-from-bert {bert_dir}: {path} is another vocabulary ({own.vocab_size} word pieces, "
                         f"BERT's has {bert_tokenizer.vocab_size}); a model started from BERT uses BERT's: run "
                         f"`videobert build-vocab {root} --from-bert {bert_dir}` (replaces {path}), or drop "
                         f"--init-from-bert to pretrain with {path}")
