"""Packaging: installs `videobert`, ships the top-level `kernels/` folder as `videobert._kernels`, and builds the
CUDA extension `videobert._kernels.cuda._C` when it can.

A top-level Python module named `kernels` must never be installed or importable from the checkout (a PyPI package
owns that name and transformers imports it): the folder has no `__init__.py`, the package's own lives in
`videobert/_kernels/`, its subpackages `triton` and `cuda` map onto `kernels/triton` and `kernels/cuda`, and the
folder's top-level modules are copied into the package when a wheel is built (an editable install reaches them
through `videobert._kernels.__path__`).

The extension: every `kernels/cuda/*.cu` is compiled by `nvcc` (framework-free sources) and linked with the
thin `binding.cpp` against the installed torch (CPU-only builds work: the binding needs no CUDA headers) and
the static CUDA runtime. It is built when `nvcc` is found and torch is importable at build time (so install
with `pip install --no-build-isolation`), or when VIDEOBERT_BUILD_CUDA=1 (then failing loudly);
VIDEOBERT_BUILD_CUDA=0 skips it. Architectures: VIDEOBERT_CUDA_ARCHS or TORCH_CUDA_ARCH_LIST
("8.0;9.0+PTX" by default; "9.0a" selects sm_90a).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
KERNEL_SUBPACKAGES = ["triton", "cuda"]  # kernels/<name> -> videobert._kernels.<name>
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(cuda_home, "bin", "nvcc") if cuda_home else None
    return str(candidate) if candidate and candidate.exists() else shutil.which("nvcc")


def _cudart_dir(nvcc: str) -> str | None:
    """The folder holding libcudart_static.a: under CUDA_HOME, nvcc's installation or /usr/local/cuda."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), Path(nvcc).resolve().parent.parent,
             "/usr/local/cuda"]
    for root in filter(None, roots):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            if Path(root, sub, "libcudart_static.a").exists():
                return str(Path(root, sub))
    return None


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
    """(ext_modules, cmdclass) for the CUDA extension, or ([], {}) with a message when it is not built."""
    mode = os.environ.get("VIDEOBERT_BUILD_CUDA", "auto")
    if mode == "0":
        return [], {}
    nvcc = _nvcc()
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        CppExtension = None
    cudart = _cudart_dir(nvcc) if nvcc else None
    reason = ("nvcc not found" if nvcc is None else
              "torch is not importable at build time (use pip install --no-build-isolation)"
              if CppExtension is None else
              "libcudart_static.a not found (set CUDA_HOME)" if cudart is None else None)
    if reason is not None:
        if mode == "1":
            sys.exit(f"VIDEOBERT_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        print(f"videobert: not building the CUDA extension ({reason}); the torch and triton backends still work")
        return [], {}

    cuda_dir = ROOT / "kernels" / "cuda"
    sources = sorted(cuda_dir.glob("*.cu"))
    archs = os.environ.get("VIDEOBERT_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS

    class BuildWithNvcc(BuildExtension):
        """Compiles the .cu sources with nvcc into objects linked into the extension (rebuilt when newer)."""

        def build_extensions(self):
            out_dir = Path(self.build_temp) / "nvcc"
            out_dir.mkdir(parents=True, exist_ok=True)
            headers = list(cuda_dir.glob("*.cuh")) + list(cuda_dir.glob("*.h"))
            for ext in self.extensions:
                for source in sources:
                    obj = out_dir / (source.stem + ".o")
                    newest = max(p.stat().st_mtime for p in [source, *headers])
                    if not obj.exists() or obj.stat().st_mtime < newest:
                        cmd = [nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-lineinfo", *gencode_flags(archs),
                               "-c", str(source), "-o", str(obj)]
                        print(" ".join(cmd))
                        subprocess.check_call(cmd)
                    ext.extra_objects.append(str(obj))
            super().build_extensions()

    ext = CppExtension(
        "videobert._kernels.cuda._C", ["kernels/cuda/binding.cpp"],
        library_dirs=[cudart], libraries=["cudart_static", "rt", "pthread", "dl"],
        extra_compile_args=["-O2"])
    return [ext], {"build_ext": BuildWithNvcc.with_options(no_python_abi_suffix=True)}


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
    cmdclass={"build_py": BuildPyWithKernelModules, **cmdclass},
)
