"""add_layer_norm: the op against float64 torch LayerNorm with autograd, dropout, opcheck, compile, errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, OPCHECK, assert_close
from videobert._kernels import reference
from videobert.ops import BackendUnavailableError, add_layer_norm
from videobert.ops._backend import resolve
from videobert.ops.layer_norm import _add_layer_norm_backward_op, _add_layer_norm_op


def expected_forward(x, residual, weight, bias, eps, keep=None, p=0.0, dtype=torch.float64):
    """float64 residual + dropout(x) then F.layer_norm, with autograd; s is rounded to `dtype` as the op does
    (the contract normalises the s it returns)."""
    x64 = x.double()
    if keep is not None:
        x64 = x64 * keep.view(x.shape) / (1 - p)
    s = x64 if residual is None else x64 + residual.double()
    s = s + (s.to(dtype).double() - s).detach()  # round the value, keep the identity gradient
    out = F.layer_norm(s, s.shape[-1:], weight.double(), None if bias is None else bias.double(), eps)
    return out, s


def usable(backend, device, dtype):
    """Skip (with the registry's reason) when `backend` cannot run these inputs here."""
    try:
        resolve("add_layer_norm", backend, torch.device(device), dtype)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter truncates fp32 -> bf16 casts (a GPU rounds to nearest): bf16 on GPU")
    return backend


BACKENDS = ["torch", "triton", "cuda"]


def leaves(*tensors):
    """Fresh leaf copies that require grad (None stays None)."""
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [1, 7, 768, 1000, 1024, 4096])
@pytest.mark.parametrize("with_residual", [True, False])
def test_forward_and_all_gradients(backend, device, dtype, hidden, with_residual):
    usable(backend, device, dtype)
    gen = torch.Generator().manual_seed(hidden)
    rows = 37
    x = torch.randn(rows, hidden, generator=gen).to(device, dtype)
    residual = torch.randn(rows, hidden, generator=gen).to(device, dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device)
    bias = (0.1 * torch.randn(hidden, generator=gen)).to(device)
    if dtype == torch.float64:
        weight, bias = weight.double(), bias.double()
    x, residual, weight, bias = leaves(x, residual, weight, bias)
    out, s = add_layer_norm(x, residual, weight, bias, 1e-5, return_residual=True, backend=backend)
    assert out.dtype == dtype and s.dtype == dtype and out.shape == x.shape
    dout, ds = torch.randn_like(out), torch.randn_like(s)
    inputs = [t for t in (x, residual, weight, bias) if t is not None]
    grads = torch.autograd.grad((out, s), inputs, (dout, ds))

    x64, res64, w64, b64 = leaves(*(None if t is None else t.double() for t in (x, residual, weight, bias)))
    e_out, e_s = expected_forward(x64, res64, w64, b64, 1e-5, dtype=dtype)
    inputs64 = [t for t in (x64, res64, w64, b64) if t is not None]
    e_grads = torch.autograd.grad((e_out, e_s), inputs64, (dout.double(), ds.double()))
    assert_close(out, e_out, dtype, "out")
    assert_close(s, e_s, dtype, "s")
    # weight/bias gradients sum over rows: their error grows with the row count
    names = ["dx", "dresidual", "dweight", "dbias"] if with_residual else ["dx", "dweight", "dbias"]
    for name, g, e in zip(names, grads, e_grads):
        scale = math.sqrt(rows) if name in ("dweight", "dbias") else 1.0
        rtol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
        torch.testing.assert_close(g.double(), e, rtol=rtol * scale, atol=max(rtol * scale * 0.1, 1e-12),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_three_dimensional_input_and_no_bias(backend, device):
    dtype = torch.float32 if backend != "torch" else torch.float64
    backend = usable(backend, device, dtype)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 40, generator=gen, dtype=dtype).to(device).requires_grad_()
    w = torch.randn(40, generator=gen, dtype=dtype).to(device).requires_grad_()
    out = add_layer_norm(x, None, w, None, 1e-6, backend=backend)
    x64, w64 = leaves(x.double(), w.double())
    expected = F.layer_norm(x64, (40,), w64, None, 1e-6)
    dout = torch.randn_like(expected)
    assert_close(out, expected, dtype, "out")
    for name, got, want in zip(("dx", "dweight"), torch.autograd.grad(out, (x, w), dout.to(dtype)),
                               torch.autograd.grad(expected, (x64, w64), dout)):
        assert_close(got, want, dtype, name)


