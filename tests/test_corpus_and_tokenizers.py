"""Synthetic corpus structure and determinism; WordPiece round trips and config checks."""
import itertools

import pytest

from videobert.config import VideoBERTConfig
from videobert.corpus import ACTIONS, CLIP_SECONDS, OBJECTS, concept_tokens, synthetic_corpus
from videobert.text_tokenizer import TextTokenizer


def test_synthetic_corpus_is_deterministic_lazy_and_structured():
    a = list(synthetic_corpus(20, seed=3))
    b = list(synthetic_corpus(20, seed=3))
    assert a == b and a != list(synthetic_corpus(20, seed=4))
    assert next(iter(synthetic_corpus(10**9, seed=0))).video_id == "synthetic-0-000000"  # lazy: no upfront work
    for video in a:
        assert video.steps and all(0 <= t < 20736 for t in video.visual_tokens)
        assert [s.start for s in video.sentences] == sorted(s.start for s in video.sentences)
        for index, step in enumerate(video.steps):
            assert step.action in ACTIONS and step.object in OBJECTS
            assert step.action in step.caption and step.object in step.caption
            described = [s for s in video.sentences if s.step == index]
            assert len(described) == 1 and described[0].text == step.caption
            # the clips in the caption's time span are the step's clips
            span = video.clips_between(described[0].start, described[0].end)
            assert span == video.visual_tokens[step.first_clip:step.last_clip + 1]
            assert abs(described[0].end - (step.last_clip + 1) * CLIP_SECONDS) < 1e-9


def test_synthetic_video_tokens_show_the_step():
    """Most of a step's clips show its action's or its object's tokens, and concepts' token sets rarely collide."""
    hits = total = 0
    for video in synthetic_corpus(30, seed=1):
        for step in video.steps:
            own = set(concept_tokens("action", ACTIONS.index(step.action), 20736) +
                      concept_tokens("object", OBJECTS.index(step.object), 20736))
            clips = video.visual_tokens[step.first_clip:step.last_clip + 1]
            hits += sum(t in own for t in clips)
            total += len(clips)
    assert hits / total > 0.75
    sets = [frozenset(concept_tokens("action", a, 20736)) for a in range(len(ACTIONS))]
    sets += [frozenset(concept_tokens("object", o, 20736)) for o in range(len(OBJECTS))]
    assert not any(x & y for x, y in itertools.combinations(sets, 2))


def test_wordpiece_trained_on_the_corpus_round_trips_and_matches_a_config(tmp_path):
    sentences = [s.text for v in synthetic_corpus(50) for s in v.sentences]
    tok = TextTokenizer.train(sentences, vocab_size=400)
    assert [tok.token_id(s) for s in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    for text in sentences[:20]:
        assert tok.decode(tok.encode(text)) == text
    config = VideoBERTConfig.tiny(**tok.config_overrides())
    tok.check_config(config)
    with pytest.raises(ValueError, match="text_vocab_size=30522"):
        tok.check_config(VideoBERTConfig.tiny())
    reloaded = TextTokenizer.from_vocab(tok.save(tmp_path))
    assert reloaded.vocab_size == tok.vocab_size and reloaded.encode(sentences[0]) == tok.encode(sentences[0])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextTokenizer.from_vocab(tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_text("hello\nworld\n")
    with pytest.raises(ValueError, match="lacks the special tokens"):
        TextTokenizer.from_vocab(tmp_path / "bad.txt")


def test_synthetic_corpus_is_learnable_by_a_count_model():
    """Words are predictable from the video and video from the words: a lookup table fitted on one part of the
    corpus names the object of held-out steps from their clips, and tells matched from mismatched pairs."""
    from collections import Counter, defaultdict

    votes = defaultdict(Counter)
    for video in synthetic_corpus(200, seed=11):
        for step in video.steps:
            for token in video.visual_tokens[step.first_clip:step.last_clip + 1]:
                votes[token][step.object] += 1
    right = total = separable = 0
    held_out = list(synthetic_corpus(40, seed=12))
    for video, other in zip(held_out, held_out[1:]):
        for step, wrong in zip(video.steps, other.steps):
            clips = video.visual_tokens[step.first_clip:step.last_clip + 1]
            guess = sum((votes[t] for t in clips), Counter()).most_common(1)
            right += bool(guess) and guess[0][0] == step.object
            total += 1
            wrong_clips = other.visual_tokens[wrong.first_clip:wrong.last_clip + 1]
            score = lambda c: sum(votes[t][step.object] for t in c)  # noqa: E731
            separable += wrong.object == step.object or score(clips) > score(wrong_clips)
    assert right / total > 0.9 and separable / total > 0.9
