"""The model tests run tiny models: one torch thread is faster than two for them (no parallel-region overhead,
and no stall when another process holds the other core)."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
