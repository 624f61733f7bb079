"""Backend selection, the shared dropout RNG against Triton's own Philox, and packaging rules."""
import importlib.util
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import triton_device
from videobert._kernels import reference
from videobert.ops import BackendUnavailableError, available_backends, segment_attention
from videobert.ops._backend import resolve

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


def test_auto_on_cpu_is_the_reference(monkeypatch):
    monkeypatch.delenv("VIDEOBERT_BACKEND", raising=False)
    for op in ("segment_attention", "add_layer_norm", "linear_cross_entropy", "softmax_cross_entropy"):
        assert resolve(op, "auto", CPU, torch.float32) == "torch"
        assert resolve(op, "torch", CPU, torch.float64) == "torch"


def test_environment_overrides_auto_only(monkeypatch):
    monkeypatch.setenv("VIDEOBERT_BACKEND", "torch")
    assert resolve("add_layer_norm", "auto", CPU, torch.float32) == "torch"
    monkeypatch.setenv("VIDEOBERT_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="add_layer_norm: backend 'cuda' is not available: "
                                                      "the CUDA extension needs CUDA tensors"):
        resolve("add_layer_norm", "auto", CPU, torch.float32)
    assert resolve("add_layer_norm", "torch", CPU, torch.float32) == "torch"  # an explicit choice wins
    monkeypatch.setenv("VIDEOBERT_BACKEND", "fastest")
    with pytest.raises(ValueError, match="VIDEOBERT_BACKEND must be one of"):
        resolve("add_layer_norm", "auto", CPU, torch.float32)


def test_unavailable_backends_say_what_is_missing(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="set TRITON_INTERPRET=1"):
        resolve("segment_attention", "triton", CPU, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendUnavailableError, match="float64 is supported by the torch reference only"):
        resolve("segment_attention", "triton", CPU, torch.float64)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        resolve("segment_attention", "tensorrt", CPU, torch.float32)
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(BackendUnavailableError, match="segment_attention: backend 'cuda' is not available"):
        segment_attention(q, q, q, torch.zeros(1, 4, dtype=torch.long), backend="cuda")


def test_available_backends_reports_every_op_and_backend():
    report = available_backends()
    assert set(report) == {"segment_attention", "add_layer_norm", "linear_cross_entropy", "softmax_cross_entropy"}
    for op, backends in report.items():
        assert set(backends) == {"torch", "triton", "cuda"}
        assert backends["torch"] == "available"
    # Ops without CUDA C++ kernels say so, not that the extension wants CUDA tensors (when the extension loads).
    from videobert.ops._backend import _load_provider

    if _load_provider("cuda") is None:
        assert report["segment_attention"]["cuda"] == "the cuda backend has no segment_attention kernel"
        assert "has no" not in report["add_layer_norm"]["cuda"]


triton = pytest.importorskip("triton")
tl = triton.language
from videobert._kernels.triton.rng import dropout_keep, dropout_keep_bytes, philox, zero_dropped_16bit  # noqa: E402


@triton.jit
def _philox_kernel(out_ptr, seed, offset, N: tl.constexpr, OURS: tl.constexpr):
    j = tl.arange(0, N)
    counters = (j.to(tl.uint32), (j * 7919).to(tl.uint32), (j + 3).to(tl.uint32), (j * 0 + offset).to(tl.uint32))
    if OURS:
        r0, r1, r2, r3 = philox(seed, *counters, 10)
    else:
        r0, r1, r2, r3 = tl.philox(seed, *counters)
    tl.store(out_ptr + j, r0.to(tl.int32, bitcast=True))
    tl.store(out_ptr + N + j, r1.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 2 * N + j, r2.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 3 * N + j, r3.to(tl.int32, bitcast=True))


@triton.jit
def _keep_kernel(out_ptr, seed, offset, col_start, c2, threshold, R: tl.constexpr, C: tl.constexpr):
    rows = tl.arange(0, R)[:, None] + 1000
    keep = dropout_keep(seed, offset, col_start, rows, c2, threshold, C)
    tl.store(out_ptr + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :], keep.to(tl.int8))


