"""segment_attention (and its varlen form): the op against an independent float64 computation, gradients, masks,
dropout, errors."""
import itertools
import math

import pytest
import torch

from conftest import DEVICES, OPCHECK, assert_close
from videobert._kernels import reference
from videobert.ops import segment_attention, segment_attention_varlen
from videobert.ops.attention import _segment_attention_backward_op, _segment_attention_op

JOINT = [[1, 1], [1, 1]]
LATE_FUSION = [[1, 0], [0, 1]]
PREFIX_LM = [[2, 1], [0, 1]]  # text = 0 attends video and earlier text; video = 1 attends video only
ALL_CAUSAL = [[2, 2], [2, 2]]


def naive_mask(segment_ids, modality_ids, rules):
    """The contract, element by element in Python: independent of the vectorised reference."""
    B, L = segment_ids.shape
    seg = segment_ids.tolist()
    mod = modality_ids.tolist() if modality_ids is not None else None
    allowed = torch.zeros(B, L, L, dtype=torch.bool)
    for b in range(B):
        for i in range(L):
            for j in range(L):
                ok = seg[b][i] == seg[b][j] and seg[b][i] >= 0
                if ok and rules is not None:
                    rule = rules[mod[b][i]][mod[b][j]]
                    ok = rule == 1 or (rule == 2 and j <= i)
                allowed[b, i, j] = ok
    return allowed


