"""Sample layout, masking and packing."""
import pytest
import torch

from videobert import VideoBERTConfig
from videobert.data import encode_sample, mask_tokens, pack_samples, random_pretraining_batch

CONFIG = VideoBERTConfig.tiny()


def test_encode_sample_layout():
    ids, types = encode_sample(CONFIG, [2000, 2001], [0, 5, 20735])
    c = CONFIG
    assert ids.tolist() == [c.cls_token_id, 2000, 2001, c.join_token_id, c.visual_offset, c.visual_offset + 5,
                            c.visual_offset + 20735, c.sep_token_id]
    assert types.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="visual_tokens must lie in"):
        encode_sample(CONFIG, [2000], [20736])
    with pytest.raises(ValueError, match="text_ids must lie in"):
        encode_sample(CONFIG, [-1], [1])


def test_pack_samples_first_fit():
    samples = [encode_sample(CONFIG, [2000] * t, [1] * v) for t, v in [(3, 3), (10, 10), (1, 1), (2, 2)]]
    ids, types, seg = pack_samples(samples, 26)  # lengths 9, 23, 5, 7
    assert ids.shape == (2, 26)
    assert seg[0].tolist() == [0] * 9 + [1] * 5 + [2] * 7 + [-1] * 5
    assert seg[1].tolist() == [0] * 23 + [-1] * 3
    assert (ids[seg < 0] == CONFIG.pad_token_id).all()
    with pytest.raises(ValueError, match="sample 1 has 23 tokens, more than row_length"):
        pack_samples(samples, 20)


def test_mask_tokens_never_masks_specials_and_hits_the_rate():
    batch = random_pretraining_batch(CONFIG, 64, 128, mask_prob=0.0, seed=0)
    masked, labels = mask_tokens(CONFIG, batch.input_ids, batch.token_type_ids, 0.15, torch.Generator().manual_seed(1))
    chosen = labels != -100
    specials = torch.isin(batch.input_ids, torch.tensor([CONFIG.cls_token_id, CONFIG.sep_token_id,
                                                         CONFIG.join_token_id, CONFIG.pad_token_id]))
    assert not (chosen & specials).any()
    assert torch.equal(labels[chosen], batch.input_ids[chosen])
    rate = chosen.sum() / (~specials).sum()
    assert 0.13 < float(rate) < 0.17
    replaced = (masked[chosen] == CONFIG.mask_token_id).float().mean()
    assert 0.75 < float(replaced) < 0.85
    # random replacements stay within their modality's vocabulary
    video = chosen & (batch.token_type_ids == 1) & (masked != CONFIG.mask_token_id)
    assert (masked[video] >= CONFIG.visual_offset).all()


def test_random_batch_has_one_vtm_label_per_sample():
    batch = random_pretraining_batch(CONFIG, 10, 64, seed=3)
    assert batch.vtm_labels.numel() == 10 == int((batch.input_ids == CONFIG.cls_token_id).sum())


def test_random_replacements_never_create_special_tokens():
    from videobert.data import mask_tokens

    config = VideoBERTConfig.tiny(text_vocab_size=8, pad_token_id=0, unk_token_id=1, cls_token_id=2, sep_token_id=3,
                                  mask_token_id=4)
    ids = torch.full((64, 64), 6)
    types = torch.zeros_like(ids)
    masked, labels = mask_tokens(config, ids, types, mask_prob=0.9, generator=torch.Generator().manual_seed(0))
    assert not torch.isin(masked, torch.tensor([0, 2, 3, config.join_token_id, config.feature_token_id])).any()
    assert (masked == 4).any() and ((masked != 4) & (masked != 6)).any()  # [MASK] and random words both occur


def test_allowed_pairs_is_the_sum_of_squared_sample_lengths():
    from videobert.data import allowed_pairs

    seg = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, 2, 2]])
    assert allowed_pairs(seg) == 9 + 4 + 36


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batch_moves_to_the_gpu_without_blocking_and_intact():
    batch = random_pretraining_batch(VideoBERTConfig.tiny(), 8, 64, seed=3)
    torch.cuda.set_sync_debug_mode("error")  # a blocking copy (a stream synchronisation) raises here
    try:
        moved = batch.to("cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for name in ("input_ids", "token_type_ids", "segment_ids", "mlm_labels", "vtm_labels"):
        got, want = getattr(moved, name), getattr(batch, name)
        assert got.is_cuda and torch.equal(got.cpu(), want), name
    assert moved.video_features is None and moved.to("cpu").input_ids.device.type == "cpu"
