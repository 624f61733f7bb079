"""NVTX ranges of videobert.profiling: usable with or without the nvtx package and a GPU, invisible to
torch.compile (the encoder's per-layer ranges are covered by test_model's fullgraph compile)."""
import pytest
import torch

from videobert import profiling


@pytest.mark.parametrize("with_package", [True, False])
def test_ranges_nest_and_pass_exceptions_through(monkeypatch, with_package):
    if not with_package:
        monkeypatch.setattr(profiling, "_nvtx", None)
    elif profiling._nvtx is None:
        pytest.skip("the nvtx package is not installed (pip install -e '.[profile]')")
    with profiling.nvtx_range("outer"), profiling.nvtx_range("inner"):
        value = 1
    assert value == 1
    with pytest.raises(KeyError):
        with profiling.nvtx_range("failing"):
            raise KeyError("x")


def test_a_range_inside_a_compiled_function_breaks_no_graph():
    def f(x):
        with profiling.nvtx_range("step"):
            return x * 2 + 1

    x = torch.arange(4.0)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), f(x))
