"""Model inputs: VideoBERT sample layout, BERT-style masking and packing samples into rows.

A sample is `[CLS] text [>] video [SEP]` (token type 0 up to and including `[>]`, 1 after), as in the
paper. Packed rows carry several samples; `segment_ids` numbers them per row (-1 = padding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from videobert.config import VideoBERTConfig
from videobert.model import IGNORE_INDEX, HeadPositions


def to_device(t: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """`t` on `device` (None stays None). From the CPU to a GPU through pinned memory without blocking the host:
    a copy from pageable memory would wait for all queued GPU work, at every training step; the copy is
    ordered on the current stream before anything that reads it."""
    if t is None:
        return None
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def pinned(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """`t` in pinned host memory (None stays None); `to_device` then copies it to a GPU without pinning again."""
    return None if t is None else t.pin_memory()


@dataclass
class PackedBatch:
    """Rows of packed samples: every tensor is (B, L) except vtm_labels (one per sample, in [CLS] order)."""

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    segment_ids: torch.Tensor
    mlm_labels: torch.Tensor
    vtm_labels: torch.Tensor
    video_features: Optional[torch.Tensor] = None  # (B, L, F), read at [FEAT] positions (continuous mode)
    head_positions: Optional[HeadPositions] = None  # static-shape head indices (`static_batch`)
    # (P, 2): per matched pair, the [CLS] indices of its text-only and its video-only sample (contrastive objective)
    nce_pairs: Optional[torch.Tensor] = None

    def to(self, device) -> "PackedBatch":
        """The same batch on `device` (`to_device`)."""
        return self._map(lambda t: to_device(t, device))

    def pin_memory(self) -> "PackedBatch":
        """The same batch in pinned host memory: a DataLoader(pin_memory=True) pins it off the training thread."""
        return self._map(pinned)

    def _map(self, fn) -> "PackedBatch":
        tensors = (fn(t) for t in (self.input_ids, self.token_type_ids, self.segment_ids, self.mlm_labels,
                                   self.vtm_labels, self.video_features))
        positions = None if self.head_positions is None else HeadPositions(*(fn(t) for t in self.head_positions))
        return PackedBatch(*tensors, head_positions=positions, nce_pairs=fn(self.nce_pairs))

    def model_inputs(self) -> dict:
        """Keyword arguments of `VideoBERTForPretraining.forward`."""
        inputs = dict(input_ids=self.input_ids, token_type_ids=self.token_type_ids, segment_ids=self.segment_ids,
                      mlm_labels=self.mlm_labels, vtm_labels=self.vtm_labels)
        if self.video_features is not None:
            inputs["video_features"] = self.video_features
        if self.nce_pairs is not None:
            inputs["nce_pairs"] = self.nce_pairs
        if self.head_positions is not None:
            inputs["head_positions"] = self.head_positions
        return inputs

    def shape_key(self) -> tuple:
        """What fixes the shapes of a forward on this batch: rows, row length and (static batches) the head
        capacities; batches with one key can replay one captured CUDA graph."""
        caps = () if self.head_positions is None else tuple(t.numel() for t in self.head_positions[:3])
        return (*self.input_ids.shape, *caps)


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def static_batch(batch: PackedBatch, config: VideoBERTConfig, row_multiple: int = 8,
                 capacity_multiple: int = 256) -> PackedBatch:
    """`batch` (on the CPU) with static shapes for a fullgraph compile or CUDA-graph replay: rows padded to a
    multiple of `row_multiple` with padding rows, and `head_positions`, the heads' gather indices (masked text,
    masked visual, [CLS] tokens) each padded to a multiple of `capacity_multiple` (the matching labels padded
    with -100 to the [CLS] capacity). Few distinct shapes, so few graphs; the losses are those of `batch`."""
    if batch.nce_pairs is not None:
        raise ValueError("static batches (--cuda-graphs, reduce-overhead compiles) do not carry the contrastive "
                         "objective's pairs: use --nce-weight 0 with them")
    B, L = batch.input_ids.shape
    pad = _round_up(B, row_multiple) - B

    def rows(t: torch.Tensor, value) -> torch.Tensor:
        return torch.cat([t, t.new_full((pad, *t.shape[1:]), value)]) if pad else t
    input_ids = rows(batch.input_ids, config.pad_token_id)
    token_types = rows(batch.token_type_ids, 0)
    segment_ids = rows(batch.segment_ids, -1)
    labels = rows(batch.mlm_labels, IGNORE_INDEX)
    features = None if batch.video_features is None else rows(batch.video_features, 0.0)
    flat_labels, flat_types = labels.flatten(), token_types.flatten()
    masked = flat_labels != IGNORE_INDEX
    groups = [(masked & (flat_types == 0)).nonzero().flatten(), (masked & (flat_types != 0)).nonzero().flatten(),
              (input_ids.flatten() == config.cls_token_id).nonzero().flatten()]
    if groups[2].numel() != batch.vtm_labels.numel():
        raise ValueError(f"vtm_labels must have one entry per [CLS] token ({groups[2].numel()}), got "
                         f"{batch.vtm_labels.numel()}")
    padded = [torch.cat([g, g.new_zeros(_round_up(g.numel(), capacity_multiple) - g.numel())]) for g in groups]
    vtm = torch.cat([batch.vtm_labels, batch.vtm_labels.new_full((padded[2].numel() - groups[2].numel(),),
                                                                  IGNORE_INDEX)])
    counts = torch.tensor([g.numel() for g in groups], dtype=torch.long)
    return PackedBatch(input_ids, token_types, segment_ids, labels, vtm, features, HeadPositions(*padded, counts))


def encode_sample(config: VideoBERTConfig, text_ids: Sequence[int], visual_tokens: Sequence[int],
                  as_features: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, token_type_ids) of `[CLS] text [>] video [SEP]`; visual_tokens are in [0, num_visual_tokens).
    With `as_features`, each clip is a `[FEAT]` position instead (its feature vector goes in separately)."""
    text = torch.as_tensor(list(text_ids), dtype=torch.long)
    video = torch.as_tensor(list(visual_tokens), dtype=torch.long)
    if text.numel() and not bool(((text >= 0) & (text < config.text_vocab_size)).all()):
        raise ValueError(f"text_ids must lie in [0, {config.text_vocab_size})")
    if video.numel() and not bool(((video >= 0) & (video < config.num_visual_tokens)).all()):
        raise ValueError(f"visual_tokens must lie in [0, {config.num_visual_tokens})")
    ids = torch.cat([torch.tensor([config.cls_token_id]), text, torch.tensor([config.join_token_id]),
                     torch.full_like(video, config.feature_token_id) if as_features else video + config.visual_offset,
                     torch.tensor([config.sep_token_id])])
    types = torch.zeros_like(ids)
    types[text.numel() + 2:] = 1
    return ids, types


