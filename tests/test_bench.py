"""The benchmark scripts' CPU smoke pass runs, labels itself, and writes its tables."""
import importlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.parametrize("script, expected", [("attention", {"videobert", "videobert+metadata",
                                                             "sdpa_dense_mask"}),
                                              ("layer_norm", {"videobert_triton", "torch_eager"}),
                                              ("mlm_loss", {"videobert_triton", "torch_eager"})])
def test_benchmark_smoke(script, expected, tmp_path, monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip(f"the GPU run is the benchmark itself (bench/{script}.py), not a test")
    monkeypatch.setenv("VIDEOBERT_BENCH_OUT", str(tmp_path))
    module = importlib.import_module(script)

    assert module.main([]) == 0
    assert "NOT GPU figures" in capsys.readouterr().out
    data = json.loads((tmp_path / f"{script}.json").read_text())
    assert data["meta"]["device"] == "cpu-smoke" and not data["meta"]["gpu_figures"]
    providers = {row["provider"] for row in data["rows"]}
    assert expected <= providers
    assert all(row["ms"] > 0 for row in data["rows"])
    if script == "attention":  # rows with their per-batch setup compare with this kernel's own with setup
        ours = [row for row in data["rows"] if row["provider"].startswith("videobert")]
        assert all(row["speedup_of_videobert"] == 1 for row in ours)
    assert (tmp_path / f"{script}.csv").exists() and (tmp_path / f"{script}.md").exists()


def test_end_to_end_training_benchmark_smoke(tmp_path, monkeypatch, capsys):
    """bench/train.py on the CPU: every provider trains on the same samples; Hugging Face pads them."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    if torch.cuda.is_available():
        pytest.skip("the GPU run is the benchmark itself (bench/train.py), not a test")
    monkeypatch.setenv("VIDEOBERT_BENCH_OUT", str(tmp_path))
    module = importlib.import_module("train")

    assert module.main([]) == 0
    out = capsys.readouterr().out
    assert "NOT GPU figures" in out
    data = json.loads((tmp_path / "train.json").read_text())
    assert data["meta"]["vocab_size"] == 30522 + 2 + 20736  # BERT's word pieces, [>] [FEAT], visual tokens
    rows = data["rows"]
    assert {r["provider"] for r in rows} == {"videobert_fused", "videobert_reference_ops", "hugging_face_bert_sdpa",
                                             "hugging_face_bert_packed"}
    assert "packed+compile: compiled on a GPU only" in out  # the skipped rows say why
    assert "videobert_fused+cuda_graphs: CUDA graphs need a GPU" in out
    assert all(r["tokens_per_s"] > 0 and r["steps_per_s"] > 0 for r in rows)
    hf = next(r for r in rows if r["provider"] == "hugging_face_bert_sdpa")
    assert 0 < hf["padded_waste"] < 1
    best = max((r for r in rows if r["provider"].startswith("hugging_face")), key=lambda r: r["tokens_per_s"])
    assert all(r["best_hugging_face"] == best["provider"] for r in rows)
    assert best["speedup_over_best_hugging_face"] == 1


@pytest.mark.parametrize("presets", ["huge", "base,", "base,xl"])
def test_training_benchmark_rejects_unknown_presets(presets, capsys):
    pytest.importorskip("torch")
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module("train").main(["--presets", presets])
    assert exit_info.value.code == 2 and "expected comma-separated presets" in capsys.readouterr().err


@pytest.mark.parametrize("script, argv, message", [
    ("train", ["--providers", "hugging_face"], "expected comma-separated providers"),
    ("attention", ["--layouts", "packed,"], "expected comma-separated layouts"),
    ("attention", ["--dropouts", "0,1.5"], "expected comma-separated rates"),
    ("layer_norm", ["--dropouts", "x"], "expected comma-separated rates")])
def test_benchmark_selections_reject_unknown_names(script, argv, message, capsys):
    pytest.importorskip("torch")
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(script).main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_selected_providers_and_layouts_only(tmp_path, monkeypatch, capsys):
    """bench/train.py --providers and bench/attention.py --layouts time what they name and nothing else (a
    capped GPU run spends its seconds on the rows it lacks)."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("the GPU run is the benchmark itself, not a test")
    monkeypatch.setenv("VIDEOBERT_BENCH_OUT", str(tmp_path))
    assert importlib.import_module("attention").main(["--layouts", "single"]) == 0
    rows = json.loads((tmp_path / "attention.json").read_text())["rows"]
    assert rows and {row["layout"] for row in rows} == {"single"}
    if importlib.util.find_spec("transformers") is not None:
        assert importlib.import_module("train").main(["--providers", "hugging_face_bert_sdpa"]) == 0
        rows = json.loads((tmp_path / "train.json").read_text())["rows"]
        assert [row["provider"] for row in rows] == ["hugging_face_bert_sdpa"]


def test_results_index_keeps_the_hand_written_part(tmp_path):
    """update_index rewrites the folder list and keeps everything from INDEX_KEEP_MARKER on (the goals table)."""
    import common

    run = tmp_path / "GPU" / "2026-01-01"
    run.mkdir(parents=True)
    (run / "attention.json").write_text(json.dumps({"meta": {"device": "GPU", "date": "2026-01-01T00:00:00"}}))
    goals = f"{common.INDEX_KEEP_MARKER}\n## Goals\n| goal | measured |\n"
    (tmp_path / "README.md").write_text("# stale list\n\n" + goals)
    text = common.update_index(tmp_path).read_text()
    assert "stale list" not in text and "[GPU/2026-01-01](GPU/2026-01-01) | attention |" in text
    assert text.endswith(goals)
    (tmp_path / "README.md").unlink()  # a fresh index has no hand-written part
    assert common.INDEX_KEEP_MARKER not in common.update_index(tmp_path).read_text()


def test_rotating_sets_exceed_the_cache_and_cycle():
    """`rotating` copies the inputs (values and requires_grad kept, memory not shared) until a cycle reads
    `min_bytes`; `bench_ms` hands consecutive calls the next set."""
    torch = pytest.importorskip("torch")
    common = importlib.import_module("common")
    x = torch.randn(256, 64, requires_grad=True)  # 64 KiB
    labels = torch.arange(256)  # 2 KiB
    sets = common.rotating(x, labels, 0.5, min_bytes=200 * 1024)
    assert len(sets) == 4 and sets[0][0] is x
    for copy, ids, scalar in sets[1:]:
        assert torch.equal(copy, x) and copy.requires_grad and copy.is_leaf
        assert copy.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        assert torch.equal(ids, labels) and scalar == 0.5
    assert len(common.rotating(x, min_bytes=0)) == 1
    assert len(common.rotating(x, min_bytes=2**40)) == common.MAX_SETS
    # Views of one storage count once: a fused projection's q, k, v are one read.
    qkv = torch.randn(3, 256, 64)
    assert len(common.rotating(*qkv.unbind(0), min_bytes=3 * 64 * 1024 + 1)) == 2

    seen = []
    common.bench_ms(lambda t, ids, scalar: seen.append(t), sets)
    assert len(seen) >= 4 and [id(t) for t in seen[:4]] == [id(s[0]) for s in sets]
    call = common.cycling(lambda t, ids, scalar: t, sets)
    assert [call() for _ in range(6)] == [s[0] for s in sets + sets[:2]]
    with pytest.raises(ValueError, match="sets"):
        common.bench_ms(lambda: None, [])


def test_gpu_check_quick_runs_the_prepared_plan(tmp_path):
    """`scripts/gpu_check.sh quick` (stub nvidia-smi, timeout and python) runs the kernel tests, then each
    benchmark with --quick under its time cap, the end-to-end one on VideoBERT-large; an unknown mode, or an
    archive without a results folder, is a usage error."""
    import os
    import subprocess

    stubs = {"nvidia-smi": "echo 'name, driver_version'", "timeout": 'echo "cap $1"; shift; exec "$@"',
             "stub-python": 'echo "python $*${VIDEOBERT_EARLY_FAILURES:+ (early failures)}"'}
    for name, body in stubs.items():
        (tmp_path / name).write_text(f"#!/bin/sh\n{body}\n")
        (tmp_path / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHON": "stub-python",
           "VIDEOBERT_BENCH_OUT": str(tmp_path / "out")}
    for name in ("GPU_CHECK_TESTS", "GPU_CHECK_BENCHES", "GPU_CHECK_BENCH_ARGS", "GPU_CHECK_STEP_S"):
        env.pop(name, None)
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    run = subprocess.run(["bash", str(script), "quick"], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    tests = next(line for line in lines if line.startswith("python -m pytest"))
    assert "tests/test_cross_entropy.py" in tests and "tests/test_model.py" in tests
    assert "tests/test_backend.py::test_philox_and_dropout_masks_match_triton_bit_for_bit" in tests  # inline PTX
    assert tests.endswith("(early failures)")  # a capped run still reports what failed
    assert " -n " in tests  # parallel workers (the stub imports any module, xdist too)
    benches = [line for line in lines if line.startswith("python bench/")]
    assert benches == ["python bench/attention.py --quick", "python bench/mlm_loss.py --quick",
                       "python bench/layer_norm.py --quick",
                       "python bench/train.py --quick --presets large --providers "
                       "videobert_fused,hugging_face_bert_packed+compile,videobert_fused+cuda_graphs"]
    caps = [int(line.split()[1]) for line in lines if line.startswith("cap ")]
    assert caps == [120, 120, 70, 45, 180] and sum(caps) <= 540  # 60 s left of 600 for the install
    bad = subprocess.run(["bash", str(script), "bogus"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr
    env = {**env, "GPU_CHECK_ARCHIVE": str(tmp_path / "r.tgz")}
    env.pop("VIDEOBERT_BENCH_OUT")
    bad = subprocess.run(["bash", str(script), "quick"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "needs VIDEOBERT_BENCH_OUT" in bad.stderr  # else it would archive the checkout


def test_early_failures_are_printed_as_they_happen(tmp_path):
    """With VIDEOBERT_EARLY_FAILURES=1 (set by gpu_check.sh) a failure's traceback is printed when the test fails,
    before pytest's summary, which a time cap may never let it reach; without it, nothing extra is printed."""
    import os
    import shutil
    import subprocess

    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path)
    (tmp_path / "test_x.py").write_text("def test_fails():\n    assert 1 == 2, 'boom'\n\n\ndef test_ok():\n    pass\n")
    command = [sys.executable, "-m", "pytest", "-q", "--tb=short", "-p", "no:cacheprovider", "test_x.py"]
    outputs = {}
    for flag in ("1", "0"):
        env = {**os.environ, "VIDEOBERT_EARLY_FAILURES": flag, "PYTHONUNBUFFERED": "1"}  # as gpu_check.sh runs it
        run = subprocess.run(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, timeout=120)
        assert run.returncode == 1, run.stdout
        outputs[flag] = run.stdout
    early = outputs["1"]
    assert "FAILED test_x.py::test_fails (call)" in early
    assert early.index("FAILED test_x.py::test_fails (call)") < early.index("= FAILURES =")
    assert "AssertionError: boom" in early[:early.index("= FAILURES =")]
    assert "(call)" not in outputs["0"]


def test_hugging_face_packed_peer_attends_within_samples():
    """The packed Hugging Face row computes what padded rows do: with position_ids restarting per sample (as
    bench/train.py feeds it) transformers masks attention to each sample, so its hidden states equal those of
    each sample run alone (the peer does the same work as ours, not cross-sample attention)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from videobert.model import segment_positions

    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, attn_implementation="sdpa")
    model = transformers.BertModel(config).eval()
    gen = torch.Generator().manual_seed(3)
    first, second = torch.randint(5, 50, (1, 7), generator=gen), torch.randint(5, 50, (1, 4), generator=gen)
    segments = torch.tensor([[0] * 7 + [1] * 4 + [-1] * 2])
    packed = torch.cat([first, second, torch.zeros(1, 2, dtype=torch.long)], 1)
    with torch.no_grad():
        out = model(input_ids=packed, position_ids=segment_positions(segments)).last_hidden_state
        alone = [model(input_ids=ids).last_hidden_state for ids in (first, second)]
    torch.testing.assert_close(out[:, :7], alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:, 7:11], alone[1], rtol=1e-4, atol=1e-5)


def test_host_overhead_proxy_counts_launches_and_times_both_paths(tmp_path, monkeypatch):
    """bench/host_overhead.py: the eager step launches Triton kernels (stubbed, counted); a graphed step launches
    none from Python and takes less host time."""
    pytest.importorskip("torch")
    monkeypatch.setenv("VIDEOBERT_BENCH_OUT", str(tmp_path))
    assert importlib.import_module("host_overhead").main(["--steps", "2", "--preset", "tiny"]) == 0
    rows = {row["path"]: row for row in json.loads((tmp_path / "host_overhead.json").read_text())["rows"]}
    assert rows["eager"]["triton_launches_per_step"] > 10 and rows["cuda_graphs"]["triton_launches_per_step"] == 0
    assert rows["cuda_graphs"]["host_ms_per_step"] < rows["eager"]["host_ms_per_step"]


def test_attention_internals_counts_pairs_as_the_kernels_walk_them():
    """bench/attention_internals.py's useful share: two samples of 3 and 5 tokens and 2 of padding in a row of 10,
    blocks of 4 queries over key tiles of 2 (a block spans [lo, hi) of its rows' samples, from lo rounded down to
    the alignment); and resident blocks per multiprocessor from registers (8 at a time) and shared memory."""
    pytest.importorskip("triton")
    torch = pytest.importorskip("torch")
    internals = importlib.import_module("attention_internals")
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, -1, -1]])
    # query blocks [0, 4) spans [0, 8): 4 tiles; [4, 8) spans [3, 8): tiles from 2, 3 tiles; [8, 10) padding: none
    assert internals.useful_share((4, 2, 4, 1), True, seg, 2) == (9 + 25) / (4 * 2 * 4 + 4 * 2 * 3)
    # key blocks of 2 over query tiles of 4: [0, 2) and [2, 4) span [0, 3) or [0, 8), [4, 6) and [6, 8) [3, 8)
    assert internals.useful_share((4, 2, 4, 1), False, seg, 4) == (9 + 25) / (2 * 4 * (1 + 2 + 2 + 2))
    # samples [0, 5) and [5, 9): the block [8, 12) spans [5, 9), one tile of 4 from 5, two from 4 aligned to 4
    seg = torch.tensor([[0] * 5 + [1] * 4 + [-1] * 3])
    assert internals.useful_share((4, 4, 4, 1), True, seg, 1) == (25 + 16) / (4 * 4 * (2 + 3 + 1))
    assert internals.useful_share((4, 4, 4, 1), True, seg, 4) == (25 + 16) / (4 * 4 * (2 + 3 + 2))
    # the forward's work items: [0, 5) as [0, 4) and [4, 5) (two tiles each: [0, 5)), [5, 9) (one), padding
    # [9, 12) (none)
    assert internals.blocks_of(seg[0].tolist(), 4, True) == [(0, 4), (4, 5), (5, 9), (9, 12)]
    assert internals.useful_share((4, 4, 4, 1), True, seg, 1, items=True) == (25 + 16) / (4 * 4 * (2 + 2 + 1))
    assert internals.blocks_of([0, 1] * 4, 4, True) == [(0, 4), (4, 8)]  # interleaved: 8 runs, fixed blocks
    assert internals.blocks_per_sm(126, 66048, 8, 90) == 2 and internals.blocks_per_sm(219, 74240, 8, 90) == 1
    assert internals.blocks_per_sm(32, 200 * 1024, 4, 90) == 1  # shared memory binds
