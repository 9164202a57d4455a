"""Linear layers for CPU inference on a weight packed once: ``y = x W^T + b``, optionally followed by the exact GELU.

:func:`packed_linear` computes it with the ``cpp`` backend's kernels where :func:`cpp_unsupported` allows;
:func:`packed_linear_ref` is ``F.linear`` (then ``F.gelu``), the numbers they reproduce. The kernels pack the weight
once into the layout they load (:func:`packed_weight`, kept beside the weight as long as it lives and rebuilt when
it changes in place), then:

* bfloat16, in and out features multiples of 32: where :func:`t2t_fast.backend.cpu_isa` is ``'amx'``, per block
  of 32 rows and 32 output features the products accumulate in float32 AMX tiles over the inputs (32 at a time);
  where it is ``'avx512'`` (a CPU with AVX512-BF16), per panel of 64 output features and block of 6 rows, 24
  float32 vector accumulators of bf16 pair products (the tiles' layout read as vectors). Bias, GELU (erf to
  1.5e-7) and one rounding to bf16 follow.
* float32, on CPUs with AVX-512 (ISA ``'avx512'`` or ``'amx'``), any sizes: per panel of 64 output features and
  block of 6 rows, 24 float32 vector accumulators of FMAs over the inputs, in their order; bias and GELU follow. A
  thread fetches its next panel into L2 while it computes the current one.

Forward only. :func:`t2t_fast.onednn.linear` (the linears of an :func:`t2t_fast.optimize_for_inference` model)
takes these kernels where they were measured faster than oneDNN's primitive: up to the rows
:data:`t2t_fast.onednn.PACKED_LINEAR_MAX_ROWS` gives the CPU class and dtype.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from t2t_fast._native import native_avx512_bf16, native_module
from t2t_fast.backend import cpu_isa, is_exporting, requested_backend, select_backend, unavailable_reason
from t2t_fast.ops._common import (CPU_KERNEL_DTYPES, DTYPE_CODES, PerWeightCache, backend_cannot_take,
                                  check_float_tensor, direct_calls_allowed, is_int, new_output, storage_extent)

_OP = "packed_linear"
MULTIPLE = 32  # in and out features of the bfloat16 kernel are multiples of this
KERNEL_ISAS = ("avx512", "amx")  # the CPU kernels' instruction sets the kernels run with


def packed_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
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
    """Why the kernels cannot take this (validated) input, or None: they need the extension, float32 or bfloat16
    tensors of one dtype, a CPU whose :func:`t2t_fast.backend.cpu_isa` is ``'avx512'`` or ``'amx'`` (for bfloat16
    with AVX512-BF16) and for bfloat16 in and out features that are multiples of 32; rows of ``x`` with
    adjacent elements (the leading dims one stride apart), no gradient to compute, no export in progress, no
    ``torch.compile`` trace (the weight is packed outside graphs; inductor makes its own GEMMs), and a weight not
    created under ``torch.inference_mode`` (its packing is cached by its version)."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    reason = _kernel_unsupported(x, weight.shape, weight.dtype, bias, grad)
    if reason is None and torch.compiler.is_compiling():
        return "torch.compile is tracing (the weight is packed outside graphs; inductor makes its own GEMMs)"
    if reason is None and weight.is_inference():
        return "a weight created under torch.inference_mode (no version counter to tell an in-place change)"
    return reason


def _kernel_unsupported(x, weight_shape, weight_dtype, bias, grad):
    """What the kernels themselves need of a call (:func:`cpp_unsupported` less what concerns the packing)."""
    reason = unavailable_reason("cpp", x.device.type)
    if reason is not None:
        return reason
    if x.dtype not in CPU_KERNEL_DTYPES or weight_dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return "dtypes other than one of float32 and bfloat16 (the kernels take float32 or bfloat16 throughout)"
    reason = isa_unsupported(x.dtype)
    if reason is not None:
        return reason
    if x.dtype == torch.bfloat16 and (weight_shape[0] % MULTIPLE or weight_shape[1] % MULTIPLE):
        return (f"weight {tuple(weight_shape)} (the bfloat16 kernel takes in and out features that are multiples "
                f"of {MULTIPLE})")
    if grad:
        return "a gradient is needed (the kernels are forward-only)"
    if _rows(x) is None:
        return f"strides {tuple(x.stride())} (the kernels read rows of adjacent elements, one stride apart)"
    if is_exporting():
        return "an export is in progress (exports record the torch ops)"
    return None


