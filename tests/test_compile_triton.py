"""Every shipped Triton config compiles for sm_80 and sm_90 (no GPU needed) without register spills and within
the card's shared memory."""
import itertools
import multiprocessing
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import pytest

triton = pytest.importorskip("triton")

from videobert._kernels.triton import add_layer_norm as ln  # noqa: E402
from videobert._kernels.triton import cross_entropy as ce  # noqa: E402
from videobert._kernels.triton import rng  # noqa: E402
from videobert._kernels.triton import segment_attention as sa  # noqa: E402
from videobert._kernels.triton.compile_check import (ARCHS, HEAD_DIMS, KINDS, NO_DROPOUT_VARIANTS,  # noqa: E402
                                                     SHARED_MEMORY_LIMIT, VARIANTS, as_launched, attention_constexprs,
                                                     attention_kernel, attention_report, attention_signature,
                                                     attention_tensor_ops, compile_attention, compile_kernel,
                                                     compile_report, kind_variants, loop_opcodes)
from videobert._kernels.triton.compile_check import main as compile_check_main  # noqa: E402

KERNELS = {kind: attention_kernel(kind) for kind in KINDS}


def shipped_attention_report(kind: str, entry_index: int, head_dim: int, arch: int, rules: bool, dropout: bool):
    """Compile one shipped attention config; returns (description, CompileReport)."""
    config = KERNELS[kind][1][entry_index][0]
    block_m, block_n, warps, stages = config
    name = (f"{kind} BLOCK_M={block_m} BLOCK_N={block_n} warps={warps} stages={stages} D={head_dim} sm_{arch} "
            f"rules={rules} dropout={dropout}")
    return name, attention_report(kind, config, head_dim, arch, rules, dropout)


