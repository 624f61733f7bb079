"""The Triton segment attention against the float64 reference and FlexAttention (CPU: TRITON_INTERPRET=1)."""
import itertools
import math
import os

import pytest
import torch

from conftest import CUDA, OPCHECK, assert_close
from test_attention import (ALL_CAUSAL, JOINT, LATE_FUSION, PREFIX_LM, make_inputs, naive_mask, random_layout,
                            varlen_inputs)
from videobert.ops import BackendUnavailableError, segment_attention, segment_attention_varlen
from videobert.ops.attention import _segment_attention_op

triton = pytest.importorskip("triton")
from videobert._kernels.triton import segment_attention as sa  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RULES = [None, JOINT, LATE_FUSION, PREFIX_LM, ALL_CAUSAL]
# The interpreter computes tl.dot on bf16 operands wrongly, so bf16 runs on a GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def run_both(q, k, v, seg, mod, rules, dropout_p=0.0, rng=None, deterministic=False):
    """Triton output and grads, and the float64 reference's on the same (rounded) inputs and upstream grad (drawn
    from its own generator, so a case does not depend on which tests ran before it)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = segment_attention(*leaves, seg, mod, rules, dropout_p=dropout_p, rng=rng, backend="triton",
                            deterministic=deterministic)
    gen = torch.Generator().manual_seed(out.numel())
    dout = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=out.dtype)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = segment_attention(*ref_leaves, seg, mod, rules, dropout_p=dropout_p, rng=rng, backend="torch")
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    return (out, *grads), (ref, *ref_grads)


def check(results, dtype, what=""):
    """Each of out, dq, dk, dv finite, in `dtype` and close to its reference."""
    for name, got, want in zip(("out", "dq", "dk", "dv"), *results):
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        assert_close(got, want, dtype, f"{what} {name}")


@pytest.mark.parametrize("L", [1, 17, 127, 129, 300])
@pytest.mark.parametrize("layout", ["packed", "padding", "single", "unsorted", "all_padding"])
def test_matches_float64_reference(L, layout):
    index = [1, 17, 127, 129, 300].index(L) + ["packed", "padding", "single", "unsorted", "all_padding"].index(layout)
    rules = RULES[index % len(RULES)]
    gen = torch.Generator().manual_seed(1000 + index * 7 + L)
    B = 1 if L >= 300 else 2  # keeps the interpreter's time down; batching is covered by the other lengths
    q, k, v, seg, mod, rules_t = make_inputs(B, L, 2, 32, torch.float32, DEVICE, gen, layout, rules)
    check(run_both(q, k, v, seg, mod, rules_t), torch.float32, f"{layout} L={L} rules={rules}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rules", RULES)
def test_every_rules_pattern_and_dtype(dtype, rules):
    gen = torch.Generator().manual_seed(len(str(rules)))
    q, k, v, seg, mod, rules_t = make_inputs(2, 129, 2, 32, dtype, DEVICE, gen, "packed", rules)
    check(run_both(q, k, v, seg, mod, rules_t), dtype, f"rules={rules}")


@pytest.mark.parametrize("D", [16, 32, 40, 64, 128])
def test_head_dims(D):
    gen = torch.Generator().manual_seed(D)
    q, k, v, seg, mod, rules = make_inputs(1, 70, 2, D, torch.float16, DEVICE, gen, "packed", PREFIX_LM)
    check(run_both(q, k, v, seg, mod, rules), torch.float16, f"D={D}")


@pytest.mark.parametrize("blocks, layout, rules, dropout_p", [
    (blocks, layout, rules, dropout_p)
    for blocks in ({"fwd": (16, 64), "bwd": (64, 16), "dkdv": (64, 16), "dq": (16, 32)},
                   {"fwd": (64, 32), "bwd": (32, 64), "dkdv": (32, 64), "dq": (64, 16)})
    for layout, rules, dropout_p in (("unsorted", PREFIX_LM, 0.0), ("packed", None, 0.1))]
    + [({"fwd": (32, 128), "bwd": (16, 128), "dkdv": (16, 128), "dq": (32, 64)}, "packed", None, 0.1)])
@pytest.mark.skipif(torch.cuda.is_available(), reason="fixed block sizes apply to the interpreter only")
def test_other_block_sizes(blocks, layout, rules, dropout_p, monkeypatch):
    """Tiles wider than 16 start off their size's multiples (windows rounded down to 16): packed samples without
    rules run interior and masked tiles so; with dropout, key tiles start at its 64-key groups (or at multiples
    of narrower tiles) and take one group, several or part of one."""
    monkeypatch.setattr(sa, "INTERPRET_CONFIG", blocks)
    gen = torch.Generator().manual_seed(9)
    q, k, v, seg, mod, rules_t = make_inputs(2, 150, 2, 32, torch.float32, DEVICE, gen, layout, rules)
    rng = torch.tensor([2**40 + 17, 2**31 + 5], dtype=torch.int64) if dropout_p else None
    check(run_both(q, k, v, seg, mod, rules_t, dropout_p=dropout_p, rng=rng), torch.float32, f"{blocks} {layout}")


# 1/256 draws the 8-bit threshold 1, which a GPU launch passes to the kernels as a compile-time constant
@pytest.mark.parametrize("deterministic, dropout_p", [(False, 0.2), (True, 0.2), (False, 1 / 256), (True, 1 / 256)])
def test_dropout_uses_the_reference_mask(deterministic, dropout_p):
    gen = torch.Generator().manual_seed(3)
    q, k, v, seg, mod, rules = make_inputs(2, 100, 2, 32, torch.float32, DEVICE, gen, "packed", PREFIX_LM)
    rng = torch.tensor([2**40 + 17, 2**31 + 5], dtype=torch.int64)
    check(run_both(q, k, v, seg, mod, rules, dropout_p=dropout_p, rng=rng, deterministic=deterministic),
          torch.float32, f"dropout {dropout_p} deterministic={deterministic}")


# The kept two-kernel backward on the cases the atomic one is tested on above: odd lengths, length 1, padding
# and empty samples, unsorted ids, rows without keys, every rules pattern, fp32 and fp16.
@pytest.mark.parametrize("rules, layout, L, dtype", [
    (None, "packed", 1, torch.float32), (JOINT, "unsorted", 77, torch.float16),
    (LATE_FUSION, "padding", 129, torch.float32), (PREFIX_LM, "all_padding", 17, torch.float32),
    (ALL_CAUSAL, "packed", 150, torch.float16)])
def test_deterministic_backward_matches_reference(rules, layout, L, dtype):
    gen = torch.Generator().manual_seed(L)
    q, k, v, seg, mod, rules_t = make_inputs(2, L, 2, 32, dtype, DEVICE, gen, layout, rules)
    check(run_both(q, k, v, seg, mod, rules_t, deterministic=True), dtype, f"deterministic {layout} L={L}")


def test_backward_paths_and_the_flag(monkeypatch):
    """The default backward is the atomic one-kernel backward, `deterministic=True` the dK/dV and dQ kernels (also
    through segment_attention_varlen, whose flag is flash-attn's); the two agree; the flag must be a bool."""
    launched = []
    real = sa._launch
    monkeypatch.setattr(sa, "_launch", lambda tuned, kind, *args: launched.append(kind) or real(tuned, kind, *args))
    gen = torch.Generator().manual_seed(13)
    q, k, v, cu_seqlens, _ = varlen_inputs([9, 0, 40, 1], 2, 16, torch.float32, DEVICE, gen)
    dout = torch.randn_like(q)
    grads = {}
    for deterministic in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = segment_attention_varlen(*leaves, cu_seqlens, backend="triton", deterministic=deterministic)
        grads[deterministic] = torch.autograd.grad(out, leaves, dout)
    assert launched == ["fwd", "bwd", "fwd", "dkdv", "dq"]
    for name, atomic, kept in zip(("dq", "dk", "dv"), grads[False], grads[True]):
        assert_close(atomic, kept, torch.float32, name)
    with pytest.raises(ValueError, match="deterministic must be a bool"):
        segment_attention(q[None], k[None], v[None], torch.zeros(1, q.shape[0], dtype=torch.long, device=DEVICE),
                          backend="triton", deterministic=1)


def launch_path(kwargs: dict) -> str:
    """The path of a forward or backward launch from its keyword arguments: "ws" (warp-specialised), "mixed" (the
    items of more than one id that completes it), "tma" or "pointer"."""
    if kwargs.get("WARP_SPECIALIZE"):
        return "ws"
    return "mixed" if kwargs.get("MIXED_ITEMS") else "tma" if kwargs["USE_TMA"] else "pointer"


class _LaunchSpy:
    """Stands in for a tuned kernel on untuned launches (`tuned.fn[grid](...)`): records (kind, path) of each
    launch (`launch_path`), then runs the real kernel."""

    def __init__(self, tuned, kind, seen):
        self.fn, self._real, self._kind, self._seen = self, tuned.fn, kind, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self._seen.append((self._kind, launch_path(kwargs)))
            return self._real[grid](*args, **kwargs)
        return launch


@pytest.fixture
def tma_launches(monkeypatch):
    """VIDEOBERT_ATTENTION_TMA=1 (the TMA path under the interpreter too) and the list of launches made."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA path needs sm_90 or newer")
    monkeypatch.setenv("VIDEOBERT_ATTENTION_TMA", "1")
    monkeypatch.setenv("VIDEOBERT_AUTOTUNE", "0")
    seen = []
    for kind, tuned in list(sa.TUNED.items()):
        monkeypatch.setitem(sa.TUNED, kind, _LaunchSpy(tuned, kind, seen))
    return seen


def takes(path: str, kind: str, head_dim: int, dropout: bool, dtype: torch.dtype = torch.float16) -> str:
    """The path a kernel runs on when `path` ("tma", or "ws" beside it) is asked for (VIDEOBERT_ATTENTION_TMA=1,
    and WS=1): under the interpreter (which runs descriptors on the CPU) every kernel takes TMA and the forward
    "ws"; on a GPU a kernel takes the path where it has a config for the launch (warp-specialised: 16-bit inputs
    only, `ws_mode`), else TMA, else pointers."""
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    table = sa.path_table(kind, path)
    if DEVICE == "cpu" and (path == "tma" or table):
        return path
    if any(sa.serves(e, block_d, 9, dropout) for e in table) and (path == "tma" or dtype != torch.float32):
        return path
    return "pointer" if path == "tma" else takes("tma", kind, head_dim, dropout)


# The TMA path (tiles through tensor descriptors) on the cases the pointer path is tested on: odd lengths, length 1,
# padding, empty samples, unsorted ids, every rules pattern, head dims off a power of two, strided views of a
# fused projection, dropout, both backwards. The forward loads Q, K, V and stores O through descriptors, the
# backwards load Q and dO (dK/dV kernels) or K and V (the dQ kernel) through them.
@pytest.mark.parametrize("rules, layout, L, D, dtype, dropout_p, deterministic", [
    (None, "packed", 1, 32, torch.float32, 0.0, False), (JOINT, "unsorted", 77, 32, torch.float16, 0.0, False),
    (LATE_FUSION, "padding", 129, 64, torch.float32, 0.0, False),
    (PREFIX_LM, "all_padding", 17, 32, torch.float32, 0.0, True),
    (ALL_CAUSAL, "packed", 150, 40, torch.float16, 0.0, False), (None, "single", 100, 16, torch.float16, 0.0, True),
    (PREFIX_LM, "packed", 100, 32, torch.float32, 0.2, False), (JOINT, "padding", 70, 32, torch.float32, 0.2, True)])
def test_tma_path_matches_reference(tma_launches, rules, layout, L, D, dtype, dropout_p, deterministic):
    gen = torch.Generator().manual_seed(L + D)
    q, k, v, seg, mod, rules_t = make_inputs(2, L, 2, D, dtype, DEVICE, gen, layout, rules)
    rng = torch.tensor([2**40 + 17, 2**31 + 5], dtype=torch.int64, device=DEVICE) if dropout_p else None
    check(run_both(q, k, v, seg, mod, rules_t, dropout_p=dropout_p, rng=rng, deterministic=deterministic), dtype,
          f"tma {layout} L={L} D={D} rules={rules} dropout={dropout_p} deterministic={deterministic}")
    kinds = ["fwd", "dkdv", "dq"] if deterministic else ["fwd", "bwd"]
    assert tma_launches == [(kind, takes("tma", kind, D, dropout_p > 0)) for kind in kinds]


def test_tma_path_takes_strided_views_and_falls_back_when_misaligned(tma_launches):
    """Views of a fused QKV projection suit descriptors (16-byte aligned strides); rows of 8 bytes (D=4 in fp16)
    or a start off a 16-byte boundary do not, and take the pointer path, with the same results."""
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, 50, 3, 2, 32, generator=gen).to(DEVICE)
    seg = random_layout("packed", 2, 50, gen).to(DEVICE)
    check(run_both(*qkv.unbind(2), seg, None, None), torch.float32, "tma strided")
    assert tma_launches == [(kind, takes("tma", kind, 32, False)) for kind in ("fwd", "bwd")]
    narrow = torch.randn(2, 50, 1, 4, generator=gen, dtype=torch.float16).to(DEVICE)
    assert sa.tma_mode(narrow) == 0
    tma_launches.clear()
    check(run_both(narrow, narrow.clone(), narrow.clone(), seg, None, None), torch.float16, "8-byte rows")
    assert tma_launches == [("fwd", "pointer"), ("bwd", "pointer")]
    storage = torch.randn(2 * 50 * 2 * 32 + 1, generator=gen).to(DEVICE).requires_grad_()
    offset = storage[1:].view(2, 50, 2, 32)  # 4 bytes past an aligned start
    assert sa.tma_mode(offset) == 0
    tma_launches.clear()
    out = segment_attention(offset, offset, offset, seg, backend="triton")
    (grad,) = torch.autograd.grad(out, storage, torch.ones_like(out))
    ref_storage = storage.detach().double().requires_grad_()
    ref_q = ref_storage[1:].view(2, 50, 2, 32)
    ref = segment_attention(ref_q, ref_q, ref_q, seg, backend="torch")
    assert_close(out, ref, torch.float32, "unaligned start: out")
    assert_close(grad, torch.autograd.grad(ref, ref_storage, torch.ones_like(ref))[0], torch.float32, "grad")
    assert tma_launches == [("fwd", "pointer"), ("bwd", "pointer")]


def test_tma_setting(monkeypatch):
    """VIDEOBERT_ATTENTION_TMA: auto (the interpreter and sm_8x take pointers), 1, 0; anything else is an error
    naming the variable."""
    q = torch.zeros(1, 16, 2, 32, device=DEVICE)
    for setting, on_cpu in (("auto", 0), ("1", 2), ("0", 0)):
        monkeypatch.setenv("VIDEOBERT_ATTENTION_TMA", setting)
        if DEVICE == "cpu":
            assert sa.tma_mode(q) == on_cpu
    monkeypatch.setenv("VIDEOBERT_ATTENTION_TMA", "yes")
    with pytest.raises(ValueError, match="VIDEOBERT_ATTENTION_TMA must be auto, 0 or 1, got 'yes'"):
        segment_attention(q, q, q, torch.zeros(1, 16, dtype=torch.long, device=DEVICE), backend="triton")


@pytest.fixture
def ws_launches(tma_launches, monkeypatch):
    """VIDEOBERT_ATTENTION_WS=1 beside TMA=1 (the warp-specialised forward under the interpreter too; on a GPU, on
    sm_90 only) and the list of launches made."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the warp-specialised forward needs sm_90 (Triton's Hopper pass)")
    monkeypatch.setenv("VIDEOBERT_ATTENTION_WS", "1")
    return tma_launches


