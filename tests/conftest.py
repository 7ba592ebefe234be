import os

# Triton reads this when a @triton.jit function is defined: set it before any kernel module is imported,
# so the fused kernels run on CPU tensors under the interpreter in CI (no GPU there).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
