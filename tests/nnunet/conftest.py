"""Fixtures of the PyTorch test process (never imports TensorFlow)."""
from __future__ import annotations

import pytest


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine, multi-threaded torch is many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