# The warp-specialised forward on the layouts that decide its two launches: items of one id (packed samples, one
# sample, padding, empty rows) through its one loop, and those of rows that keep fixed blocks (unsorted ids, short
# samples) through the pointer kernel that completes it; odd lengths, length 1, head dims off a power of two,
# dropout. Launches with rules take the TMA path instead.
@pytest.mark.parametrize("rules, layout, L, D, dtype, dropout_p", [
    (None, "packed", 1, 32, torch.float32, 0.0), (None, "packed", 77, 32, torch.float16, 0.0),
    (None, "unsorted", 77, 32, torch.float32, 0.0), (None, "padding", 129, 40, torch.float32, 0.0),
    (None, "single", 150, 64, torch.float16, 0.0), (None, "all_padding", 17, 32, torch.float32, 0.0),
    (None, "packed", 100, 32, torch.float32, 0.2), (None, "unsorted", 70, 64, torch.float32, 0.2),
    (JOINT, "packed", 60, 32, torch.float32, 0.0)])
def test_warp_specialised_forward_matches_reference(ws_launches, rules, layout, L, D, dtype, dropout_p):
    gen = torch.Generator().manual_seed(L + D + 1)
    q, k, v, seg, mod, rules_t = make_inputs(2, L, 2, D, dtype, DEVICE, gen, layout, rules)
    rng = torch.tensor([2**40 + 17, 2**31 + 5], dtype=torch.int64, device=DEVICE) if dropout_p else None
    check(run_both(q, k, v, seg, mod, rules_t, dropout_p=dropout_p, rng=rng), dtype,
          f"ws {layout} L={L} D={D} rules={rules} dropout={dropout_p}")
    path = "tma" if rules else takes("ws", "fwd", D, dropout_p > 0, dtype)
    assert [launch for launch in ws_launches if launch[0] == "fwd"] == \
        ([("fwd", "ws"), ("fwd", "mixed")] if path == "ws" else [("fwd", path)])


