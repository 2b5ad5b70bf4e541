"""fastattn build.

The Python packages: `fastattn` (kernels, dispatch, modules) and `fastattn.models` (mapped from the top-level
models/ directory).  The C++/CUDA extension in csrc/ arrives with a later issue; csrc/ is empty for now.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["fastattn", "fastattn.*"])
packages += ["fastattn.models"] + ["fastattn.models." + p for p in find_packages("models")]

setup(
    name="fastattn",
    version="0.1.0",
    description="Fused attention kernels (Triton) for PyTorch: dense, causal, masked, GQA; drop-in modules",
    python_requires=">=3.9",
    packages=packages,
    package_dir={"fastattn.models": "models"},
    install_requires=["torch>=2.5", "numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark"], "bench": ["matplotlib"]},
)