def mask_tokens(config: VideoBERTConfig, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                mask_prob: float = 0.15, generator: Optional[torch.Generator] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of word pieces and visual tokens (never specials): of the chosen positions 80% become
    [MASK], 10% a random token of the same modality, 10% stay. Returns (masked input_ids, mlm_labels)."""
    specials = torch.tensor([config.pad_token_id, config.cls_token_id, config.sep_token_id, config.join_token_id,
                             config.feature_token_id, config.mask_token_id])
    maskable = ~torch.isin(input_ids, specials)
    chosen = maskable & (torch.rand(input_ids.shape, generator=generator) < mask_prob)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    roll = torch.rand(input_ids.shape, generator=generator)
    random_text = torch.randint(0, config.text_vocab_size, input_ids.shape, generator=generator)
    random_video = config.visual_offset + torch.randint(0, max(config.num_visual_tokens, 1), input_ids.shape,
                                                        generator=generator)
    random_ids = torch.where(token_type_ids == 0, random_text, random_video)
    # A random special would change the sample layout (a stray [CLS] starts a "sample"): keep the token then.
    random_ids = torch.where(torch.isin(random_ids, specials), input_ids, random_ids)
    masked = torch.where(chosen & (roll < 0.8), torch.full_like(input_ids, config.mask_token_id), input_ids)
    masked = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, masked)
    return masked, labels


def allowed_pairs(segment_ids: torch.Tensor) -> int:
    """(query, key) pairs a document mask allows over (B, L) segment ids (-1 padding): the sum over rows of the
    squared sample lengths (what attention FLOP counts use)."""
    total = 0
    for row in segment_ids.cpu():
        counts = torch.bincount(row[row >= 0].long())
        total += int((counts.long() ** 2).sum())
    return total


def plan_rows(lengths: Sequence[int], row_length: int, packed: bool = True) -> list[list[int]]:
    """Sample indices per row: first-fit into rows of `row_length` keeping sample order within each row
    (never splitting a sample), or one sample per row when not `packed` (the padded layout)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index, n in enumerate(lengths):
        if n > row_length:
            raise ValueError(f"sample {index} has {n} tokens, more than row_length ({row_length})")
        target = next((r for r, free in enumerate(room) if free >= n), None) if packed else None
        if target is None:
            rows.append([])
            room.append(row_length)
            target = len(rows) - 1
        rows[target].append(index)
        room[target] -= n
    return rows


def pack_tensors(samples: Sequence[dict[str, torch.Tensor]], row_length: int, fill: dict[str, int],
                 rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Per-token fields of samples (each a dict of tensors whose first dimension is the token, the keys of `fill`)
    laid out in rows of `row_length` as `rows` says (sample indices per row), the rest filled with `fill`'s values;
    adds "segment_ids" (the sample's place in its row, -1 on padding). Returns (rows, row_length, ...) tensors of
    the samples' dtypes (long without samples)."""
    def blank(name: str, value) -> torch.Tensor:
        like = samples[rows[0][0]][name] if rows and rows[0] else torch.zeros(0, dtype=torch.long)
        return torch.full((len(rows), row_length, *like.shape[1:]), value, dtype=like.dtype)
    out = {name: blank(name, value) for name, value in fill.items()}
    out["segment_ids"] = torch.full((len(rows), row_length), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for segment, index in enumerate(members):
            n = next(iter(samples[index].values())).shape[0]
            for name in fill:
                out[name][r, start:start + n] = samples[index][name]
            out["segment_ids"][r, start:start + n] = segment
            start += n
    return out


def pack_samples(samples: Sequence[tuple[torch.Tensor, torch.Tensor]], row_length: int, pad_token_id: int = 0,
                 rows: Optional[list[list[int]]] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, token_type_ids) samples laid out in rows of `row_length` as `rows` says (default: first-fit
    `plan_rows`). Returns (input_ids, token_type_ids, segment_ids) of shape (rows, row_length)."""
    if rows is None:
        rows = plan_rows([ids.numel() for ids, _ in samples], row_length)
    packed = pack_tensors([{"input_ids": ids, "token_type_ids": types} for ids, types in samples], row_length,
                          {"input_ids": pad_token_id, "token_type_ids": 0}, rows)
    return packed["input_ids"], packed["token_type_ids"], packed["segment_ids"]


def random_pretraining_batch(config: VideoBERTConfig, num_samples: int = 16, row_length: int = 128,
                             mask_prob: float = 0.15, seed: int = 0) -> PackedBatch:
    """A packed batch of random samples (random lengths, words and visual tokens, random VTM labels), for
    smoke runs and tests; it has the structure of real data but nothing to learn beyond memorisation."""
    gen = torch.Generator().manual_seed(seed)
    budget = row_length - 3  # [CLS], [>], [SEP]
    samples = []
    for _ in range(num_samples):
        n_text = int(torch.randint(1, max(2, budget // 2), (), generator=gen))
        n_video = int(torch.randint(1, max(2, budget - n_text), (), generator=gen))
        text = torch.randint(999, config.text_vocab_size, (n_text,), generator=gen)
        video = torch.randint(0, config.num_visual_tokens, (n_video,), generator=gen)
        samples.append(encode_sample(config, text.tolist(), video.tolist()))
    input_ids, token_types, segment_ids = pack_samples(samples, row_length, config.pad_token_id)
    masked, labels = mask_tokens(config, input_ids, token_types, mask_prob, gen)
    # Packing preserves sample order within a row and rows fill in order, but [CLS] order is row-major:
    # draw labels per [CLS] in that order.
    n_cls = int((input_ids == config.cls_token_id).sum())
    vtm = torch.randint(0, 2, (n_cls,), generator=gen)
    return PackedBatch(masked, token_types, segment_ids, labels, vtm)