def test_ws_setting(monkeypatch):
    """VIDEOBERT_ATTENTION_WS: 0 (default), auto (the autotuner's choice on sm_90), 1 (always where allowed, the
    interpreter included); never with rules or off the TMA path; anything else is an error naming the variable."""
    cpu = torch.zeros(1)
    for setting, mode in (("0", 0), ("auto", 0), ("1", 2)):
        monkeypatch.setenv("VIDEOBERT_ATTENTION_WS", setting)
        assert sa.ws_mode(2, False, cpu) == mode
        assert sa.ws_mode(2, True, cpu) == sa.ws_mode(0, False, cpu) == 0
    monkeypatch.delenv("VIDEOBERT_ATTENTION_WS")
    assert sa.ws_setting() == "0"
    monkeypatch.setenv("VIDEOBERT_ATTENTION_WS", "on")
    q = torch.zeros(1, 16, 2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="VIDEOBERT_ATTENTION_WS must be auto, 0 or 1, got 'on'"):
        segment_attention(q, q, q, torch.zeros(1, 16, dtype=torch.long, device=DEVICE), backend="triton")


def test_descriptor_scratch_allocator_respects_the_callers():
    """Launches on the TMA path give Triton a scratch allocator when none is set, and keep one the caller set
    (each check in a fresh context: Triton keeps the allocator in a context variable)."""
    import contextvars

    from triton.runtime import _allocation

    from videobert._kernels.triton import launch

    def after_ensure(preset):
        if preset is not None:
            triton.set_allocator(preset)
        launch.ensure_allocator()
        return _allocation._allocator.get()

    assert contextvars.Context().run(after_ensure, None) is launch._scratch

    def mine(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)
    assert contextvars.Context().run(after_ensure, mine) is mine


