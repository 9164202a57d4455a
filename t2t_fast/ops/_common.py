"""Helpers shared by the op wrappers: output allocation (NaN-poisonable for tests), input checks, launch
helpers (``cdiv``, ``device_guard``) and the one error for a backend that cannot take an input."""
import contextlib
from typing import Optional, Tuple

import torch
import torch.utils._python_dispatch
from torch.utils.weak import WeakIdKeyDictionary

from t2t_fast._native import native_module
from t2t_fast.backend import BackendUnavailableError, transform_active
from t2t_fast.geometry import is_int

_poison_outputs = False

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# what the vectorised C++ CPU kernels (csrc/cpu_kernels.inc and the units beside it) take
CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
# dtype codes of the native extension (csrc/restructurize_unfold.h: enum DType)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops do their statistics and feature maths in: float64 stays float64, every other float
    dtype computes in float32."""
    return torch.promote_types(dtype, torch.float32)


def check_float_tensor(name, tensor, op, dtypes=FLOAT_DTYPES):
    """Raise TypeError unless ``tensor`` is a tensor of one of ``dtypes``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} has dtype {str(tensor.dtype).replace('torch.', '')}; expected one of {names}")


def image_sizes(op, name, x, grid_size):
    """(B, C, H, W) of the input of a soft split: an NCHW image (``grid_size`` None) or tokens
    (B, H*W, C) with ``grid_size=(H, W)``. Raises ValueError naming the problem."""
    if x.dim() == 4:
        if grid_size is not None:
            raise ValueError(f"{op}: grid_size is only for token input (B, H*W, C); {name} is a 4-D image")
        sizes = tuple(x.shape)
    elif x.dim() == 3:
        if grid_size is None:
            raise ValueError(f"{op}: token input (B, H*W, C) needs grid_size=(H, W)")
        if (not isinstance(grid_size, (tuple, list)) or len(grid_size) != 2
                or not all(is_int(g) and g > 0 for g in grid_size)):
            raise ValueError(f"{op}: grid_size must be two positive ints (H, W), got {grid_size!r}")
        height, width = grid_size
        if height * width != x.shape[1]:
            raise ValueError(f"{op}: grid_size {tuple(grid_size)} has {height * width} positions but {name} has "
                             f"{x.shape[1]} tokens (N must equal H*W)")
        sizes = (x.shape[0], x.shape[2], height, width)
    else:
        raise ValueError(f"{op}: {name} must be tokens (B, H*W, C) with grid_size, or an image (B, C, H, W); "
                         f"got {x.dim()} dims")
    if sizes[1] == 0:
        raise ValueError(f"{op}: {name} has no channels")
    return sizes


def split_geometry(x, grid_h, grid_w):
    """((B, C, H, W), element strides as (B, C, H, W)) of a soft-split input: tokens (B, H*W, C) on a
    ``grid_h`` x ``grid_w`` grid (row-major), or an NCHW image (the grid arguments are then ignored)."""
    if x.dim() == 3:
        batch, _, channels = x.shape
        return (batch, channels, grid_h, grid_w), (x.stride(0), x.stride(2), grid_w * x.stride(1), x.stride(1))
    return tuple(x.shape), tuple(x.stride())


def as_image(x: torch.Tensor, grid_size: Optional[Tuple[int, int]]) -> torch.Tensor:
    """The NCHW view of a soft-split input: tokens (B, H*W, C) are transposed and reshaped, images returned as-is."""
    if grid_size is None:
        return x
    batch, _, channels = x.shape
    return x.transpose(1, 2).reshape(batch, channels, grid_size[0], grid_size[1])


