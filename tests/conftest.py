import os

import pytest
import torch

# Triton kernels run on CPU tensors under its interpreter; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """Small tensors: one intra-op thread is faster, and robust to a loaded machine (OpenMP spin-waits).
    Modules of small-model tests use it: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
