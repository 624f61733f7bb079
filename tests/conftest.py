"""Shared test settings: tolerances per dtype (stated once, here), devices, and the Triton interpreter."""
import importlib.util
import os
import sys

import pytest
import torch

# Without a GPU, Triton kernels are tested on CPU tensors through the interpreter; the switch must be
# set before triton decorates any kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, tests take each kernel's first shipped config instead of autotuning every new shape (minutes of
# compiling); test_attention_triton runs the autotuned path once explicitly.
os.environ.setdefault("VIDEOBERT_AUTOTUNE", "0")

# (rtol, atol) of a result in this dtype against a float64 computation of the same function.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 2e-3),
    torch.bfloat16: (5e-2, 2e-2),
}

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# torch.library.opcheck imports expecttest, which a GPU image may lack (scripts/gpu_wheels.sh brings it).
OPCHECK = pytest.mark.skipif(importlib.util.find_spec("expecttest") is None,
                             reason="torch.library.opcheck needs expecttest (pip install expecttest)")

# CPU always; CUDA as well when a GPU is present (those cases skip with a reason otherwise).
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "") -> None:
    """Compare `actual` (computed in `dtype`) with a float64 `expected` at the tolerance of `dtype`."""
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), rtol=rtol, atol=atol,
                               msg=lambda m: f"{name}: {m}")


def triton_device() -> str:
    """Where Triton kernels run in this session ("cuda", or "cpu" under the interpreter); skips the test where
    they cannot run (no GPU and TRITON_INTERPRET unset)."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    return "cpu"


def pytest_runtest_logreport(report) -> None:
    """With VIDEOBERT_EARLY_FAILURES=1 (scripts/gpu_check.sh sets it) each failure is printed with its traceback
    as it happens, so a run stopped by a time cap still says what failed and why."""
    if report.failed and os.environ.get("VIDEOBERT_EARLY_FAILURES") == "1":
        sys.stderr.write(f"\nFAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n")
        sys.stderr.flush()


def pytest_report_header(config) -> str:
    """The versions this run resolved (a fresh environment takes the newest): what 'last seen passing' cites."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "triton", "numpy", "transformers", "kernels", "tokenizers", "safetensors"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} absent")
    return f"videobert dependencies: python {sys.version.split()[0]}, " + ", ".join(found)