def direct_calls_allowed(tensor):
    """Whether the extension's kernels may be called on ``tensor`` without the dispatcher: a plain CPU tensor,
    no ``torch.compile`` trace, and no dispatch mode or functorch transform that would need to see the calls (fake
    tensors, vmap, FLOP counters, ...)."""
    if torch.compiler.is_compiling() or type(tensor) is not torch.Tensor or tensor.device.type != "cpu":
        return False
    in_mode = getattr(torch.utils._python_dispatch, "is_in_torch_dispatch_mode", None)
    return in_mode is not None and not in_mode() and not transform_active()


def differentiable_backward(reference, inputs, needs_grad, grad_output):
    """The gradients of ``reference(*inputs)`` (the op's pure-torch twin) for the inputs where ``needs_grad``, as a
    graph that can be differentiated again (None for the others): a fused op's backward under
    ``create_graph=True``, whose backward kernels have no formula of their own."""
    wanted = [i for i, needed in enumerate(needs_grad) if needed]
    with torch.enable_grad():
        grads = torch.autograd.grad(reference(*inputs), [inputs[i] for i in wanted], grad_output,
                                    create_graph=True, allow_unused=True)
    result = [None] * len(inputs)
    for i, grad in zip(wanted, grads):
        result[i] = grad
    return result


def storage_extent(tensor):
    """Elements ``tensor``'s storage holds from its first element: the extension checks what a kernel will
    reach against it."""
    return tensor.untyped_storage().nbytes() // tensor.element_size() - tensor.storage_offset()


def float32_parameter(tensor):
    """A LayerNorm parameter as the C++ kernels read it: ``tensor`` itself where it is float32 and contiguous, else
    a float32 contiguous copy; with its (address, extent). Keep the returned tensor alive during the call."""
    if tensor.dtype != torch.float32 or not tensor.is_contiguous():
        tensor = tensor.detach().to(torch.float32).contiguous()
    return tensor, (tensor.data_ptr(), storage_extent(tensor))


def fingerprint_buffer(tensor):
    """``(address, bytes)`` of a CPU tensor, as :func:`sample_fingerprint` takes it: no more bytes than its storage
    holds from its first element (none where the storage was resized to nothing, as FSDP does to sharded
    parameters)."""
    return tensor.data_ptr(), max(0, min(tensor.nbytes, storage_extent(tensor) * tensor.element_size()))


def sample_fingerprint(buffers):
    """A hash of a sample of the :func:`fingerprint_buffer` ``buffers``' bytes (8 words each): it changes when a
    tensor is overwritten as a whole, also through ``tensor.data``, which leaves the version counter alone. None
    without the extension."""
    native = native_module()
    return None if native is None else native.sample_fingerprint(buffers)


class PerWeightCache:
    """``cache(weight)``: ``build(weight)`` made once per weight and rebuilt when the weight is changed in place (its
    address or version counter moves, or a sample of its bytes changes: writes through ``weight.data`` leave the
    version counter alone; seen where the extension is built), kept only as long as the weight lives: a weight
    packed or reordered for a CPU kernel. Not for weights created under ``torch.inference_mode`` (no version
    counter)."""

    def __init__(self, build):
        self._build = build
        # weight -> ((address, version, fingerprint) it was built from, the result)
        self._entries = WeakIdKeyDictionary()

    def __call__(self, weight):
        fingerprint = sample_fingerprint([fingerprint_buffer(weight)]) if weight.is_cpu else None
        key = (weight.data_ptr(), weight._version, fingerprint)
        entry = self._entries.get(weight)
        if entry is None or entry[0] != key:
            entry = (key, self._build(weight))
            self._entries[weight] = entry
        return entry[1]


def cdiv(a, b):
    """Ceiling division of non-negative ints (grid sizes)."""
    return (a + b - 1) // b


def device_guard(tensor):
    """Make ``tensor``'s CUDA device current for a kernel launch (a no-op for CPU tensors)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def backend_cannot_take(op, backend, reason):
    """Raise :class:`BackendUnavailableError`: the forced ``backend`` cannot take this input (``reason``)."""
    raise BackendUnavailableError(f"{op}: backend {backend!r} cannot take this input: {reason}")
