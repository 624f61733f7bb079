"""Video-and-text corpora in one shape: per video, a clip-level sequence of visual tokens (one per 1.5 s clip)
and time-stamped sentences.

`synthetic_corpus` is the embedded default (no download): seeded instructional "cooking videos" made of steps,
each an (action, object) pair that yields a run of visual tokens (the action's and the object's visual words,
drifting to neighbouring tokens) and a sentence describing it, mixed with unrelated chatter. Masked
words are predictable from the video and vice versa, and matched vs mismatched pairs are separable; every step
keeps its ground truth (action, object, caption) for evaluation.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

CLIP_SECONDS = 1.5  # the paper's clips: 30 frames at 20 fps

ACTIONS = ("cut", "pour", "stir", "fry", "bake", "peel", "mix", "boil", "slice", "grate", "whisk", "season")
OBJECTS = ("onion", "tomato", "egg", "flour", "butter", "garlic", "carrot", "potato", "rice", "milk", "cheese",
           "pepper", "chicken", "pasta", "sugar", "lemon")
TEMPLATES = ("now {a} the {o}", "{a} the {o} carefully", "next we {a} some {o}", "then you {a} the {o}",
             "let me show you how to {a} the {o}", "{a} the {o} for a minute")
CHATTER = ("thanks for watching", "this is my favourite recipe", "my kitchen is a bit messy today",
           "do not forget to subscribe", "it smells really good", "i got this pan last week")


@dataclass
class Sentence:
    """A time-stamped sentence; `step` is the index of the step it describes (-1 for chatter)."""

    start: float
    end: float
    text: str
    step: int = -1


@dataclass
class Step:
    """Ground truth of one step: what happens in clips [first_clip, last_clip] and the caption saying it."""

    action: str
    object: str
    caption: str
    first_clip: int
    last_clip: int


@dataclass
class Video:
    """One video: visual token per clip, sentences in time order, (synthetic only) its steps, and (continuous-
    feature mode only) a (clips, F) feature tensor."""

    video_id: str
    visual_tokens: list[int]
    sentences: list[Sentence]
    steps: list[Step] = field(default_factory=list)
    features: Optional[torch.Tensor] = None

    def clip_range(self, start: float, end: float) -> range:
        """Indices of the clips overlapping [start, end) seconds (at least one clip when in range)."""
        first = int(start // CLIP_SECONDS)
        last = max(first, int((end - 1e-9) // CLIP_SECONDS))
        return range(first, min(last + 1, len(self.visual_tokens)))

    def clips_between(self, start: float, end: float) -> list[int]:
        """Visual tokens of the clips overlapping [start, end) seconds."""
        return [self.visual_tokens[i] for i in self.clip_range(start, end)]


def token_features(tokens: list[int], dim: int, noise: float = 0.1, seed: int = 0) -> torch.Tensor:
    """(clips, dim) clip features for synthetic tokens: a fixed random vector per token plus noise, so that the
    continuous-feature mode sees the same structure as the token mode."""
    table = {t: torch.randn(dim, generator=torch.Generator().manual_seed(t)) for t in set(tokens)}
    base = torch.stack([table[t] for t in tokens]) if tokens else torch.zeros(0, dim)
    return base + noise * torch.randn(base.shape, generator=torch.Generator().manual_seed(seed))


def concept_tokens(kind: str, index: int, num_visual_tokens: int, per_concept: int = 1) -> list[int]:
    """The visual tokens that show an action or an object ("action" / "object", its index): fixed sets, disjoint
    across concepts (while the vocabulary is large enough), spread over the vocabulary, so a step's clips show
    both what is done and what it is done to. One word per concept by default: it keeps video-text matching
    learnable by the tiny model within a CPU demo (a matching-only probe of 400 steps x 64 samples reached 0.6
    accuracy with three words per concept, 0.8 with one)."""
    concepts = len(ACTIONS) + len(OBJECTS)
    spread = random.Random("concepts").sample(range(num_visual_tokens), min(num_visual_tokens, concepts * per_concept))
    slot = index if kind == "action" else len(ACTIONS) + index
    return [spread[(slot * per_concept + j) % len(spread)] for j in range(per_concept)]


def synthetic_video(seed: int, index: int, num_visual_tokens: int = 20736, chatter_prob: float = 0.2,
                    drift_prob: float = 0.15) -> Video:
    """Video `index` of the synthetic corpus of `seed` (random access: each video has its own generator)."""
    if num_visual_tokens < 2:
        raise ValueError(f"num_visual_tokens must be >= 2, got {num_visual_tokens}")
    rng = random.Random(f"{seed}/{index}")
    tokens: list[int] = []
    sentences: list[Sentence] = []
    steps: list[Step] = []
    for step_index in range(rng.randint(3, 8)):
        a, o = rng.randrange(len(ACTIONS)), rng.randrange(len(OBJECTS))
        vocabulary = concept_tokens("action", a, num_visual_tokens) + concept_tokens("object", o, num_visual_tokens)
        first = len(tokens)
        for _ in range(rng.randint(3, 10)):
            token = rng.choice(vocabulary)
            if rng.random() < drift_prob:  # visual drift: a neighbouring visual word
                token = (token + rng.choice((-1, 1))) % num_visual_tokens
            tokens.append(token)
        caption = rng.choice(TEMPLATES).format(a=ACTIONS[a], o=OBJECTS[o])
        steps.append(Step(ACTIONS[a], OBJECTS[o], caption, first, len(tokens) - 1))
        start, end = first * CLIP_SECONDS, len(tokens) * CLIP_SECONDS
        sentences.append(Sentence(start, end, caption, step_index))
        if rng.random() < chatter_prob:  # unrelated speech over the end of the step
            sentences.append(Sentence(start + (end - start) * rng.uniform(0.5, 0.9), end, rng.choice(CHATTER)))
    sentences.sort(key=lambda s: (s.start, s.end))
    return Video(f"synthetic-{seed}-{index:06d}", tokens, sentences, steps)


def synthetic_corpus(num_videos: int, seed: int = 0, **options) -> Iterator[Video]:
    """`num_videos` synthetic videos, deterministic given `seed`, generated lazily (any size, constant memory)."""
    if num_videos < 0:
        raise ValueError(f"num_videos must be >= 0, got {num_videos}")
    for index in range(num_videos):
        yield synthetic_video(seed, index, **options)
