"""Packaging: installs `videobert` and maps the top-level `kernels/` folder to `videobert._kernels`.

A top-level Python module named `kernels` must never be installed (a PyPI package owns that name
and transformers imports it), so the folder is shipped under the `videobert` namespace instead.
"""
from setuptools import setup

KERNEL_PACKAGES = ["kernels", "kernels.triton"]

setup(
    packages=["videobert", "videobert.ops"] + [p.replace("kernels", "videobert._kernels", 1) for p in KERNEL_PACKAGES],
    package_dir={"videobert": "videobert", "videobert._kernels": "kernels"},
)
