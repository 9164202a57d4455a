"""Fused soft split (unfold) + LayerNorm, forward and backward, in Triton, with their launches.

A T2T layer unfolds its input with a k x k window (stride s, zero padding p) and applies LayerNorm over
the F = C*k*k features of every window. These kernels gather each window straight from the input and
normalise it in registers, so the (B, L, F) unfolded tensor never exists in global memory.

Layout: the input element (b, c, h, w) sits at ``b*sxb + c*sxc + h*sxh + w*sxw``, which covers NCHW images
and (B, H*W, C) tokens (sxh = W*stride(1), sxw = stride(1), sxc = stride(2)) alike. Row r = b*L + oh*OW + ow
of the output is window (oh, ow) of image b; feature f = c*k*k + ki*k + kj is input (c, oh*s - p + ki,
ow*s - p + kj), zero outside the image (the zeros take part in the statistics, as in F.unfold + LayerNorm).

A row is held in registers as one or two power-of-two *pieces* (Triton tiles are power-of-two shaped), each a
[BLOCK_M, U, V] tile:

* generic (``TOKENS=False``): consecutive features, U = 1. F is covered by a power of two plus, where that
  leaves little over, a quarter of it (147 = 128 + 19 in 128 + 32 lanes) rather than one padded tile (256).
* tokens (``TOKENS=True``): (B, H*W, C) input with contiguous channels, C and the strides multiples of 16:
  U = taps (ki, kj), V = channels, the taps split into a power of two plus the rest (k = 3: 8 + 1). Loads then
  run along the channels, 16 bytes per lane; the (c, ki, kj) output order is made by the compiler's layout
  conversion (shared memory) between the channel-major loads and the tap-major stores of y and loads of dy.

Backward (xhat = (x - mean) * rstd, g = dy * w):
    dx_unf[r, f] = rstd_r * (g[r, f] - c2_r - xhat[r, f] * c1_r),  c1_r = mean_f(g * xhat), c2_r = mean_f(g)
    dw[f] = sum_r dy[r, f] * xhat[r, f],  db[f] = sum_r dy[r, f]
``_bwd_rows_kernel`` recomputes the gathered rows, writes c1/c2 per row and per-program dw/db partials
(persistent programs, as many as fit on the GPU at once, so the partials stay small); ``_sum_partials_kernel``
reduces the partials in a fixed order. ``_bwd_dx_kernel`` then gives every input element its own lane, which
sums dx_unf over the (at most ceil(k/s)^2) windows that read it: a gather, so no atomics and a deterministic
result.

:func:`forward` and :func:`backward` launch them; :func:`compile_specs` lists every configuration they launch.
"""
import functools

import torch
import triton
import triton.language as tl

from t2t_fast.geometry import split_output_size
from t2t_fast.kernels import CompileSpec, kernel_signature
from t2t_fast.kernels._common import to_output
from t2t_fast.ops._common import cdiv, device_guard, new_output, split_geometry