def test_rows_without_keys_and_degenerate_shapes():
    seg = torch.tensor([[0, 0, -1, 1, 1, -1, -1, 2, 2], [-1] * 9], device=DEVICE)
    mod = torch.tensor([[0, 1, 0, 0, 1, 0, 1, 1, 1], [0] * 9], device=DEVICE)
    rules = torch.tensor([[1, 1], [0, 0]], device=DEVICE)  # modality 1 attends nothing
    q, k, v = (torch.randn(2, 9, 2, 16, device=DEVICE) for _ in range(3))
    results = run_both(q, k, v, seg, mod, rules)
    check(results, torch.float32, "empty rows")
    out, dq = results[0][0], results[0][1]
    empty = (seg < 0) | (mod == 1)
    assert (out[empty] == 0).all() and (dq[empty] == 0).all()
    for B, L in ((0, 5), (3, 1), (2, 0)):
        q = torch.randn(B, L, 2, 16, device=DEVICE)
        results = run_both(q, q, q, torch.zeros(B, L, dtype=torch.long, device=DEVICE), None, None)
        check(results, torch.float32, f"B={B} L={L}")


def test_ids_beyond_int32_and_non_contiguous_ids():
    gen = torch.Generator().manual_seed(9)
    q, k, v, seg, mod, rules = make_inputs(2, 77, 2, 16, torch.float32, DEVICE, gen, "unsorted", PREFIX_LM)
    big = torch.where(seg >= 0, seg * 2**40 + 2**33 + 1, seg)  # distinct ids that agree in their low 32 bits
    big_t = big.t().contiguous().t()
    mod_t = mod.t().contiguous().t()
    assert not big_t.is_contiguous() and not mod_t.is_contiguous()
    check(run_both(q, k, v, big_t, mod_t, rules), torch.float32, "int64 ids")


