"""This project's kernels inside Hugging Face models (videobert.integrations.transformers) and the nn.Module
forms of the ops (videobert.modules): each matches what it replaces, in fp32, outputs and gradients."""
import copy

import pytest
import torch
import torch.nn.functional as F

from videobert.modules import AddLayerNorm, LinearCrossEntropyLoss

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers")


def _bert_config(transformers, **extra):
    return transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64, **extra)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_registered_attention_on_padded_and_packed_batches(transformers, tmp_path):
    """attn_implementation="videobert" (from_pretrained) gives SDPA's hidden states on a padded batch, and on a
    padding-free packed row (position_ids restarting per sample) each sample's hidden states run alone."""
    import videobert.integrations.transformers  # noqa: F401  (registers "videobert")

    torch.manual_seed(0)
    transformers.BertModel(_bert_config(transformers)).save_pretrained(tmp_path)
    sdpa = transformers.BertModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ours = transformers.BertModel.from_pretrained(tmp_path, attn_implementation="videobert").eval()
    ids = torch.randint(5, 120, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:], mask[2, 3:] = 0, 0
    want = sdpa(input_ids=ids, attention_mask=mask).last_hidden_state
    got = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], **TOL)
    first, second = torch.randint(5, 120, (1, 7)), torch.randint(5, 120, (1, 5))
    packed = torch.cat([first, second], 1)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    out = ours(input_ids=packed, position_ids=positions).last_hidden_state
    torch.testing.assert_close(out[:, :7], sdpa(input_ids=first).last_hidden_state, **TOL)
    torch.testing.assert_close(out[:, 7:], sdpa(input_ids=second).last_hidden_state, **TOL)


@pytest.mark.parametrize("arch", ["BertForMaskedLM", "RobertaForMaskedLM", "BertForPreTraining"])
def test_patched_model_matches_the_unpatched_one(transformers, arch):
    """apply_videobert_kernels: the attention, the fused add + LayerNorm and the MLM loss without logits give the
    unpatched model's loss and every gradient; without labels the logits are the unpatched ones."""
    from videobert.integrations.transformers import apply_videobert_kernels

    torch.manual_seed(1)
    if arch.startswith("Roberta"):
        config = transformers.RobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=64,
                                            max_position_embeddings=70, attn_implementation="sdpa")
    else:
        config = _bert_config(transformers, attn_implementation="sdpa")
    model = getattr(transformers, arch)(config).eval()
    patched = apply_videobert_kernels(copy.deepcopy(model))
    ids = torch.randint(5, 120, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    labels = torch.where(torch.rand(2, 16) < 0.3, ids, -100)
    labels[1, 11:] = -100
    extra = {"next_sentence_label": torch.tensor([0, 1])} if arch == "BertForPreTraining" else {}
    results = []
    for m in (model, patched):
        out = m(input_ids=ids, attention_mask=mask, labels=labels, **extra)
        out.loss.backward()
        results.append((out, _grads(m)))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got.loss, want.loss, **TOL)
    assert set(got_grads) == set(want_grads)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **TOL, msg=name)
    assert (got.logits if arch != "BertForPreTraining" else got.prediction_logits) is None  # never formed
    with torch.no_grad():
        logits = [m(input_ids=ids, attention_mask=mask) for m in (model, patched)]
    key = "logits" if arch != "BertForPreTraining" else "prediction_logits"
    torch.testing.assert_close(getattr(logits[1], key)[mask.bool()], getattr(logits[0], key)[mask.bool()], **TOL)


def test_registered_attention_refuses_what_it_cannot_compute(transformers):
    from videobert.integrations.transformers import videobert_attention_forward

    module = torch.nn.Module()
    q = torch.randn(2, 4, 6, 8)
    with pytest.raises(ValueError, match="2-D padding mask"):
        videobert_attention_forward(module, q, q, q, torch.ones(2, 1, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="as many key/value heads"):
        videobert_attention_forward(module, q, q[:, :2], q[:, :2], None)


def test_add_layer_norm_module_is_a_layer_norm():
    """AddLayerNorm loads nn.LayerNorm's state dict and computes LayerNorm(residual + x) (dropout in training)."""
    gen = torch.Generator().manual_seed(2)
    plain = torch.nn.LayerNorm(24, eps=1e-6)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(24, generator=gen))
        plain.bias.copy_(torch.randn(24, generator=gen))
    fused = AddLayerNorm(24, eps=1e-6, dropout=0.1).eval()
    fused.load_state_dict(plain.state_dict())
    assert set(fused.state_dict()) == set(plain.state_dict())
    x, r = (torch.randn(5, 3, 24, generator=gen, requires_grad=True) for _ in range(2))
    torch.testing.assert_close(fused(x, r), plain(x + r), **TOL)
    torch.testing.assert_close(fused(x), plain(x), **TOL)
    fused.train()
    dropped = fused(torch.ones(64, 24), torch.zeros(64, 24))
    assert not torch.allclose(dropped, plain(torch.ones(64, 24)))  # dropout is on in training
    with pytest.raises(ValueError, match="one size"):
        AddLayerNorm((4, 6))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_loss_module_is_a_linear_layer(reduction):
    """LinearCrossEntropyLoss loads nn.Linear's state dict and gives cross_entropy(linear(h), labels), with
    ignored rows, for any leading shape."""
    gen = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(16, 40)
    loss_module = LinearCrossEntropyLoss(16, 40, reduction=reduction)
    loss_module.load_state_dict(linear.state_dict())
    h = torch.randn(3, 5, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 40, (3, 5), generator=gen)
    labels[0, :2] = -100
    want = F.cross_entropy(linear(h).reshape(-1, 40), labels.reshape(-1), reduction=reduction)
    got = loss_module(h, labels)
    torch.testing.assert_close(got, want.view(labels.shape) if reduction == "none" else want, **TOL)
    with pytest.raises(ValueError, match="leading shape"):
        loss_module(h, labels[:, :3])
