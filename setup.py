"""Packaging: installs `videobert`, ships the top-level `kernels/` folder as `videobert._kernels`, and builds the
CUDA library `videobert/_kernels/cuda/libvideobert_kernels.so` when it can.

A top-level Python module named `kernels` must never be installed or importable from the checkout (a PyPI package
owns that name and transformers imports it): the folder has no `__init__.py`, the package's own lives in
`videobert/_kernels/`, its subpackages `triton` and `cuda` map onto `kernels/triton` and `kernels/cuda`, and the
folder's top-level modules are copied into the package when a wheel is built (an editable install reaches them
through `videobert._kernels.__path__`).

The CUDA library: every `kernels/cuda/*.cu` (framework-free sources with a C API, videobert_kernels.h) is
compiled by `nvcc` and linked with the static CUDA runtime into a plain shared library that Python loads with
ctypes: it needs no torch at build time and works with any torch build, so wheels are tagged py3-none-<platform>.
It is built when `nvcc` is found, or when VIDEOBERT_BUILD_CUDA=1 (then failing loudly); VIDEOBERT_BUILD_CUDA=0
skips it. Architectures: VIDEOBERT_CUDA_ARCHS or TORCH_CUDA_ARCH_LIST
("8.0;9.0+PTX" by default; "9.0a" selects sm_90a).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
KERNEL_SUBPACKAGES = ["triton", "cuda"]  # kernels/<name> -> videobert._kernels.<name>
DEFAULT_ARCHS = "8.0;9.0+PTX"
LIBRARY_NAME = "libvideobert_kernels.so"  # kernels/cuda/library.py loads it by this name


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(cuda_home, "bin", "nvcc") if cuda_home else None
    return str(candidate) if candidate and candidate.exists() else shutil.which("nvcc")


def gencode_flags(spec: str) -> list[str]:
    """nvcc -gencode flags for an arch list like "8.0;9.0a+PTX" (TORCH_CUDA_ARCH_LIST syntax)."""
    flags = []
    for item in spec.replace(",", ";").replace(" ", ";").split(";"):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        arch = item.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


def _cuda_extension():
    """(ext_modules, cmdclass) for the CUDA library, or ([], {}) with a message when it is not built."""
    mode = os.environ.get("VIDEOBERT_BUILD_CUDA", "auto")
    if mode == "0":
        return [], {}
    nvcc = _nvcc()
    if nvcc is None:
        if mode == "1":
            sys.exit("VIDEOBERT_BUILD_CUDA=1 but the CUDA library cannot be built: nvcc not found")
        print("videobert: not building the CUDA library (nvcc not found); the torch and triton backends still work")
        return [], {}
    from setuptools.command.build_ext import build_ext

    cuda_dir = ROOT / "kernels" / "cuda"
    archs = os.environ.get("VIDEOBERT_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS

    class BuildCudaLibrary(build_ext):
        """Builds libvideobert_kernels.so with nvcc from every kernels/cuda/*.cu (static CUDA runtime): a plain
        shared library that Python loads with ctypes, tied to no Python or torch ABI."""

        def get_ext_filename(self, fullname):
            *package, _ = fullname.split(".")
            return os.path.join(*package, LIBRARY_NAME)

        def build_extension(self, ext):
            out_dir = Path(self.build_temp) / "nvcc"
            out_dir.mkdir(parents=True, exist_ok=True)
            headers = [*cuda_dir.glob("*.cuh"), *cuda_dir.glob("*.h")]
            objects = []
            for source in map(Path, ext.sources):
                obj = out_dir / (source.stem + ".o")
                newest = max(p.stat().st_mtime for p in [source, *headers])
                if not obj.exists() or obj.stat().st_mtime < newest:
                    self._run([nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-lineinfo", *gencode_flags(archs),
                               "-c", str(source), "-o", str(obj)])
                objects.append(str(obj))
            target = Path(self.get_ext_fullpath(ext.name))
            target.parent.mkdir(parents=True, exist_ok=True)
            self._run([nvcc, "-shared", "-cudart", "static", *gencode_flags(archs), *objects, "-o", str(target)])

        @staticmethod
        def _run(cmd):
            print(" ".join(cmd))
            subprocess.check_call(cmd)

    sources = sorted(str(p.relative_to(ROOT)) for p in cuda_dir.glob("*.cu"))
    return [Extension("videobert._kernels.cuda.libvideobert_kernels", sources)], {"build_ext": BuildCudaLibrary}


class PlatformWheel(bdist_wheel):
    """A wheel for any Python 3 and any torch on this platform: the compiled library has no Python ABI."""

    def get_tag(self):
        *_, platform = super().get_tag()
        return "py3", "none", platform


class BuildPyWithKernelModules(build_py):
    """build_py, plus the top-level modules of `kernels/` (reference.py) copied into videobert/_kernels."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reaches them through the package's path
            return
        target = Path(self.build_lib, "videobert", "_kernels")
        self.mkpath(str(target))
        for module in sorted((ROOT / "kernels").glob("*.py")):
            self.copy_file(str(module), str(target / module.name))


ext_modules, cmdclass = _cuda_extension()
setup(
    packages=["videobert", "videobert.ops", "videobert._kernels"]
    + [f"videobert._kernels.{name}" for name in KERNEL_SUBPACKAGES],
    package_dir={"videobert": "videobert", **{f"videobert._kernels.{name}": f"kernels/{name}"
                                              for name in KERNEL_SUBPACKAGES}},
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithKernelModules, **cmdclass, **({"bdist_wheel": PlatformWheel} if ext_modules else {})},
)