@triton.jit
def _keep_bytes_kernel(out_ptr, seed, offset, col_start, c2, threshold, R: tl.constexpr, C: tl.constexpr,
                       TRANSPOSED: tl.constexpr):
    rows = tl.arange(0, R)[:, None] + 1000
    keep = dropout_keep_bytes(seed, offset, col_start, rows, c2, threshold, C, TRANSPOSED)
    if TRANSPOSED:  # (C, R)
        tl.store(out_ptr + tl.arange(0, C)[:, None] * R + tl.arange(0, R)[None, :], keep.to(tl.int8))
    else:
        tl.store(out_ptr + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :], keep.to(tl.int8))


@triton.jit
def _zero_dropped_kernel(x_ptr, eye_ptr, out_ptr, seed, offset, col_start, c2, threshold, R: tl.constexpr,
                         C: tl.constexpr):
    """`zero_dropped_16bit` on an MMA accumulator's layout, as the forward applies it: x (fp32 holding values of
    the output's dtype) times the identity, exact in TF32, cast to the output's dtype."""
    rows = tl.arange(0, R)[:, None] + 1000
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    eye = tl.load(eye_ptr + tl.arange(0, C)[:, None] * C + tl.arange(0, C)[None, :])
    values = tl.dot(tl.load(x_ptr + offs), eye, input_precision="tf32").to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, zero_dropped_16bit(values, seed, offset, col_start, rows, c2, threshold, C))


def test_philox_and_dropout_masks_match_triton_bit_for_bit():
    device = triton_device()
    # attention rates: thresholds 77, 1 and 255
    for (seed, offset), p in zip(((0, 0), (0x123456789ABCD, 77), (2**62 - 1, 2**31 - 1)), (0.3, 1 / 256, 0.9999)):
        j = torch.arange(256)
        expected = torch.stack(reference.philox(seed, j, j * 7919, j + 3, torch.tensor(offset)))
        for ours in (True, False):  # rng.philox (a wide multiply per product) and tl.philox
            out = torch.empty(4, 256, dtype=torch.int32, device=device)
            _philox_kernel[(1,)](out, seed, offset, 256, ours)
            assert torch.equal(out.cpu().long() & reference.MASK32, expected), ours

        keep = torch.empty(8, 32, dtype=torch.int8, device=device)
        threshold = reference.dropout_threshold(0.3)
        _keep_kernel[(1,)](keep, seed, offset, 64, 5, threshold, 8, 32)
        cols, rows = torch.arange(64, 96)[None, :], torch.arange(1000, 1008)[:, None]
        assert torch.equal(keep.cpu().bool(), reference.dropout_keep(seed, offset, cols, rows, torch.tensor(5), 0.3))
        # the attention's 8-bit masks: 16 decisions per call in 64-column groups, tiles of a group or more and
        # the parts of one a narrower tile takes, as drawn and transposed (the key-side backward's)
        for (width, col_start), transposed in itertools.product(
                ((128, 192), (64, 0), (64, 320), (32, 32), (32, 64), (16, 0), (16, 16), (16, 176)), (False, True)):
            keep = torch.empty((width, 8) if transposed else (8, width), dtype=torch.int8, device=device)
            _keep_bytes_kernel[(1,)](keep, seed, offset, col_start, 5, reference.dropout_byte_threshold(p), 8,
                                     width, transposed)
            cols = torch.arange(col_start, col_start + width)[None, :]
            expected = reference.dropout_keep_bytes(seed, offset, cols, rows, torch.tensor(5), p)
            assert torch.equal(keep.cpu().bool().T if transposed else keep.cpu().bool(), expected), \
                (width, col_start, transposed, p)
            if transposed:
                continue
            # the same mask applied to 16-bit values a register pair at a time: every finite normal value (the
            # identity product keeps their bits: no -0.0 summed with zeros, no subnormals flushed) comes back bit for
            # bit where kept, +0.0 where dropped
            rows16 = torch.arange(1000, 1016)[:, None]
            expected = reference.dropout_keep_bytes(seed, offset, cols, rows16, torch.tensor(5), p)
            for dtype in (torch.float16, torch.bfloat16):
                values = torch.randint(-2**15, 2**15, (16, width), dtype=torch.int16).view(dtype)
                values = torch.where(values.isfinite() & (values.abs() >= torch.finfo(dtype).tiny), values, 1.0)
                out = torch.empty_like(values, device=device)
                _zero_dropped_kernel[(1,)](values.float().to(device), torch.eye(width, device=device), out, seed,
                                           offset, col_start, 5, reference.dropout_byte_threshold(p), 16, width)
                assert torch.equal(out.cpu().view(torch.int16), torch.where(expected, values.view(torch.int16), 0)), \
                    (width, col_start, dtype, p)


