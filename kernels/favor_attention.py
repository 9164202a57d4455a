"""Triton kernels of the fused FAVOR+ (Performer) attention; the maths, the eps rescaling and the backward
derivation are in the docstring of ``t2t_fast.ops.favor_attention``.

Per image b (T tokens, e = width, m = random features, W the (m, e) frozen matrix), in fp32:
  a_t = k_t W^T - |k_t|^2/2,  c_k = max_t a_t (per feature),  K_t = exp(a_t - c_k)
  b_t = q_t W^T - |q_t|^2/2 + c_k,  c_q[t] = max_j b_tj,      P_t = exp(b_t - c_q[t])
  S = sum_t K_t^T v_t (m, e),  z = sum_t K_t (m)
  y_t = P_t S / (P_t . z + eps_t),  eps_t = exp(min(log(eps m) - c_q[t], 80))

Forward:   _fwd_kv_chunk (one program per (image, token chunk): chunk-local shifts, partial S, z)
           -> _fwd_kv_reduce (one program per image: rescale + sum the chunks in order)
           -> _fwd_out (one program per (image, token chunk): P on the fly, y).
Backward:  _bwd_q_chunk (dq and the chunk partials of dS, dz) -> _bwd_reduce (sum in order)
           -> _bwd_kv_chunk (dk, dv).
Every reduction has a fixed order (no atomics), so results are bitwise reproducible run to run.
Offsets are computed in int64 (image index cast first), so large B*T*3e strided views are safe.
"""
import triton
import triton.language as tl

from t2t_fast.kernels import CompileSpec

BLOCK_T = 32  # tokens per tile (tl.dot M dimension)
# Launch options, passed explicitly by the wrapper (t2t_fast/ops/favor_attention.py) and used by
# compile_specs(), so the configurations compiled ahead of time are the ones that run.
NUM_WARPS = 4
# The backward token kernels hold the most state: at 4 warps ptxas (sm_90) spills 28-260 bytes per thread at
# 255 registers; at 8 warps the fp32 T2T tile (m32 e64) spills nothing, with the same 8 warps per SM.
BWD_NUM_WARPS = 8
NUM_STAGES = 1
DOT_PRECISION = tl.constexpr("tf32x3")  # ~fp32 accuracy on tensor cores (3 tf32 MMAs per product)


