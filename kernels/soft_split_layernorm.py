"""Fused soft split (unfold) + LayerNorm, forward and backward, in Triton.

A T2T layer unfolds its input with a k x k window (stride s, zero padding p) and applies LayerNorm over
the F = C*k*k features of every window. These kernels gather each window straight from the input and
normalise it in registers, so the (B, L, F) unfolded tensor never exists in global memory.

Layout: the input element (b, c, h, w) sits at ``b*sxb + c*sxc + h*sxh + w*sxw``, which covers NCHW images
and (B, H*W, C) tokens (sxh = W*stride(1), sxw = stride(1), sxc = stride(2)) alike. Row r = b*L + oh*OW + ow
of the output is window (oh, ow) of image b; feature f = c*k*k + ki*k + kj is input (c, oh*s - p + ki,
ow*s - p + kj), zero outside the image (the zeros take part in the statistics, as in F.unfold + LayerNorm).

Backward (xhat = (x - mean) * rstd, g = dy * w):
    dx_unf[r, f] = rstd_r * (g[r, f] - c2_r - xhat[r, f] * c1_r),  c1_r = mean_f(g * xhat), c2_r = mean_f(g)
    dw[f] = sum_r dy[r, f] * xhat[r, f],  db[f] = sum_r dy[r, f]
``_bwd_rows_kernel`` recomputes the gathered rows, writes c1/c2 per row and per-program dw/db partials
(persistent programs, so the partials stay small); ``_sum_partials_kernel`` reduces the partials in a fixed
order. ``_bwd_dx_kernel`` then gives every input element its own lane, which sums dx_unf over the (at most
ceil(k/s)^2) windows that read it: a gather, so no atomics and a deterministic result.
"""
import os

import triton
import triton.language as tl

from t2t_fast.kernels import CompileSpec

# Rows are held whole in registers: F is padded to a power of two, and each program takes several rows
# so a program always works on about ROW_TILE elements (147 -> 16 rows x 256, 576 -> 4 rows x 1024).
MAX_FEATURES = 4096
ROW_TILE = 4096
MAX_ROWS = 64
DX_BLOCK = 1024
PARTIALS_BLOCK_G = 32
PARTIALS_BLOCK_N = 128
# Launch options the wrapper (t2t_fast/ops/soft_split_layernorm.py) passes explicitly and compile_specs()
# compiles: what runs is what the tests compiled. The row kernels take their warps from row_config.
NUM_WARPS = 4
NUM_STAGES = 2
DTYPES = ("fp32", "fp16", "bf16")
# The interpreter converts fp32 -> bf16 by truncation; GPUs round to nearest even. Round by hand there.
_ROUND_BF16_BY_HAND = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