def isa_unsupported(dtype):
    """Why the CPU kernels' instruction set (:func:`t2t_fast.backend.cpu_isa`) runs no packed-weight kernel for
    ``dtype`` (float32 or bfloat16), or None: both need ``'avx512'`` or ``'amx'``, bfloat16 a CPU with AVX512-BF16
    too (with ``'amx'`` it runs on the AMX tiles)."""
    isa = cpu_isa()
    if isa not in KERNEL_ISAS:
        return f"the CPU kernels' instruction set is {isa} (the packed-weight kernels need avx512)"
    if dtype == torch.bfloat16 and not native_avx512_bf16():
        return "this CPU has no AVX512-BF16 instructions (the bfloat16 kernel needs them)"
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
    code, (out_features, in_features) = DTYPE_CODES[source.dtype], source.shape
    packed = torch.empty(native_module().linear_packed_elements(code, out_features, in_features), dtype=source.dtype)
    native_module().linear_pack_weight_cpu((source.data_ptr(), storage_extent(source)), code, out_features,
                                           in_features, (packed.data_ptr(), storage_extent(packed)))
    return packed


_packed_weights = PerWeightCache(_pack)


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ((out_features, in_features), float32, or bfloat16 with features multiples of 32) in the
    kernel's layout: packed once, rebuilt when the weight is changed in place, kept only as long as the weight
    lives."""
    return _packed_weights(weight)


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, gelu: bool = False,
                  backend=None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (then the exact GELU when ``gelu``) on the extension's kernels for a packed
    weight where they take the input.

    Args:
        x: (..., in_features).
        weight: (out_features, in_features); bias: (out_features,) or None.
        gelu: apply the exact (erf) GELU to the result.
        backend: None/'auto', 'cpp' or 'torch' (see :mod:`t2t_fast.backend`). 'cpp' runs the kernels where
            :func:`cpp_unsupported` allows; otherwise (and for 'torch') :func:`packed_linear_ref` runs. A forced
            'cpp' that cannot take the input raises.

    Returns:
        (..., out_features) in ``x``'s dtype. Differentiable through the torch path.
    """
    _validate(x, weight, bias, gelu)
    if select_backend(_OP, x.device, ("cpp", "torch"), backend) == "cpp":
        reason = cpp_unsupported(x, weight, bias)
        if reason is None:
            return (run_cpp if direct_calls_allowed(x) else _cpp_op)(x, packed_weight(weight), bias, weight.shape[0],
                                                                     gelu)
        if requested_backend(backend) != "auto":
            backend_cannot_take(_OP, "cpp", reason)
    return packed_linear_ref(x, weight, bias, gelu)


def _validate_cpp_op(x, packed, bias, out_features, gelu):
    check_float_tensor("x", x, _OP)
    if not is_int(out_features) or out_features <= 0:
        raise ValueError(f"{_OP}: out_features must be a positive int, got {out_features!r}")
    weight_shape = (out_features, x.shape[-1] if x.dim() else 0)
    if x.dtype in CPU_KERNEL_DTYPES and out_features > 0:
        elements = native_module().linear_packed_elements(DTYPE_CODES[x.dtype], *weight_shape)
        if packed.dtype != x.dtype or packed.numel() != elements:
            raise ValueError(f"{_OP}: packed must hold the {elements} {x.dtype} elements of an out_features x "
                             f"in_features = {weight_shape[0]} x {weight_shape[1]} weight packed, got "
                             f"{packed.numel()} of {packed.dtype}")
    _validate_sizes(x, weight_shape, bias, gelu)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias))
    reason = _kernel_unsupported(x, weight_shape, packed.dtype, bias, grad)
    if reason is not None:
        backend_cannot_take(_OP, "cpp", reason)


@torch.library.custom_op("t2t_fast::packed_linear_cpp", mutates_args=())
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
    y = new_output((*x.shape[:-1], out_features), x.dtype, x.device)
    rows = _rows(x)
    if rows.shape[0] == 0:
        return y
    bias = None if bias is None else bias.contiguous()
    bias_buffer = (0, 0) if bias is None else (bias.data_ptr(), storage_extent(bias))
    native_module().linear_forward_cpu(
        (rows.data_ptr(), storage_extent(rows), rows.stride(0) if rows.shape[0] > 1 else rows.shape[1]),
        DTYPE_CODES[x.dtype], rows.shape[0], (packed.data_ptr(), storage_extent(packed)), out_features, rows.shape[1],
        bias_buffer, gelu, (y.data_ptr(), storage_extent(y)), cpu_isa(), torch.get_num_threads())
    return y


@_cpp_op.register_fake
def _(x, packed, bias, out_features, gelu):
    _validate_cpp_op(x, packed, bias, out_features, gelu)
    return x.new_empty((*x.shape[:-1], out_features))
