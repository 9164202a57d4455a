"""Helpers shared by the op wrappers: output allocation (NaN-poisonable for tests) and input checks."""
import contextlib

import torch

_poison_outputs = False

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def new_output(shape, dtype, device):
    """``torch.empty`` for kernel outputs; filled with NaN inside :func:`poison_outputs` so a kernel that
    skips an element is caught by the tests."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison_outputs and out.is_floating_point():
        out.fill_(float("nan"))
    return out


@contextlib.contextmanager
def poison_outputs(enabled=True):
    """Within this context every output buffer the ops allocate starts out as NaN."""
    global _poison_outputs
    previous, _poison_outputs = _poison_outputs, enabled
    try:
        yield
    finally:
        _poison_outputs = previous


def check_float_tensor(name, tensor, op, dtypes=FLOAT_DTYPES):
    """Raise TypeError unless ``tensor`` is a tensor of one of ``dtypes``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} has dtype {str(tensor.dtype).replace('torch.', '')}; expected one of {names}")
