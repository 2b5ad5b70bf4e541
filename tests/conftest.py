"""Test configuration.

Without a GPU, the Triton kernels run under Triton's interpreter on CPU tensors: TRITON_INTERPRET must be set
before triton decorates the kernels, i.e. before fastattn is imported -- hence here, at conftest import.
With a GPU, the same parametrised tests run the compiled kernels on CUDA tensors.
Every test runs with poisoned kernel outputs (NaN-filled before the kernel writes them).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["FASTATTN_POISON_OUTPUTS"] = "1"
os.environ.pop("FASTATTN_BACKEND", None)

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: slow on CPU (Triton interpreter)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ops():
    """torch.ops.fastattn, the compiled extension's ops (skips the test where the extension is unavailable)."""
    from fastattn import _ext
    err = _ext.error()
    if err is not None:
        pytest.skip(f"the compiled kernels are not available here: {err}")
    return torch.ops.fastattn
