"""Test setup. Runs before t2t_fast is imported so the Triton interpreter can be switched on for CPU runs."""
import os

import torch

if not torch.cuda.is_available():
    # Triton kernels then run on CPU tensors in the interpreter (must be set before @triton.jit runs).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import t2t_fast  # noqa: E402
from t2t_fast.backend import unavailable_reason  # noqa: E402


def pytest_report_header(config):
    return [f"t2t_fast from {os.path.dirname(t2t_fast.__file__)}",
            f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}"]


def pytest_configure(config):
    # Without CUDA the Triton tests run in the interpreter: stop at once, saying why, where it cannot work.
    if not torch.cuda.is_available():
        reason = unavailable_reason("triton", "cpu")
        if reason is not None:
            raise pytest.UsageError(f"the Triton kernel tests cannot run on this machine: {reason}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield



@pytest.fixture
def calls_of(monkeypatch):
    """``calls_of(module, name)``: the list of argument tuples of every call of ``module.name`` from now on (the
    function still runs)."""

    def watch(module, name):
        calls, original = [], getattr(module, name)

        def counting(*args):
            calls.append(args)
            return original(*args)

        monkeypatch.setattr(module, name, counting)
        return calls

    return watch