MAX_FEATURES = 4096
# Padded elements (rows x lanes of the pieces) per program tile of the forward and of the backward row kernel,
# which holds x, dy and their products at once: 16 and 8 per thread at 4 warps (the gather also holds a
# 64-bit address per element until its load).
FWD_ROW_TILE = 2048
BWD_ROW_TILE = 1024
MAX_ROWS = 64
# Token tiles: channel widths (C padded to a power of two) and window sizes with a token configuration (the
# T2T token splits are C = 64, k = 3); other token inputs take the generic tiles.
TOKEN_CHANNELS = (32, 64, 128)
TOKEN_KERNELS = (3,)
DX_BLOCK = 512
# Row and element indices are int32 (program_id * BLOCK + arange): the op sends the kernels only inputs whose
# element count, span and row count stay below this, so no index reaches 2**31.
INDEX_LIMIT = 2**31 - max(MAX_ROWS, DX_BLOCK)
PARTIALS_BLOCK_G = 32
PARTIALS_BLOCK_N = 128
NUM_WARPS = 4
NUM_STAGES = 2
# Programs of the persistent backward row kernel where occupancy cannot be read (the interpreter).
INTERPRETER_PROGRAMS = 4
# (x dtype, y dtype) pairs the kernels write directly: y in x's dtype, or fp32 input written at the
# autocast precision. The backward reads dy in y's dtype.
DTYPE_PAIRS = (("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("fp32", "bf16"), ("fp32", "fp16"))
_TRITON_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _piece(start, F, C, K, TOKENS: tl.constexpr, U: tl.constexpr, V: tl.constexpr):
    """Features of a [U, V] piece of the row: f, its (c, ki, kj) and validity, each broadcastable to [U, V].

    TOKENS: U taps from tap ``start`` on, V channels (f = c*k*k + tap); else U*V features from ``start`` on."""
    if TOKENS:
        tap = start + tl.arange(0, U)[:, None]
        c = tl.arange(0, V)[None, :]
        ki = tap // K
        kj = tap - ki * K
        f = c * (K * K) + tap
        valid = (tap < K * K) & (c < C)
    else:
        f = start + tl.arange(0, U)[:, None] * V + tl.arange(0, V)[None, :]
        c = f // (K * K)
        kij = f - c * (K * K)
        ki = kij // K
        kj = kij - ki * K
        valid = f < F
    return f, c, ki, kj, valid


@triton.jit
def _gather(x_ptr, rows, c, ki, kj, valid, M, L, OW, H, W, S, P, sxb, sxc, sxh, sxw, TOKENS: tl.constexpr):
    """The unfolded tile x_unf[rows, piece] as fp32 [BLOCK_M, U, V] (zeros outside the image) and its mask."""
    b = rows // L  # [BM]
    l_idx = rows - b * L
    oh = l_idx // OW
    ow = l_idx - oh * OW
    ih0 = oh * S - P  # top-left input pixel of each window, [BM]
    iw0 = ow * S - P
    row_off = b.to(tl.int64) * sxb + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw
    if TOKENS:
        feat_off = c + ki * sxh + kj * sxw  # channels are contiguous: 16-byte loads along them
    else:
        feat_off = c * sxc + ki * sxh + kj * sxw
    ih = ih0[:, None, None] + ki[None, :, :]
    iw = iw0[:, None, None] + kj[None, :, :]
    tile_mask = (rows < M)[:, None, None] & valid[None, :, :]
    inside = tile_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    x = tl.load(x_ptr + row_off[:, None, None] + feat_off[None, :, :], mask=inside, other=0.0)
    return x.to(tl.float32), tile_mask


@triton.jit
def _row_sum(t):
    return tl.sum(tl.sum(t, axis=2), axis=1)


@triton.jit
def _store_rows(y_ptr, w_ptr, b_ptr, rows, f, valid, xc, rstd, tile_mask, F):
    """y[rows, f] = xc * rstd * w[f] + b[f], in y's dtype."""
    w = tl.load(w_ptr + f, mask=valid, other=0.0)
    bias = tl.load(b_ptr + f, mask=valid, other=0.0)
    y = xc * rstd[:, None, None] * w[None, :, :] + bias[None, :, :]
    offsets = rows.to(tl.int64)[:, None, None] * F + f[None, :, :]
    tl.store(y_ptr + offsets, to_output(y, y_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _fwd_kernel(
    x_ptr,  # input, element (b, c, h, w) at b*sxb + c*sxc + h*sxh + w*sxw
    w_ptr,  # [F] fp32 LayerNorm weight
    b_ptr,  # [F] fp32 LayerNorm bias
    y_ptr,  # [M, F] output, M = B*L rows
    mean_ptr,  # [M] fp32
    rstd_ptr,  # [M] fp32
    M, L, OW, H, W, C, F, K, S, P,
    sxb, sxc, sxh, sxw,
    eps,
    BLOCK_M: tl.constexpr,
    TOKENS: tl.constexpr,
    U_A: tl.constexpr,  # piece A: [U_A, V_A]
    V_A: tl.constexpr,
    U_B: tl.constexpr,  # piece B: [U_B, V_B], absent when U_B == 0
    V_B: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    fa, ca, kia, kja, va = _piece(0, F, C, K, TOKENS, U_A, V_A)
    xa, ma = _gather(x_ptr, rows, ca, kia, kja, va, M, L, OW, H, W, S, P, sxb, sxc, sxh, sxw, TOKENS)
    total = _row_sum(xa)
    if U_B > 0:
        fb, cb, kib, kjb, vb = _piece(U_A if TOKENS else U_A * V_A, F, C, K, TOKENS, U_B, V_B)
        xb, mb = _gather(x_ptr, rows, cb, kib, kjb, vb, M, L, OW, H, W, S, P, sxb, sxc, sxh, sxw, TOKENS)
        total += _row_sum(xb)
    mean = total / F  # [BM]
    xa = tl.where(ma, xa - mean[:, None, None], 0.0)
    var = _row_sum(xa * xa)
    if U_B > 0:
        xb = tl.where(mb, xb - mean[:, None, None], 0.0)
        var += _row_sum(xb * xb)
    rstd = tl.rsqrt(var / F + eps)
    _store_rows(y_ptr, w_ptr, b_ptr, rows, fa, va, xa, rstd, ma, F)
    if U_B > 0:
        _store_rows(y_ptr, w_ptr, b_ptr, rows, fb, vb, xb, rstd, mb, F)
    row_mask = rows < M
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _bwd_piece(x_ptr, dy_ptr, rows, f, c, ki, kj, valid, mean, rstd, M, L, OW, H, W, F, S, P,
               sxb, sxc, sxh, sxw, TOKENS: tl.constexpr):
    """(xhat, dy) of one piece, fp32 [BLOCK_M, U, V], zero outside the rows and features."""
    x, tile_mask = _gather(x_ptr, rows, c, ki, kj, valid, M, L, OW, H, W, S, P, sxb, sxc, sxh, sxw, TOKENS)
    xhat = tl.where(tile_mask, (x - mean[:, None, None]) * rstd[:, None, None], 0.0)
    dy = tl.load(dy_ptr + rows.to(tl.int64)[:, None, None] * F + f[None, :, :], mask=tile_mask, other=0.0)
    return xhat, dy.to(tl.float32)


@triton.jit
def _bwd_rows_kernel(
    x_ptr,  # input, strided as in _fwd_kernel
    w_ptr,  # [F] fp32
    dy_ptr,  # [M, F] contiguous output gradient
    mean_ptr,  # [M] fp32, saved by the forward
    rstd_ptr,  # [M] fp32, saved by the forward
    c1_ptr,  # [M] fp32 out: mean_f(dy * w * xhat)
    c2_ptr,  # [M] fp32 out: mean_f(dy * w)
    part_ptr,  # [num_programs, 2, PW] fp32 out: this program's dw and db partial sums at column f
    M, L, OW, H, W, C, F, K, S, P,
    sxb, sxc, sxh, sxw,
    PW,  # partial_width(): every f of the pieces, padding included, is < PW
    BLOCK_M: tl.constexpr,
    TOKENS: tl.constexpr,
    U_A: tl.constexpr,
    V_A: tl.constexpr,
    U_B: tl.constexpr,
    V_B: tl.constexpr,
):
    pid = tl.program_id(0)
    fa, ca, kia, kja, va = _piece(0, F, C, K, TOKENS, U_A, V_A)
    wa = tl.load(w_ptr + fa, mask=va, other=0.0)
    # dw/db are summed over this program's rows in [U, V] vectors: a per-tile accumulator as wide as the tile
    # would double the live registers of the loop.
    dwa = tl.zeros((U_A, V_A), dtype=tl.float32)
    dba = tl.zeros((U_A, V_A), dtype=tl.float32)
    if U_B > 0:
        fb, cb, kib, kjb, vb = _piece(U_A if TOKENS else U_A * V_A, F, C, K, TOKENS, U_B, V_B)
        wb = tl.load(w_ptr + fb, mask=vb, other=0.0)
        dwb = tl.zeros((U_B, V_B), dtype=tl.float32)
        dbb = tl.zeros((U_B, V_B), dtype=tl.float32)
    # Persistent loop: a fixed number of programs each walks its tiles, so the partials are num_programs rows.
    for tile in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        xhat, dy = _bwd_piece(x_ptr, dy_ptr, rows, fa, ca, kia, kja, va, mean, rstd, M, L, OW, H, W, F, S, P,
                              sxb, sxc, sxh, sxw, TOKENS)
        g = dy * wa[None, :, :]
        c1 = _row_sum(g * xhat)
        c2 = _row_sum(g)
        dwa += tl.sum(dy * xhat, axis=0)
        dba += tl.sum(dy, axis=0)
        if U_B > 0:
            xhat, dy = _bwd_piece(x_ptr, dy_ptr, rows, fb, cb, kib, kjb, vb, mean, rstd, M, L, OW, H, W, F, S, P,
                                  sxb, sxc, sxh, sxw, TOKENS)
            g = dy * wb[None, :, :]
            c1 += _row_sum(g * xhat)
            c2 += _row_sum(g)
            dwb += tl.sum(dy * xhat, axis=0)
            dbb += tl.sum(dy, axis=0)
        tl.store(c1_ptr + rows, c1 / F, mask=row_mask)
        tl.store(c2_ptr + rows, c2 / F, mask=row_mask)
    # Unmasked (padding lanes hold zeros and stay below PW): masks kept alive across the loop cost
    # predicate registers, which ptxas spills.
    part = part_ptr + pid.to(tl.int64) * 2 * PW
    tl.store(part + fa, dwa)
    tl.store(part + PW + fa, dba)
    if U_B > 0:
        tl.store(part + fb, dwb)
        tl.store(part + PW + fb, dbb)


@triton.jit
def _sum_partials_kernel(
    part_ptr,  # [G, 2, PW] fp32 partials of _bwd_rows_kernel
    dw_ptr,  # [F] fp32 out: sums over G of part[:, 0, :F], accumulated in a fixed order
    db_ptr,  # [F] fp32 out: sums over G of part[:, 1, :F]
    G, F, PW,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # of the [G, 2 * PW] partials
    acc = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        mask = (g[:, None] < G) & (cols[None, :] < 2 * PW)
        acc += tl.load(part_ptr + g.to(tl.int64)[:, None] * (2 * PW) + cols[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(dw_ptr + cols, total, mask=cols < F)
    tl.store(db_ptr + (cols - PW), total, mask=(cols >= PW) & (cols < PW + F))


@triton.jit
def _unravel(idx, n0, n1, n2):
    """(i0, i1, i2, i3) of the flat index ``idx`` of a contiguous array whose innermost sizes are n0, n1, n2."""
    i0 = idx % n0
    t = idx // n0
    i1 = t % n1
    t = t // n1
    return i0, i1, t % n2, t // n2


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
    # int32: the op's validation keeps numel + BLOCK below 2**31
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # element of dx in memory order, [BLOCK]
    mask = idx < numel
    if CHANNELS_LAST:
        c, w, h, b = _unravel(idx, C, W, H)
    else:
        w, h, c, b = _unravel(idx, W, H, C)
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
    tl.store(dx_ptr + idx, to_output(acc, dx_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------ configuration

@functools.lru_cache(maxsize=None)
def row_config(row_tile, tokens, features, channels, kernel_size):
    """(constexprs, num_warps) of a row kernel with ``row_tile`` (FWD_ROW_TILE or BWD_ROW_TILE): the pieces
    (TOKENS, U_A, V_A, U_B, V_B) and BLOCK_M.

    ``tokens``: the input qualifies for the token tiles (:func:`token_layout`)."""
    if tokens:
        taps = kernel_size * kernel_size
        u_a = 1 << (taps.bit_length() - 1)  # taps = u_a + the rest (9 = 8 + 1)
        u_b = triton.next_power_of_2(taps - u_a) if taps > u_a else 0
        v_a = triton.next_power_of_2(channels)
        v_b = v_a if u_b else 0
    else:
        v_a = max(64, 1 << (features.bit_length() - 1))  # the largest power of two <= F (tiny rows: 64)
        u_b, v_b = 0, 0
        if features > v_a:  # a quarter-width second piece, where it holds the rest
            if features - v_a <= v_a // 4:
                u_b, v_b = 1, v_a // 4
            else:
                v_a *= 2
        u_a = 1
    lanes = u_a * v_a + u_b * v_b
    block_m = max(1, min(MAX_ROWS, 1 << max(0, (row_tile // lanes).bit_length() - 1)))
    # more warps once a row alone outgrows the tile, so the widest rows keep about as few elements per thread; a
    # row at most a quarter over the tile stays at 4 warps (its registers fit; at 8 warps Triton 3.8's ptxas
    # capped them at 64 and spilled)
    num_warps = 4 if lanes <= row_tile * 5 // 4 else 4 * min(4, triton.next_power_of_2(triton.cdiv(lanes, row_tile)))
    constexprs = {"BLOCK_M": block_m, "TOKENS": tokens, "U_A": u_a, "V_A": v_a, "U_B": u_b, "V_B": v_b}
    return constexprs, num_warps


def partial_width(constexprs, kernel_size):
    """Columns per dw/db partial row: above every feature index the pieces of ``constexprs`` reach."""
    if constexprs["TOKENS"]:
        return constexprs["V_A"] * kernel_size * kernel_size  # U_A + U_B = k*k taps for TOKEN_KERNELS
    return constexprs["U_A"] * constexprs["V_A"] + constexprs["U_B"] * constexprs["V_B"]


def token_layout(x, kernel_size):
    """True when tokens ``x`` (B, H*W, C) take the token tiles: contiguous channels, C and the token strides
    multiples of 16 (so every channel run starts 16-byte aligned and the kernels are compiled for exactly
    that), and a window and width with a token configuration."""
    if x.dim() != 3 or x.stride(2) != 1:
        return False
    channels = x.shape[2]
    return (channels % 16 == 0 and triton.next_power_of_2(channels) in TOKEN_CHANNELS
            and kernel_size in TOKEN_KERNELS and x.stride(0) % 16 == 0 and x.stride(1) % 16 == 0)


def _geometry(x, kernel_size, stride, padding, grid_h, grid_w):
    (batch, channels, height, width), strides = split_geometry(x, grid_h, grid_w)
    out_h = split_output_size(height, kernel_size, stride, padding)
    out_w = split_output_size(width, kernel_size, stride, padding)
    return batch, channels, height, width, out_h, out_w, strides


def _blocks_per_sm(compiled, device):
    """Blocks of ``compiled`` (a loaded kernel) one SM holds at once: the least of its register, thread and
    shared-memory limits (registers are allocated per warp in 256-register units)."""
    props = torch.cuda.get_device_properties(device)
    num_warps = compiled.metadata.num_warps
    regs_per_warp = cdiv(max(compiled.n_regs, 1) * 32, 256) * 256
    by_regs = props.regs_per_multiprocessor // (regs_per_warp * num_warps)
    by_threads = props.max_threads_per_multi_processor // (32 * num_warps)
    shared = compiled.metadata.shared
    by_shared = props.shared_memory_per_multiprocessor // shared if shared else by_threads
    return max(1, min(by_regs, by_threads, by_shared))


_resident = {}  # (device index, compiled kernel hash) -> programs resident at once


def _rows_programs(args, kwargs, tiles, device):
    """Program count of the persistent backward row kernel: as many as the GPU holds resident at once,
    from the registers, warps and shared memory of the kernel compiled for exactly these arguments (a fixed
    count under the interpreter).

    dweight/dbias are summed from one partial per program in a fixed order: bit-reproducible on one GPU
    model, but GPUs with another SM count round differently."""
    if device.type != "cuda":
        return min(tiles, INTERPRETER_PROGRAMS)
    compiled = _bwd_rows_kernel.warmup(*args, grid=(1,), **kwargs)  # the launch's own compilation, cached
    key = (device.index, compiled.hash)
    if key not in _resident:
        compiled._init_handles()  # loads the binary: n_regs is known from here on
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        _resident[key] = sms * _blocks_per_sm(compiled, device)
    return min(tiles, _resident[key])


# ------------------------------------------------------------------------------------------------ launches

def forward(x, weight, bias, kernel_size, stride, padding, eps, grid_h, grid_w, out_dtype):
    """Fused soft split + LayerNorm of ``x`` (an NCHW image, or (B, H*W, C) tokens on a ``grid_h`` x
    ``grid_w`` grid; any strides, spanning < 2**31 elements). Returns y (B, L, C*k*k) in ``out_dtype`` and the
    fp32 row mean and rstd (B*L,). The arguments must have passed the op's validation."""
    if not _direct(x.dtype, out_dtype):
        x = x.float()  # the kernels read x as fp32 for every output dtype
    batch, channels, height, width, out_h, out_w, strides = _geometry(x, kernel_size, stride, padding,
                                                                      grid_h, grid_w)
    features = channels * kernel_size * kernel_size
    rows = batch * out_h * out_w
    y = new_output((batch, out_h * out_w, features), out_dtype, x.device)
    mean = new_output((rows,), torch.float32, x.device)
    rstd = new_output((rows,), torch.float32, x.device)
    if rows == 0:
        return y, mean, rstd
    constexprs, num_warps = row_config(FWD_ROW_TILE, token_layout(x, kernel_size), features, channels, kernel_size)
    with device_guard(x):
        _fwd_kernel[(cdiv(rows, constexprs["BLOCK_M"]),)](
            x, weight.float().contiguous(), bias.float().contiguous(), y, mean, rstd,
            rows, out_h * out_w, out_w, height, width, channels, features, kernel_size, stride, padding, *strides,
            eps, **constexprs, num_warps=num_warps, num_stages=NUM_STAGES)
    return y, mean, rstd


def backward(dy, x, weight, mean, rstd, kernel_size, stride, padding, grid_h, grid_w, input_grad):
    """Backward of :func:`forward` for output gradient ``dy`` (B, L, C*k*k): returns dx (x's shape and dtype,
    contiguous; empty without ``input_grad``), dweight and dbias (fp32)."""
    x_dtype = x.dtype
    if not _direct(x.dtype, dy.dtype):
        x = x.float()  # the kernels read x as fp32 with dy of every dtype
    batch, channels, height, width, out_h, out_w, strides = _geometry(x, kernel_size, stride, padding,
                                                                      grid_h, grid_w)
    features = channels * kernel_size * kernel_size
    rows = batch * out_h * out_w
    dy, mean, rstd = dy.contiguous(), mean.contiguous(), rstd.contiguous()
    w = weight.float().contiguous()
    constexprs, num_warps = row_config(BWD_ROW_TILE, token_layout(x, kernel_size), features, channels, kernel_size)
    c1 = new_output((rows,), torch.float32, x.device)
    c2 = new_output((rows,), torch.float32, x.device)
    dweight = new_output((features,), torch.float32, x.device)
    dbias = new_output((features,), torch.float32, x.device)
    dx = new_output(tuple(x.shape) if input_grad else (0,), x.dtype, x.device)
    part_width = partial_width(constexprs, kernel_size)
    geometry = (rows, out_h * out_w, out_w, height, width, channels, features, kernel_size, stride, padding,
                *strides, part_width)
    with device_guard(x):
        tiles = cdiv(rows, constexprs["BLOCK_M"])
        options = dict(constexprs, num_warps=num_warps, num_stages=NUM_STAGES)
        programs = 0
        if tiles > 0:
            # the partials' size is what is being chosen: c1 stands in for them while the kernel is compiled
            programs = _rows_programs((x, w, dy, mean, rstd, c1, c2, c1, *geometry), options, tiles, x.device)
        partials = new_output((programs, 2, part_width), torch.float32, x.device)
        if programs > 0:
            _bwd_rows_kernel[(programs,)](x, w, dy, mean, rstd, c1, c2, partials, *geometry, **options)
        _sum_partials_kernel[(cdiv(2 * part_width, PARTIALS_BLOCK_N),)](
            partials, dweight, dbias, programs, features, part_width, BLOCK_G=PARTIALS_BLOCK_G,
            BLOCK_N=PARTIALS_BLOCK_N, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
        if input_grad and x.numel() > 0:
            _bwd_dx_kernel[(cdiv(x.numel(), DX_BLOCK),)](
                x, w, dy, mean, rstd, c1, c2, dx, x.numel(), channels, height, width, out_h * out_w, out_h, out_w,
                features, kernel_size, stride, padding, *strides,
                CHANNELS_LAST=x.dim() == 3, BLOCK=DX_BLOCK, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return dx.to(x_dtype), dweight, dbias


def _direct(x_dtype, y_dtype):
    """True when the kernels take x and y (or dy) in these dtypes as they are (DTYPE_PAIRS)."""
    return (_TRITON_NAMES[x_dtype], _TRITON_NAMES[y_dtype]) in DTYPE_PAIRS


# ------------------------------------------------------------------------------------------- compile specs

def _row_configs(row_tile):
    """Every distinct (constexprs, num_warps) row_config gives with ``row_tile``."""
    configs = {}
    for features in range(1, MAX_FEATURES + 1):
        configs[features] = row_config(row_tile, False, features, features, 1)  # only F matters here
    for block_c in TOKEN_CHANNELS:
        for kernel_size in TOKEN_KERNELS:
            configs[block_c, kernel_size] = row_config(row_tile, True, block_c * kernel_size ** 2, block_c,
                                                       kernel_size)
    unique = {}
    for constexprs, num_warps in configs.values():
        unique[tuple(constexprs.items())] = (constexprs, num_warps)
    return list(unique.values())


def _config_name(constexprs):
    if constexprs["TOKENS"]:
        return f"tokens,C{constexprs['V_A']},taps{constexprs['U_A']}+{constexprs['U_B']}"
    return f"F{constexprs['V_A']}+{constexprs['V_B']}"


def compile_specs():
    """Every configuration :func:`forward` and :func:`backward` can launch."""
    specs = []
    for kernel, row_tile, what in ((_fwd_kernel, FWD_ROW_TILE, "fwd"), (_bwd_rows_kernel, BWD_ROW_TILE, "bwd_rows")):
        for constexprs, num_warps in _row_configs(row_tile):
            # token tiles are launched only when these are multiples of 16 (token_layout)
            divisible = ("C", "sxb", "sxh", "sxw") if constexprs["TOKENS"] else ()
            for x_type, y_type in DTYPE_PAIRS:
                pointers = {"x_ptr": f"*{x_type}", "y_ptr": f"*{y_type}", "dy_ptr": f"*{y_type}"}
                signature = kernel_signature(kernel, pointers, scalars={"eps": "fp32"})
                name = f"soft_split_layernorm_{what}[{x_type}->{y_type},{_config_name(constexprs)}]"
                specs.append(CompileSpec(name, kernel, signature, constexprs, num_warps, NUM_STAGES, divisible))
    for x_type, y_type in DTYPE_PAIRS:
        for channels_last in (False, True):
            sig = kernel_signature(_bwd_dx_kernel, {"x_ptr": f"*{x_type}", "dy_ptr": f"*{y_type}",
                                                    "dx_ptr": f"*{x_type}"})
            layout = "tokens" if channels_last else "nchw"
            specs.append(CompileSpec(f"soft_split_layernorm_bwd_dx[{x_type}<-{y_type},{layout}]", _bwd_dx_kernel,
                                     sig, {"CHANNELS_LAST": channels_last, "BLOCK": DX_BLOCK}, NUM_WARPS,
                                     NUM_STAGES))
    specs.append(CompileSpec(
        "soft_split_layernorm_sum_partials", _sum_partials_kernel, kernel_signature(_sum_partials_kernel),
        {"BLOCK_G": PARTIALS_BLOCK_G, "BLOCK_N": PARTIALS_BLOCK_N}, NUM_WARPS, NUM_STAGES))
    return specs
