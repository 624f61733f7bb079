"""Kernel sources as `videobert._kernels`: PyTorch references, Triton kernels, CUDA C++.

Nothing here is public API; `videobert.ops` validates inputs, picks a backend and calls in.

The sources live in the checkout's top-level `kernels/` folder, which has no `__init__.py` on purpose: run from
the checkout root (where `python -m ...` puts it on `sys.path`), a package there would shadow the PyPI package
`kernels` that transformers imports. An installed wheel carries the sources inside this package (setup.py copies
them); from a source checkout or an editable install this package reaches into that folder.
"""
from pathlib import Path

_SOURCES = Path(__file__).resolve().parents[2] / "kernels"
# The marker keeps an unrelated `kernels` beside an installed videobert (site-packages/kernels, the PyPI package)
# out of this package's path.
if (_SOURCES / "cuda" / "videobert_kernels.h").is_file() and not Path(__file__).with_name("reference.py").exists():
    __path__.append(str(_SOURCES))
