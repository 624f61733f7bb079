"""The source distribution carries every source a build needs, and builds: without nvcc a pure-Python wheel,
with nvcc a py3-none-<platform> wheel holding the CUDA library; both install and import."""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdist")
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))"
    built = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    return out / built.stdout.split()[-1]


def test_sdist_carries_every_source(sdist):
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    tracked = subprocess.run(["git", "ls-files", "kernels"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    needed = set(tracked or (str(p.relative_to(ROOT)) for p in (ROOT / "kernels").rglob("*")
                             if p.suffix in (".py", ".cu", ".cuh", ".h")))
    needed |= {"CMakeLists.txt", "LICENSE", "README.md", "setup.py", "pyproject.toml", "MANIFEST.in",
               "videobert/_kernels/__init__.py", "videobert/cli.py"}
    assert {"kernels/cuda/videobert_kernels.h", "kernels/reference.py"} <= needed
    assert needed <= names, f"missing from the sdist: {sorted(needed - names)}"
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]  # no build products


def _without_nvcc(env: dict) -> dict:
    """The environment with no CUDA_HOME/CUDA_PATH and no PATH entry holding nvcc."""
    env = {k: v for k, v in env.items() if k not in ("CUDA_HOME", "CUDA_PATH", "VIDEOBERT_BUILD_CUDA")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not (Path(p) / "nvcc").exists())
    return env


def _wheel_and_install(sdist: Path, tmp_path: Path, env: dict) -> tuple[Path, Path]:
    """Build a wheel from the sdist and install it into a folder of its own: (wheel, folder)."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(sdist)],
                           env=env, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    (wheel,) = wheels.glob("*.whl")
    done = subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return wheel, target


def _imports(target: Path, code: str) -> str:
    """Run `code` where the installed folder comes first (never the checkout: cwd is elsewhere)."""
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=target.parent, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_sdist_installs_pure_python_without_nvcc(sdist, tmp_path):
    wheel, target = _wheel_and_install(sdist, tmp_path, _without_nvcc(dict(os.environ)))
    assert wheel.name.endswith("-py3-none-any.whl")
    package = target / "videobert" / "_kernels"
    assert (package / "reference.py").is_file() and not (package / "cuda" / "libvideobert_kernels.so").exists()
    assert not (target / "kernels").exists()  # never a top-level module of that name
    out = _imports(target, "import videobert, videobert._kernels.reference as r, videobert._kernels.triton.launch; "
                           "print(r.__file__); print(videobert.__version__)")
    path, version = out.split()
    assert Path(path).is_relative_to(target) and version == __import__("videobert").__version__


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed on this machine")
def test_sdist_builds_the_cuda_library_with_nvcc(sdist, tmp_path):
    env = {**os.environ, "VIDEOBERT_BUILD_CUDA": "1", "VIDEOBERT_CUDA_ARCHS": "9.0"}  # one arch: a quicker build
    wheel, target = _wheel_and_install(sdist, tmp_path, env)
    assert "-py3-none-linux_" in wheel.name, wheel.name  # any Python 3, any torch, this platform
    library = target / "videobert" / "_kernels" / "cuda" / "libvideobert_kernels.so"
    assert library.is_file()
    out = _imports(target, "from videobert._kernels.cuda import library; print(library._PATH); "
                           "print(library.layer_norm_max_hidden(True))")
    assert out.split() == [str(library.resolve()), "8192"]
