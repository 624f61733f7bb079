"""Property-based tests of the public ops (hypothesis): random shapes (zero-size included), dtypes, strides
(non-contiguous, expanded), id and label values, NaN/inf contents. Every call either matches a plain-PyTorch
computation written here (fp64) or raises ValueError/TypeError naming one of the op's arguments."""
import math

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is a dev dependency (pip install -e .[dev])")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from videobert.ops import add_layer_norm, linear_cross_entropy, segment_attention  # noqa: E402

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64])
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2}  # of the fp64 computation


def _tensor(draw, shape, dtype, special: bool):
    """A random tensor, possibly non-contiguous (a transposed copy) or holding NaN/inf."""
    if dtype == torch.int64:
        return torch.randint(-3, 4, shape)
    t = torch.randn(shape, dtype=torch.float64).to(dtype)
    if special and t.numel():
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    if len(shape) >= 2 and draw(st.booleans()):  # same values, other strides
        t = t.transpose(0, 1).contiguous().transpose(0, 1)
    return t


def _raises_named(call, names):
    """Run `call`; None if it returned, else check the error is ValueError/TypeError naming an argument."""
    try:
        return call()
    except (ValueError, TypeError) as exc:
        assert any(name in str(exc) for name in names), f"{type(exc).__name__} names no argument: {exc}"
        return None


def _close(actual, expected, dtype):
    """Close where finite; non-finite (NaN or an infinity: which one is arithmetic detail) exactly where expected."""
    actual = actual.double()
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), (actual, expected)
    torch.testing.assert_close(actual[finite], expected[finite], rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@SETTINGS
@given(st.data())
def test_segment_attention_matches_dense_masking_or_names_the_argument(data):
    B, L, H, D = (data.draw(st.integers(0, 2)), data.draw(st.integers(0, 9)), data.draw(st.integers(1, 2)),
                  data.draw(st.sampled_from([1, 8, 16])))
    dtype, special = data.draw(DTYPES), data.draw(st.booleans())
    q, k, v = (_tensor(data.draw, (B, L, H, D), dtype, special) for _ in range(3))
    if data.draw(st.booleans()):  # a key of another shape, or an expanded (stride-0) value
        k = k[:, :, :, : max(D - 1, 0)] if data.draw(st.booleans()) else k
        v = v[:1].expand(B, L, H, D) if B and data.draw(st.booleans()) else v
    segment_ids = torch.randint(-1, 3, (B, L))
    if data.draw(st.booleans()):
        segment_ids = segment_ids.to(torch.float32) if data.draw(st.booleans()) else segment_ids[:, : max(L - 1, 0)]
    scale = data.draw(st.sampled_from([None, 0.5, math.nan, -1.0, 0.0]))
    out = _raises_named(lambda: segment_attention(q, k, v, segment_ids, softmax_scale=scale),
                        ("q", "k", "v", "segment_ids", "softmax_scale"))
    if out is None:
        return
    assert out.shape == q.shape and out.dtype == q.dtype
    qd, kd, vd = q.double(), k.double(), v.double()
    scores = torch.einsum("blhd,bmhd->bhlm", qd, kd) * (scale or 1 / math.sqrt(D))
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] >= 0)
    scores = scores.masked_fill(~allowed[:, None], -math.inf)
    probs = torch.softmax(scores, dim=-1).masked_fill(~allowed[:, None], 0.0)
    probs = probs.masked_fill(~allowed[:, None].any(-1, keepdim=True), 0.0)  # rows with no key give zeros
    expected = torch.einsum("bhlm,bmhd->blhd", probs, vd)
    if special:  # where a NaN or inf spreads is the summation order's business; the finite rest must agree
        both = torch.isfinite(out.double()) & torch.isfinite(expected)
        out, expected = out[both], expected[both]
    _close(out, expected, dtype)


@SETTINGS
@given(st.data())
def test_add_layer_norm_matches_layer_norm_or_names_the_argument(data):
    rows, width = data.draw(st.integers(0, 5)), data.draw(st.integers(0, 40))
    dtype, special = data.draw(DTYPES), data.draw(st.booleans())
    x = _tensor(data.draw, (rows, width), dtype, special)
    residual = _tensor(data.draw, (rows, width), dtype, False) if data.draw(st.booleans()) else None
    weight = _tensor(data.draw, (width if data.draw(st.integers(0, 5)) else width + 1,), dtype, False)
    bias = _tensor(data.draw, (width,), dtype, False) if data.draw(st.booleans()) else None
    eps = data.draw(st.sampled_from([1e-5, 0.0, -1.0, math.nan]))
    out = _raises_named(lambda: add_layer_norm(x, residual, weight, bias, eps),
                        ("x", "residual", "weight", "bias", "eps"))
    if out is None:
        return
    s = x.double() + (residual.double() if residual is not None else 0)
    expected = F.layer_norm(s, (width,), weight.double(), None if bias is None else bias.double(), eps)
    assert out.shape == x.shape and out.dtype == x.dtype
    _close(out, expected, dtype)


@SETTINGS
@given(st.data())
def test_linear_cross_entropy_matches_cross_entropy_or_names_the_argument(data):
    n, d, vocab = data.draw(st.integers(0, 6)), data.draw(st.integers(1, 12)), data.draw(st.integers(1, 30))
    dtype, special = data.draw(DTYPES), data.draw(st.booleans())
    hidden = _tensor(data.draw, (n, d), dtype, special)
    weight = _tensor(data.draw, (vocab, d if data.draw(st.integers(0, 5)) else d + 1), dtype, False)
    bias = _tensor(data.draw, (vocab,), dtype, False) if data.draw(st.booleans()) else None
    labels = torch.randint(-1 if data.draw(st.booleans()) else 0, vocab + data.draw(st.integers(0, 1)), (n,))
    labels[labels == -1] = -100
    if data.draw(st.integers(0, 5)) == 0:
        labels = labels.float()
    reduction = data.draw(st.sampled_from(["mean", "sum", "none", "avg"]))
    loss = _raises_named(lambda: linear_cross_entropy(hidden, weight, labels, bias, reduction=reduction),
                         ("hidden", "weight", "labels", "bias", "reduction"))
    if loss is None:
        return
    logits = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    expected = F.cross_entropy(logits, labels, ignore_index=-100, reduction=reduction)
    if reduction == "mean" and not (labels != -100).any():
        expected = torch.zeros((), dtype=torch.float64)  # the op's documented mean over no rows
    _close(loss, expected, dtype)