@triton.jit
def _load_w_t(w_ptr, M, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # W^T as a (BLOCK_E, BLOCK_M) fp32 tile, zero-padded; w is contiguous fp32 (m, e).
    offs_e = tl.arange(0, BLOCK_E)
    offs_m = tl.arange(0, BLOCK_M)
    mask = (offs_e[:, None] < E) & (offs_m[None, :] < M)
    return tl.load(w_ptr + offs_m[None, :] * E + offs_e[:, None], mask=mask, other=0.0)


@triton.jit
def _load_w(w_ptr, M, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # W as a (BLOCK_M, BLOCK_E) fp32 tile, zero-padded.
    offs_e = tl.arange(0, BLOCK_E)
    offs_m = tl.arange(0, BLOCK_M)
    mask = (offs_m[:, None] < M) & (offs_e[None, :] < E)
    return tl.load(w_ptr + offs_m[:, None] * E + offs_e[None, :], mask=mask, other=0.0)


@triton.jit
def _load_rows(ptr, offs_t, T, E, s_t, s_e, BLOCK_E: tl.constexpr):
    # (BLOCK_T, BLOCK_E) fp32 tile of a strided (T, e) matrix, zero outside; converted right after the load.
    offs_e = tl.arange(0, BLOCK_E)
    mask = (offs_t[:, None] < T) & (offs_e[None, :] < E)
    x = tl.load(ptr + offs_t[:, None].to(tl.int64) * s_t + offs_e[None, :] * s_e, mask=mask, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _store_rows(ptr, x, offs_t, T, E, BLOCK_E: tl.constexpr):
    # Store a (BLOCK_T, BLOCK_E) tile into a contiguous (T, e) output.
    offs_e = tl.arange(0, BLOCK_E)
    mask = (offs_t[:, None] < T) & (offs_e[None, :] < E)
    tl.store(ptr + offs_t[:, None].to(tl.int64) * E + offs_e[None, :], x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _logits(x, w_t):
    # x W^T - |x|^2/2 : (BLOCK_T, BLOCK_M) fp32 (padded feature columns get -|x|^2/2: finite, masked later).
    return tl.dot(x, w_t, input_precision=DOT_PRECISION) - 0.5 * tl.sum(x * x, axis=1)[:, None]


@triton.jit
def _program_chunk(T, chunk, n_chunks):
    # Grid (B * n_chunks,): this program's image b (int64), chunk index and token range [start, end).
    pid = tl.program_id(0)
    c_idx = pid % n_chunks
    start = c_idx * chunk
    return (pid // n_chunks).to(tl.int64), c_idx, start, tl.minimum(start + chunk, T)


@triton.jit
def _fwd_kv_chunk(k_ptr, v_ptr, w_ptr, s_part_ptr, z_part_ptr, c_part_ptr,
                  T, M, E, chunk, n_chunks,
                  sk_b, sk_t, sk_e, sv_b, sv_t, sv_e,
                  BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # grid (B * n_chunks,). Writes s_part (B, n_chunks, m, e), z_part (B, n_chunks, m), c_part (B, n_chunks, m):
    # S and z of the chunk with feature j scaled by exp(-c_j), c_j the chunk's max logit of feature j
    # (online rescaling as in flash attention, per feature).
    b, c_idx, start, end = _program_chunk(T, chunk, n_chunks)
    k_ptr += b * sk_b
    v_ptr += b * sv_b
    offs_m = tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    w_t = _load_w_t(w_ptr, M, E, BLOCK_M, BLOCK_E)                          # (E, M)
    s_acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)                  # (M, E)
    z_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    c_run = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        kb = _load_rows(k_ptr, offs_t, end, E, sk_t, sk_e, BLOCK_E)        # (T_blk, E)
        vb = _load_rows(v_ptr, offs_t, end, E, sv_t, sv_e, BLOCK_E)        # (T_blk, E)
        a = tl.where(offs_t[:, None] < end, _logits(kb, w_t), float("-inf"))  # (T_blk, M)
        c_new = tl.maximum(c_run, tl.max(a, axis=0))                       # finite: >= 1 valid row
        alpha = tl.exp(c_run - c_new)                                       # 0 on the first block
        p = tl.exp(a - c_new[None, :])                                      # (T_blk, M), <= 1
        s_acc = s_acc * alpha[:, None] + tl.dot(tl.trans(p), vb, input_precision=DOT_PRECISION)
        z_acc = z_acc * alpha + tl.sum(p, axis=0)
        c_run = c_new
    part = b * n_chunks + c_idx
    mask_me = (offs_m[:, None] < M) & (offs_e[None, :] < E)
    tl.store(s_part_ptr + part * M * E + offs_m[:, None] * E + offs_e[None, :], s_acc, mask=mask_me)
    tl.store(z_part_ptr + part * M + offs_m, z_acc, mask=offs_m < M)
    tl.store(c_part_ptr + part * M + offs_m, c_run, mask=offs_m < M)


@triton.jit
def _fwd_kv_reduce(s_part_ptr, z_part_ptr, c_part_ptr, s_ptr, z_ptr, c_ptr,
                   M, E, n_chunks,
                   BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # grid (B,). c_k = max_c c_c, S = sum_c exp(c_c - c_k) S_c in chunk order (per feature);
    # writes s (B, m, e), z (B, m), c (B, m).
    b = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    mask_m = offs_m < M
    mask_me = (offs_m[:, None] < M) & (offs_e[None, :] < E)
    c_k = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    for c_idx in range(0, n_chunks):
        c_k = tl.maximum(c_k, tl.load(c_part_ptr + (b * n_chunks + c_idx) * M + offs_m, mask=mask_m, other=0.0))
    s_acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    z_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c_idx in range(0, n_chunks):
        part = b * n_chunks + c_idx
        scale = tl.exp(tl.load(c_part_ptr + part * M + offs_m, mask=mask_m, other=0.0) - c_k)   # (M,) <= 1
        s_c = tl.load(s_part_ptr + part * M * E + offs_m[:, None] * E + offs_e[None, :], mask=mask_me, other=0.0)
        z_c = tl.load(z_part_ptr + part * M + offs_m, mask=mask_m, other=0.0)
        s_acc += scale[:, None] * s_c
        z_acc += scale * z_c
    tl.store(s_ptr + b * M * E + offs_m[:, None] * E + offs_e[None, :], s_acc, mask=mask_me)
    tl.store(z_ptr + b * M + offs_m, z_acc, mask=mask_m)
    tl.store(c_ptr + b * M + offs_m, c_k, mask=mask_m)


@triton.jit
def _load_state(s_ptr, z_ptr, c_ptr, b, M, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # The image's (m, e) matrix, (m,) vector and (m,) shift, zero-padded to (BLOCK_M, BLOCK_E) / (BLOCK_M,).
    offs_m = tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    mask_me = (offs_m[:, None] < M) & (offs_e[None, :] < E)
    s_tile = tl.load(s_ptr + b * M * E + offs_m[:, None] * E + offs_e[None, :], mask=mask_me, other=0.0)
    z_vec = tl.load(z_ptr + b * M + offs_m, mask=offs_m < M, other=0.0)
    c_k = tl.load(c_ptr + b * M + offs_m, mask=offs_m < M, other=0.0)
    return s_tile, z_vec, c_k


@triton.jit
def _q_side(qb, w_t, s_tile, z_vec, c_k, log_eps_m, M, BLOCK_M: tl.constexpr):
    # P (T_blk, M), numerator N = P S (T_blk, E) and denominator D = P.z + eps_t (T_blk,) of a token block.
    offs_m = tl.arange(0, BLOCK_M)
    b_log = tl.where(offs_m[None, :] < M, _logits(qb, w_t) + c_k[None, :], float("-inf"))
    c_q = tl.max(b_log, axis=1)                                             # per-token shift
    p = tl.exp(b_log - c_q[:, None])                                        # max 1 per row
    num = tl.dot(p, s_tile, input_precision=DOT_PRECISION)
    eps_t = tl.exp(tl.minimum(log_eps_m - c_q, 80.0))  # clamp: _EPS_LOG_CLAMP of the ops module
    den = tl.sum(p * z_vec[None, :], axis=1) + eps_t                       # >= 1 + eps_t
    return p, num, den


@triton.jit
def _fwd_out(q_ptr, w_ptr, s_ptr, z_ptr, c_ptr, y_ptr,
             T, M, E, chunk, n_chunks, log_eps_m,
             sq_b, sq_t, sq_e,
             BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # grid (B * n_chunks,). y (B, T, e) contiguous, in y's dtype.
    b, c_idx, start, end = _program_chunk(T, chunk, n_chunks)
    q_ptr += b * sq_b
    y_ptr += b * T * E
    w_t = _load_w_t(w_ptr, M, E, BLOCK_M, BLOCK_E)                          # (E, M)
    s_tile, z_vec, c_k = _load_state(s_ptr, z_ptr, c_ptr, b, M, E, BLOCK_M, BLOCK_E)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        qb = _load_rows(q_ptr, offs_t, end, E, sq_t, sq_e, BLOCK_E)
        _, num, den = _q_side(qb, w_t, s_tile, z_vec, c_k, log_eps_m, M, BLOCK_M)
        _store_rows(y_ptr, num / den[:, None], offs_t, end, E, BLOCK_E)


@triton.jit
def _bwd_q_chunk(gy_ptr, q_ptr, w_ptr, s_ptr, z_ptr, c_ptr, dq_ptr, ds_part_ptr, dz_part_ptr,
                 T, M, E, chunk, n_chunks, log_eps_m,
                 sg_b, sg_t, sg_e, sq_b, sq_t, sq_e,
                 BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # grid (B * n_chunks,). dq (B, T, e); chunk partials ds_part (B, n_chunks, m, e), dz_part (B, n_chunks, m).
    b, c_idx, start, end = _program_chunk(T, chunk, n_chunks)
    gy_ptr += b * sg_b
    q_ptr += b * sq_b
    dq_ptr += b * T * E
    offs_m = tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    w_t = _load_w_t(w_ptr, M, E, BLOCK_M, BLOCK_E)                          # (E, M)
    w = _load_w(w_ptr, M, E, BLOCK_M, BLOCK_E)                              # (M, E)
    s_tile, z_vec, c_k = _load_state(s_ptr, z_ptr, c_ptr, b, M, E, BLOCK_M, BLOCK_E)
    ds_acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    dz_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        qb = _load_rows(q_ptr, offs_t, end, E, sq_t, sq_e, BLOCK_E)
        gb = _load_rows(gy_ptr, offs_t, end, E, sg_t, sg_e, BLOCK_E)       # 0 on padded rows
        p, num, den = _q_side(qb, w_t, s_tile, z_vec, c_k, log_eps_m, M, BLOCK_M)
        p = tl.where(offs_t[:, None] < end, p, 0.0)
        g_n = gb / den[:, None]                                             # dL/dN
        r = -tl.sum(g_n * (num / den[:, None]), axis=1)                     # dL/dD
        dp = tl.dot(g_n, tl.trans(s_tile), input_precision=DOT_PRECISION) + r[:, None] * z_vec[None, :]
        a = dp * p                                                          # (T_blk, M)
        dq = tl.dot(a, w, input_precision=DOT_PRECISION) - tl.sum(a, axis=1)[:, None] * qb
        _store_rows(dq_ptr, dq, offs_t, end, E, BLOCK_E)
        ds_acc += tl.dot(tl.trans(p), g_n, input_precision=DOT_PRECISION)
        dz_acc += tl.sum(p * r[:, None], axis=0)
    part = b * n_chunks + c_idx
    mask_me = (offs_m[:, None] < M) & (offs_e[None, :] < E)
    tl.store(ds_part_ptr + part * M * E + offs_m[:, None] * E + offs_e[None, :], ds_acc, mask=mask_me)
    tl.store(dz_part_ptr + part * M + offs_m, dz_acc, mask=offs_m < M)


@triton.jit
def _bwd_reduce(ds_part_ptr, dz_part_ptr, ds_ptr, dz_ptr,
                M, E, n_chunks,
                BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # grid (B,). dS, dz = sums of the chunk partials in chunk order.
    b = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    mask_me = (offs_m[:, None] < M) & (offs_e[None, :] < E)
    ds_acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    dz_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c_idx in range(0, n_chunks):
        part = b * n_chunks + c_idx
        ds_acc += tl.load(ds_part_ptr + part * M * E + offs_m[:, None] * E + offs_e[None, :], mask=mask_me,
                          other=0.0)
        dz_acc += tl.load(dz_part_ptr + part * M + offs_m, mask=offs_m < M, other=0.0)
    tl.store(ds_ptr + b * M * E + offs_m[:, None] * E + offs_e[None, :], ds_acc, mask=mask_me)
    tl.store(dz_ptr + b * M + offs_m, dz_acc, mask=offs_m < M)


@triton.jit
def _bwd_kv_chunk(k_ptr, v_ptr, w_ptr, c_ptr, ds_ptr, dz_ptr, dk_ptr, dv_ptr,
                  T, M, E, chunk, n_chunks,
                  sk_b, sk_t, sk_e, sv_b, sv_t, sv_e,
                  BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # grid (B * n_chunks,). dk, dv (B, T, e) from K recomputed with the saved per-image shifts.
    b, c_idx, start, end = _program_chunk(T, chunk, n_chunks)
    k_ptr += b * sk_b
    v_ptr += b * sv_b
    dk_ptr += b * T * E
    dv_ptr += b * T * E
    offs_m = tl.arange(0, BLOCK_M)
    w_t = _load_w_t(w_ptr, M, E, BLOCK_M, BLOCK_E)                          # (E, M)
    w = _load_w(w_ptr, M, E, BLOCK_M, BLOCK_E)                              # (M, E)
    ds_tile, dz_vec, c_k = _load_state(ds_ptr, dz_ptr, c_ptr, b, M, E, BLOCK_M, BLOCK_E)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        kb = _load_rows(k_ptr, offs_t, end, E, sk_t, sk_e, BLOCK_E)
        vb = _load_rows(v_ptr, offs_t, end, E, sv_t, sv_e, BLOCK_E)
        valid = (offs_t[:, None] < end) & (offs_m[None, :] < M)
        kf = tl.where(valid, tl.exp(_logits(kb, w_t) - c_k[None, :]), 0.0)  # K (T_blk, M), <= 1
        dkf = tl.dot(vb, tl.trans(ds_tile), input_precision=DOT_PRECISION) + dz_vec[None, :]
        dv = tl.dot(kf, ds_tile, input_precision=DOT_PRECISION)
        a = dkf * kf
        dk = tl.dot(a, w, input_precision=DOT_PRECISION) - tl.sum(a, axis=1)[:, None] * kb
        _store_rows(dk_ptr, dk, offs_t, end, E, BLOCK_E)
        _store_rows(dv_ptr, dv, offs_t, end, E, BLOCK_E)


MAX_DIM = 64  # largest m and e: the (m, e) state tiles live in registers
# (BLOCK_M, BLOCK_E) tiles: the official m=32, e=64 exactly, everything else zero-padded to 64 x 64. Few
# configs on purpose: each costs ~10-30 s of ahead-of-time compilation per target.
TILES = ((32, 64), (64, 64))


def tile_sizes(m, e):
    """The (BLOCK_M, BLOCK_E) tile of TILES that holds m features and width e (both <= MAX_DIM)."""
    return next((bm, be) for bm, be in TILES if m <= bm and e <= be)


_PTR_TYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _signature(kernel, io_type):
    """Signature of ``kernel``: pointers named in _IO_POINTERS take io_type, the other pointers are fp32,
    the tile sizes are constexpr, ``log_eps_m`` is fp32 and the remaining scalars i32."""
    sig = {}
    for name in kernel.arg_names:
        if name.startswith("BLOCK_"):
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = io_type if name in _IO_POINTERS else "*fp32"
        elif name == "log_eps_m":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


_IO_POINTERS = ("k_ptr", "q_ptr", "v_ptr", "gy_ptr", "y_ptr", "dq_ptr", "dk_ptr", "dv_ptr")
_TOKEN_KERNELS = (_fwd_kv_chunk, _fwd_out, _bwd_q_chunk, _bwd_kv_chunk)
_BWD_TOKEN_KERNELS = (_bwd_q_chunk, _bwd_kv_chunk)
_REDUCE_KERNELS = (_fwd_kv_reduce, _bwd_reduce)


def compile_specs():
    """Every (kernel, dtype, tile) configuration the favor_attention wrapper launches."""
    specs = []
    for bm, be in TILES:
        for kernel in _TOKEN_KERNELS:
            for dtype, ptr in _PTR_TYPES.items():
                specs.append(CompileSpec(
                    name=f"favor{kernel.__name__}_{dtype}_m{bm}_e{be}", kernel=kernel,
                    signature=_signature(kernel, ptr),
                    constexprs={"BLOCK_T": BLOCK_T, "BLOCK_M": bm, "BLOCK_E": be},
                    num_warps=BWD_NUM_WARPS if kernel in _BWD_TOKEN_KERNELS else NUM_WARPS,
                    num_stages=NUM_STAGES))
        for kernel in _REDUCE_KERNELS:
            specs.append(CompileSpec(
                name=f"favor{kernel.__name__}_m{bm}_e{be}", kernel=kernel,
                signature=_signature(kernel, "*fp32"), constexprs={"BLOCK_M": bm, "BLOCK_E": be},
                num_warps=NUM_WARPS, num_stages=NUM_STAGES))
    return specs
