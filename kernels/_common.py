"""Triton helpers shared by the kernel modules."""
import os

import triton
import triton.language as tl

# Triton's interpreter converts fp32 -> bf16 by truncation where GPUs round to nearest even: round by hand
# there, so interpreter runs (the CPU tests) give the GPU's numbers.
_ROUND_BF16_BY_HAND = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def to_output(y, dtype: tl.constexpr):
    """fp32 ``y`` -> ``dtype``, rounding to nearest even under the interpreter too."""
    if _ROUND_BF16_BY_HAND:
        if dtype == tl.bfloat16:
            bits = y.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            y = bits.to(tl.float32, bitcast=True)
    return y.to(dtype)