def _cases():
    for kind, (_, table) in KERNELS.items():
        for index, entry in enumerate(table):
            for head_dim, arch in itertools.product(HEAD_DIMS, ARCHS):
                if sa.serves(entry, head_dim, arch // 10):
                    variants = VARIANTS
                elif sa.serves(entry, head_dim, arch // 10, dropout=False):
                    variants = NO_DROPOUT_VARIANTS
                else:
                    continue
                for rules, dropout in kind_variants(kind, variants):
                    yield kind, index, head_dim, arch, rules, dropout


def metadata_report(arch: int, rules: bool, batch: int = 0):
    """Compile the metadata kernel as the launcher runs it on a GPU (contiguous int64 ids, whose unit strides a
    launch specialises into constants, 64-token blocks); batch=1 is how Triton specialises a batch of one."""
    sig = as_launched({"Seg": "*i64", "Mod": "*i64", "Rules": "*i64", "Meta": "*i32", "stride_sb": "i32",
                       "stride_mb": "i32", "B": "i32", "L": "i32"}, "stride_sb", "stride_mb", "L")
    constexprs = dict(NUM_MODALITIES=2, HAS_RULES=rules, BLOCK=64, stride_sl=1, stride_ml=1)
    if batch == 1:
        sig["B"] = "constexpr"
        constexprs["B"] = 1
    report = compile_report(sa._segment_metadata_kernel, sig, constexprs, arch, 4, 1)
    return f"metadata sm_{arch} rules={rules} B={batch or 'any'}", report


def layer_norm_report(kind: str, hidden: int, arch: int, full: bool):
    """Compile the LayerNorm forward or backward as launched for `hidden` (bf16 activations, fp32 weight);
    `full` turns on residual, bias and dropout (and the extra ds input of the backward)."""
    block_n, rows, warps = ln.launch_config(hidden, backward=kind == "bwd")
    flags = dict(HAS_RESIDUAL=full, HAS_BIAS=full, HAS_DROPOUT=full, ROWS=rows, BLOCK_N=block_n)
    rng = {"Rng": "*i64", "threshold": "i32", "drop_scale": "fp32"}
    if kind == "fwd":
        sig = {"X": "*bf16", "Res": "*bf16", "W": "*fp32", "Bias": "*fp32", "Out": "*bf16", "S": "*bf16",
               "Mean": "*fp32", "Rstd": "*fp32", "M": "i32", "N": "i32", "eps": "fp32", **rng}
        kernel = ln._add_layer_norm_fwd_kernel
    else:
        sig = {"DOut": "*bf16", "DSExtra": "*bf16", "S": "*bf16", "Mean": "*fp32", "Rstd": "*fp32", "W": "*fp32",
               "DX": "*bf16", "DRes": "*bf16", "DWPartial": "*fp32", "DBPartial": "*fp32", "M": "i32", "N": "i32",
               "num_tiles": "i32", **rng}
        kernel = ln._add_layer_norm_bwd_kernel
        flags = dict(flags, HAS_DS=full, LOOP_STAGES=ln.backward_loop_stages(hidden))
    if hidden == 1:  # a launch specialises an integer argument equal to 1 into a constant
        del sig["N"]
        flags["N"] = 1
    sig = as_launched(sig, *(["N"] if hidden % 16 == 0 else []))
    return f"layer_norm {kind} N={hidden} sm_{arch} full={full}", compile_report(kernel, sig, flags, arch, warps, 1)


def cross_entropy_launch(kind: str, smoothing: bool = True):
    """(kernel, signature, constexprs, warps, stages) of a cross-entropy kernel with its GPU config (bf16 inputs,
    bias, int64 labels, label smoothing on: the heavier variant), as launched: N and D divide by 16 in the
    benchmark's shapes, V (51258) and so the logits' row stride do not."""
    rows = {"Labels": "*i64", "Lse": "*fp32"}
    scalars = {"N": "i32", "V": "i32"}
    stats = {"Loss": "*fp32", "Lse": "*fp32", "Correct": "*i8"}
    if kind == "linear_combine":
        sig = {"Partial": "*fp32", "Labels": "*i64", **stats, **scalars, "splits": "i32", "ignore_index": "i32",
               "label_smoothing": "fp32"}
        return (ce._linear_ce_combine_kernel, as_launched(sig, "N"), dict(BLOCK_M=ce.COMBINE_ROWS,
                                                                  BLOCK_S=ce.COMBINE_SPLITS), 4, 1)
    if kind.startswith("linear"):
        bm, bv, bk, warps, stages = ce.LINEAR_CONFIG["gpu"]
        consts = dict(HAS_BIAS=True, HAS_SMOOTHING=smoothing, SPLIT=kind == "linear_fwd_split",
                      DOT_PRECISION="tf32", BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk)
        common = {"H": "*bf16", "W": "*bf16", "Bias": "*bf16", "Labels": "*i64"}
        tail = {**scalars, "D": "i32", "stride_h": "i32", "stride_w": "i32", "split_v": "i32", "ignore_index": "i32",
                "label_smoothing": "fp32"}
        kernel, sig = ce._linear_ce_fwd_kernel, {**common, **stats, "Partial": "*fp32", **tail}
    else:
        bm, bv, warps = ce.SOFTMAX_CONFIG[kind.split("_")[1]]["gpu"]
        stages = 1
        consts = dict(ALIGN=ce.TILE_ALIGN, BLOCK_M=bm, BLOCK_V=bv)
        if kind == "softmax_fwd":
            consts["HAS_SMOOTHING"] = smoothing
            kernel, sig = ce._softmax_ce_fwd_kernel, {"Z": "*bf16", "Labels": "*i64", "Loss": "*fp32",
                                                      "Lse": "*fp32", "Correct": "*i8", **scalars, "stride_z": "i32",
                                                      "ignore_index": "i32", "label_smoothing": "fp32"}
        else:
            kernel, sig = ce._softmax_ce_bwd_kernel, {"Z": "*bf16", **rows, "DLoss": "*fp32", "DLse": "*fp32",
                                                      "DZ": "*bf16", "N": "i32", "width": "i32", "col0": "i32",
                                                      "V": "i32", "stride_z": "i32", "stride_dz": "i32",
                                                      "ignore_index": "i32", "label_smoothing": "fp32"}
            consts.update(HAS_DLSE=True, SAME_STRIDE=True)
    return kernel, as_launched(sig, "N", "D", "stride_h", "stride_w", "split_v"), consts, warps, stages


def cross_entropy_report(kind: str, arch: int):
    """Compile a cross-entropy kernel as launched; returns (description, CompileReport)."""
    kernel, sig, consts, warps, stages = cross_entropy_launch(kind)
    return f"cross_entropy {kind} sm_{arch}", compile_report(kernel, sig, consts, arch, warps, stages)


def _global_accesses(kind: str) -> Counter:
    """The global load and store instructions in the sm_90 PTX of a cross-entropy kernel as launched."""
    kernel, sig, consts, warps, stages = cross_entropy_launch(kind)
    ptx = compile_kernel(kernel, sig, consts, 90, warps, stages).asm["ptx"]
    return Counter(re.findall(r"(?:ld|st)\.global[\w.]*", ptx))


def _run(case):
    if case[0] == "cross_entropy":
        return cross_entropy_report(*case[1:])
    if case[0] == "metadata":
        return metadata_report(*case[1:])
    if case[0] == "layer_norm":
        return layer_norm_report(*case[1:])
    return shipped_attention_report(*case)


def _layer_norm_fwd_ptx(signature: dict) -> str:
    return compile_kernel(ln._add_layer_norm_fwd_kernel, signature, dict(HAS_RESIDUAL=True, HAS_BIAS=False,
                          HAS_DROPOUT=False, ROWS=1, BLOCK_N=4096), 90, 8, 1).asm["ptx"]


def test_compile_check_specialises_like_a_launch(monkeypatch):
    """The spill and SASS checks compile what a launch runs: ":16" arguments (aligned pointers, sizes that divide
    by 16) give 16-byte vector loads, as a GPU launch's specialisation does; unmarked ones give element loads."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    sig = {"X": "*bf16", "Res": "*bf16", "W": "*fp32", "Bias": "*fp32", "Out": "*bf16", "S": "*bf16",
           "Mean": "*fp32", "Rstd": "*fp32", "M": "i32", "N": "i32", "eps": "fp32", "Rng": "*i64",
           "threshold": "i32", "drop_scale": "fp32"}
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        launched, odd = pool.map(_layer_norm_fwd_ptx, [as_launched(sig, "N"), sig])
    assert "ld.global.v4" in launched and "ld.global.b16" not in launched
    assert "ld.global.v4" not in odd and "ld.global.b16" in odd


def test_softmax_kernels_vectorise_at_odd_row_strides(monkeypatch):
    """Logits 51258 wide have a row stride no launch specialises, yet the softmax kernels' interior tiles load
    (and the backward stores) 16 bytes per access, from row starts rounded down to TILE_ALIGN; only the two
    edge tiles of a row access elements one by one."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        fwd, bwd = pool.map(_global_accesses, ["softmax_fwd", "softmax_bwd"])
    per_thread = {kind: ce.SOFTMAX_CONFIG[kind]["gpu"][1] // (32 * ce.SOFTMAX_CONFIG[kind]["gpu"][2])
                  for kind in ("fwd", "bwd")}  # bf16 elements of a tile per thread
    assert fwd["ld.global.v4.b32"] == per_thread["fwd"] // 8 and fwd["ld.global.b16"] == 2 * per_thread["fwd"]
    assert bwd["ld.global.v4.b32"] == bwd["st.global.v4.b32"] == per_thread["bwd"] // 8
    assert bwd["st.global.b16"] == 2 * per_thread["bwd"]


def cross_entropy_loops(kind: str, smoothing: bool) -> list[Counter]:
    """SASS opcode counts of each loop of a cross-entropy kernel as launched on sm_90."""
    kernel, sig, consts, warps, stages = cross_entropy_launch(kind, smoothing)
    return loop_opcodes(kernel, sig, consts, 90, warps, stages)


def test_cross_entropy_loops_exponentiate_once_per_element(monkeypatch):
    """Every exponential in the cross-entropy kernels' loops is one MUFU (exp2: `tl.exp` would add a
    subnormal fix-up, an FSETP and two FMULs per element), and a whole tile's loop selects at most once per
    element (the target's, only run in tiles holding one): no column or ignored-row masks there."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cases = [(kind, smoothing) for kind in ("linear_fwd", "softmax_fwd", "softmax_bwd") for smoothing in (False, True)]
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        found = dict(zip(cases, pool.map(cross_entropy_loops, *zip(*cases))))
    for (kind, smoothing), loops in found.items():
        assert all(loop["FSETP"] <= 2 for loop in loops), (kind, smoothing)  # the per-row -inf tests only
        whole = loops[1] if kind == "linear_fwd" else loops[0]  # the linear forward's first loop is its K loop
        assert 0 < whole["FSEL"] <= whole["MUFU"], (kind, smoothing)


@pytest.mark.parametrize("argv, message", [(["--config", "128,64,8"], "expected M,N,WARPS,STAGES"),
                                           (["--config", "96,64,8,3"], "powers of"),
                                           (["--config", "a,b,c,d"], "four positive integers"),
                                           (["--kind", "backward"], "invalid choice"),
                                           (["--workers", "0"], "expected a positive integer")])
def test_config_sweep_rejects_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        compile_check_main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_every_head_dim_and_arch_has_configs():
    """The forward and the deterministic backward serve every launch; the atomic backward (whose launches without
    a config take the deterministic kernels) serves at least the BERT head dim 64 everywhere, with dropout; the
    TMA path serves the forward and the atomic backward at head dim 64 on sm_90, with dropout, and never sm_80
    (launches it does not serve take the pointer path)."""
    for kind in ("fwd_tma", "bwd_tma", "fwd_ws"):
        assert any(sa.serves(entry, 64, 9) for entry in KERNELS[kind][1]), kind
        assert not any(sa.serves(entry, d, 8, False) for entry in KERNELS[kind][1] for d in HEAD_DIMS), kind
    for kind, (_, table) in KERNELS.items():
        if kind.endswith(("_tma", "_ws")):
            continue
        for head_dim, arch in itertools.product((16,) + HEAD_DIMS, ARCHS):
            served = any(sa.serves(entry, head_dim, arch // 10) for entry in table)
            assert served or (kind == "bwd" and head_dim != 64), (kind, head_dim, arch)
            if kind == "bwd":
                assert served == sa.atomic_backward_serves(max(head_dim, 32), arch // 10, True)


def test_warp_specialised_forward_has_its_complement():
    """Each launch the warp-specialised forward serves has a pointer config with its BLOCK_M, which takes the items
    of more than one id (rows that keep fixed blocks) on the same work items."""
    for entry in KERNELS["fwd_ws"][1]:
        for head_dim, dropout in itertools.product(HEAD_DIMS, (False, True)):
            if sa.serves(entry, head_dim, 9, dropout):
                assert any(e[0][0] == entry[0][0] and sa.serves(e, head_dim, 9, dropout) for e in sa.FWD_TABLE), \
                    (entry, head_dim, dropout)


def test_shipped_configs_compile_without_spills(monkeypatch):
    cases = list(_cases()) + [("metadata", arch, rules, batch) for arch in ARCHS for rules in (False, True)
                              for batch in (0, 1)]
    cases += [("layer_norm", kind, hidden, arch, full) for kind in ("fwd", "bwd")
              for hidden in (1, 768, 1024, 4096, 8192) for arch in ARCHS for full in (False, True)]
    cases += [("cross_entropy", kind, arch) for arch in ARCHS
              for kind in ("linear_fwd", "linear_fwd_split", "linear_combine", "softmax_fwd", "softmax_bwd")]
    # Fresh worker processes import the kernels as real JIT functions (not under the test's interpreter).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_run, cases))
    spilling = [f"{name}: a {r.stack} B stack frame (register spills)" for name, r in results
                if r.stack > _ALLOWED_STACK_BYTES.get(name, 0)]
    assert not spilling, "\n".join(spilling)
    too_big = [f"{name}: {r.shared} B of shared memory" for name, r in results
               if r.shared > SHARED_MEMORY_LIMIT[int(re.search(r"sm_(\d+)", name).group(1))]]
    assert not too_big, "\n".join(too_big)


# Known, measured exceptions (stack bytes per thread, upper bounds), compiled as launched (Triton 3.9). The linear
# cross-entropy forward at (128, 128, 64, 8, 3) spills a little on sm_80 (a 24 B frame since its vocabulary
# range became a runtime split; 16 B before) but ran at 392 TFLOP/s on an H100 (bench/tune.py), 2.4x the
# spill-free (64, 128, 32, 8, 3). The LayerNorm backward at hidden 8192 holds
# 16 columns per thread of the dweight and dbias partial sums beside the row's values at the 128-register cap of
# 16 warps; with residual, bias, dropout and the extra ds input it spills on sm_90 (a 40 B frame; none without
# them, none on sm_80); 32 warps (a 64-register cap) spill more.
_ALLOWED_STACK_BYTES = {"cross_entropy linear_fwd sm_80": 32, "layer_norm bwd N=8192 sm_90 full=True": 64}


def first_sm90_config(kind: str) -> tuple:
    """(BLOCK_M, BLOCK_N, warps, stages) of an attention kind's first config shipped for sm_90 at D=64."""
    return next(e for e in KERNELS[kind][1] if sa.serves(e, 64, 9))[0]


def attention_loops(kind: str, rules: bool, dropout: bool = False):
    """SASS opcode counts of each inner loop of an attention kernel's first sm_90 config at D=64 (bf16)."""
    block_m, block_n, warps, stages = first_sm90_config(kind)
    constexprs = attention_constexprs(kind, block_m, block_n, 64, rules, dropout)
    return loop_opcodes(KERNELS[kind][0], attention_signature(kind, "bf16"), constexprs, 90, warps, stages)


def test_attention_interior_tiles_compile_unmasked(monkeypatch):
    """Without rules each attention kernel has two inner loops on sm_90: the interior of one contiguous sample,
    with no mask, and the masked edge tiles; with rules only the masked loop. The interior has no select per score
    but in the atomic backward: one, on the scores of a key item's tail (the next sample's keys, whose dQ terms
    must be zeros)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kinds = [kind for kind in KERNELS if kind != "fwd_ws"]  # one masked loop, in warpgroups (no rules)
    cases = [(kind, rules) for kind in kinds for rules in (False, True)]
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        loops = dict(zip(cases, pool.map(attention_loops, *zip(*cases))))
    for kind in kinds:
        (interior, masked), (only,) = loops[kind, False], loops[kind, True]
        assert interior["HGMMA"] == masked["HGMMA"] > 0, kind  # the same tile work
        block_m, block_n, warps, _ = first_sm90_config(kind)
        tail_selects = block_m * block_n // (32 * warps) if kind.startswith("bwd") else 0
        assert interior["FSEL"] == tail_selects and masked["FSEL"] >= max(tail_selects, 1), kind
        # The atomic backward's first tile (32x128 over 8 warps) holds 16 scores per thread beside the dQ GEMM and
        # its atomics: the mask is a smaller share of its loop (311 against 359 instructions, Triton 3.9; on the TMA
        # path 336 against 372, its dQ reduce-add needing no row mask in the masked loop either).
        share = 0.92 if kind.startswith("bwd") else 0.85
        assert sum(interior.values()) < share * sum(masked.values()) and only["FSEL"] > 0, kind


def test_attention_dropout_costs_one_instruction_per_use(monkeypatch):
    """Dropout's mask reaches each use of P in one instruction per score or fewer: no multiply by the mask as a
    float (its 1 / (1 - rate) is applied once per output, or fused with the subtraction of delta); the forward
    zeroes dropped 16-bit probabilities a register pair at a time (one PRMT and one AND per pair, no select), the
    dQ kernel selects once per score and the key-side ones twice (P for dV, dP), and no booleans are stored through
    shared memory (a SEL to a byte each) by the key-side kernels, which move the random bytes of their transposed
    mask instead. The forward with dropout stays near 1.35x the instructions of the forward without (Triton 3.9:
    409 against 302 in the pointer kernel, 409 against 305 on the TMA path; 3.6, the GPU image's: 396 against 284,
    411 against 305; 460 against 302 before the pairs). Interior loops, sm_90, D=64."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kinds = [kind for kind in KERNELS if kind != "fwd_ws"]  # its tile is the forward's masked tile
    cases = [(kind, False, dropout) for kind in kinds for dropout in (False, True)]
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        loops = dict(zip(cases, pool.map(attention_loops, *zip(*cases))))
    for kind in kinds:
        plain, drop = loops[kind, False, False][0], loops[kind, False, True][0]
        assert drop["FMUL"] == plain["FMUL"], kind
        key_side = kind.startswith(("bwd", "dkdv"))
        assert not key_side or drop["SEL"] <= plain["SEL"], kind
        if kind.startswith("fwd"):
            block_m, block_n, warps, _ = first_sm90_config(kind)
            assert drop["FSEL"] == plain["FSEL"], kind
            assert drop["PRMT"] - plain["PRMT"] == block_m * block_n // (32 * warps) // 2, kind
            assert sum(drop.values()) < 1.42 * sum(plain.values()), kind
        else:
            assert 0 < drop["FSEL"] <= (2 if key_side else 1) * drop["MUFU"], kind


def _dropout_pair_layouts(case: tuple) -> list:
    """The layouts (their definitions in the TTGIR) of the 16-bit pairs a shipped forward config zeroes with dropout,
    compiled as the spill check compiles it (fp16; Triton's cache serves it again)."""
    kind, index, head_dim, arch, rules = case
    ttgir = compile_attention(kind, KERNELS[kind][1][index][0], head_dim, arch, rules, True).asm["ttgir"]
    aliases = dict(re.findall(r"^(#\w+) = (.*)$", ttgir, re.MULTILINE))
    uses = re.findall(re.escape(rng._ZERO_DROPPED_ASM.value) + r'".*-> tensor<[0-9x]+xf16, (#\w+)>', ttgir)
    return [aliases[use] for use in uses]


def test_dropout_pairs_are_accumulator_register_pairs(monkeypatch):
    """`rng.zero_dropped_16bit` takes two consecutive elements of a thread as columns 2i, 2i + 1 of one row (one
    register): true of an MMA accumulator's layout (sm_80's mma and sm_90's wgmma), where the forward's
    probabilities are, and what its numpy semantics under the interpreter assume; in another layout the mask would
    be misapplied. Checked in the TTGIR of every shipped forward config served with dropout, rules or not."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # in the compiling processes: real JIT functions
    cases = [(kind, index, head_dim, arch, rules) for kind, index, head_dim, arch, rules, dropout in _cases()
             if kind.startswith("fwd") and dropout]
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        for case, layouts in zip(cases, pool.map(_dropout_pair_layouts, cases)):
            assert layouts and all(layout.startswith("#ttg.nvidia_mma<") for layout in layouts), (case, layouts)


# int arguments a launch may pass as 1: batch 1, one head, rows of one token (length bucket 1), a dropout rate
# that rounds to 1/256 (threshold 1), the TMA path and the warp-specialised one left to the autotuner (mode 1)
ONES = ("B", "H", "L", "threshold", "L_BUCKET", "TMA_MODE", "WS_MODE")


def _compiles_with_ones(kind: str) -> str:
    """Compile an attention kind's first sm_90 config (D=64, dropout) with ONES as constants; '' or the error."""
    block_m, block_n, warps, stages = first_sm90_config(kind)
    signature = attention_signature(kind, "bf16")
    ones = [name for name in ONES if name in signature]
    signature = {name: t for name, t in signature.items() if name not in ones}
    constexprs = {**attention_constexprs(kind, block_m, block_n, 64, False, True), **dict.fromkeys(ones, 1)}
    try:
        compile_kernel(KERNELS[kind][0], signature, constexprs, 90, warps, stages)
    except Exception as error:  # any compile error: reported by the test, with its kind
        return f"{type(error).__name__}: {error}"
    return ""


def test_attention_compiles_with_arguments_equal_to_one(monkeypatch):
    """Triton passes an int argument equal to 1 as a compile-time constant (a Python int, with no tensor methods
    such as .to), which the interpreter never does: each attention kernel compiles so with all of ONES equal to
    1 (a dropout threshold of 1, rates from 1/512 to 3/512, is where `threshold.to(...)` failed before)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        errors = dict(zip(KERNELS, pool.map(_compiles_with_ones, KERNELS)))
    assert not any(errors.values()), {kind: error[-300:] for kind, error in errors.items() if error}


def _tensor_ops(case):
    kind, config, head_dim = case
    return attention_tensor_ops(kind, config, head_dim, 90)


def test_shipped_sm90_configs_use_wgmma(monkeypatch):
    """Every attention config shipped for sm_9x runs its GEMMs on wgmma (HGMMA in its SASS, no mma.sync HMMA):
    a config with a 32-row GEMM side compiles to mma.sync there and must serve sm_8x only. Configs of the TMA path
    load their tiles with bulk tensor copies (UTMALDG in their SASS); those of the pointer path never do. The atomic
    backward's TMA configs add their dQ tiles with bulk tensor reductions (UTMAREDG); no other config has one. The
    warp-specialised forward's configs are so (USETMAXREG: registers moved between its warpgroups), no other is."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cases = []
    for kind, (_, table) in KERNELS.items():
        for entry in table:
            dims = [d for d in HEAD_DIMS if sa.serves(entry, d, 9, dropout=False)]
            if dims:
                cases.append((kind, entry[0], dims[0]))
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        ops = dict(zip(cases, pool.map(_tensor_ops, cases)))
    slow = [f"{kind} {config} D={d}: {dict(ops[kind, config, d])}" for kind, config, d in cases
            if not ops[kind, config, d]["HGMMA"] or ops[kind, config, d]["HMMA"]
            or bool(ops[kind, config, d]["UTMALDG"]) != kind.endswith(("_tma", "_ws"))
            or bool(ops[kind, config, d]["UTMAREDG"]) != (kind == "bwd_tma")
            or bool(ops[kind, config, d]["USETMAXREG"]) != (kind == "fwd_ws")]
    assert not slow, "\n".join(slow)
    assert {kind for kind, *_ in cases} == set(KINDS)  # the TMA kinds included


def _dots_per_loop(kind: str) -> float:
    """tl.dot operations per inner-loop body of an attention kernel (no rules: an interior and a masked loop)."""
    compiled = compile_attention(kind, first_sm90_config(kind), 64, 90, False, False, "bf16")
    return compiled.asm["ttir"].count("tt.dot ") / 2


def test_atomic_backward_does_five_gemms_per_tile_pair(monkeypatch):
    """FlashAttention-2's backward: one kernel computes S, dP, dV, dK and dQ once per (key block, query tile), 5
    GEMMs, where the deterministic dK/dV and dQ kernels do 4 + 3 (each recomputes S and P)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        dots = dict(zip(("bwd", "dkdv", "dq"), pool.map(_dots_per_loop, ("bwd", "dkdv", "dq"))))
    assert dots == {"bwd": 5, "dkdv": 4, "dq": 3}
