"""The encoder and pretraining heads: shapes, packed == padded, masks, Hugging Face BERT equivalence."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, TOLERANCES, triton_device
from videobert import VideoBERTConfig, VideoBERTForPretraining, VideoBERTModel, segment_positions
from videobert.data import encode_sample, pack_samples, random_pretraining_batch


def small_config(**overrides):
    """A two-layer, 32-wide config without dropout (overrides applied)."""
    return VideoBERTConfig(**{**dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                     max_position_embeddings=64, text_vocab_size=1000, num_visual_tokens=144,
                                     hidden_dropout=0.0, attention_dropout=0.0), **overrides})


def test_presets_and_vocabulary_layout():
    base, large = VideoBERTConfig.base(), VideoBERTConfig.large()
    assert (base.num_layers, base.hidden_size, base.num_heads) == (12, 768, 12)
    assert (large.num_layers, large.hidden_size, large.num_heads, large.intermediate_size) == (24, 1024, 16, 4096)
    assert base.vocab_size == 30522 + 2 + 20736 and base.visual_offset == 30524
    assert (base.join_token_id, base.feature_token_id) == (30522, 30523)
    tiny = VideoBERTConfig.preset("tiny")
    assert tiny.num_layers == 2 and VideoBERTConfig.from_dict(tiny.to_dict()) == tiny
    with pytest.raises(ValueError, match="divisible by num_heads"):
        VideoBERTConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="unk_token_id must be a word-piece id"):
        VideoBERTConfig(text_vocab_size=50)
    with pytest.raises(ValueError, match="preset must be one of"):
        VideoBERTConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown VideoBERTConfig fields"):
        VideoBERTConfig.from_dict({"hidden": 3})


def test_segment_positions_restart_per_sample_in_any_order():
    seg = torch.tensor([[0, 0, 0, 1, 1, -1, -1], [2, 0, 2, 0, 2, 1, -1]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 0], [0, 0, 1, 1, 2, 0, 0]])
    assert torch.equal(segment_positions(seg), expected)


def _samples(config, lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [encode_sample(config, torch.randint(999, config.text_vocab_size, (t,), generator=gen).tolist(),
                          torch.randint(0, config.num_visual_tokens, (v,), generator=gen).tolist())
            for t, v in lengths]


@pytest.mark.parametrize("device", DEVICES)
def test_packed_and_padded_batches_give_the_same_outputs(device):
    config = small_config()
    model = VideoBERTModel(config).to(device).eval()
    samples = _samples(config, [(5, 9), (1, 1), (12, 14), (7, 3)])
    packed_ids, packed_types, packed_seg = pack_samples(samples, 64)
    assert packed_ids.shape[0] == 1  # all four samples share one row
    longest = max(ids.numel() for ids, _ in samples)
    padded = [pack_samples([s], longest) for s in samples]
    padded_ids, padded_types, padded_seg = (torch.cat([p[i] for p in padded]) for i in range(3))
    with torch.no_grad():
        out_packed = model(packed_ids.to(device), token_type_ids=packed_types.to(device),
                           segment_ids=packed_seg.to(device)).last_hidden_state
        out_padded = model(padded_ids.to(device), token_type_ids=padded_types.to(device),
                           segment_ids=padded_seg.to(device)).last_hidden_state
    tokens_packed = out_packed[packed_seg.to(device) >= 0]
    tokens_padded = out_padded[padded_seg.to(device) >= 0]
    torch.testing.assert_close(tokens_packed, tokens_padded, rtol=1e-5, atol=1e-5)


def test_modality_rules_isolate_text_from_video():
    config = small_config()
    model = VideoBERTModel(config).eval()
    ids, types = encode_sample(config, [1000 - 5, 1000 - 6, 1000 - 7], [1, 2, 3, 4])
    ids, types = ids[None], types[None]
    late_fusion = torch.tensor([[1, 0], [0, 1]])
    other_video = ids.clone()
    other_video[types == 1] = config.visual_offset + 100
    with torch.no_grad():
        a = model(ids, token_type_ids=types, modality_rules=late_fusion).last_hidden_state
        b = model(other_video, token_type_ids=types, modality_rules=late_fusion).last_hidden_state
        c = model(other_video, token_type_ids=types).last_hidden_state  # joint: text now sees the changed video
    text = types[0] == 0
    torch.testing.assert_close(a[0, text], b[0, text])
    assert not torch.allclose(a[0, text], c[0, text])


def test_video_features_replace_feat_positions():
    config = small_config(video_feature_dim=16)
    model = VideoBERTModel(config).eval()
    ids = torch.tensor([[config.cls_token_id, 1005, config.join_token_id, config.feature_token_id,
                         config.feature_token_id, config.sep_token_id]])
    types = torch.tensor([[0, 0, 0, 1, 1, 1]])
    feats = torch.randn(1, 6, 16)
    with torch.no_grad():
        a = model(ids, token_type_ids=types, video_features=feats).last_hidden_state
        feats2 = feats.clone()
        feats2[0, 0] += 1.0  # not a [FEAT] position: ignored
        b = model(ids, token_type_ids=types, video_features=feats2).last_hidden_state
        feats2[0, 3] += 1.0
        c = model(ids, token_type_ids=types, video_features=feats2).last_hidden_state
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match=r"video_features must have shape \(1, 6, 16\)"):
        model(ids, token_type_ids=types, video_features=torch.randn(1, 6, 8))
    with pytest.raises(ValueError, match="no video_feature_dim"):
        VideoBERTModel(small_config())(ids, token_type_ids=types, video_features=feats)


def test_bad_model_inputs_raise_clear_errors():
    config = small_config()
    model = VideoBERTModel(config)
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="input_ids must be an integer"):
        model(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"input_ids values must lie in \[0, 1146\)"):
        model(torch.full((2, 5), config.vocab_size))
    with pytest.raises(ValueError, match="segment_ids must have the shape of input_ids"):
        model(ids, segment_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="token_type_ids values"):
        model(ids, token_type_ids=torch.full((2, 5), 2))
    with pytest.raises(ValueError, match="longer than max_position_embeddings"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_encoder_compiles_fullgraph():
    config = small_config()
    model = VideoBERTModel(config).eval()
    batch = random_pretraining_batch(config, 4, 48, seed=1)
    with torch.no_grad():
        eager = model(batch.input_ids, token_type_ids=batch.token_type_ids,
                      segment_ids=batch.segment_ids).last_hidden_state
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(
            batch.input_ids, token_type_ids=batch.token_type_ids, segment_ids=batch.segment_ids).last_hidden_state
    torch.testing.assert_close(compiled, eager)


def test_head_positions_are_the_masked_and_cls_positions_in_row_order():
    from videobert.model import _head_positions
    config = small_config()
    batch = random_pretraining_batch(config, 9, 64, seed=4)
    labels, types, ids = batch.mlm_labels.flatten(), batch.token_type_ids.flatten(), batch.input_ids.flatten()
    text, visual, cls = _head_positions(batch.input_ids, batch.token_type_ids, batch.mlm_labels, config.cls_token_id)
    assert torch.equal(text, ((labels != -100) & (types == 0)).nonzero().squeeze(1))
    assert torch.equal(visual, ((labels != -100) & (types != 0)).nonzero().squeeze(1))
    assert torch.equal(cls, (ids == config.cls_token_id).nonzero().squeeze(1))
    assert text.numel() > 0 and visual.numel() > 0 and cls.numel() == 9
    _, _, cls_only = _head_positions(batch.input_ids, batch.token_type_ids, None, config.cls_token_id)
    assert torch.equal(cls_only, cls)


def test_static_batch_gives_the_same_losses_and_gradients():
    """static_batch pads rows and the heads' gather indices to fixed capacities; the losses, accuracies, counts
    and every gradient equal those of the batch as made."""
    from videobert.data import static_batch

    config = small_config()
    batch = random_pretraining_batch(config, 9, 64, seed=4)
    static = static_batch(batch, config, row_multiple=8, capacity_multiple=64)
    assert static.input_ids.shape == (8, 64) and batch.input_ids.shape[0] < 8
    assert [t.numel() for t in static.head_positions[:3]] == [64, 64, 64]
    assert static.vtm_labels.shape == (64,) and static.head_positions.counts[2] == 9
    model = VideoBERTForPretraining(config).eval()
    runs = []
    for inputs in (batch.model_inputs(), static.model_inputs()):
        model.zero_grad()
        out = model(**inputs)
        out["loss"].backward()
        runs.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = runs
    for key in want:
        torch.testing.assert_close(got[key].float(), want[key].float(), rtol=1e-5, atol=1e-6, msg=key)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    broken = random_pretraining_batch(config, 9, 64, seed=4)
    broken.vtm_labels = broken.vtm_labels[:-1]
    with pytest.raises(ValueError, match="one entry per \\[CLS\\] token"):
        static_batch(broken, config)


def test_pretraining_step_compiles_fullgraph():
    """torch.compile(fullgraph=True) of the pretraining model's forward and backward on a static batch: no graph
    break, no data-dependent shape, no host read (what CUDA-graph capture needs), the eager losses and gradients."""
    from videobert.data import static_batch

    config = small_config()
    static = static_batch(random_pretraining_batch(config, 6, 64, seed=2), config, capacity_multiple=64)
    model = VideoBERTForPretraining(config).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    grads = []
    for run in (model, compiled):
        model.zero_grad()
        loss = run(**static.model_inputs())["loss"]
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    for got, want in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pretraining_forward_synchronises_once():
    import warnings
    config = small_config()
    model = VideoBERTForPretraining(config).cuda()
    batch = random_pretraining_batch(config, 6, 64, seed=2).to("cuda")
    model(**batch.model_inputs())  # compile and autotune (benchmarking synchronises) before counting
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(**batch.model_inputs())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


def test_pretraining_losses_gradients_and_masked_only_head():
    config = small_config(hidden_dropout=0.1, attention_dropout=0.1)
    model = VideoBERTForPretraining(config)
    batch = random_pretraining_batch(config, 6, 64, seed=2)
    seen = []
    model.mlm_transform.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape[0]))
    out = model(**batch.model_inputs())
    n_masked = int((batch.mlm_labels != -100).sum())
    assert seen == [n_masked] and n_masked > 0
    for key in ("loss", "text_mlm_loss", "visual_mlm_loss", "vtm_loss", "text_mlm_acc", "visual_mlm_acc", "vtm_acc"):
        assert key in out and torch.isfinite(out[key]), key
    total = out["text_mlm_loss"] + out["visual_mlm_loss"] + out["vtm_loss"]
    torch.testing.assert_close(out["loss"], total)
    assert int(out["text_mlm_count"] + out["visual_mlm_count"]) == n_masked
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


@pytest.mark.parametrize("autocast", [None, torch.float16])
def test_pretraining_step_through_the_triton_kernels_matches_the_reference_ops(autocast):
    """The fused training path (attention, add + LayerNorm, linear and softmax cross-entropy all through Triton,
    in the interpreter on the CPU) gives the reference ops' losses, counts and every parameter's gradient, in
    fp32 and under fp16 autocast (fp32 weights beside half activations in every fused op, as bf16 autocast on a
    GPU; the interpreter's bf16 dots are not exact, so fp16 stands in)."""
    pytest.importorskip("triton")
    device = triton_device()
    runs = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        config = small_config(backend=backend)
        model = VideoBERTForPretraining(config).to(device)
        with torch.autocast(device, autocast or torch.bfloat16, enabled=autocast is not None):
            out = model(**random_pretraining_batch(config, 4, 48, seed=5).to(device).model_inputs())
        out["loss"].backward()
        runs.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (ref, ref_grads), (fused, fused_grads) = runs
    rtol, atol = (1e-4, 1e-5) if autocast is None else TOLERANCES[autocast]
    for key, value in ref.items():
        torch.testing.assert_close(fused[key].float(), value.float(), rtol=rtol, atol=atol, msg=key)
    assert ref_grads.keys() == fused_grads.keys()
    for name, grad in ref_grads.items():
        assert fused_grads[name] is not None, name
        if autocast is None:
            torch.testing.assert_close(fused_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
        else:  # two half-precision computations: compared relative to the gradient's scale
            assert (fused_grads[name] - grad).abs().max() <= 3e-2 * grad.abs().max() + 1e-6, name


def test_pretraining_under_cpu_bf16_autocast():
    config = small_config()
    model = VideoBERTForPretraining(config)
    batch = random_pretraining_batch(config, 4, 48, seed=3)
    with torch.autocast("cpu", torch.bfloat16):
        out = model(**batch.model_inputs())
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.bert.layers[0].qkv.weight.grad is not None


def test_vtm_labels_must_match_cls_count():
    config = small_config()
    model = VideoBERTForPretraining(config)
    batch = random_pretraining_batch(config, 4, 48, seed=4)
    with pytest.raises(ValueError, match="vtm_labels must have one entry per"):
        model(batch.input_ids, token_type_ids=batch.token_type_ids, segment_ids=batch.segment_ids,
              vtm_labels=batch.vtm_labels[:-1])


# ---------------------------------------------------------------- Hugging Face BERT

@pytest.fixture
def transformers():
    """The transformers package; only the tests that compare with Hugging Face skip without it."""
    return pytest.importorskip("transformers")


def _bert_config(transformers):
    """A small BertConfig (3 layers, 64 wide, 1000 word pieces)."""
    return transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                   intermediate_size=128, max_position_embeddings=64)


def _padded_batch(gen, vocab=1000):
    """(ids, token types, attention mask) of four right-padded rows of lengths 17, 5, 1 and 32."""
    lengths = torch.tensor([17, 5, 1, 32])
    ids = torch.randint(0, vocab, (4, 32), generator=gen)
    attention = (torch.arange(32)[None] < lengths[:, None]).long()
    types = (torch.arange(32)[None] >= (lengths[:, None] // 2)).long() * attention
    return ids, types, attention


def test_hidden_states_match_hugging_face_bert(transformers):
    torch.manual_seed(0)
    bert = transformers.BertModel(_bert_config(transformers), add_pooling_layer=False).eval()
    model = VideoBERTModel.from_bert(bert).eval()
    gen = torch.Generator().manual_seed(0)
    ids, types, attention = _padded_batch(gen)
    with torch.no_grad():
        expected = bert(input_ids=ids, token_type_ids=types, attention_mask=attention).last_hidden_state
        ours = model(ids, attention, types).last_hidden_state  # BertModel's positional order
    real = attention.bool()
    torch.testing.assert_close(ours[real], expected[real], rtol=1e-5, atol=1e-5)
    # the word table grew by the extra specials and the visual tokens; BERT's rows are unchanged
    assert model.embeddings.word_embeddings.weight.shape[0] == 1000 + 2 + 20736
    torch.testing.assert_close(model.embeddings.word_embeddings.weight[:1000], bert.embeddings.word_embeddings.weight)


def test_pretraining_heads_match_bert_for_pretraining(transformers):
    torch.manual_seed(1)
    bert = transformers.BertForPreTraining(_bert_config(transformers)).eval()
    model = VideoBERTForPretraining.from_bert(bert).eval()
    gen = torch.Generator().manual_seed(1)
    ids, types, attention = _padded_batch(gen)
    ids[:, 0] = 101  # each sample starts with [CLS]
    labels = torch.where((torch.rand(ids.shape, generator=gen) < 0.3) & attention.bool(), ids, -100)
    labels[:, 0] = -100
    vtm = torch.tensor([1, 0, 1, 1])
    with torch.no_grad():
        hf = bert(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=attention)
        ours = model(ids, attention, torch.zeros_like(ids), mlm_labels=labels, vtm_labels=vtm)
    expected_mlm = F.cross_entropy(hf.prediction_logits.flatten(0, 1), labels.flatten())
    expected_vtm = F.cross_entropy(hf.seq_relationship_logits, 1 - vtm)  # BERT's class 0 is "is next"
    torch.testing.assert_close(ours["text_mlm_loss"], expected_mlm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["vtm_loss"], expected_vtm, rtol=1e-5, atol=1e-5)
    assert int(ours["visual_mlm_count"]) == 0 and float(ours["visual_mlm_loss"]) == 0.0


def test_from_bert_state_dict_needs_a_matching_config(transformers):
    bert = transformers.BertModel(_bert_config(transformers), add_pooling_layer=False)
    with pytest.raises(ValueError, match="config is required"):
        VideoBERTModel.from_bert(bert.state_dict())
    config = VideoBERTConfig.from_bert_config(bert.config)
    model = VideoBERTModel.from_bert(bert.state_dict(), config)
    torch.testing.assert_close(model.layers[2].ffn_out.weight, bert.encoder.layer[2].output.dense.weight)
    with pytest.raises(ValueError, match="BERT word table is"):
        VideoBERTModel.from_bert(bert.state_dict(), VideoBERTConfig.from_bert_config(bert.config, text_vocab_size=999))
    with pytest.raises(KeyError, match="no 'encoder.layer.0.attention.self.query.weight'"):
        VideoBERTModel.from_bert({k: v for k, v in bert.state_dict().items() if "layer.0.attention.self" not in k},
                                 config)
