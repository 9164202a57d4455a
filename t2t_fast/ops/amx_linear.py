"""bfloat16 linear layers on AMX tiles, for CPU inference: ``y = x W^T + b``, optionally followed by the exact GELU.

:func:`amx_linear` computes it with the ``cpp`` backend's kernel where :func:`cpp_unsupported` allows;
:func:`amx_linear_ref` is ``F.linear`` (then ``F.gelu``), the numbers it reproduces. The kernel packs the weight
once into the layout the tiles load (:func:`packed_weight`, kept beside the weight as long as it lives and rebuilt
when it changes in place), then per block of 32 rows and 32 output features accumulates the products in float32
tiles over the inputs (32 at a time), adds the bias, applies the GELU (erf to 1.5e-7) and rounds to bf16 once.
Forward only, bfloat16 only, on CPUs whose :func:`t2t_fast.backend.cpu_isa` is ``'amx'``, in and out features
multiples of 32. :func:`t2t_fast.onednn.linear` (the linears of an :func:`t2t_fast.optimize_for_inference` model)
takes it where it was measured faster than oneDNN's primitive: up to :data:`t2t_fast.onednn.AMX_LINEAR_MAX_ROWS`
rows.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from t2t_fast._native import native_module
from t2t_fast.backend import cpu_isa, is_exporting, requested_backend, select_backend, unavailable_reason
from t2t_fast.ops._common import (PerWeightCache, backend_cannot_take, check_float_tensor, new_output,
                                  storage_extent)

_OP = "amx_linear"
MULTIPLE = 32  # in and out features of the kernel are multiples of this


def amx_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   gelu: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, then the exact GELU when ``gelu``."""
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


def _validate(x, weight, bias, gelu):
    check_float_tensor("x", x, _OP)
    check_float_tensor("weight", weight, _OP)
    if weight.dim() != 2:
        raise ValueError(f"{_OP}: weight must be (out_features, in_features), got {tuple(weight.shape)}")
    _validate_sizes(x, weight.shape, bias, gelu)


def _validate_sizes(x, weight_shape, bias, gelu):
    if bias is not None:
        check_float_tensor("bias", bias, _OP)
    if x.dim() == 0 or x.shape[-1] != weight_shape[1]:
        raise ValueError(f"{_OP}: x (..., in_features) and weight (out_features, in_features) do not match: "
                         f"{tuple(x.shape)} and {tuple(weight_shape)}")
    if bias is not None and tuple(bias.shape) != (weight_shape[0],):
        raise ValueError(f"{_OP}: bias must be ({weight_shape[0]},), got {tuple(bias.shape)}")
    if not isinstance(gelu, bool):
        raise TypeError(f"{_OP}: gelu must be a bool, got {gelu!r}")


