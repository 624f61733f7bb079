"""pytest-benchmark entry points for regression tracking: `pytest bench --benchmark-only` (with the `bench`
extra installed) times each fused op, forward and forward+backward, at one representative size on the GPU
(`auto` backends) or a toy size on the CPU. The comparison tables against peers come from the scripts beside
this file; these are for `--benchmark-compare` across commits on one machine."""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from common import cycling, rotating  # noqa: E402  (bench/ is on the path: pytest's rootdir-relative import)

from videobert.ops import add_layer_norm, linear_cross_entropy, segment_attention  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE, DTYPE = ("cuda", torch.bfloat16) if GPU else ("cpu", torch.float32)
BACKEND = "auto" if GPU else "torch"  # the interpreter is for correctness, not timing


def _timed(benchmark, fn, backward: bool, *args):
    """benchmark of `fn` over `rotating` copies of `args`, the device synchronised so each round measures
    finished work; with `backward`, also the gradients of the arguments that require them."""
    def run(*args):
        out = fn(*args)
        if backward:
            torch.autograd.grad(out.float().sum(), [a for a in args if isinstance(a, torch.Tensor) and
                                                    a.requires_grad])
        if GPU:
            torch.cuda.synchronize()
    call = cycling(run, rotating(*args))
    call()  # compile, autotune, allocate
    benchmark(call)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_segment_attention(benchmark, backward):
    """segment_attention on rows of 16 equal samples (BERT-large heads at L=2048 on a GPU)."""
    B, L, H, D = (8, 2048, 16, 64) if GPU else (1, 128, 2, 32)
    q, k, v = (torch.randn(B, L, H, D, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3))
    ids = torch.arange(L, device=DEVICE).div(max(1, L // 16), rounding_mode="floor").expand(B, L).contiguous()
    _timed(benchmark, lambda q, k, v, ids: segment_attention(q, k, v, ids, backend=BACKEND), backward, q, k, v, ids)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_add_layer_norm(benchmark, backward):
    """add_layer_norm with residual and bias (16k rows of 1024 on a GPU)."""
    rows, hidden = (16384, 1024) if GPU else (256, 768)
    x, r = (torch.randn(rows, hidden, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(2))
    w = torch.ones(hidden, device=DEVICE, dtype=DTYPE, requires_grad=True)
    b = torch.zeros(hidden, device=DEVICE, dtype=DTYPE, requires_grad=True)
    _timed(benchmark, lambda x, r, w, b: add_layer_norm(x, r, w, b, 1e-12, backend=BACKEND), backward, x, r, w, b)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_linear_cross_entropy(benchmark, backward):
    """linear_cross_entropy over the joint vocabulary (N=16k, D=1024, V=51258 on a GPU)."""
    N, D, V = (16384, 1024, 51258) if GPU else (64, 64, 1000)
    hidden = torch.randn(N, D, device=DEVICE, dtype=DTYPE, requires_grad=True)
    weight = (torch.randn(V, D, device=DEVICE) * D ** -0.5).to(DTYPE).requires_grad_()
    labels = torch.randint(0, V, (N,), device=DEVICE)
    _timed(benchmark, lambda h, w, y: linear_cross_entropy(h, w, y, backend=BACKEND), backward, hidden, weight,
           labels)