@pytest.mark.parametrize("hidden", [768, 4096])
def test_triton_backward_schedules_agree(hidden):
    """The Triton backward's tuning knobs (programs per multiprocessor, pipelining depth of its loop over row
    tiles; bench/tune.py sweeps them) change the schedule only: dx and dresidual are identical, dweight and dbias
    equal up to the order of their partial sums."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    usable("triton", device, torch.float32)
    from videobert._kernels.triton import add_layer_norm as tln

    gen = torch.Generator().manual_seed(hidden)
    x, dout = (torch.randn(37, hidden, generator=gen).to(device) for _ in range(2))
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device)
    _, s, mean, rstd = tln.add_layer_norm_fwd(x, None, w, None, 1e-5, 0.0, None)
    dx, dres, dw, db = tln.add_layer_norm_bwd(dout, None, s, mean, rstd, w, True, True, 0.0, None)
    for per_sm, stages in [(1, 1), (3, 2), (2, 3)]:
        got = tln.add_layer_norm_bwd(dout, None, s, mean, rstd, w, True, True, 0.0, None, programs_per_sm=per_sm,
                                     loop_stages=stages)
        assert torch.equal(got[0], dx) and torch.equal(got[1], dres), (per_sm, stages)
        assert_close(got[2], dw.double(), torch.float32, "dweight")
        assert_close(got[3], db.double(), torch.float32, "dbias")


def test_gradcheck_with_dropout():
    gen = torch.Generator().manual_seed(0)
    x, r = (torch.randn(5, 11, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(11, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    rng = torch.tensor([42, 1], dtype=torch.int64)
    fn = lambda x, r, w, b: add_layer_norm(x, r, w, b, 1e-5, dropout_p=0.2, rng=rng,  # noqa: E731
                                           return_residual=True)
    assert torch.autograd.gradcheck(fn, (x, r, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_dropout_statistics_and_same_mask(backend, device):
    dtype = torch.float64 if backend == "torch" else torch.float32
    usable(backend, device, dtype)
    rows, cols, p = 64, 1000, 0.1
    keep = reference.layer_norm_dropout_keep(99, 7, rows, cols, p, torch.device("cpu"))
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / keep.numel()), rate
    # different rows and offsets draw different masks
    assert not torch.equal(keep[0], keep[1])
    assert not torch.equal(keep, reference.layer_norm_dropout_keep(99, 8, rows, cols, p, torch.device("cpu")))
    gen = torch.Generator().manual_seed(1)
    x, r = leaves(torch.randn(rows, cols, generator=gen, dtype=dtype).to(device),
                  torch.randn(rows, cols, generator=gen, dtype=dtype).to(device))
    w, b = torch.ones(cols, dtype=dtype, device=device), torch.zeros(cols, dtype=dtype, device=device)
    out, s = add_layer_norm(x, r, w, b, 1e-5, dropout_p=p, rng=torch.tensor([99, 7]), return_residual=True,
                            backend=backend)
    x64, r64 = leaves(x.double(), r.double())
    e_out, e_s = expected_forward(x64, r64, w.double(), b.double(), 1e-5, keep.to(device), p, dtype)
    assert_close(s, e_s, dtype, "s")
    assert_close(out, e_out, dtype, "out")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, r), dout)
    for name, g, e in zip(("dx", "dresidual"), grads, torch.autograd.grad(e_out, (x64, r64), dout.double())):
        assert_close(g, e, dtype, name)
    assert (grads[0][~keep.to(device)] == 0).all()  # dropped elements of x get no gradient


@OPCHECK
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_custom_ops_pass_opcheck(backend, device):
    usable(backend, device, torch.float32)
    gen = torch.Generator().manual_seed(2)
    x, r = (torch.randn(6, 24, generator=gen).to(device).requires_grad_() for _ in range(2))
    w, b = (torch.randn(24, generator=gen).to(device).requires_grad_() for _ in range(2))
    rng = torch.tensor([5, 0], dtype=torch.int64)
    torch.library.opcheck(_add_layer_norm_op, (x, r, w, b, 1e-5, 0.1, rng, backend))
    torch.library.opcheck(_add_layer_norm_op, (x, None, w, None, 1e-5, 0.0, None, backend))
    x, r, w = x.detach(), r.detach(), w.detach()
    _, s, mean, rstd = _add_layer_norm_op(x, r, w, None, 1e-5, 0.1, rng, backend)
    torch.library.opcheck(_add_layer_norm_backward_op,
                          (torch.randn_like(x), torch.randn_like(x), s, mean, rstd, w, True, False, 0.1, rng, backend))


def test_torch_compile_fullgraph():
    x, r = (torch.randn(4, 32, requires_grad=True) for _ in range(2))
    w, b = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)

    def fn(x, r, w, b):
        out, s = add_layer_norm(x, r, w, b, 1e-5, return_residual=True)
        return (out * s).sum()

    eager = torch.autograd.grad(fn(x, r, w, b), (x, r, w, b))
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for g, e in zip(torch.autograd.grad(compiled(x, r, w, b), (x, r, w, b)), eager):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(x=torch.randn(4, 0)), ValueError, "non-empty last"),
    (dict(x=torch.randn(8, 4).T), ValueError, "x must be contiguous"),
    (dict(residual=torch.randn(4, 7)), ValueError, r"residual must have shape \(4, 8\)"),
    (dict(residual=torch.randn(4, 8, dtype=torch.float16)), TypeError, "residual must have the dtype of x"),
    (dict(weight=torch.randn(7)), ValueError, r"weight must have shape \(8\)"),
    (dict(bias=torch.randn(8, 1)), ValueError, "bias must be 1-D"),
    (dict(bias=torch.randn(8, dtype=torch.float64)), TypeError, "bias must have the dtype of weight"),
    (dict(eps=0.0), ValueError, "eps must be a positive float"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(overrides, error, match):
    args = dict(x=torch.randn(4, 8), residual=None, weight=torch.ones(8), bias=torch.zeros(8), eps=1e-5)
    args.update(overrides)
    with pytest.raises(error, match=match):
        add_layer_norm(**args)
