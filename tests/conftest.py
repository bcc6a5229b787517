import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def smollm():
    """The real smollm2-135m (fetched from PyPI once, cached), float32 on CPU."""
    from kvagents import KVModel

    return KVModel.from_pretrained("smollm2-135m", dtype="float32", device="cpu").load()


@pytest.fixture(scope="module")
def interp():
    """Triton kernel tests on CPU tensors: skip unless this process runs Triton's interpreter (see
    tests/triton_interpreter.py, which the kernel test modules import before kvagents)."""
    from triton_interpreter import require_interpreter

    require_interpreter()
