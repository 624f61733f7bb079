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


# ---------------------------------------------------------------- the encoder keeps transformers' contract

def _tiny():
    from videobert import VideoBERTConfig

    return VideoBERTConfig.tiny(num_visual_tokens=50, text_vocab_size=1100)


def test_save_and_load_pretrained_are_exact(tmp_path):
    """save_pretrained writes config.json + model.safetensors; from_pretrained reads them bit for bit, and an
    encoder folder and a pretraining folder load into each other's classes (heads fresh / dropped)."""
    import json

    from videobert import VideoBERTForPretraining, VideoBERTModel

    torch.manual_seed(0)
    model = VideoBERTForPretraining(_tiny())
    model.save_pretrained(tmp_path / "pre")
    saved = json.loads((tmp_path / "pre" / "config.json").read_text())
    assert saved["model_type"] == "videobert" and saved["architectures"] == ["VideoBERTForPretraining"]
    again = VideoBERTForPretraining.from_pretrained(tmp_path / "pre")
    assert again.config == model.config
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    encoder = VideoBERTModel.from_pretrained(tmp_path / "pre")
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, model.bert.state_dict()[name]), name
    encoder.save_pretrained(tmp_path / "enc")
    with_heads = VideoBERTForPretraining.from_pretrained(tmp_path / "enc")
    assert torch.equal(with_heads.bert.layers[0].qkv.weight, model.bert.layers[0].qkv.weight)
    with pytest.raises(FileNotFoundError, match="not a saved model folder"):
        VideoBERTModel.from_pretrained(tmp_path / "missing")


def test_auto_classes_load_videobert_folders(transformers, tmp_path):
    import videobert.integrations.transformers  # noqa: F401  (registers model type "videobert")
    from videobert import VideoBERTForPretraining, VideoBERTModel

    model = VideoBERTForPretraining(_tiny())
    model.save_pretrained(tmp_path)
    assert transformers.AutoConfig.from_pretrained(tmp_path).hidden_size == model.config.hidden_size
    encoder = transformers.AutoModel.from_pretrained(tmp_path)
    full = transformers.AutoModelForPreTraining.from_pretrained(tmp_path)
    assert isinstance(encoder, VideoBERTModel) and isinstance(full, VideoBERTForPretraining)
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), model.state_dict().values()))


def _hf_bert(transformers, tmp_path):
    torch.manual_seed(2)
    bert = transformers.BertForPreTraining(_bert_config(transformers, attn_implementation="eager")).eval()
    bert.save_pretrained(tmp_path)
    return bert


def test_hugging_face_style_calls_match_bert(transformers, tmp_path):
    """A Hugging Face BERT folder loads with from_pretrained; BertModel-style calls (input_ids, attention_mask,
    token_type_ids positionally; padding-free packed rows by position_ids) give transformers' eager outputs and
    gradients in fp32; output objects follow BaseModelOutputWithPooling."""
    from videobert import VideoBERTModel

    bert = _hf_bert(transformers, tmp_path).bert
    ours = VideoBERTModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(5, 120, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:], mask[2, 2:] = 0, 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    want = bert(ids, mask, types, output_hidden_states=True)
    got = ours(ids, mask, types, output_hidden_states=True)
    real = mask.bool()
    torch.testing.assert_close(got.last_hidden_state[real], want.last_hidden_state[real], **TOL)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, **TOL)
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    assert got[0] is got.last_hidden_state and got["pooler_output"] is got.pooler_output
    assert isinstance(ours(ids, mask, return_dict=False), tuple)
    (got.last_hidden_state[real].sum() + got.pooler_output.sum()).backward()
    (want.last_hidden_state[real].sum() + want.pooler_output.sum()).backward()
    torch.testing.assert_close(ours.layers[0].qkv.weight.grad[:32],
                               bert.encoder.layer[0].attention.self.query.weight.grad, **TOL)
    # padding-free: two samples in one row, positions restarting, no mask
    first, second = ids[0, :4], ids[1, :6]
    packed = torch.cat([first, second])[None]
    positions = torch.cat([torch.arange(4), torch.arange(6)])[None]
    with torch.no_grad():
        out = ours(packed, position_ids=positions).last_hidden_state
        alone = [bert(t[None]).last_hidden_state for t in (first, second)]
    torch.testing.assert_close(out[:, :4], alone[0], **TOL)
    torch.testing.assert_close(out[:, 4:], alone[1], **TOL)


def test_other_checkpoints_and_misuse_are_refused(transformers, tmp_path):
    """RoBERTa folders are refused with the reason; BertModel-style misuse raises instead of passing silently."""
    from videobert import VideoBERTModel

    roberta = transformers.RobertaModel(transformers.RobertaConfig(vocab_size=120, hidden_size=32,
                                                                     num_hidden_layers=1, num_attention_heads=2,
                                                                     intermediate_size=64))
    roberta.save_pretrained(tmp_path / "roberta")
    with pytest.raises(ValueError, match="model_type 'roberta' is not supported.*padding_idx"):
        VideoBERTModel.from_pretrained(tmp_path / "roberta")
    model = VideoBERTModel(_tiny())
    ids = torch.randint(5, 1100, (2, 6))
    with pytest.raises(ValueError, match="attention_mask values must lie in"):
        model(ids, torch.full((2, 6), 3))  # token types or segment ids where the mask goes
    with pytest.raises(ValueError, match="not both"):
        model(ids, torch.ones(2, 6, dtype=torch.long), segment_ids=torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(ids, inputs_embeds=torch.randn(2, 6, 128))
    with pytest.raises(TypeError):
        model(ids, None, None, None, None, None, None, torch.zeros(2, 6))  # segment_ids are keyword-only


def test_inputs_embeds_equal_the_word_table_lookup():
    from videobert import VideoBERTModel

    model = VideoBERTModel(_tiny()).eval()
    ids = torch.randint(5, 1100, (2, 7))
    with torch.no_grad():
        a = model(ids).last_hidden_state
        b = model(inputs_embeds=model.embeddings.word_embeddings(ids)).last_hidden_state
    torch.testing.assert_close(a, b)


def test_gradient_checkpointing_gives_identical_gradients():
    """gradient_checkpointing_enable recomputes each layer in the backward with the same dropout masks: the very
    same loss and gradients, bit for bit, with dropout on."""
    from videobert import VideoBERTForPretraining
    from videobert.data import random_pretraining_batch

    config = _tiny()
    batch = random_pretraining_batch(config, 6, 64, seed=3)
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = VideoBERTForPretraining(config)
        if checkpointing:
            model.gradient_checkpointing_enable()
        assert model.is_gradient_checkpointing == checkpointing
        torch.manual_seed(5)
        loss = model(**batch.model_inputs()).loss
        loss.backward()
        runs.append((loss.detach(), [p.grad for p in model.parameters()]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_cased_vocabularies_stay_cased(tmp_path):
    """A checkpoint's tokenizer_config.json (do_lower_case false) keeps its vocabulary cased, and saving keeps it."""
    import json

    from videobert.text_tokenizer import TextTokenizer

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Paris", "paris"]))
    assert TextTokenizer.from_vocab(tmp_path / "vocab.txt").encode("Paris") == [6]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    cased = TextTokenizer.from_vocab(tmp_path / "vocab.txt")
    assert cased.encode("Paris") == [5] and not cased.lowercase
    cased.save(tmp_path / "run")
    assert TextTokenizer.from_vocab(tmp_path / "run" / "vocab.txt").encode("Paris") == [5]