def test_strided_inputs_from_a_fused_projection():
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, 50, 3, 2, 32, generator=gen).to(DEVICE)
    q, k, v = qkv.unbind(2)
    seg = random_layout("packed", 2, 50, gen).to(DEVICE)
    assert not q.is_contiguous()
    check(run_both(q, k, v, seg, None, None), torch.float32, "strided")


def test_matches_flex_attention():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    gen = torch.Generator().manual_seed(5)
    q, k, v, seg, mod, rules = make_inputs(2, 96, 2, 32, torch.float32, DEVICE, gen, "packed", PREFIX_LM)

    def mask_mod(b, h, i, j):
        rule = rules[mod[b, i], mod[b, j]]
        return (seg[b, i] == seg[b, j]) & (seg[b, i] >= 0) & ((rule == 1) | ((rule == 2) & (j <= i)))

    block_mask = flex.create_block_mask(mask_mod, 2, None, 96, 96, device=DEVICE)
    backward = torch.cuda.is_available()  # FlexAttention has no backward on CPU
    leaves = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]
    expected = flex.flex_attention(*(t.transpose(1, 2) for t in leaves), block_mask=block_mask).transpose(1, 2)
    leaves2 = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = segment_attention(*leaves2, seg, mod, rules, backend="triton")
    has_key = naive_mask(seg.cpu(), mod.cpu(), rules.tolist()).any(-1).to(DEVICE)
    assert_close(out[has_key], expected[has_key], torch.float32, "out")  # Flex's empty rows are its own business
    if backward:
        dout = torch.randn_like(expected)
        for name, g, e in zip(("dq", "dk", "dv"), torch.autograd.grad(out, leaves2, dout),
                              torch.autograd.grad(expected, leaves, dout)):
            assert_close(g, e, torch.float32, name)


def test_windows_are_sound_and_tight():
    gen = torch.Generator().manual_seed(6)
    for layout in ("packed", "unsorted", "padding"):
        for rules in RULES:
            seg = random_layout(layout, 3, 70, gen)
            mod = torch.randint(0, 2, (3, 70), generator=gen)
            rules_t = torch.tensor(rules) if rules is not None else None
            meta = sa.attention_metadata(seg.to(DEVICE), mod.to(DEVICE) if rules else None,
                                         None if rules_t is None else rules_t.to(DEVICE)).long().cpu()
            canonical, mod_out, key_lo, key_hi, query_lo, query_hi, contiguous = meta
            allowed = naive_mask(seg, mod, rules)
            b, i, j = allowed.nonzero(as_tuple=True)
            # every allowed pair lies inside both windows
            assert ((key_lo[b, i] <= j) & (j < key_hi[b, i]) & (query_lo[b, j] <= i) & (i < query_hi[b, j])).all()
            # canonical ids: 0 exactly on padding, equal exactly where the given ids are
            assert torch.equal(canonical == 0, seg < 0) and (canonical >= 0).all()
            assert torch.equal(canonical[:, :, None] == canonical[:, None, :], seg[:, :, None] == seg[:, None, :])
            assert torch.equal(mod_out, mod if rules else torch.zeros_like(mod))
            # contiguous: 1 exactly on the tokens of segments that fill their span
            for b, row in enumerate(seg):
                for value in row[row >= 0].unique():
                    where = (row == value).nonzero().squeeze(1)
                    fills = int(where[-1] - where[0] + 1) == where.numel()
                    assert (contiguous[b, where] == int(fills)).all(), (layout, b, int(value))
            assert (contiguous[seg < 0] == 0).all()
    # contiguous packed samples with joint attention: the windows are exactly the sample spans
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    _, _, key_lo, key_hi, _, _, _ = sa.attention_metadata(seg.to(DEVICE), None, None).cpu()
    assert key_lo.tolist() == [[0, 0, 0, 3, 3, 5, 8, 8]] and key_hi.tolist() == [[3, 3, 3, 5, 5, 6, 0, 0]]


