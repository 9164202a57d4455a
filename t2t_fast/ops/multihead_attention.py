"""Softmax attention of the backbone's blocks, from the output of their qkv projection.

``multihead_attention(qkv, num_heads, scale)``: with q, k, v the (B, T, 3, H, d) view of ``qkv`` (the official
``Attention``'s layout), ``softmax(scale q k^T) v`` per image and head, returned as (B, T, H*d), the layout the
output projection reads. :func:`multihead_attention_ref` is that computation as the official code does it.

The ``cpp`` backend is a C++ kernel for inference on CPUs with AVX-512 and BF16 dot products, in bfloat16 and
float32: per image and head it packs k (and, in bf16, v) once, then per 12 query rows computes their scores against
every key in float32 registers (bf16: dot products of bf16 pairs; fp32: FMAs), the softmax's exponentials in
float32 (in bf16 rounded to bf16, as the reference's bf16 probabilities are) and P v, normalised by the float32
row sums; q, k, v are read in place and the heads written straight into the (B, T, H*d) output. Where
:func:`t2t_fast.backend.cpu_isa` is ``'amx'``, the bf16 products of a head size that is a multiple of 32 run on AMX
tiles, 32 query rows at a time (float32 products in the tiles, the same softmax). In bf16 its
scores are float32 where the reference rounds them to bf16 before the softmax, so it is closer to the float64
result than the bf16 reference. Forward only: with a gradient to compute, another dtype, or a head size that is not
a multiple of 16, the torch path runs.
"""
from typing import Optional

import torch

from t2t_fast._native import native_avx512_bf16, native_attention_max_token_stride, native_module
from t2t_fast.backend import cpu_isa, is_exporting, requested_backend, select_backend, unavailable_reason
from t2t_fast.ops._common import (CPU_KERNEL_DTYPES, DTYPE_CODES, backend_cannot_take, check_float_tensor,
                                  direct_calls_allowed, is_int, new_output, storage_extent)

_OP = "multihead_attention"
_CPP_ISAS = ("amx", "avx512")