def row_config(num_features):
    """(BLOCK_M, BLOCK_F, num_warps) of the row kernels for ``num_features`` <= MAX_FEATURES."""
    block_f = max(64, triton.next_power_of_2(num_features))  # fewer configs; tiny rows are not T2T rows
    block_m = max(1, min(MAX_ROWS, ROW_TILE // block_f))
    # 8 warps for the widest rows, and for the 64/32-row tiles of F <= 128: at 4 warps the backward row kernel
    # spills there (ptxas sm_90: 368-516 bytes per thread at 255 registers; 8 warps: ~190 registers, none).
    return block_m, block_f, 4 if 256 <= block_f <= 1024 else 8


@triton.jit
def _to_output(y, dtype: tl.constexpr):
    """fp32 -> the output dtype, rounding to nearest even under the interpreter too."""
    if _ROUND_BF16_BY_HAND:
        if dtype == tl.bfloat16:
            bits = y.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            y = bits.to(tl.float32, bitcast=True)
    return y.to(dtype)


@triton.jit
def _gather_rows(x_ptr, rows, f, M, L, OW, H, W, F, K, S, P, sxb, sxc, sxh, sxw):
    """Load the unfolded tile x_unf[rows, f] (fp32, zeros outside the image) and its validity mask."""
    row_mask = rows < M
    f_mask = f < F
    b = rows // L  # [BM]
    l_idx = rows - b * L
    oh = l_idx // OW
    ow = l_idx - oh * OW
    ih0 = oh * S - P  # top-left input pixel of each window, [BM]
    iw0 = ow * S - P
    row_off = b.to(tl.int64) * sxb + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw
    KK = K * K
    c = f // KK  # [BF]
    kij = f - c * KK
    ki = kij // K
    kj = kij - ki * K
    feat_off = c * sxc + ki * sxh + kj * sxw
    ih = ih0[:, None] + ki[None, :]  # [BM, BF]
    iw = iw0[:, None] + kj[None, :]
    tile_mask = row_mask[:, None] & f_mask[None, :]
    inside = tile_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    x = tl.load(x_ptr + row_off[:, None] + feat_off[None, :], mask=inside, other=0.0).to(tl.float32)
    return x, tile_mask


@triton.jit
def _fwd_kernel(
    x_ptr,  # input, element (b, c, h, w) at b*sxb + c*sxc + h*sxh + w*sxw
    w_ptr,  # [F] fp32 LayerNorm weight
    b_ptr,  # [F] fp32 LayerNorm bias
    y_ptr,  # [M, F] output, M = B*L rows, input dtype
    mean_ptr,  # [M] fp32
    rstd_ptr,  # [M] fp32
    M, L, OW, H, W, F, K, S, P,
    sxb, sxc, sxh, sxw,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    f = tl.arange(0, BLOCK_F)
    x, tile_mask = _gather_rows(x_ptr, rows, f, M, L, OW, H, W, F, K, S, P, sxb, sxc, sxh, sxw)
    mean = tl.sum(x, axis=1) / F  # [BM]
    xc = tl.where(tile_mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / F + eps)
    w = tl.load(w_ptr + f, mask=f < F, other=0.0)
    bias = tl.load(b_ptr + f, mask=f < F, other=0.0)
    y = xc * rstd[:, None] * w[None, :] + bias[None, :]
    row_mask = rows < M
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * F + f[None, :], _to_output(y, y_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _bwd_rows_kernel(
    x_ptr,  # input, strided as in _fwd_kernel
    w_ptr,  # [F] fp32
    dy_ptr,  # [M, F] contiguous output gradient
    mean_ptr,  # [M] fp32, saved by the forward
    rstd_ptr,  # [M] fp32, saved by the forward
    c1_ptr,  # [M] fp32 out: mean_f(dy * w * xhat)
    c2_ptr,  # [M] fp32 out: mean_f(dy * w)
    part_ptr,  # [num_programs, 2F] fp32 out: this program's dw (first F) and db (last F) partial sums
    M, L, OW, H, W, F, K, S, P,
    sxb, sxc, sxh, sxw,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    pid = tl.program_id(0)
    f = tl.arange(0, BLOCK_F)
    w = tl.load(w_ptr + f, mask=f < F, other=0.0)
    acc_dw = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    acc_db = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    # Persistent loop: a fixed number of programs each walks its tiles, so the partials are num_programs rows.
    for tile in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        x, tile_mask = _gather_rows(x_ptr, rows, f, M, L, OW, H, W, F, K, S, P, sxb, sxc, sxh, sxw)
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        xhat = tl.where(tile_mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * F + f[None, :], mask=tile_mask, other=0.0)
        dy = dy.to(tl.float32)
        g = dy * w[None, :]
        tl.store(c1_ptr + rows, tl.sum(g * xhat, axis=1) / F, mask=row_mask)
        tl.store(c2_ptr + rows, tl.sum(g, axis=1) / F, mask=row_mask)
        acc_dw += dy * xhat
        acc_db += dy
    part = part_ptr + pid.to(tl.int64) * 2 * F
    tl.store(part + f, tl.sum(acc_dw, axis=0), mask=f < F)
    tl.store(part + F + f, tl.sum(acc_db, axis=0), mask=f < F)


@triton.jit
def _sum_partials_kernel(
    part_ptr,  # [G, 2F] fp32 partials of _bwd_rows_kernel
    dw_ptr,  # [F] fp32 out: column sums of the first F columns, accumulated in a fixed order
    db_ptr,  # [F] fp32 out: column sums of the last F columns
    G, F,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        mask = (g[:, None] < G) & (cols[None, :] < 2 * F)
        acc += tl.load(part_ptr + g.to(tl.int64)[:, None] * (2 * F) + cols[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(dw_ptr + cols, total, mask=cols < F)
    tl.store(db_ptr + (cols - F), total, mask=(cols >= F) & (cols < 2 * F))


@triton.jit
def _bwd_dx_kernel(
    x_ptr,  # input, strided as in _fwd_kernel
    w_ptr,  # [F] fp32
    dy_ptr,  # [M, F] contiguous output gradient
    mean_ptr,  # [M] fp32
    rstd_ptr,  # [M] fp32
    c1_ptr,  # [M] fp32 from _bwd_rows_kernel
    c2_ptr,  # [M] fp32 from _bwd_rows_kernel
    dx_ptr,  # contiguous, same shape as the input: (B, H*W, C) if CHANNELS_LAST else (B, C, H, W)
    numel, C, H, W, L, OH, OW, F, K, S, P,
    sxb, sxc, sxh, sxw,
    CHANNELS_LAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # element of dx in memory order, [BLOCK]
    mask = idx < numel
    if CHANNELS_LAST:
        c = idx % C
        t = idx // C
        w = t % W
        t = t // W
        h = t % H
        b = t // H
    else:
        w = idx % W
        t = idx // W
        h = t % H
        t = t // H
        c = t % C
        b = t // C
    x_off = b.to(tl.int64) * sxb + c.to(tl.int64) * sxc + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
    xv = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    hp = h + P  # padded coordinates: window (oh, ki) reads row hp iff hp = oh*S + ki
    wp = w + P
    taps = tl.cdiv(K, S)  # windows per axis that can cover one pixel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for ti in range(0, taps):
        ki = hp % S + ti * S
        oh = (hp - ki) // S
        valid_h = mask & (ki < K) & (hp >= ki) & (oh < OH)
        for tj in range(0, taps):
            kj = wp % S + tj * S
            ow = (wp - kj) // S
            valid = valid_h & (kj < K) & (wp >= kj) & (ow < OW)
            r = b * L + oh * OW + ow
            f = c * (K * K) + ki * K + kj
            dy = tl.load(dy_ptr + r.to(tl.int64) * F + f, mask=valid, other=0.0).to(tl.float32)
            wf = tl.load(w_ptr + f, mask=valid, other=0.0)
            mean = tl.load(mean_ptr + r, mask=valid, other=0.0)
            rstd = tl.load(rstd_ptr + r, mask=valid, other=0.0)
            c1 = tl.load(c1_ptr + r, mask=valid, other=0.0)
            c2 = tl.load(c2_ptr + r, mask=valid, other=0.0)
            acc += rstd * (dy * wf - c2 - (xv - mean) * rstd * c1)
    tl.store(dx_ptr + idx, _to_output(acc, dx_ptr.dtype.element_ty), mask=mask)


def _row_signature(dtype, extra):
    sig = {"x_ptr": f"*{dtype}", "w_ptr": "*fp32"}
    sig.update(extra)
    sig.update({name: "i32" for name in ("M", "L", "OW", "H", "W", "F", "K", "S", "P",
                                         "sxb", "sxc", "sxh", "sxw")})
    return sig


def compile_specs():
    """Every configuration the soft_split_layernorm wrapper can launch."""
    specs = []
    block_fs = sorted({row_config(n)[1] for n in range(1, MAX_FEATURES + 1)})
    for dtype in DTYPES:
        for block_f in block_fs:
            block_m, _, num_warps = row_config(block_f)
            constexprs = {"BLOCK_M": block_m, "BLOCK_F": block_f}
            fwd = _row_signature(dtype, {"b_ptr": "*fp32", "y_ptr": f"*{dtype}", "mean_ptr": "*fp32",
                                         "rstd_ptr": "*fp32"})
            fwd.update({"eps": "fp32", "BLOCK_M": "constexpr", "BLOCK_F": "constexpr"})
            specs.append(CompileSpec(f"soft_split_layernorm_fwd[{dtype},F{block_f}]", _fwd_kernel, fwd,
                                     constexprs, num_warps, NUM_STAGES))
            rows = _row_signature(dtype, {"dy_ptr": f"*{dtype}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
                                          "c1_ptr": "*fp32", "c2_ptr": "*fp32", "part_ptr": "*fp32"})
            rows.update({"BLOCK_M": "constexpr", "BLOCK_F": "constexpr"})
            specs.append(CompileSpec(f"soft_split_layernorm_bwd_rows[{dtype},F{block_f}]", _bwd_rows_kernel,
                                     rows, constexprs, num_warps, NUM_STAGES))
        for channels_last in (False, True):
            sig = {"x_ptr": f"*{dtype}", "w_ptr": "*fp32", "dy_ptr": f"*{dtype}", "mean_ptr": "*fp32",
                   "rstd_ptr": "*fp32", "c1_ptr": "*fp32", "c2_ptr": "*fp32", "dx_ptr": f"*{dtype}"}
            sig.update({name: "i32" for name in ("numel", "C", "H", "W", "L", "OH", "OW", "F", "K", "S", "P",
                                                 "sxb", "sxc", "sxh", "sxw")})
            sig.update({"CHANNELS_LAST": "constexpr", "BLOCK": "constexpr"})
            layout = "tokens" if channels_last else "nchw"
            specs.append(CompileSpec(f"soft_split_layernorm_bwd_dx[{dtype},{layout}]", _bwd_dx_kernel, sig,
                                     {"CHANNELS_LAST": channels_last, "BLOCK": DX_BLOCK}, NUM_WARPS, NUM_STAGES))
    specs.append(CompileSpec(
        "soft_split_layernorm_sum_partials", _sum_partials_kernel,
        {"part_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32", "G": "i32", "F": "i32", "BLOCK_G": "constexpr",
         "BLOCK_N": "constexpr"},
        {"BLOCK_G": PARTIALS_BLOCK_G, "BLOCK_N": PARTIALS_BLOCK_N}, NUM_WARPS, NUM_STAGES))
    return specs