@pytest.mark.parametrize("rules", [None, JOINT, PREFIX_LM])
def test_unmasked_interior_tiles(rules, monkeypatch):
    """Without rules, blocks inside one contiguous segment skip the mask on interior tiles: exact on rows of
    long samples, a segment with a hole (another sample inside its span) and padding, as is the masked path
    that rules keep on the same rows; and the contiguity flag is what lets a block skip the mask (forcing it
    on the segment with a hole changes the result)."""
    gen = torch.Generator().manual_seed(12)
    L = 160
    seg = torch.full((2, L), -1)
    seg[0, :64], seg[0, 64:96], seg[0, 96:] = 0, 1, 0  # segment 0 has a hole
    seg[1, :150] = 5
    mod = (torch.arange(L) % 3 == 0).long().expand(2, L).contiguous()
    rules_t = None if rules is None else torch.tensor(rules)
    q, k, v = (torch.randn(2, L, 2, 32, generator=gen).to(DEVICE) for _ in range(3))
    inputs = (q, k, v, seg.to(DEVICE), mod.to(DEVICE) if rules else None,
              None if rules_t is None else rules_t.to(DEVICE))
    check(run_both(*inputs), torch.float32, f"rules={rules}")
    if rules is not None:
        return
    real = sa.attention_metadata

    def forced(*args):
        meta = real(*args)
        meta[6] = (meta[0] > 0).int()  # claim every segment is contiguous
        return meta
    monkeypatch.setattr(sa, "attention_metadata", forced)
    # A query block lies inside segment 0 for every shipped BLOCK_M (at most 128; the GPU's first config takes
    # 128 rows, which on the rows above would straddle the hole and stay masked) and its key window spans the hole.
    L = 256
    seg = torch.full((2, L), -1)
    seg[0, :128], seg[0, 128:192], seg[0, 192:] = 0, 1, 0
    seg[1, :250] = 5
    q, k, v = (torch.randn(2, L, 2, 32, generator=gen).to(DEVICE) for _ in range(3))
    got = segment_attention(q, k, v, seg.to(DEVICE), backend="triton")
    want = segment_attention(q.double(), k.double(), v.double(), seg.to(DEVICE), backend="torch")
    assert not torch.allclose(got[0, :128].double(), want[0, :128], atol=1e-3)  # segment 0 read segment 1's keys
    assert_close(got[1], want[1].float(), torch.float32, "contiguous row")


def test_metadata_is_reused_while_the_same_ids_come_back(monkeypatch):
    """One metadata launch for a forward and backward through three layers on the same ids; recomputed for a
    new tensor of equal values, after an in-place change (and then still exact), for other rules, and every
    time for inference tensors."""
    launches = []
    real = sa.attention_metadata
    monkeypatch.setattr(sa, "attention_metadata", lambda *ids: launches.append(1) or real(*ids))
    sa.forget_metadata()
    gen = torch.Generator().manual_seed(21)
    q, k, v, seg, mod, _ = make_inputs(2, 70, 2, 16, torch.float32, DEVICE, gen, "packed", JOINT)
    x = q.clone().requires_grad_()
    out = x
    for _ in range(3):
        out = segment_attention(out, k, v, seg, backend="triton")
    out.sum().backward()
    assert len(launches) == 1
    segment_attention(q, k, v, seg.clone(), backend="triton")
    assert len(launches) == 2
    segment_attention(q, k, v, seg, backend="triton")
    assert len(launches) == 3
    seg[:, :10] = 99  # bumps the version counter: stale windows would let these tokens see their old sample
    check(run_both(q, k, v, seg, None, None), torch.float32, "after an in-place change")
    assert len(launches) == 4
    rules = torch.tensor(JOINT, device=DEVICE)
    check(run_both(q, k, v, seg, mod, rules), torch.float32, "with rules")
    assert len(launches) == 5
    with torch.inference_mode():
        frozen = seg.clone()
        for _ in range(2):
            segment_attention(q, k, v, frozen, backend="triton")
    assert len(launches) == 7


@CUDA
def test_metadata_is_rebuilt_in_cuda_graph_replays():
    """A captured call rebuilds the metadata from the graph's own ids on every replay (never the reused one)."""
    gen = torch.Generator().manual_seed(22)
    q, k, v, seg, _, _ = make_inputs(2, 200, 2, 64, torch.float16, "cuda", gen, "packed", None)
    static = seg.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # tune and compile outside the capture
        segment_attention(q, k, v, static, backend="triton")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = segment_attention(q, k, v, static, backend="triton")
    for layout in ("unsorted", "padding"):
        ids = random_layout(layout, 2, 200, gen).cuda()
        static.copy_(ids)
        graph.replay()
        want = segment_attention(q.double(), k.double(), v.double(), ids, backend="torch")
        assert_close(out, want, torch.float16, f"replay on {layout} ids")


