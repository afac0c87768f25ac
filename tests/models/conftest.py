"""Shared fixtures of the model tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: tiny tensors only pay barrier overhead for more (and stall on a shared machine), and the
    stored outputs (test_preserve_outputs.py) depend on the summation order, which depends on the thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
