"""Residual add + LayerNorm of the pre-norm blocks: ``sum = x + residual`` and ``normed = LayerNorm(sum)``.

Every block of the backbone ends a residual step with an add whose result the next LayerNorm reads at once (the
attention step's add -> ``norm2``, the MLP step's add -> the next block's ``norm1`` or the final ``norm``).
:func:`add_layernorm` returns both tensors; :func:`add_layernorm_ref` is the two torch ops it replaces.

The ``cpp`` backend is a C++ kernel for float32 and bfloat16 CPU tensors, vectorised with
:func:`t2t_fast.backend.cpu_isa`: per row the add (rounded to the dtype, as torch's add rounds it), then the
LayerNorm of the rounded sums with float32 statistics and float32 affine parameters, while the row is in cache.
Forward only: with a gradient to compute, float16/float64, or during an export, the torch path runs.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from t2t_fast._native import native_module
from t2t_fast.backend import cpu_isa, is_exporting, select_backend, unavailable_reason
from t2t_fast.ops._common import (CPU_KERNEL_DTYPES, DTYPE_CODES, backend_cannot_take, check_float_tensor,
                                  direct_calls_allowed, float32_parameter, new_output, storage_extent)

_OP = "add_layernorm"


def add_layernorm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` and ``F.layer_norm(s, (C,), weight, bias, eps)`` over the last dim C; float32
    parameters of a bfloat16/float16 ``x`` stay float32 (torch's LayerNorm takes that pair), other parameters
    are cast to ``x``'s dtype."""
    total = x + residual
    if weight.dtype != x.dtype and not (x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == torch.float32
                                        and bias.dtype == torch.float32):
        weight, bias = weight.to(x.dtype), bias.to(x.dtype)
    return total, F.layer_norm(total, weight.shape, weight, bias, eps)  # a constant under export


def _validate(x, residual, weight, bias, eps):
    for name, tensor in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)):
        check_float_tensor(name, tensor, _OP)
    if x.dim() == 0 or x.shape != residual.shape:
        raise ValueError(f"{_OP}: x and residual must have one shape with at least one dim, got {tuple(x.shape)} "
                         f"and {tuple(residual.shape)}")
    if x.dtype != residual.dtype:
        raise TypeError(f"{_OP}: x and residual must have one dtype, got {x.dtype} and {residual.dtype}")
    features = x.shape[-1]
    if weight.shape != (features,) or bias.shape != (features,):
        raise ValueError(f"{_OP}: weight and bias must be ({features},), got {tuple(weight.shape)} and "
                         f"{tuple(bias.shape)}")
    if not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"{_OP}: eps must be a finite non-negative number, got {eps!r}")


def cpp_unsupported(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor) -> Optional[str]:
    """Why the C++ kernel cannot take this (validated) input, or None: it needs the extension, float32 or
    bfloat16 CPU tensors, no gradient to compute and no export in progress."""
    reason = unavailable_reason("cpp", x.device.type)
    if reason is not None:
        return reason
    if x.dtype not in CPU_KERNEL_DTYPES:
        return f"dtype {x.dtype} (the C++ kernel takes float32 and bfloat16)"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, residual, weight, bias)):
        return "a gradient is needed (the C++ kernel is forward-only)"
    if is_exporting():
        return "an export is in progress (exports record the torch ops)"
    return None


def add_layernorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  eps: float = 1e-5, backend=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x + residual`` and its LayerNorm over the last dim, in one pass where the C++ kernel takes the input.

    Args:
        x, residual: (..., C) tensors of one shape and dtype.
        weight, bias: (C,) LayerNorm affine parameters (any float dtype; float32 in an
            :func:`t2t_fast.optimize_for_inference` model).
        eps: the LayerNorm's epsilon.
        backend: None/'auto', 'cpp' or 'torch' (see :mod:`t2t_fast.backend`). 'cpp' runs the C++ kernel where
            :func:`cpp_unsupported` allows; otherwise (and for 'torch') :func:`add_layernorm_ref` runs, as for a
            model forced to 'cpp' that trains (a backend the extension cannot run at all raises).

    Returns:
        ``(sum, normed)``, both shaped and typed as ``x``. Differentiable through the torch path.
    """
    _validate(x, residual, weight, bias, eps)
    if select_backend(_OP, x.device, ("cpp", "torch"), backend) == "cpp" \
            and cpp_unsupported(x, residual, weight, bias) is None:
        return (run_cpp if direct_calls_allowed(x) else _cpp_op)(x, residual, weight, bias, float(eps))
    return add_layernorm_ref(x, residual, weight, bias, eps)


def _validate_cpp_op(x, residual, weight, bias, eps):
    _validate(x, residual, weight, bias, eps)
    reason = cpp_unsupported(x, residual, weight, bias)
    if reason is not None:
        backend_cannot_take(_OP, "cpp", reason)


def _rows(tensor):
    """``tensor`` as (rows, C) with adjacent elements along a row: a view where its strides allow, else a copy."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    count, features = rows.shape
    if (features > 1 and rows.stride(1) != 1) or (count > 1 and rows.stride(0) < features):  # e.g. expanded
        rows = rows.contiguous()
    return rows


def _operand(rows):
    count, features = rows.shape
    return rows.data_ptr(), storage_extent(rows), rows.stride(0) if count > 1 else features


@torch.library.custom_op("t2t_fast::add_layernorm_cpp", mutates_args=())
def _cpp_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The C++ forward (no autograd is registered: :func:`cpp_unsupported` sends training to the torch path)."""
    _validate_cpp_op(x, residual, weight, bias, eps)
    return run_cpp(x, residual, weight, bias, eps)


def run_cpp(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The C++ kernel on an input that :func:`cpp_unsupported` took (the caller checked it), without the
    dispatcher or further checks: for eager CPU inference, where a call's own Python would cost as much as the
    kernel at batch 1 (the extension still checks every buffer it reads or writes)."""
    total, normed = new_output(x.shape, x.dtype, x.device), new_output(x.shape, x.dtype, x.device)
    if x.numel() == 0:
        return total, normed
    x_rows, residual_rows = _rows(x), _rows(residual)
    weight, weight_buffer = float32_parameter(weight)
    bias, bias_buffer = float32_parameter(bias)
    native_module().add_layernorm_forward_cpu(
        _operand(x_rows), _operand(residual_rows), DTYPE_CODES[x.dtype], x_rows.shape[0], x_rows.shape[1],
        weight_buffer, bias_buffer, eps, (total.data_ptr(), storage_extent(total)),
        (normed.data_ptr(), storage_extent(normed)), cpu_isa(), torch.get_num_threads())
    return total, normed


@_cpp_op.register_fake
def _(x, residual, weight, bias, eps):
    _validate_cpp_op(x, residual, weight, bias, eps)
    return x.new_empty(x.shape), x.new_empty(x.shape)