def expected_items(canonical: torch.Tensor, block: int) -> list:
    """The work items of each row, as `work_items` documents them: item starts at every run start and
    every `block` positions into a run, then L; fixed blocks where that is more than MAX_ITEMS_PER_BLOCK times as
    many."""
    rows = []
    for row in canonical.tolist():
        L, starts, run = len(row), [], 0
        for pos, value in enumerate(row):
            run = pos if pos == 0 or value != row[pos - 1] else run
            if (pos - run) % block == 0:
                starts.append(pos)
        if len(starts) > sa.MAX_ITEMS_PER_BLOCK * -(-L // block):
            starts = list(range(0, L, block))
        rows.append(starts + [L])
    return rows


@pytest.mark.parametrize("L", [1, 63, 129, 300])
def test_work_items(L):
    """Items per block size and row: packed samples and padding runs cut from their starts, a sample longer
    than the block in several items, a row of interleaved ids (fixed blocks), a row of padding."""
    gen = torch.Generator().manual_seed(L)
    seg = random_layout("packed", 4, L, gen)
    seg[1] = torch.where(torch.rand(L, generator=gen) < 0.3, -1, seg[1])  # padding runs inside the row
    seg[2] = torch.arange(L) % 3  # interleaved
    seg[3] = -1
    canonical = sa.attention_metadata(seg.to(DEVICE), None, None)[0]
    items = sa.work_items(canonical).cpu()
    assert items.stride(1) % 16 == 0  # launches specialise stride_items as divisible by 16 (compile_check)
    for k, block in enumerate(sa.ITEM_BLOCKS):
        for b, want in enumerate(expected_items(canonical.cpu(), block)):
            count = int(items[k, b, 0])
            assert items[k, b, 1:count + 2].tolist() == want, (block, b)
            assert count <= sa.MAX_ITEMS_PER_BLOCK * -(-L // block)  # one program per item


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_more_items_than_fixed_blocks(dropout_p):
    """Samples of 20 and 45 tokens cut into more items than fixed blocks (32-row items: 3 per 65 tokens against
    2.03 fixed blocks), which the programs past the fixed blocks' count take, in the forward as in the backward
    (key items without dropout, fixed key blocks with it; dQ's query items); exact with and without dropout,
    atomic and deterministic backward."""
    L, lengths = 300, [20, 45] * 5
    seg = torch.full((2, L), -1)
    start = 0
    for index, n in enumerate(lengths):
        seg[:, start:start + n] = index
        start += n
    canonical = sa.attention_metadata(seg.to(DEVICE), None, None)[0]
    block = sa.INTERPRET_CONFIG["fwd"][0] if DEVICE == "cpu" else 32
    count = int(sa.work_items(canonical)[sa.ITEM_BLOCKS.index(block), 0, 0])
    assert -(-L // block) < count <= sa.MAX_ITEMS_PER_BLOCK * -(-L // block)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, L, 2, 32, generator=gen).to(DEVICE) for _ in range(3))
    rng = torch.tensor([2**33 + 3, 7], dtype=torch.int64, device=DEVICE) if dropout_p else None
    for deterministic in (False, True):
        check(run_both(q, k, v, seg.to(DEVICE), None, None, dropout_p=dropout_p, rng=rng,
                       deterministic=deterministic), torch.float32,
              f"items dropout={dropout_p} deterministic={deterministic}")


@pytest.mark.parametrize("deterministic", [False, True])
def test_key_item_tails_add_nothing(deterministic):
    """A key item ending inside its block (a sample of 40 keys in 32-key blocks) computes its interior tiles
    unmasked over the next sample's first keys, whose scores with its queries overflow fp32's exp here (a large
    component shared by the first sample's queries and the second's keys only): gradients stay finite and exact."""
    L, D = 96, 32
    seg = torch.zeros((1, L), dtype=torch.long)
    seg[0, 40:] = 1
    gen = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(1, L, 2, D, generator=gen) for _ in range(3))
    # q_A . k_B = 600, x 0.18 (the scale) = 106: exp overflows past 88. k_B's part stays small: dq_B's first
    # component sums ds (zero in exact arithmetic) times it, which would scale the rounding error
    q[:, :40, :, 0], k[:, :40, :, 0] = 100.0, 0.0
    q[:, 40:, :, 0], k[:, 40:, :, 0] = 0.0, 6.0
    check(run_both(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), seg.to(DEVICE), None, None,
                   deterministic=deterministic), torch.float32, f"tails deterministic={deterministic}")


def test_work_scales_with_squared_sample_lengths():
    """Tiles the kernels visit, counted from the windows exactly as the kernels do, for packed rows."""
    gen = torch.Generator().manual_seed(7)
    L, block_m, block_n = 2048, 128, 64
    ids, start, segment = torch.full((1, L), -1), 0, 0
    lengths = []
    while start < L:
        n = min(int(torch.randint(20, 180, (), generator=gen)), L - start)
        ids[0, start:start + n] = segment
        lengths.append(n)
        start, segment = start + n, segment + 1
    _, _, key_lo, key_hi, _, _, _ = sa.attention_metadata(ids.to(DEVICE), None, None).cpu()
    visited = 0
    for m in range(0, L, block_m):
        lo, hi = int(key_lo[0, m:m + block_m].min()), int(key_hi[0, m:m + block_m].max())
        visited += max(0, math.ceil((hi - (lo // block_n) * block_n) / block_n))
    dense = (L // block_m) * (L // block_n)
    ideal = sum(n * n for n in lengths) / (block_m * block_n)
    assert visited < dense / 5, (visited, dense)
    assert visited < 4 * ideal + 2 * L / block_m, (visited, ideal)


@OPCHECK
def test_opcheck():
    gen = torch.Generator().manual_seed(8)
    q, k, v, seg, mod, rules = make_inputs(2, 40, 2, 16, torch.float32, DEVICE, gen, "packed", PREFIX_LM)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    rng = torch.tensor([11, 0], dtype=torch.int64)
    torch.library.opcheck(_segment_attention_op, (q, k, v, seg, mod, rules, 0.1, 0.25, rng, "triton"))


def test_unsupported_inputs_name_the_limit():
    q = torch.randn(1, 4, 1, 160, device=DEVICE)
    seg = torch.zeros(1, 4, dtype=torch.long, device=DEVICE)
    with pytest.raises(BackendUnavailableError, match="head dim 160 is larger than 128"):
        segment_attention(q, q, q, seg, backend="triton")
    q = torch.randn(1, 4, 1, 16, device=DEVICE)
    with pytest.raises(BackendUnavailableError, match="5 modalities; the Triton kernel takes at most 4"):
        segment_attention(q, q, q, seg, torch.zeros(1, 4, dtype=torch.long, device=DEVICE),
                          torch.ones(5, 5, dtype=torch.long, device=DEVICE), backend="triton")


@CUDA
def test_auto_picks_triton_on_cuda():
    from videobert.ops._backend import resolve

    assert resolve("segment_attention", "auto", torch.device("cuda"), torch.bfloat16, head_dim=64) == "triton"


@pytest.mark.parametrize("arch_major", [8, 9])
@pytest.mark.parametrize("block_d", [16, 32, 64, 128])
def test_autotune_pruning_keeps_only_spill_free_configs(monkeypatch, arch_major, block_d):
    """The autotuner times only configs shipped for the launch: spill-free for its head dim, GPU and dropout, on
    the pointer path unless the TMA mode allows descriptors (both paths in mode 1, TMA alone where it serves in
    mode 2, never on sm_8x); the forward's warp-specialised configs join where its mode allows (alone in mode 2)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (arch_major, 0))
    for kind in ("fwd", "bwd", "dkdv", "dq"):
        configs = sa.TUNED[kind].configs
        for length, dropout, mode, ws in itertools.product((32, 512, 4096), (False, True), (0, 1, 2), (0, 1, 2)):
            if ws and (kind != "fwd" or not mode):
                continue  # `ws_mode`: the forward's, on the TMA path
            kept = sa._pruner(kind)(configs, {"Q": None}, L_BUCKET=length, BLOCK_D=block_d, HEAD_DIM=block_d,
                                    HAS_DROPOUT=dropout, TMA_MODE=mode, WS_MODE=ws)
            # launches the atomic backward does not serve take the deterministic kernels
            assert kept or (kind == "bwd" and not sa.atomic_backward_serves(block_d, arch_major, dropout))
            tables = {path: sa.path_table(kind, path) for path in sa.PATHS}
            for c in kept:
                served = {entry[0] for entry in tables[sa.config_path(c)]
                          if sa.serves(entry, block_d, arch_major, dropout)}
                assert (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in served
            serves = {path: any(sa.serves(e, block_d, arch_major, dropout) for e in table)
                      for path, table in tables.items()}
            tma_serves, ws_serves = mode and serves["tma"], ws and serves["ws"]
            expected = {path for path, ok in (("pointer", serves["pointer"] and not (tma_serves and mode == 2)),
                                              ("tma", tma_serves), ("ws", ws_serves)) if ok}
            if ws == 2 and ws_serves:
                expected = {"ws"}
            assert {sa.config_path(c) for c in kept} == expected, (kind, length, dropout, mode, ws)


def test_configs_without_dropout_serve_only_launches_without_it():
    """An entry's head dims served only without dropout (its fourth element: the tile spills with dropout there)
    make it a candidate for launches without dropout only; its other head dims take both (e.g. the 128x128 forward
    tile at three stages: D=64 without dropout, D=32 with it, on sm_8x and sm_9x)."""
    checked = 0
    for table in sa.TABLES.values():
        for config, dims_sm8x, dims_sm9x, *without in table:
            for arch_major, dims, extra in zip((8, 9), (dims_sm8x, dims_sm9x), without[0] if without else ((), ())):
                for d in extra:
                    assert config in sa.candidates(table, d, 2048, arch_major, dropout=False)
                    assert config not in sa.candidates(table, d, 2048, arch_major, dropout=True)
                    checked += 1
                for d in dims:
                    assert config in sa.candidates(table, d, 2048, arch_major, dropout=True)
                    assert config in sa.candidates(table, d, 2048, arch_major, dropout=False)
    assert checked >= 10  # the tables hold such entries


@CUDA
def test_autotuned_launch_matches_reference(monkeypatch):
    monkeypatch.setenv("VIDEOBERT_AUTOTUNE", "1")
    gen = torch.Generator().manual_seed(7)
    q, k, v, seg, mod, rules_t = make_inputs(2, 300, 2, 64, torch.float16, DEVICE, gen, "packed", JOINT)
    check(run_both(q, k, v, seg, mod, rules_t), torch.float16, "autotuned")


def test_reset_autotuning_forgets_tuned_configs():
    """A new workload at the same shapes is tuned afresh (the key cannot see the id layout)."""
    for tuned in sa.TUNED.values():
        tuned.cache[("stale",)] = object()
    sa.reset_autotuning()
    assert not any(t.cache for t in sa.TUNED.values())


@pytest.mark.parametrize("rules", [None, PREFIX_LM])
def test_varlen_matches_float64_reference(rules):
    """segment_attention_varlen on the Triton backend (cu_seqlens with an empty sample, lengths off the block
    sizes) against the float64 reference on the same samples."""
    gen = torch.Generator().manual_seed(77 + (rules is None))
    q, k, v, cu_seqlens, _ = varlen_inputs([5, 0, 37, 1, 20], 2, 32, torch.float32, DEVICE, gen)
    mod = torch.randint(0, 2, (q.shape[0],), generator=gen).to(DEVICE) if rules is not None else None
    rules_t = torch.tensor(rules, device=DEVICE) if rules is not None else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = segment_attention_varlen(*leaves, cu_seqlens, modality_ids=mod, modality_rules=rules_t, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = segment_attention_varlen(*ref_leaves, cu_seqlens, modality_ids=mod, modality_rules=rules_t,
                                   backend="torch")
    check(((out, *grads), (ref, *torch.autograd.grad(ref, ref_leaves, dout.double()))), torch.float32, "varlen")
