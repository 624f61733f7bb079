"""linear_cross_entropy and softmax_cross_entropy against float64 F.cross_entropy with autograd."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, OPCHECK, assert_close, triton_device
from videobert.ops import linear_cross_entropy, softmax_cross_entropy
from videobert.ops.cross_entropy import (_linear_ce_backward_op, _linear_ce_op, _softmax_ce_backward_op,
                                         _softmax_ce_op)


def expected_loss(logits64, labels, ignore_index, label_smoothing, reduction):
    """F.cross_entropy in float64, with `mean` over no valid rows defined as 0 like the op."""
    loss = F.cross_entropy(logits64, labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction=reduction)
    if reduction == "mean" and not bool((labels != ignore_index).any()):
        loss = (logits64 * 0).sum()
    return loss


def make_labels(N, V, gen, ignored_fraction=0.3, ignore_index=-100):
    """N targets in [0, V), about `ignored_fraction` of them `ignore_index`."""
    labels = torch.randint(0, V, (N,), generator=gen)
    return torch.where(torch.rand(N, generator=gen) < ignored_fraction, ignore_index, labels)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N, D, V", [(1, 64, 7), (33, 64, 1000), (17, 128, 30522), (5, 96, 20738)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_cross_entropy_matches_float64(device, dtype, N, D, V, reduction, with_bias):
    gen = torch.Generator().manual_seed(N * V + D)
    hidden = torch.randn(N, D, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=gen) * D ** -0.5).to(device, dtype).requires_grad_()
    bias = (0.1 * torch.randn(V, generator=gen)).to(device, dtype).requires_grad_() if with_bias else None
    labels = make_labels(N, V, gen).to(device)
    smoothing = 0.1 if reduction != "sum" else 0.0
    loss = linear_cross_entropy(hidden, weight, labels, bias, label_smoothing=smoothing, reduction=reduction)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    upstream = torch.randn(loss.shape, generator=gen).to(device, loss.dtype)
    params = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad(loss, params, upstream)

    p64 = [t.detach().double().requires_grad_() for t in params]
    logits = F.linear(p64[0], p64[1], p64[2] if with_bias else None)
    expected = expected_loss(logits, labels, -100, smoothing, reduction)
    e_grads = torch.autograd.grad(expected, p64, upstream.double())
    assert_close(loss, expected, torch.float32 if dtype != torch.float64 else dtype, "loss")
    for name, g, e in zip(("dhidden", "dweight", "dbias"), grads, e_grads):
        assert g.dtype == dtype
        assert_close(g, e, dtype, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_softmax_cross_entropy_matches_float64(device, dtype, reduction, label_smoothing):
    gen = torch.Generator().manual_seed(11)
    N, V = 29, 30522
    logits = (3 * torch.randn(N, V, generator=gen)).to(device, dtype).requires_grad_()
    labels = make_labels(N, V, gen, ignore_index=7).to(device)  # a non-default ignore_index inside [0, V)
    loss = softmax_cross_entropy(logits, labels, ignore_index=7, label_smoothing=label_smoothing, reduction=reduction)
    upstream = torch.randn(loss.shape, generator=gen).to(device, loss.dtype)
    (grad,) = torch.autograd.grad(loss, logits, upstream)
    l64 = logits.detach().double().requires_grad_()
    expected = expected_loss(l64, labels, 7, label_smoothing, reduction)
    assert_close(loss, expected, torch.float32 if dtype != torch.float64 else dtype, "loss")
    assert_close(grad, torch.autograd.grad(expected, l64, upstream.double())[0], dtype, "dlogits")


def test_huge_logits_do_not_overflow():
    gen = torch.Generator().manual_seed(2)
    logits = (1e4 * torch.randn(8, 5000, generator=gen)).half().requires_grad_()
    labels = torch.randint(0, 5000, (8,), generator=gen)
    loss = softmax_cross_entropy(logits, labels)
    loss.backward()
    expected = F.cross_entropy(logits.detach().double(), labels)
    assert torch.isfinite(loss) and torch.isfinite(logits.grad.float()).all()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-2)
    hidden = (100 * torch.randn(8, 64, generator=gen)).requires_grad_()
    weight = (100 * torch.randn(3000, 64, generator=gen)).requires_grad_()  # logits of magnitude ~1e5
    loss = linear_cross_entropy(hidden, weight, labels % 3000)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_zero_loss_and_zero_grads(reduction):
    hidden = torch.randn(4, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    labels = torch.full((4,), -100)
    loss = linear_cross_entropy(hidden, weight, labels, bias, reduction=reduction, label_smoothing=0.1)
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    for t in (hidden, weight, bias):
        assert torch.equal(t.grad, torch.zeros_like(t))
    empty = linear_cross_entropy(hidden[:0], weight, labels[:0], reduction=reduction)
    assert empty.numel() == (0 if reduction == "none" else 1) and not torch.isnan(empty).any()


def test_stats_lse_gradient_and_accuracy():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(12, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    logits64 = hidden.detach() @ weight.detach().T
    labels = logits64.argmax(-1)
    labels[:5] = (labels[:5] + 1) % 40  # five wrong
    labels[-2:] = -100  # two ignored (one of them correct before)
    res = linear_cross_entropy(hidden, weight, labels, return_stats=True)
    assert int(res.num_correct) == 12 - 5 - 2
    z_loss = 1e-2 * res.lse.square().sum()
    grads = torch.autograd.grad(res.loss + z_loss, (hidden, weight))
    h64, w64 = (t.detach().clone().requires_grad_() for t in (hidden, weight))
    logits = h64 @ w64.T
    valid = labels != -100
    expected = F.cross_entropy(logits, labels) + 1e-2 * torch.logsumexp(logits[valid], -1).square().sum()
    for g, e in zip(grads, torch.autograd.grad(expected, (h64, w64))):
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(res.lse[valid], torch.logsumexp(logits64[valid], -1))
    assert (res.lse[~valid] == 0).all()


def test_gradcheck():
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 8, -100, 3, 3, 1])
    fn = lambda h, w, b: linear_cross_entropy(h, w, labels, b, label_smoothing=0.1, reduction="none")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))
    fn = lambda z: softmax_cross_entropy(z, labels, label_smoothing=0.3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (torch.randn(6, 9, dtype=torch.float64, requires_grad=True),))


@OPCHECK
def test_custom_ops_pass_opcheck():
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(7, 16, generator=gen, requires_grad=True)
    weight = torch.randn(33, 16, generator=gen, requires_grad=True)
    bias = torch.randn(33, generator=gen, requires_grad=True)
    labels = torch.tensor([0, 32, -100, 4, 4, 1, 9])
    torch.library.opcheck(_linear_ce_op, (hidden, weight, labels, bias, -100, 0.1, "torch"))
    torch.library.opcheck(_linear_ce_op, (hidden, weight, labels, None, -100, 0.0, "torch"))
    logits = torch.randn(7, 33, generator=gen, requires_grad=True)
    torch.library.opcheck(_softmax_ce_op, (logits, labels, -100, 0.1, "torch"))
    hidden, weight, bias, logits = (t.detach() for t in (hidden, weight, bias, logits))
    dloss, dlse = torch.randn(7), torch.randn(7)
    _, lse, _ = _linear_ce_op(hidden, weight, labels, bias, -100, 0.1, "torch")
    torch.library.opcheck(_linear_ce_backward_op, (dloss, dlse, hidden, weight, labels, bias, lse, -100, 0.1, "torch"))
    torch.library.opcheck(_linear_ce_backward_op, (dloss, None, hidden, weight, labels, None, lse, -100, 0.1, "torch"))
    _, lse, _ = _softmax_ce_op(logits, labels, -100, 0.1, "torch")
    torch.library.opcheck(_softmax_ce_backward_op, (dloss, dlse, logits, labels, lse, -100, 0.1, "torch"))


def test_torch_compile_fullgraph():
    hidden = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(30, 16, requires_grad=True)
    labels = torch.tensor([0, 1, 2, -100, 4, 5, 29, 7, 8])

    def fn(hidden, weight):
        res = linear_cross_entropy(hidden, weight, labels, return_stats=True)
        return res.loss + softmax_cross_entropy(hidden @ weight.T, labels) + 1e-3 * res.lse.sum()

    eager = torch.autograd.grad(fn(hidden, weight), (hidden, weight))
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for g, e in zip(torch.autograd.grad(compiled(hidden, weight), (hidden, weight)), eager):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(hidden=torch.randn(4, 8, 1)), ValueError, "hidden must be 2-D"),
    (dict(weight=torch.randn(10, 7)), ValueError, r"weight must have shape \(\*, 8\)"),
    (dict(weight=torch.randn(10, 8, dtype=torch.float64)), TypeError, "weight must have the dtype of hidden"),
    (dict(bias=torch.randn(9)), ValueError, r"bias must have shape \(10\)"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, r"labels must have shape \(4\)"),
    (dict(labels=torch.zeros(4)), TypeError, "labels must have dtype in"),
    (dict(labels=torch.tensor([0, 1, 10, 2])), ValueError,
     r"labels values must lie in \[0, 10\) or equal -100; found 10"),
    (dict(labels=torch.tensor([0, -1, 1, 2])), ValueError, "found -1"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(weight=torch.randn(0, 8), bias=None), ValueError, "vocabulary size"),
])
def test_linear_bad_inputs_raise_clear_errors(overrides, error, match):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8), labels=torch.tensor([0, 1, 9, -100]),
                bias=torch.randn(10))
    args.update(overrides)
    with pytest.raises(error, match=match):
        linear_cross_entropy(**args)


def test_softmax_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="logits must be 2-D"):
        softmax_cross_entropy(torch.randn(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels values must lie in \[0, 3\)"):
        softmax_cross_entropy(torch.randn(2, 3), torch.tensor([0, 3]))


# The interpreter computes tl.dot on bf16 operands wrongly, so bf16 runs on a GPU only.
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("N, D, V", [(1, 64, 7), (33, 64, 1000), (9, 96, 2053)])
@pytest.mark.parametrize("reduction, smoothing", [("mean", 0.1), ("sum", 0.0), ("none", 0.2)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_triton_linear_cross_entropy_matches_float64(dtype, N, D, V, reduction, smoothing, with_bias):
    device = triton_device()
    gen = torch.Generator().manual_seed(N * V + D + with_bias)
    hidden = torch.randn(N, D, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=gen) * D ** -0.5).to(device, dtype).requires_grad_()
    bias = (0.1 * torch.randn(V, generator=gen)).to(device, dtype).requires_grad_() if with_bias else None
    labels = make_labels(N, V, gen, ignored_fraction=0.3 if N > 1 else 0.0).to(device)
    result = linear_cross_entropy(hidden, weight, labels, bias, label_smoothing=smoothing, reduction=reduction,
                                  return_stats=True, backend="triton")
    upstream = torch.randn(result.loss.shape, generator=gen).to(device)
    lse_upstream = torch.randn(N, generator=gen).to(device)  # a z-loss-like gradient through lse
    params = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad((result.loss, result.lse), params, (upstream, lse_upstream))

    p64 = [t.detach().double().requires_grad_() for t in params]
    logits = F.linear(p64[0], p64[1], p64[2] if with_bias else None)
    expected = expected_loss(logits, labels, -100, smoothing, reduction)
    valid = labels != -100
    e_lse = torch.where(valid, torch.logsumexp(logits, -1), 0.0)
    e_grads = torch.autograd.grad((expected, e_lse), p64, (upstream.double(), lse_upstream.double()))
    assert_close(result.loss, expected, torch.float32, "loss")
    assert_close(result.lse, e_lse, torch.float32, "lse")
    e_correct = (valid & (logits.gather(1, labels.clamp(min=0)[:, None])[:, 0] >= logits.max(-1).values)).sum()
    assert int(result.num_correct) == int(e_correct)
    for name, g, e in zip(("dhidden", "dweight", "dbias"), grads, e_grads):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        assert_close(g, e, dtype, name)


@pytest.mark.parametrize("method, splits, N", [("fused", None, 37), ("fused", 1, 37), ("fused", 3, 37),
                                               ("fused", 40, 37), ("fused", 3, 1), ("chunked", None, 37)])
def test_triton_linear_forward_methods_match_float64(method, splits, N):
    """Both forward algorithms of the Triton backend (bench/tune.py picks the default) give the reference's
    per-row loss, lse and accuracy, with bias, smoothing and ignored rows, over several row chunks; the fused one
    with its vocabulary split between programs or not (None: the launcher's choice, 4 splits here; 40: more than
    the 33 tiles, so one tile each, combined COMBINE_SPLITS at a time; the last split holds the partial tile), also
    for a single row."""
    from videobert._kernels.triton import cross_entropy as ce

    device = triton_device()
    gen = torch.Generator().manual_seed(15)
    D, V = 64, 2053
    hidden = torch.randn(N, D, generator=gen).to(device)
    weight = (torch.randn(V, D, generator=gen) * D ** -0.5).to(device)
    bias = (0.1 * torch.randn(V, generator=gen)).to(device)
    labels = make_labels(N, V, gen, ignored_fraction=0.3 if N > 1 else 0.0).to(device)
    loss, lse, correct = ce.linear_cross_entropy_fwd(hidden, weight, labels, bias, -100, 0.1, method=method,
                                                    splits=splits)
    logits = F.linear(hidden.double(), weight.double(), bias.double())
    valid = labels != -100
    expected = F.cross_entropy(logits, labels, reduction="none", label_smoothing=0.1)
    assert_close(loss, expected, torch.float32, "loss")
    assert_close(lse, torch.where(valid, torch.logsumexp(logits, -1), 0.0), torch.float32, "lse")
    target = logits.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    assert torch.equal(correct, valid & (target >= logits.max(-1).values))


def test_linear_forward_splits_the_vocabulary_only_where_row_blocks_leave_the_gpu_idle():
    """One program per multiprocessor (the GPU config's registers): the row blocks alone when they fill whole
    waves of the GPU's 132 slots, else equal vocabulary shares (V = 51258: 401 tiles of 128)."""
    from videobert._kernels.triton import cross_entropy as ce

    assert ce.vocab_splits(128, 401, 132) == 1  # N = 16k: 128 blocks, one wave either way
    assert ce.vocab_splits(512, 401, 132) == 1  # N = 64k: 3.9 waves
    assert ce.vocab_splits(32, 401, 132) == 4  # N = 4k: 128 programs instead of 32
    assert ce.vocab_splits(150, 401, 132) == 7  # 8 waves of 1/7 of the tiles, not a second wave of 18 blocks
    assert ce.vocab_splits(8, 239, 132) == 16  # a VideoBERT step's ~1k masked text tokens, V = 30522
    assert ce.vocab_splits(1, 3, 132) == 3  # never more splits than tiles
    assert ce.vocab_splits(1, 1, 132) == 1
    device = triton_device()
    with pytest.raises(ValueError, match="splits must be a positive"):
        ce.linear_cross_entropy_fwd(torch.zeros(2, 8, device=device), torch.zeros(3, 8, device=device),
                                    torch.zeros(2, dtype=torch.long, device=device), None, -100, 0.0, splits=0)


@pytest.mark.parametrize("method, chunk", [("one_sweep", None), ("two_sweeps", None), ("one_sweep", 300)])
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_triton_linear_backward_methods_match_float64(method, chunk, dtype):
    """Both backward algorithms (one sweep with an fp32 dhidden accumulator, two sweeps without) give the
    reference's gradients of hidden, weight and bias over several chunks (their default widths, or 300 entries:
    a partial last chunk), with smoothing, ignored rows, a per-row upstream gradient and one through lse."""
    from videobert._kernels.triton import cross_entropy as ce

    device = triton_device()
    gen = torch.Generator().manual_seed(16)
    N, D, V = 37, 64, 1000
    hidden = torch.randn(N, D, generator=gen).to(device, dtype)
    weight = (torch.randn(V, D, generator=gen) * D ** -0.5).to(device, dtype)
    bias = (0.1 * torch.randn(V, generator=gen)).to(device, dtype)
    labels = make_labels(N, V, gen).to(device)
    dloss, dlse = torch.randn(N, generator=gen).to(device), torch.randn(N, generator=gen).to(device)
    _, lse, _ = ce.linear_cross_entropy_fwd(hidden, weight, labels, bias, -100, 0.1)
    grads = ce.linear_cross_entropy_bwd(dloss, dlse, hidden, weight, labels, bias, lse, -100, 0.1, method=method,
                                        chunk=chunk)

    p64 = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    logits = F.linear(*p64)
    valid = labels != -100
    loss = F.cross_entropy(logits, labels, reduction="none", label_smoothing=0.1)
    e_lse = torch.where(valid, torch.logsumexp(logits, -1), 0.0)
    e_grads = torch.autograd.grad((loss, e_lse), p64, (dloss.double(), dlse.double()))
    for name, g, e in zip(("dhidden", "dweight", "dbias"), grads, e_grads):
        assert g.dtype == dtype, name
        assert_close(g, e, dtype, name)
    for bad, match in ((dict(method="three_sweeps"), "method must be one of"), (dict(chunk=0), "chunk must be")):
        with pytest.raises(ValueError, match=match):
            ce.linear_cross_entropy_bwd(dloss, dlse, hidden, weight, labels, bias, lse, -100, 0.1, **bad)


@pytest.mark.parametrize("N, dtype, D, V, method", [
    (16384, torch.bfloat16, 1024, 51258, "one_sweep"), (16384, torch.bfloat16, 768, 51258, "one_sweep"),
    (16384, torch.bfloat16, 1024, 30522, "two_sweeps"), (16384, torch.bfloat16, 1024, 20736, "two_sweeps"),
    (16384, torch.float32, 4096, 30522, "one_sweep"), (16384, torch.float32, 1024, 20736, "two_sweeps"),
    (4096, torch.bfloat16, 1024, 20736, "two_sweeps"), (1024, torch.bfloat16, 1024, 30522, "one_sweep"),
    (1000, torch.bfloat16, 1024, 20736, "one_sweep"), (1, torch.bfloat16, 4096, 20736, "one_sweep")])
def test_linear_backward_default_method_keeps_scratch_in_budget(N, dtype, D, V, method):
    """On a GPU the backward takes one sweep where its fp32 accumulator and chunks of at least MIN_CHUNK
    vocabulary entries fit SCRATCH_SHARE of the fp32 logits (fp32 inputs need no accumulator), else two; below
    BUDGET_MIN_ROWS rows (a VideoBERT step's masked tokens per head) the budget is that of BUDGET_MIN_ROWS rows,
    where one sweep fits in a few chunks."""
    from videobert._kernels.triton import cross_entropy as ce

    cuda = torch.device("cuda")  # only the device type matters: no GPU is used
    if dtype != torch.float32 and not ce._MIXED_ADDMM:
        method = "two_sweeps"  # PyTorch < 2.10: no fp32-accumulating GEMM of bf16 operands on CUDA
    assert ce.default_backward_method(N, D, V, dtype, cuda) == method
    cols = ce._one_sweep_cols(N, D, V, dtype, cuda)
    if cols is not None:
        scratch = N * cols * dtype.itemsize + (0 if dtype == torch.float32 else N * D * 4)
        assert min(V, ce.MIN_CHUNK["gpu"][0]) <= cols <= V and (cols % ce.ROW_ALIGN == 0 or cols == V)
        assert scratch <= ce.SCRATCH_SHARE * max(N, ce.BUDGET_MIN_ROWS["gpu"]) * V * 4
        if N < ce.BUDGET_MIN_ROWS["gpu"]:
            assert -(-V // cols) <= 5  # a few chunks, not ~20


def test_triton_linear_cross_entropy_large_logits_and_all_ignored():
    device = triton_device()
    gen = torch.Generator().manual_seed(5)
    hidden = (torch.randn(6, 32, generator=gen) * 300).to(device).requires_grad_()  # logits around 1e4
    weight = torch.randn(300, 32, generator=gen).to(device).requires_grad_()
    labels = torch.randint(0, 300, (6,), generator=gen).to(device)
    loss = linear_cross_entropy(hidden, weight, labels, backend="triton")
    logits = F.linear(hidden.detach().double(), weight.detach().double())
    assert logits.abs().max() > 5e3 and torch.isfinite(loss)
    assert_close(loss, F.cross_entropy(logits, labels), torch.float32, "loss")
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(loss, (hidden, weight)))
    ignored = torch.full((6,), -100, device=device)
    loss = linear_cross_entropy(hidden, weight, ignored, backend="triton")
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert loss.item() == 0.0 and all((g == 0).all() for g in grads)


def _fused_or_skip(backend):
    """The device the fused `backend` of softmax_cross_entropy runs on here, or a skip saying why none."""
    if backend == "triton":
        return triton_device()
    from videobert.ops import BackendUnavailableError
    from videobert.ops._backend import resolve

    if not torch.cuda.is_available():
        pytest.skip("the CUDA extension needs a GPU to run")
    try:
        resolve("softmax_cross_entropy", "cuda", torch.device("cuda"), torch.float32)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    return "cuda"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction, smoothing, V", [("mean", 0.0, 1037), ("none", 0.2, 1037), ("sum", 0.1, 2048)])
def test_fused_softmax_cross_entropy_matches_float64(backend, dtype, reduction, smoothing, V):
    device = _fused_or_skip(backend)
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("the Triton interpreter truncates fp32 -> bf16 casts (a GPU rounds to nearest): bf16 on GPU")
    gen = torch.Generator().manual_seed(12)
    N = 13  # V=2048 takes the CUDA kernel's 16-byte path, 1037 its scalar path
    logits = (torch.randn(N, V, generator=gen) * 3).to(device, dtype)
    logits[0] *= 3e3  # magnitudes near 1e4
    logits.requires_grad_()
    labels = make_labels(N, V, gen).to(device)
    loss = softmax_cross_entropy(logits, labels, label_smoothing=smoothing, reduction=reduction, backend=backend)
    upstream = torch.randn(loss.shape, generator=gen).to(device)
    (grad,) = torch.autograd.grad(loss, logits, upstream)
    l64 = logits.detach().double().requires_grad_()
    expected = expected_loss(l64, labels, -100, smoothing, reduction)
    (e_grad,) = torch.autograd.grad(expected, l64, upstream.double())
    assert_close(loss, expected, torch.float32, "loss")
    assert grad.dtype == dtype
    assert_close(grad, e_grad, dtype, "dlogits")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("V", [1037, 2048])
def test_fused_softmax_cross_entropy_takes_masked_logits(backend, V):
    """Logits masked with -inf (whole leading spans, all but a few entries of a row) give the float64 loss and
    gradient, finite, as F.cross_entropy does: a thread whose columns are all -inf so far must not form
    exp(-inf - -inf)."""
    device = _fused_or_skip(backend)
    gen = torch.Generator().manual_seed(14)
    logits = torch.randn(4, V, generator=gen)
    logits[:, :V * 3 // 4] = float("-inf")
    logits[1, V * 3 // 4 + 5:] = float("-inf")  # five finite entries left
    labels = torch.tensor([V - 1, V * 3 // 4 + 2, V * 7 // 8, -100])
    logits, labels = logits.to(device).requires_grad_(), labels.to(device)
    loss = softmax_cross_entropy(logits, labels, reduction="none", backend=backend)
    upstream = torch.rand(4, generator=gen).to(device)
    (grad,) = torch.autograd.grad(loss, logits, upstream)
    l64 = logits.detach().double().requires_grad_()
    expected = F.cross_entropy(l64, labels, reduction="none")
    (e_grad,) = torch.autograd.grad(expected, l64, upstream.double())
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close(loss, expected, torch.float32, "loss")
    assert_close(grad, e_grad, torch.float32, "dlogits")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_softmax_cross_entropy_backward_in_place(backend):
    device = _fused_or_skip(backend)
    if backend == "triton":
        from videobert._kernels.triton import cross_entropy as ce
    else:
        from videobert._kernels.cuda import softmax_cross_entropy as ce

    gen = torch.Generator().manual_seed(13)
    logits = torch.randn(5, 333, generator=gen).to(device)
    labels = torch.randint(0, 333, (5,), generator=gen).to(device)
    loss, lse, _ = ce.softmax_cross_entropy_fwd(logits, labels, -100, 0.0)
    dloss = torch.rand(5, generator=gen).to(device)
    expected = ce.softmax_cross_entropy_bwd(dloss, None, logits, labels, lse, -100, 0.0)
    buffer = logits.clone()
    assert ce.softmax_cross_entropy_bwd(dloss, None, buffer, labels, lse, -100, 0.0, out=buffer) is buffer
    torch.testing.assert_close(buffer, expected, rtol=0, atol=0)


@pytest.mark.parametrize("V", [1, 2, 15, 64, 129, 1037])
@pytest.mark.parametrize("layout", ["dense", "view"])
def test_triton_softmax_kernels_take_any_row_layout(V, layout):
    """The softmax kernels tile each row from its start rounded down to TILE_ALIGN elements: rows that start
    anywhere (a column slice of a wider buffer, odd widths), narrower than one alignment step or than a tile, and
    a gradient written in place (the rows' own layout) or into a dense buffer (another stride)."""
    device = triton_device()
    from videobert._kernels.triton import cross_entropy as ce

    gen = torch.Generator().manual_seed(V)
    N, ls = 7, 0.1
    full = torch.randn(N, V + 13, generator=gen).to(device)
    logits = full[:, 3:3 + V] if layout == "view" else full[:, :V].contiguous()
    labels = make_labels(N, V, gen).to(device)
    dloss = torch.randn(N, generator=gen).to(device)
    l64 = logits.double().requires_grad_()
    per_row = F.cross_entropy(l64, labels, reduction="none", label_smoothing=ls)
    (e_grad,) = torch.autograd.grad(per_row, l64, dloss.double())
    loss, lse, correct = ce.softmax_cross_entropy_fwd(logits, labels, -100, ls)
    assert_close(loss, per_row, torch.float32, "loss")
    valid = labels != -100
    assert torch.equal(correct[valid], logits[valid].argmax(1) == labels[valid]) and not correct[~valid].any()
    assert_close(ce.softmax_cross_entropy_bwd(dloss, None, logits, labels, lse, -100, ls), e_grad, torch.float32,
                 "dlogits (dense output)")
    before = full.clone()
    assert ce.softmax_cross_entropy_bwd(dloss, None, logits, labels, lse, -100, ls, out=logits) is logits
    assert_close(logits, e_grad, torch.float32, "dlogits (in place)")
    if layout == "view":  # the columns around the rows are untouched
        assert torch.equal(full[:, :3], before[:, :3]) and torch.equal(full[:, 3 + V:], before[:, 3 + V:])


@OPCHECK
@pytest.mark.parametrize("op", ["linear", "softmax"])
def test_triton_cross_entropy_ops_pass_opcheck(op):
    device = triton_device()
    gen = torch.Generator().manual_seed(14)
    labels = torch.tensor([3, -100, 0, 7], device=device)
    if op == "linear":
        hidden = torch.randn(4, 16, generator=gen).to(device).requires_grad_()
        weight = torch.randn(9, 16, generator=gen).to(device).requires_grad_()
        torch.library.opcheck(_linear_ce_op, (hidden, weight, labels, None, -100, 0.1, "triton"))
    else:
        logits = torch.randn(4, 9, generator=gen).to(device).requires_grad_()
        torch.library.opcheck(_softmax_ce_op, (logits, labels, -100, 0.1, "triton"))