def test_attention_dropout_rate_is_rounded_to_a_256th():
    """8-bit thresholds draw the rate p rounded to a multiple of 1/256, and the keep scale is that rate's."""
    assert reference.dropout_byte_threshold(0.1) == 26 and reference.dropout_byte_threshold(0.25) == 64
    assert reference.attention_dropout_scale(0.25) == 1 / 0.75
    assert reference.dropout_byte_threshold(0.9999) == 255  # at least one keep in 256
    keep = reference.attention_dropout_keep(5, 9, 2, 4, 128, 0.1, torch.device("cpu"))
    drawn = 1 - keep.double().mean().item()
    assert abs(drawn - 26 / 256) < 5 * math.sqrt(0.1 * 0.9 / keep.numel()), drawn


def test_attention_dropout_columns_draw_their_own_bytes():
    """Every key of a 64-key group takes its own byte of its call: no two columns share their decisions (they
    would agree on every row), and each column drops at the drawn rate."""
    keep = reference.attention_dropout_keep(11, 4, 1, 8, 192, 0.25, torch.device("cpu")).reshape(-1, 192).double()
    agree = (keep.T @ keep + (1 - keep).T @ (1 - keep)) / keep.shape[0]
    assert agree.fill_diagonal_(0).max() < 0.75, agree.max()  # independent columns agree on ~62.5% of rows
    drawn = 1 - keep.mean(0)
    assert (drawn - 0.25).abs().max() < 6 * math.sqrt(0.25 * 0.75 / keep.shape[0]), drawn


def test_reference_masks_stay_on_the_inputs_device():
    # "meta" stands in for a GPU here: a counter left on the CPU would fail to combine with it.
    keep = reference.attention_dropout_keep(2**40 + 3, 2**31 + 5, 2, 3, 17, 0.2, torch.device("meta"))
    assert keep.device.type == "meta" and keep.shape == (2, 3, 17, 17)
    keep = reference.layer_norm_dropout_keep(9, 1, 5, 33, 0.1, torch.device("meta"))
    assert keep.device.type == "meta" and keep.shape == (5, 33)


def test_no_top_level_kernels_module_is_installed():
    # Run outside the repository so the source folder itself is not on sys.path.
    code = ("import importlib.util, videobert._kernels as k; s = importlib.util.find_spec('kernels'); "
            "print(k.__file__); print(s.origin if s else 'none')")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    ours, top = out.stdout.split()
    assert Path(ours).name == "__init__.py"
    # "none", or another distribution's module (the PyPI package of that name), never our folder
    assert top == "none" or Path(top).parent != ROOT / "kernels", f"a top-level 'kernels' resolves to {top}"


@pytest.mark.parametrize("cwd", [ROOT, Path("/")], ids=["checkout_root", "elsewhere"])
def test_kernels_folder_never_shadows_the_kernels_package(cwd, tmp_path):
    """`import kernels` finds an installed distribution of that name (a stand-in here, first on the path, as the
    PyPI package transformers imports would be), never the source folder, also from the checkout root where
    `python -m` / `-c` put the folder's parent first on sys.path; and a Hugging Face BERT builds there."""
    transformers_present = importlib.util.find_spec("transformers") is not None
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("STAND_IN = True\n")
    (site / "kernels-0.0.1.dist-info").mkdir()
    (site / "kernels-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\n"
                                                               "Version: 0.0.1\n")
    code = ("import kernels, videobert._kernels.reference\n"
            "print(getattr(kernels, 'STAND_IN', kernels.__file__))\n")
    if transformers_present:
        code += ("from transformers import BertConfig, BertModel\n"
                 "BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, "
                 "intermediate_size=64, vocab_size=100))\n"
                 "print('bert built')\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True"] + (["bert", "built"] if transformers_present else [])