def cpp_unsupported(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why the AMX kernel cannot take this (validated) input, or None: it needs the extension, a CPU whose
    :func:`t2t_fast.backend.cpu_isa` is ``'amx'``, bfloat16 tensors, in and out features that are multiples of
    32, rows of ``x`` with adjacent elements (the leading dims one stride apart), no gradient to compute, no
    export in progress, no ``torch.compile`` trace (the weight is packed outside graphs; inductor makes its own
    GEMMs), and a weight not created under ``torch.inference_mode`` (its packing is cached by its version)."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    reason = _kernel_unsupported(x, weight.shape, weight.dtype, bias, grad)
    if reason is None and torch.compiler.is_compiling():
        return "torch.compile is tracing (the weight is packed outside graphs; inductor makes its own GEMMs)"
    if reason is None and weight.is_inference():
        return "a weight created under torch.inference_mode (no version counter to tell an in-place change)"
    return reason


def _kernel_unsupported(x, weight_shape, weight_dtype, bias, grad):
    """What the kernel itself needs of a call (:func:`cpp_unsupported` less what concerns the packing)."""
    reason = unavailable_reason("cpp", x.device.type)
    if reason is not None:
        return reason
    if cpu_isa() != "amx":
        return f"the CPU kernels' instruction set is {cpu_isa()} (the kernel needs amx: AMX tiles)"
    if x.dtype != torch.bfloat16 or weight_dtype != torch.bfloat16 or (bias is not None
                                                                       and bias.dtype != torch.bfloat16):
        return "a dtype other than bfloat16 (the kernel takes bfloat16)"
    if weight_shape[0] % MULTIPLE or weight_shape[1] % MULTIPLE:
        return (f"weight {tuple(weight_shape)} (the kernel takes in and out features that are multiples of "
                f"{MULTIPLE})")
    if grad:
        return "a gradient is needed (the kernel is forward-only)"
    if _rows(x) is None:
        return f"strides {tuple(x.stride())} (the kernel reads rows of adjacent elements, one stride apart)"
    if is_exporting():
        return "an export is in progress (exports record the torch ops)"
    return None


def _rows(x):
    """``x`` as a (rows, in_features) view with adjacent elements along a row, or None where its strides do not
    allow one."""
    try:
        rows = x.view(-1, x.shape[-1])
    except RuntimeError:
        return None
    if rows.shape[1] > 1 and rows.stride(1) != 1 or rows.shape[0] > 1 and rows.stride(0) < rows.shape[1]:
        return None
    return rows


def _pack(weight):
    source = weight.detach().contiguous()
    packed = torch.empty(source.numel(), dtype=torch.bfloat16)
    native_module().linear_pack_weight_cpu((source.data_ptr(), storage_extent(source)), source.shape[0],
                                           source.shape[1], (packed.data_ptr(), storage_extent(packed)))
    return packed


_packed_weights = PerWeightCache(_pack)


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (bf16, (out_features, in_features), features multiples of 32) in the kernel's layout: packed
    once, rebuilt when the weight is changed in place, kept only as long as the weight lives."""
    return _packed_weights(weight)


def amx_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, gelu: bool = False,
               backend=None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (then the exact GELU when ``gelu``) on AMX tiles where the kernel takes the
    input.

    Args:
        x: (..., in_features).
        weight: (out_features, in_features); bias: (out_features,) or None.
        gelu: apply the exact (erf) GELU to the result.
        backend: None/'auto', 'cpp' or 'torch' (see :mod:`t2t_fast.backend`). 'cpp' runs the kernel where
            :func:`cpp_unsupported` allows; otherwise (and for 'torch') :func:`amx_linear_ref` runs. A forced
            'cpp' that cannot take the input raises.

    Returns:
        (..., out_features) in ``x``'s dtype. Differentiable through the torch path.
    """
    _validate(x, weight, bias, gelu)
    if select_backend(_OP, x.device, ("cpp", "torch"), backend) == "cpp":
        reason = cpp_unsupported(x, weight, bias)
        if reason is None:
            return _cpp_op(x, packed_weight(weight), bias, weight.shape[0], gelu)
        if requested_backend(backend) != "auto":
            backend_cannot_take(_OP, "cpp", reason)
    return amx_linear_ref(x, weight, bias, gelu)


def _validate_cpp_op(x, packed, bias, out_features, gelu):
    check_float_tensor("x", x, _OP)
    weight_shape = (out_features, x.shape[-1] if x.dim() else 0)
    if packed.dtype != torch.bfloat16 or packed.numel() != weight_shape[0] * weight_shape[1]:
        raise ValueError(f"{_OP}: packed must hold out_features x in_features = {weight_shape[0]} x "
                         f"{weight_shape[1]} bfloat16 elements, got {packed.numel()} of {packed.dtype}")
    _validate_sizes(x, weight_shape, bias, gelu)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias))
    reason = _kernel_unsupported(x, weight_shape, packed.dtype, bias, grad)
    if reason is not None:
        backend_cannot_take(_OP, "cpp", reason)


@torch.library.custom_op("t2t_fast::amx_linear_cpp", mutates_args=())
def _cpp_op(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor], out_features: int,
            gelu: bool) -> torch.Tensor:
    """The C++ forward from a :func:`packed_weight` (no autograd is registered: :func:`cpp_unsupported` sends
    training to the torch path)."""
    _validate_cpp_op(x, packed, bias, out_features, gelu)
    return run_cpp(x, packed, bias, out_features, gelu)


def run_cpp(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor], out_features: int,
            gelu: bool) -> torch.Tensor:
    """The kernel on an input that :func:`cpp_unsupported` took and a :func:`packed_weight` (the caller checked
    them), without the dispatcher or further checks (the extension still checks every buffer it reads or
    writes)."""
    y = new_output((*x.shape[:-1], out_features), torch.bfloat16, x.device)
    rows = _rows(x)
    if rows.shape[0] == 0:
        return y
    bias = None if bias is None else bias.contiguous()
    bias_buffer = (0, 0) if bias is None else (bias.data_ptr(), storage_extent(bias))
    native_module().linear_forward_cpu(
        (rows.data_ptr(), storage_extent(rows), rows.stride(0) if rows.shape[0] > 1 else rows.shape[1]),
        rows.shape[0], (packed.data_ptr(), storage_extent(packed)), out_features, rows.shape[1], bias_buffer, gelu,
        (y.data_ptr(), storage_extent(y)), torch.get_num_threads())
    return y


@_cpp_op.register_fake
def _(x, packed, bias, out_features, gelu):
    _validate_cpp_op(x, packed, bias, out_features, gelu)
    return x.new_empty((*x.shape[:-1], out_features))