def multihead_attention_ref(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """The official computation: q, k, v heads from the (B, T, 3, H, d) view of ``qkv``,
    ``((q @ k^T) * scale).softmax(-1) @ v`` in ``qkv``'s dtype, heads concatenated to (B, T, H*d)."""
    batch, tokens, _ = qkv.shape
    q, k, v = qkv.reshape(batch, tokens, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(batch, tokens, -1)


def _validate(qkv, num_heads, scale):
    check_float_tensor("qkv", qkv, _OP)
    if qkv.dim() != 3:
        raise ValueError(f"{_OP}: qkv must be (B, T, 3 * num_heads * head_dim), got {qkv.dim()} dims")
    if not is_int(num_heads) or num_heads <= 0:
        raise ValueError(f"{_OP}: num_heads must be a positive int, got {num_heads!r}")
    if qkv.shape[2] == 0 or qkv.shape[2] % (3 * num_heads) != 0:
        raise ValueError(f"{_OP}: the last dim of qkv ({qkv.shape[2]}) must be 3 * num_heads ({num_heads}) * head_dim")
    if not isinstance(scale, (int, float)) or not scale > 0 or scale == float("inf"):
        raise ValueError(f"{_OP}: scale must be a positive finite number, got {scale!r}")


def cpp_unsupported(qkv: torch.Tensor, num_heads: int) -> Optional[str]:
    """Why the C++ kernel cannot take this (validated) input, or None: it needs the extension, a CPU with
    AVX512-BF16 and :func:`t2t_fast.backend.cpu_isa` ``'amx'`` or ``'avx512'``, float32 or bfloat16 ``qkv`` with
    adjacent elements along its last dim, a head size that is a multiple of 16, no gradient to compute, and no
    export in progress."""
    reason = unavailable_reason("cpp", qkv.device.type)
    if reason is not None:
        return reason
    if not native_avx512_bf16():
        return "this CPU has no AVX512-BF16 instructions"
    if cpu_isa() not in _CPP_ISAS:
        return f"the CPU kernels' instruction set is {cpu_isa()} (the C++ kernel runs with {' or '.join(_CPP_ISAS)})"
    if qkv.dtype not in CPU_KERNEL_DTYPES:
        return f"dtype {qkv.dtype} (the C++ kernel takes float32 and bfloat16)"
    if qkv.shape[2] // (3 * num_heads) % 16 != 0:
        return f"head size {qkv.shape[2] // (3 * num_heads)} (the C++ kernel takes multiples of 16)"
    if torch.is_grad_enabled() and qkv.requires_grad:
        return "a gradient is needed (the C++ kernel is forward-only)"
    if qkv.stride(2) != 1 or qkv.stride(1) > native_attention_max_token_stride() or qkv.stride(0) < 0:
        return f"strides {tuple(qkv.stride())} (the C++ kernel reads rows of adjacent elements)"
    if is_exporting():
        return "an export is in progress (exports record the torch ops)"
    return None


def multihead_attention(qkv: torch.Tensor, num_heads: int, scale: float, backend=None) -> torch.Tensor:
    """Softmax attention of the (B, T, 3, H, d) view of ``qkv`` -> (B, T, H*d).

    Args:
        qkv: (B, T, 3 * num_heads * d), the qkv projection's output.
        num_heads: H.
        scale: the scores' factor (the official ``head_dim ** -0.5`` or ``qk_scale``), positive.
        backend: None/'auto', 'cpp' or 'torch' (see :mod:`t2t_fast.backend`). 'cpp' runs the C++ kernel where
            :func:`cpp_unsupported` allows; otherwise (and for 'torch') :func:`multihead_attention_ref` runs.
            A forced 'cpp' that cannot take the input raises.

    Returns:
        (B, T, H*d) in ``qkv``'s dtype. Differentiable through the torch path.
    """
    _validate(qkv, num_heads, scale)
    chosen = select_backend(_OP, qkv.device, ("cpp", "torch"), backend)
    if chosen == "cpp":
        reason = cpp_unsupported(qkv, num_heads)
        if reason is None:
            return (run_cpp if direct_calls_allowed(qkv) else _cpp_op)(qkv, num_heads, float(scale))
        if requested_backend(backend) != "auto":
            backend_cannot_take(_OP, "cpp", reason)
    return multihead_attention_ref(qkv, num_heads, scale)


def _validate_cpp_op(qkv, num_heads, scale):
    _validate(qkv, num_heads, scale)
    reason = cpp_unsupported(qkv, num_heads)
    if reason is not None:
        backend_cannot_take(_OP, "cpp", reason)


@torch.library.custom_op("t2t_fast::multihead_attention_cpp", mutates_args=())
def _cpp_op(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """The C++ forward (no autograd is registered: :func:`cpp_unsupported` sends training to the torch path)."""
    _validate_cpp_op(qkv, num_heads, scale)
    return run_cpp(qkv, num_heads, scale)


def run_cpp(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """The C++ kernel on an input that :func:`cpp_unsupported` took (the caller checked it), without the
    dispatcher or further checks: for eager CPU inference, where a call's own Python would cost as much as the
    kernel at batch 1 (the extension still checks every buffer it reads or writes)."""
    batch, tokens, width = qkv.shape
    out = new_output((batch, tokens, width // 3), qkv.dtype, qkv.device)
    if batch == 0 or tokens == 0:
        return out
    native_module().attention_forward_cpu(
        (qkv.data_ptr(), storage_extent(qkv), qkv.stride(0), qkv.stride(1)), DTYPE_CODES[qkv.dtype], batch, tokens,
        num_heads, width // (3 * num_heads), scale, (out.data_ptr(), storage_extent(out)), cpu_isa(),
        torch.get_num_threads())
    return out


@_cpp_op.register_fake
def _(qkv, num_heads, scale):
    _validate_cpp_op(qkv, num_heads, scale)
    batch, tokens, width = qkv.shape
    return qkv.new_empty((batch, tokens, width // 3))