def test_custom_op_loads_its_backend_when_called_first():
    """The custom op called before any backend is resolved (opcheck does, and so does a graph run in a fresh
    process) loads its provider itself; a backend that cannot be had raises BackendUnavailableError."""
    code = ("import os; os.environ['TRITON_INTERPRET'] = '1'\n"
            "import torch\n"
            "from videobert.ops._backend import BackendUnavailableError, run\n"
            "from videobert.ops.attention import _segment_attention_op\n"
            "q = torch.randn(1, 5, 1, 16)\n"
            "out = _segment_attention_op(q, q, q, torch.zeros(1, 5, dtype=torch.long), None, None, 0.0, 0.25, None,"
            " 'triton')\n"
            "print(tuple(out[0].shape))\n"
            "try:\n"
            "    run('no_such_op', 'triton', 'fwd')\n"
            "except BackendUnavailableError as exc:\n"
            "    print('unavailable:', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["(1, 5, 1, 16)", "unavailable: no triton implementation of no_such_op is "
                                       "installed"]


def test_triton_launch_helpers():
    """The plain-int grid helpers agree with Triton's (constexpr functions, slow on the host); the dropout
    arguments pass the (seed, offset) tensor itself (the kernel reads it: nothing on the host), the keep
    threshold and scale, and are neutral without dropout."""
    triton = pytest.importorskip("triton")
    from videobert._kernels.triton.launch import cdiv, dropout_args, next_power_of_2

    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(1, 1100))
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(300) for b in (1, 3, 16, 64, 129))
    fallback, rng = torch.zeros(3), torch.tensor([7, 2**32 + 2**31 + 5])
    assert dropout_args(0.0, None, fallback) == dict(Rng=fallback, threshold=0, drop_scale=1.0)
    assert dropout_args(0.25, rng, fallback) == dict(Rng=rng, threshold=2**29, drop_scale=1 / 0.75)


def test_dropout_generator_draws_fresh_masks_and_replays_exactly():
    """The device-side dropout generator: each call takes (seed, counter) and advances the counter in place on
    the state's device, so calls replayed as a CUDA graph replays them (the same ops on the same state tensor)
    draw fresh masks, never a repeated one, while a recorded (seed, offset) reproduces its mask bit for bit;
    manual_seed and the checkpoint getters make the states reproducible."""
    from videobert.ops import add_layer_norm, get_dropout_states, manual_seed, set_dropout_states
    from videobert.ops._checks import dropout_state, next_rng

    device = triton_device()
    x = torch.randn(16, 64, device=device)
    w = torch.ones(64, device=device)
    state = torch.tensor([12345, 0], device=device)

    def step(rng):  # s = dropout(x): zero exactly where dropped
        return add_layer_norm(x, None, w, None, dropout_p=0.5, rng=rng, return_residual=True, backend="triton")[1]

    recorded, outputs = [], []
    for _ in range(4):  # what four replays of a captured step do
        rng = next_rng(state)
        recorded.append(rng)
        outputs.append(step(rng))
    assert state.tolist() == [12345, 4] and [r.tolist() for r in recorded] == [[12345, i] for i in range(4)]
    masks = [(out == 0) for out in outputs]
    assert all(not torch.equal(masks[i], masks[j]) for i in range(4) for j in range(i))
    assert torch.equal(step(recorded[2]), outputs[2])  # the recorded (seed, offset) replays exactly
    # Per-device states: seeded by manual_seed, restored from a checkpoint's copy.
    manual_seed(7)
    first = dropout_state(torch.device("cpu")).clone()
    next_rng(dropout_state(torch.device("cpu")))
    saved = get_dropout_states()
    manual_seed(7)
    assert torch.equal(dropout_state(torch.device("cpu")), first)
    set_dropout_states(saved)
    assert dropout_state(torch.device("cpu")).tolist() == [first[0].item(), 1]