def naive_attention(q, k, v, allowed, scale, keep=None, p=0.0):
    """Softmax attention in float64 with autograd; rows with no allowed key give 0."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * scale
    allowed = allowed[:, None].to(scores.device)
    scores = scores.masked_fill(~allowed, -1e300)  # finite, so empty rows keep finite gradients
    probs = torch.softmax(scores, -1) * allowed
    if keep is not None:
        probs = probs * keep / (1 - p)
    return (probs @ v).transpose(1, 2)


def random_layout(kind, B, L, gen):
    """segment_ids for a named layout: packed samples, padding, one sample, unsorted ids, empty rows."""
    if kind == "single":
        return torch.zeros(B, L, dtype=torch.int64)
    if kind == "padding":
        lengths = torch.randint(0, L + 1, (B,), generator=gen)
        return torch.where(torch.arange(L)[None] < lengths[:, None], 0, -1)
    if kind == "packed":
        ids = torch.full((B, L), -1, dtype=torch.int64)
        for b in range(B):
            start, seg = 0, 0
            while start < L:
                n = int(torch.randint(1, max(2, L // 3), (), generator=gen))
                ids[b, start:start + n] = seg if torch.rand((), generator=gen) > 0.15 else -1
                start, seg = start + n, seg + 1
        return ids
    if kind == "unsorted":
        return torch.randint(-1, 4, (B, L), generator=gen)
    if kind == "all_padding":
        return torch.full((B, L), -1, dtype=torch.int64)
    raise ValueError(kind)


def make_inputs(B, L, H, D, dtype, device, gen, layout="packed", rules=None):
    """(q, k, v, segment_ids, modality_ids, rules) on `device`; modality ids and rules only with `rules`."""
    q, k, v = (torch.randn(B, L, H, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    seg = random_layout(layout, B, L, gen).to(device)
    mod = torch.randint(0, 2, (B, L), generator=gen).to(device) if rules is not None else None
    rules_t = torch.tensor(rules, device=device) if rules is not None else None
    return q, k, v, seg, mod, rules_t


@pytest.mark.parametrize("L", [1, 17, 127, 129])
@pytest.mark.parametrize("layout", ["packed", "padding", "single", "unsorted"])
@pytest.mark.parametrize("rules", [None, JOINT, LATE_FUSION, PREFIX_LM, ALL_CAUSAL])
def test_forward_and_gradients_match_float64(L, layout, rules):
    gen = torch.Generator().manual_seed(L * 31 + len(layout))
    q, k, v, seg, mod, rules_t = make_inputs(2, L, 2, 16, torch.float64, "cpu", gen, layout, rules)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = segment_attention(q, k, v, seg, mod, rules_t, backend="torch")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected = naive_attention(q, k, v, naive_mask(seg, mod, rules), 1 / math.sqrt(16))
    expected_grads = torch.autograd.grad(expected, (q, k, v), dout)
    assert_close(out, expected, torch.float64, "out")
    for name, g, e in zip("qkv", grads, expected_grads):
        assert_close(g, e, torch.float64, f"d{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64, 128])
def test_low_precision_matches_float64(device, dtype, D):
    gen = torch.Generator().manual_seed(D)
    q, k, v, seg, mod, rules = make_inputs(2, 300, 3, D, dtype, device, gen, "packed", PREFIX_LM)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = segment_attention(q, k, v, seg, mod, rules)
    assert out.dtype == dtype and out.shape == q.shape
    dout = torch.randn(out.shape, generator=gen).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = naive_attention(q64, k64, v64, reference.attention_allowed(seg, mod, rules).cpu(), D ** -0.5)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), dout.double())
    assert_close(out, expected, dtype, "out")
    for name, g, e in zip("qkv", grads, expected_grads):
        assert_close(g, e, dtype, f"d{name}")


def test_rows_without_allowed_keys_give_zeros_and_zero_gradients():
    gen = torch.Generator().manual_seed(0)
    q, k, v, _, _, _ = make_inputs(2, 9, 2, 8, torch.float32, "cpu", gen)
    seg = torch.tensor([[0, 0, -1, 1, 1, -1, -1, 2, 2], [-1] * 9])
    # modality 1 may attend nothing: those rows are fully masked even inside a sample
    mod = torch.tensor([[0, 1, 0, 0, 1, 0, 1, 1, 1], [0] * 9])
    rules = torch.tensor([[1, 1], [0, 0]])
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = segment_attention(q, k, v, seg, mod, rules)
    out.sum().backward()
    empty = ~reference.attention_allowed(seg, mod, rules).any(-1)
    assert empty.sum() > 9
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert (out[empty] == 0).all() and (q.grad[empty] == 0).all()
    # keys that no query may attend get no gradient either
    unseen = ~reference.attention_allowed(seg, mod, rules).any(1)
    assert (k.grad[unseen] == 0).all() and (v.grad[unseen] == 0).all()


def test_empty_and_length_one_inputs():
    q = torch.randn(0, 5, 2, 8, requires_grad=True)
    out = segment_attention(q, q, q, torch.zeros(0, 5, dtype=torch.long))
    assert out.shape == (0, 5, 2, 8)
    q = torch.randn(3, 1, 2, 8, dtype=torch.float64, requires_grad=True)
    out = segment_attention(q, q, q, torch.zeros(3, 1, dtype=torch.long))
    torch.testing.assert_close(out, q)  # one key: attention returns its value


def test_gradcheck_with_modality_rules_and_dropout():
    gen = torch.Generator().manual_seed(1)
    q, k, v, seg, mod, rules = make_inputs(1, 7, 2, 4, torch.float64, "cpu", gen, "packed", PREFIX_LM)
    rng = torch.tensor([1234, 5], dtype=torch.int64)
    fn = lambda q, k, v: segment_attention(q, k, v, seg, mod, rules, dropout_p=0.3, rng=rng)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (q, k, v)))


def test_dropout_keep_rate_and_same_mask_gradients():
    gen = torch.Generator().manual_seed(2)
    B, L, H, D, p = 2, 64, 4, 16, 0.25
    q, k, v, _, _, _ = make_inputs(B, L, H, D, torch.float64, "cpu", gen)
    seg = torch.zeros(B, L, dtype=torch.long)
    rng = torch.tensor([987654321, 3], dtype=torch.int64)
    keep = reference.attention_dropout_keep(987654321, 3, B, H, L, p, q.device)
    n = keep.numel()
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), rate  # five standard deviations
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = segment_attention(q, k, v, seg, dropout_p=p, rng=rng)
    expected = naive_attention(q, k, v, naive_mask(seg, None, None), D ** -0.5, keep, p)
    assert_close(out, expected, torch.float64, "out")
    dout = torch.randn_like(out)
    for name, g, e in zip("qkv", torch.autograd.grad(out, (q, k, v), dout),
                          torch.autograd.grad(expected, (q, k, v), dout)):
        assert_close(g, e, torch.float64, f"d{name}")
    # a fresh seed per call when rng is not given: two calls differ, the same torch seed reproduces
    torch.manual_seed(0)
    a = segment_attention(q, k, v, seg, dropout_p=p)
    b = segment_attention(q, k, v, seg, dropout_p=p)
    torch.manual_seed(0)
    assert not torch.equal(a, b) and torch.equal(a, segment_attention(q, k, v, seg, dropout_p=p))


def test_matches_pytorch_sdpa_on_padding_mask():
    gen = torch.Generator().manual_seed(3)
    q, k, v, seg, _, _ = make_inputs(3, 40, 2, 16, torch.float32, "cpu", gen, "padding")
    seg[:, 0] = 0  # SDPA returns NaN on fully masked rows, so keep every row non-empty
    mask = reference.attention_allowed(seg, None, None)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None]).transpose(1, 2)
    out = segment_attention(q, k, v, seg)
    rows = (seg >= 0)
    assert_close(out[rows], expected[rows], torch.float32, "out")


@OPCHECK
def test_custom_op_passes_opcheck():
    gen = torch.Generator().manual_seed(4)
    q, k, v, seg, mod, rules = make_inputs(2, 13, 2, 8, torch.float32, "cpu", gen, "packed", PREFIX_LM)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    rng = torch.tensor([7, 0], dtype=torch.int64)
    torch.library.opcheck(_segment_attention_op, (q, k, v, seg, mod, rules, 0.1, 0.35, rng, "torch"))
    torch.library.opcheck(_segment_attention_op, (q, k, v, seg, None, None, 0.0, 0.35, None, "torch"))
    # The backward op is not differentiable itself (no double backward): check it on plain tensors.
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = _segment_attention_op(q, k, v, seg, mod, rules, 0.1, 0.35, rng, "torch")
    torch.library.opcheck(_segment_attention_backward_op,
                          (torch.randn_like(out), q, k, v, out, lse, seg, mod, rules, 0.1, 0.35, rng, False, "torch"))


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(5)
    q, k, v, seg, mod, rules = make_inputs(2, 21, 2, 8, torch.float32, "cpu", gen, "packed", PREFIX_LM)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def fn(q, k, v):
        return segment_attention(q, k, v, seg, mod, rules).square().sum()

    eager = torch.autograd.grad(fn(q, k, v), (q, k, v))
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for g, e in zip(torch.autograd.grad(compiled(q, k, v), (q, k, v)), eager):
        torch.testing.assert_close(g, e)


def _args(**overrides):
    q = torch.randn(2, 5, 2, 8)
    args = dict(q=q, k=q.clone(), v=q.clone(), segment_ids=torch.zeros(2, 5, dtype=torch.long))
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, error, match", [
    (dict(q=torch.randn(2, 5, 16)), ValueError, "q must be 4-D"),
    (dict(k=torch.randn(2, 5, 2, 4)), ValueError, r"k must have shape \(2, 5, 2, 8\)"),
    (dict(k=torch.randn(2, 5, 2, 8, 1)), ValueError, r"k must have shape \(2, 5, 2, 8\), got \(2, 5, 2, 8, 1\)"),
    (dict(v=torch.randn(2, 5, 2)), ValueError, r"v must have shape \(2, 5, 2, 8\), got \(2, 5, 2\)"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be a finite number > 0"),
    (dict(softmax_scale=-0.5), ValueError, "softmax_scale must be a finite number > 0"),
    (dict(v=torch.randn(2, 5, 2, 8, dtype=torch.float64)), TypeError, "v must have the dtype of q"),
    (dict(q=torch.randint(0, 3, (2, 5, 2, 8))), TypeError, "q must have dtype in"),
    (dict(k=torch.randn(2, 5, 8, 2).transpose(-1, -2)), ValueError, "k must have unit stride"),
    (dict(segment_ids=torch.zeros(2, 6, dtype=torch.long)), ValueError, r"segment_ids must have shape \(2, 5\)"),
    (dict(segment_ids=torch.zeros(2, 5)), TypeError, "segment_ids must have dtype in"),
    (dict(modality_rules=torch.ones(2, 2, dtype=torch.long)), ValueError, "modality_ids is required"),
    (dict(modality_ids=torch.zeros(2, 5, dtype=torch.long), modality_rules=torch.ones(2, 3, dtype=torch.long)),
     ValueError, "square"),
    (dict(modality_ids=torch.zeros(2, 5, dtype=torch.long), modality_rules=torch.full((2, 2), 3)),
     ValueError, r"modality_rules values must lie in \[0, 3\)"),
    (dict(modality_ids=torch.full((2, 5), 2), modality_rules=torch.ones(2, 2, dtype=torch.long)),
     ValueError, r"modality_ids values must lie in \[0, 2\)"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    (dict(rng=torch.tensor([1, 2, 3])), ValueError, "rng must have shape"),
])
def test_bad_inputs_raise_clear_errors(overrides, error, match):
    args = _args(**overrides)
    if "rng" in overrides:
        args["dropout_p"] = 0.1
    with pytest.raises(error, match=match):
        segment_attention(**args)


def varlen_inputs(lengths, H, D, dtype, device, gen):
    """(q, k, v) of (T, H, D), cu_seqlens, and the (1, T) segment ids built sample by sample in Python."""
    T = sum(lengths)
    q, k, v = (torch.randn(T, H, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    cu_seqlens = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=device)
    seg = torch.tensor([[s for s, n in enumerate(lengths) for _ in range(n)]], dtype=torch.int64)
    return q, k, v, cu_seqlens, seg


@pytest.mark.parametrize("lengths", [[5, 0, 17, 1, 9], [1], [33], [0, 4, 0]])
@pytest.mark.parametrize("rules", [None, PREFIX_LM])
def test_varlen_matches_float64(lengths, rules):
    """segment_attention_varlen (flash-attn's cu_seqlens layout, empty samples included) gives each sample
    attention within itself, with modality rules, outputs and gradients against the naive float64 computation."""
    gen = torch.Generator().manual_seed(sum(lengths) + len(lengths))
    q, k, v, cu_seqlens, seg = varlen_inputs(lengths, 2, 16, torch.float64, "cpu", gen)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mod = torch.randint(0, 2, (q.shape[0],), generator=gen) if rules is not None else None
    rules_t = torch.tensor(rules) if rules is not None else None
    out = segment_attention_varlen(q, k, v, cu_seqlens, modality_ids=mod, modality_rules=rules_t, backend="torch")
    assert out.shape == q.shape
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    allowed = naive_mask(seg, None if mod is None else mod[None], rules)
    expected = naive_attention(q[None], k[None], v[None], allowed, 1 / math.sqrt(16))[0]
    expected_grads = torch.autograd.grad(expected, (q, k, v), dout)
    assert_close(out, expected, torch.float64, "out")
    for name, g, e in zip("qkv", grads, expected_grads):
        assert_close(g, e, torch.float64, f"d{name}")


@pytest.mark.parametrize("overrides, error, match", [
    (dict(q=torch.randn(1, 5, 2, 8)), ValueError, "q must be 3-D"),
    (dict(k=torch.randn(5, 2, 4)), ValueError, r"k must have q's shape \(5, 2, 8\)"),
    (dict(k=torch.randn(5, 1, 8), v=torch.randn(5, 1, 8)), ValueError, "grouped-query attention is not supported"),
    (dict(cu_seqlens_q=torch.tensor([0.0, 5.0])), TypeError, "cu_seqlens_q must have dtype in"),
    (dict(cu_seqlens_q=torch.tensor([[0, 5]])), ValueError, "cu_seqlens_q must be 1-D"),
    (dict(cu_seqlens_q=torch.zeros(0, dtype=torch.long)), ValueError, "at least one offset"),
    (dict(cu_seqlens_q=torch.tensor([0, 4])), ValueError, r"rise from 0 to the number of tokens \(5\)"),
    (dict(cu_seqlens_q=torch.tensor([1, 5])), ValueError, "rise from 0"),
    (dict(cu_seqlens_q=torch.tensor([0, 3, 2, 5])), ValueError, "without decreasing"),
    (dict(cu_seqlens_k=torch.tensor([0, 3, 5])), ValueError, "cu_seqlens_k must equal cu_seqlens_q"),
    (dict(max_seqlen_q=-1), ValueError, "max_seqlen_q must be a non-negative int"),
    (dict(causal=True, modality_rules=torch.ones(1, 1, dtype=torch.long)), ValueError, "pass one"),
    (dict(window_size=(4, 4)), ValueError, "does not support window_size"),
    (dict(alibi_slopes=torch.ones(2)), ValueError, "does not support alibi_slopes"),
    (dict(no_such=1), TypeError, "unexpected arguments"),
    (dict(modality_ids=torch.zeros(1, 5, dtype=torch.long)), ValueError, "modality_ids must be 1-D"),
])
def test_varlen_bad_inputs_raise_clear_errors(overrides, error, match):
    q = torch.randn(5, 2, 8)
    args = dict(q=q, k=q.clone(), v=q.clone(), cu_seqlens_q=torch.tensor([0, 2, 5]))
    args.update(overrides)
    with pytest.raises(error, match=match):
        segment_attention_varlen(**args)


def test_varlen_calls_like_flash_attn():
    """flash_attn_varlen_func's call works as is: cu_seqlens_q/_k, max_seqlen_q/_k, dropout_p, softmax_scale and
    causal positionally, window_size and friends at their defaults; causal is within each sample; with
    return_attn_probs the log-sum-exp (H, T) of each query's scores comes back, detached."""
    gen = torch.Generator().manual_seed(8)
    q, k, v, cu, seg = varlen_inputs([4, 7, 1], 2, 16, torch.float64, "cpu", gen)
    scale = 0.3
    out, lse, probs = segment_attention_varlen(q, k, v, cu, cu, 7, 7, 0.0, scale, True, True, window_size=(-1, -1),
                                               softcap=0.0, alibi_slopes=None, deterministic=False, backend="torch")
    causal_within = naive_mask(seg, None, None) & torch.ones(12, 12, dtype=torch.bool).tril()
    assert_close(out, naive_attention(q[None], k[None], v[None], causal_within, scale)[0], torch.float64, "out")
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale
    want_lse = scores.masked_fill(~causal_within[0][None], float("-inf")).logsumexp(-1)
    assert probs is None and lse.shape == (2, 12) and not lse.requires_grad
    assert_close(lse, want_lse, torch.float64, "lse")
