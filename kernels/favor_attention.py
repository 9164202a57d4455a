"""Triton kernels of the fused FAVOR+ (Performer) attention and their launches; the maths, the eps rescaling,
the overflow rules and the backward derivation are in the docstring of ``t2t_fast.ops.favor_attention``.

Per image b (T tokens, e = width, m = random features, W the (m, e) frozen matrix), in fp32:
  a_t = k_t W^T - |k_t|^2/2 (-inf where |k_t|^2/2 overflows),  c_k = max_t a_t per feature (0 if all -inf),
  K_t = exp(a_t - c_k),  S = sum_t K_t^T v_t (m, e),  z = sum_t K_t (m)
  u_t = s_t (q_t W^T + c_k) (s_t = 1, or 2^-64 on rows whose |q_t|^2/2 overflows, with q_t scaled first),
  P_t = exp((u_t - max_j u_tj) / s_t),  eps_t = exp(min(log(eps m) + |q_t|^2/2 - max_j u_tj, EPS_LOG_CLAMP))
  y_t = P_t S / max(P_t . z + eps_t, 1)

Forward:   _fwd_kv_chunk (one program per (image, token chunk, block of FEATURE_BLOCK features): chunk-local
           shifts, partial S, z) -> _fwd_kv_reduce (one program per image: rescale + sum the chunks in order)
           -> _fwd_out (one program per (image, token chunk): P on the fly, y).
Backward:  _bwd_q_chunk (dq; for m <= FEATURE_BLOCK also the chunk partials of dS, dz, else per token the
           shift, D and r, from which _bwd_ds_chunk forms the partials per feature block) -> _bwd_reduce (sum
           in order) -> _bwd_kv_chunk (dk, dv).
Every reduction has a fixed order (no atomics), so results are bitwise reproducible run to run.
Offsets: the image index is int64; offsets inside one image are int32, which the op's validation
guarantees (:func:`index_limits`).
"""
import torch
import triton
import triton.language as tl

from t2t_fast.kernels import CompileSpec, kernel_signature
from t2t_fast.kernels._common import to_output
from t2t_fast.ops._common import cdiv, device_guard, new_output
from t2t_fast.ops.favor_attention import EPS_LOG_CLAMP, HALF_NORM_CAP, ROW_SCALE, log_eps_m

NUM_STAGES = 1
DOT_PRECISION = tl.constexpr("tf32x3")  # ~fp32 accuracy on tensor cores (3 tf32 MMAs per product)
CHUNK = 256  # tokens per program of every token kernel; partial sums are per chunk (a multiple of BLOCK_T)
_CLAMP = tl.constexpr(EPS_LOG_CLAMP)
_HN_CAP = tl.constexpr(HALF_NORM_CAP)
_ROW_SCALE = tl.constexpr(ROW_SCALE)
_INV_ROW_SCALE = tl.constexpr(1.0 / ROW_SCALE)


@triton.jit
def _load_w_t(w_ptr, m0, M, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # Rows m0 .. m0 + BLOCK_M of W, transposed: a (BLOCK_E, BLOCK_M) fp32 tile, zero-padded; w is contiguous
    # fp32 (m, e).
    offs_e = tl.arange(0, BLOCK_E)
    offs_m = m0 + tl.arange(0, BLOCK_M)
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
def _load_rows(ptr, offs_t, T, E, s_t, BLOCK_E: tl.constexpr):
    # (BLOCK_T, BLOCK_E) fp32 tile of a (T, e) matrix with row stride s_t and unit stride along e (so each
    # row's elements sit at constant offsets from one address), zero outside; converted right after the load.
    offs_e = tl.arange(0, BLOCK_E)
    mask = (offs_t[:, None] < T) & (offs_e[None, :] < E)
    x = tl.load(ptr + offs_t[:, None] * s_t + offs_e[None, :], mask=mask, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _store_rows(ptr, x, offs_t, T, E, BLOCK_E: tl.constexpr):
    # Store a (BLOCK_T, BLOCK_E) fp32 tile into a contiguous (T, e) output of the pointer's dtype.
    offs_e = tl.arange(0, BLOCK_E)
    mask = (offs_t[:, None] < T) & (offs_e[None, :] < E)
    tl.store(ptr + offs_t[:, None] * E + offs_e[None, :], to_output(x, ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_matrix(ptr, b, M, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # The image's (m, e) matrix, zero-padded to (BLOCK_M, BLOCK_E).
    offs_m = tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    mask_me = (offs_m[:, None] < M) & (offs_e[None, :] < E)
    return tl.load(ptr + b * M * E + offs_m[:, None] * E + offs_e[None, :], mask=mask_me, other=0.0)


@triton.jit
def _store_matrix(ptr, x, row, m0, M, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # Store features m0 .. m0 + BLOCK_M of the (m, e) matrix ``row`` (int64) of a contiguous (rows, m, e) buffer.
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    mask_me = (offs_m[:, None] < M) & (offs_e[None, :] < E)
    tl.store(ptr + row * M * E + offs_m[:, None] * E + offs_e[None, :], x, mask=mask_me)


@triton.jit
def _load_vector(ptr, row, m0, M, pad, BLOCK_M: tl.constexpr):
    # Features m0 .. m0 + BLOCK_M of the (m,) vector ``row`` (int64) of a contiguous (rows, m) buffer, padded
    # with ``pad``.
    offs_m = m0 + tl.arange(0, BLOCK_M)
    return tl.load(ptr + row * M + offs_m, mask=offs_m < M, other=pad)


@triton.jit
def _store_vector(ptr, x, row, m0, M, BLOCK_M: tl.constexpr):
    # Store features m0 .. m0 + BLOCK_M of the (m,) vector ``row`` (int64) of a contiguous (rows, m) buffer.
    offs_m = m0 + tl.arange(0, BLOCK_M)
    tl.store(ptr + row * M + offs_m, x, mask=offs_m < M)


@triton.jit
def _program_chunk(T, CHUNK: tl.constexpr):
    # Grid axis 0 = B * cdiv(T, CHUNK): this program's image b (int64), chunk row (int64: the index of the
    # (image, chunk) pair in the partial buffers) and token range [start, end).
    n_chunks = tl.cdiv(T, CHUNK)
    pid = tl.program_id(0)
    start = (pid % n_chunks) * CHUNK
    return (pid // n_chunks).to(tl.int64), pid.to(tl.int64), start, tl.minimum(start + CHUNK, T)


@triton.jit
def _tf32_parts(x):
    # x = hi + lo: hi is x rounded to tf32 (to nearest, ties away from zero, as cvt.rna), lo = x - hi exactly.
    hi = ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def _dot(a, b, A_TF32: tl.constexpr, B_TF32: tl.constexpr):
    # a @ b (fp32) at DOT_PRECISION. tf32x3 is done here rather than by tl.dot: lo*hi + hi*lo + hi*hi of the
    # operands' tf32 parts, each part converted for the tensor cores just before its product, so fewer operand
    # copies are live at once (registers). An operand that is exactly tf32 (widened fp16/bf16 data: A_TF32 /
    # B_TF32) has lo = 0: two products give the same sum with that operand held once.
    if DOT_PRECISION != "tf32x3":
        return tl.dot(a, b, input_precision=DOT_PRECISION)
    elif A_TF32:
        b_hi, b_lo = _tf32_parts(b)
        return tl.dot(a, b_hi, tl.dot(a, b_lo, input_precision="tf32"), input_precision="tf32")
    elif B_TF32:
        a_hi, a_lo = _tf32_parts(a)
        return tl.dot(a_hi, b, tl.dot(a_lo, b, input_precision="tf32"), input_precision="tf32")
    else:
        a_hi, a_lo = _tf32_parts(a)
        b_hi, b_lo = _tf32_parts(b)
        acc = tl.dot(a_hi, b_lo, tl.dot(a_lo, b_hi, input_precision="tf32"), input_precision="tf32")
        return tl.dot(a_hi, b_hi, acc, input_precision="tf32")


@triton.jit
def _key_logits(kb, w_t, valid_t, EXACT: tl.constexpr):
    # a = k W^T - |k|^2/2 (BLOCK_T, BLOCK_M); -inf on padded rows and on rows whose |k|^2/2 overflows (their
    # features are exp(-inf) = 0, the limit); NaN on a row with a NaN (its image's S and z then NaN, as in the
    # reference). Padded feature columns get -|k|^2/2: finite, never stored.
    half_norm = 0.5 * tl.sum(kb * kb, axis=1)
    keep = valid_t & (half_norm != float("inf"))
    return tl.where(keep[:, None], _dot(kb, w_t, EXACT, False) - half_norm[:, None],
                    float("-inf"))


@triton.jit
def _query_logits(qb, w_t, c_q, EXACT: tl.constexpr):
    # The rows as the dot saw them (scaled by 2^-64 where |q|^2/2 overflows), u = s (q W^T + c_k) and the
    # per-row 1/s and capped |q|^2/2. c_q is c_k with -inf on padded features.
    half_norm = 0.5 * tl.sum(qb * qb, axis=1)
    in_range = half_norm < float("inf")
    scale = tl.where(in_range, 1.0, _ROW_SCALE)
    qb = qb * scale[:, None]
    u = _dot(qb, w_t, EXACT, False) + scale[:, None] * c_q[None, :]
    return qb, u, tl.where(in_range, 1.0, _INV_ROW_SCALE), tl.minimum(half_norm, _HN_CAP)


@triton.jit
def _q_side(qb, w_t, z_vec, c_q, log_eps_m, EXACT: tl.constexpr):
    # For a token block: the rows as the dot saw them, P (T_blk, M), its shift max_j u, the denominator
    # D = max(P.z + eps_t, 1) (T_blk,) and d eps_t / d(|q|^2/2) (eps_t where the clamp is inactive, else 0).
    qb, u, inv_scale, half_norm = _query_logits(qb, w_t, c_q, EXACT)
    shift = tl.max(u, axis=1)                                              # finite: a real feature is finite
    p = tl.exp((u - shift[:, None]) * inv_scale[:, None])                  # max 1 per row
    eps_log = log_eps_m + half_norm - shift
    eps_t = tl.exp(tl.minimum(eps_log, _CLAMP))
    den = tl.maximum(tl.sum(p * z_vec[None, :], axis=1) + eps_t, 1.0)     # a no-op unless S = z = 0
    return qb, p, shift, den, tl.where(eps_log < _CLAMP, eps_t, 0.0)


@triton.jit
def _fwd_kv_chunk(k_ptr, v_ptr, w_ptr, s_part_ptr, z_part_ptr, c_part_ptr,
                  T, M, E,
                  sk_b, sk_t, sv_b, sv_t,
                  CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # grid (B * n_chunks, cdiv(m, BLOCK_M)): features are independent here, so each program takes one block of
    # them. Writes s_part (B, n_chunks, m, e), z_part and c_part (B, n_chunks, m): S and z of the chunk with
    # feature j scaled by exp(-c_j), c_j the chunk's max logit of feature j (online rescaling as in flash
    # attention, per feature; c_j = -inf where the chunk has no finite logit).
    b, row, start, end = _program_chunk(T, CHUNK)
    EXACT: tl.constexpr = k_ptr.dtype.element_ty != tl.float32  # fp16/bf16 data is exactly tf32
    m0 = tl.program_id(1) * BLOCK_M
    k_ptr += b * sk_b
    v_ptr += b * sv_b
    w_t = _load_w_t(w_ptr, m0, M, E, BLOCK_M, BLOCK_E)                      # (E, M)
    s_acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)                  # (M, E)
    z_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    c_run = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        kb = _load_rows(k_ptr, offs_t, end, E, sk_t, BLOCK_E)              # (T_blk, E)
        a = _key_logits(kb, w_t, offs_t < end, EXACT)                       # (T_blk, M)
        c_new = tl.maximum(c_run, tl.max(a, axis=0))
        c_use = tl.where(c_new > float("-inf"), c_new, 0.0)                 # no exp(-inf - -inf)
        alpha = tl.exp(c_run - c_use)                                       # 0 until a finite logit
        p = tl.exp(a - c_use[None, :])                                      # (T_blk, M), <= 1
        vb = _load_rows(v_ptr, offs_t, end, E, sv_t, BLOCK_E)              # (T_blk, E)
        s_acc = s_acc * alpha[:, None] + _dot(tl.trans(p), vb, False, EXACT)
        z_acc = z_acc * alpha + tl.sum(p, axis=0)
        c_run = c_new
    _store_matrix(s_part_ptr, s_acc, row, m0, M, E, BLOCK_M, BLOCK_E)
    _store_vector(z_part_ptr, z_acc, row, m0, M, BLOCK_M)
    _store_vector(c_part_ptr, c_run, row, m0, M, BLOCK_M)


@triton.jit
def _fwd_kv_reduce(s_part_ptr, z_part_ptr, c_part_ptr, s_ptr, z_ptr, c_ptr,
                   M, E, n_chunks,
                   BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # grid (B,). c_k = max_c c_c (0 for a feature no key reaches: its K column is 0), S = sum_c exp(c_c - c_k)
    # S_c in chunk order (per feature); writes s (B, m, e), z (B, m), c (B, m).
    b = tl.program_id(0).to(tl.int64)
    c_k = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    for c_idx in range(0, n_chunks):
        c_k = tl.maximum(c_k, _load_vector(c_part_ptr, b * n_chunks + c_idx, 0, M, 0.0, BLOCK_M))
    c_k = tl.where(c_k > float("-inf"), c_k, 0.0)
    s_acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    z_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c_idx in range(0, n_chunks):
        row = b * n_chunks + c_idx
        scale = tl.exp(_load_vector(c_part_ptr, row, 0, M, 0.0, BLOCK_M) - c_k)   # (M,) <= 1
        s_acc += scale[:, None] * _load_matrix(s_part_ptr, row, M, E, BLOCK_M, BLOCK_E)
        z_acc += scale * _load_vector(z_part_ptr, row, 0, M, 0.0, BLOCK_M)
    _store_matrix(s_ptr, s_acc, b, 0, M, E, BLOCK_M, BLOCK_E)
    _store_vector(z_ptr, z_acc, b, 0, M, BLOCK_M)
    _store_vector(c_ptr, c_k, b, 0, M, BLOCK_M)


@triton.jit
def _fwd_out(q_ptr, w_ptr, s_ptr, z_ptr, c_ptr, y_ptr,
             T, M, E, log_eps_m,
             sq_b, sq_t,
             CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # grid (B * n_chunks,). y (B, T, e) contiguous, in y's dtype.
    b, _row, start, end = _program_chunk(T, CHUNK)
    EXACT: tl.constexpr = q_ptr.dtype.element_ty != tl.float32  # fp16/bf16 data is exactly tf32
    q_ptr += b * sq_b
    y_ptr += b * T * E
    w_t = _load_w_t(w_ptr, 0, M, E, BLOCK_M, BLOCK_E)                       # (E, M)
    s_tile = _load_matrix(s_ptr, b, M, E, BLOCK_M, BLOCK_E)
    z_vec = _load_vector(z_ptr, b, 0, M, 0.0, BLOCK_M)
    c_q = _load_vector(c_ptr, b, 0, M, float("-inf"), BLOCK_M)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        qb = _load_rows(q_ptr, offs_t, end, E, sq_t, BLOCK_E)
        qb, p, shift, den, eps_grad = _q_side(qb, w_t, z_vec, c_q, log_eps_m, EXACT)
        num = _dot(p, s_tile, False, False)                                 # P S (T_blk, E)
        _store_rows(y_ptr, num / den[:, None], offs_t, end, E, BLOCK_E)


@triton.jit
def _bwd_q_chunk(gy_ptr, q_ptr, w_ptr, s_ptr, z_ptr, c_ptr, dq_ptr, ds_part_ptr, dz_part_ptr, stats_ptr,
                 T, M, E, log_eps_m,
                 sg_b, sg_t, sq_b, sq_t,
                 CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                 FUSED_DS: tl.constexpr):
    # grid (B * n_chunks,). dq (B, T, e). With FUSED_DS the chunk partials ds_part (B, n_chunks, m, e) and
    # dz_part (B, n_chunks, m); without, per token (shift, D, r) in stats (B, T, 3) for _bwd_ds_chunk.
    b, row, start, end = _program_chunk(T, CHUNK)
    EXACT: tl.constexpr = q_ptr.dtype.element_ty != tl.float32  # fp16/bf16 data is exactly tf32
    gy_ptr += b * sg_b
    q_ptr += b * sq_b
    dq_ptr += b * T * E
    z_vec = _load_vector(z_ptr, b, 0, M, 0.0, BLOCK_M)
    c_q = _load_vector(c_ptr, b, 0, M, float("-inf"), BLOCK_M)
    ds_acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    dz_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        w_t = _load_w_t(w_ptr, 0, M, E, BLOCK_M, BLOCK_E)                   # (E, M)
        s_tile = _load_matrix(s_ptr, b, M, E, BLOCK_M, BLOCK_E)
        qb = _load_rows(q_ptr, offs_t, end, E, sq_t, BLOCK_E)
        qb, p, shift, den, eps_grad = _q_side(qb, w_t, z_vec, c_q, log_eps_m, EXACT)
        p = tl.where((offs_t < end)[:, None], p, 0.0)
        gb = _load_rows(gy_ptr, offs_t, end, E, sg_t, BLOCK_E)             # 0 on padded rows
        # With G = g / D (dL/dN): dP = S G + r z, r = dL/dD = -G.y = -P.(S G) / D, dS += P^T G; the 1/D
        # scaling is applied outside the products so that g enters them as loaded.
        dp = _dot(gb, tl.trans(s_tile), EXACT, False) / den[:, None]       # S G (T_blk, M)
        r = -tl.sum(p * dp, axis=1) / den
        if FUSED_DS:
            ds_acc += _dot(tl.trans(p / den[:, None]), gb, False, EXACT)
            dz_acc += tl.sum(p * r[:, None], axis=0)
        else:
            stats = stats_ptr + (b * T + offs_t) * 3
            tl.store(stats, shift, mask=offs_t < end)
            tl.store(stats + 1, den, mask=offs_t < end)
            tl.store(stats + 2, r, mask=offs_t < end)
        dp += r[:, None] * z_vec[None, :]
        w = _load_w(w_ptr, M, E, BLOCK_M, BLOCK_E)                          # (M, E)
        # dq = (dP * P) W + dL/d eps_t * d eps_t/dq, with d eps_t/dq = eps_t q (the exact form of the shifted
        # formula's q-term: no cancellation).
        dq = _dot(dp * p, w, False, False) + (r * eps_grad)[:, None] * qb
        _store_rows(dq_ptr, dq, offs_t, end, E, BLOCK_E)
    if FUSED_DS:
        _store_matrix(ds_part_ptr, ds_acc, row, 0, M, E, BLOCK_M, BLOCK_E)
        _store_vector(dz_part_ptr, dz_acc, row, 0, M, BLOCK_M)


@triton.jit
def _bwd_ds_chunk(gy_ptr, q_ptr, w_ptr, c_ptr, stats_ptr, ds_part_ptr, dz_part_ptr,
                  T, M, E,
                  sg_b, sg_t, sq_b, sq_t,
                  CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # grid (B * n_chunks, cdiv(m, BLOCK_M)): the chunk partials of dS and dz for one block of features, from
    # P recomputed with the per-token shift and D (and r) that _bwd_q_chunk saved over all features.
    b, row, start, end = _program_chunk(T, CHUNK)
    EXACT: tl.constexpr = q_ptr.dtype.element_ty != tl.float32  # fp16/bf16 data is exactly tf32
    m0 = tl.program_id(1) * BLOCK_M
    gy_ptr += b * sg_b
    q_ptr += b * sq_b
    w_t = _load_w_t(w_ptr, m0, M, E, BLOCK_M, BLOCK_E)                      # (E, M)
    c_q = _load_vector(c_ptr, b, m0, M, float("-inf"), BLOCK_M)
    ds_acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    dz_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        valid = offs_t < end
        stats = stats_ptr + (b * T + offs_t) * 3
        shift = tl.load(stats, mask=valid, other=0.0)
        den = tl.load(stats + 1, mask=valid, other=1.0)
        r = tl.load(stats + 2, mask=valid, other=0.0)
        qb = _load_rows(q_ptr, offs_t, end, E, sq_t, BLOCK_E)
        qb, u, inv_scale, half_norm = _query_logits(qb, w_t, c_q, EXACT)
        p = tl.where(valid[:, None], tl.exp((u - shift[:, None]) * inv_scale[:, None]), 0.0)
        gb = _load_rows(gy_ptr, offs_t, end, E, sg_t, BLOCK_E)
        ds_acc += _dot(tl.trans(p / den[:, None]), gb, False, EXACT)
        dz_acc += tl.sum(p * r[:, None], axis=0)
    _store_matrix(ds_part_ptr, ds_acc, row, m0, M, E, BLOCK_M, BLOCK_E)
    _store_vector(dz_part_ptr, dz_acc, row, m0, M, BLOCK_M)


@triton.jit
def _bwd_reduce(ds_part_ptr, dz_part_ptr, ds_ptr, dz_ptr,
                M, E, n_chunks,
                BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # grid (B,). dS, dz = sums of the chunk partials in chunk order.
    b = tl.program_id(0).to(tl.int64)
    ds_acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    dz_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c_idx in range(0, n_chunks):
        ds_acc += _load_matrix(ds_part_ptr, b * n_chunks + c_idx, M, E, BLOCK_M, BLOCK_E)
        dz_acc += _load_vector(dz_part_ptr, b * n_chunks + c_idx, 0, M, 0.0, BLOCK_M)
    _store_matrix(ds_ptr, ds_acc, b, 0, M, E, BLOCK_M, BLOCK_E)
    _store_vector(dz_ptr, dz_acc, b, 0, M, BLOCK_M)


@triton.jit
def _bwd_kv_chunk(k_ptr, v_ptr, w_ptr, c_ptr, ds_ptr, dz_ptr, dk_ptr, dv_ptr,
                  T, M, E,
                  sk_b, sk_t, sv_b, sv_t,
                  CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # grid (B * n_chunks,). dk, dv (B, T, e) from K recomputed with the saved per-image shifts. Padded feature
    # columns of K are finite and meet zero rows of dS and dz, so they add nothing.
    b, _row, start, end = _program_chunk(T, CHUNK)
    EXACT: tl.constexpr = k_ptr.dtype.element_ty != tl.float32  # fp16/bf16 data is exactly tf32
    k_ptr += b * sk_b
    v_ptr += b * sv_b
    dk_ptr += b * T * E
    dv_ptr += b * T * E
    dz_vec = _load_vector(dz_ptr, b, 0, M, 0.0, BLOCK_M)
    c_k = _load_vector(c_ptr, b, 0, M, 0.0, BLOCK_M)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        w_t = _load_w_t(w_ptr, 0, M, E, BLOCK_M, BLOCK_E)                   # (E, M)
        ds_tile = _load_matrix(ds_ptr, b, M, E, BLOCK_M, BLOCK_E)
        kb = _load_rows(k_ptr, offs_t, end, E, sk_t, BLOCK_E)
        kf = tl.exp(_key_logits(kb, w_t, offs_t < end, EXACT) - c_k[None, :])     # K (T_blk, M), <= 1
        _store_rows(dv_ptr, _dot(kf, ds_tile, False, False), offs_t, end, E, BLOCK_E)
        vb = _load_rows(v_ptr, offs_t, end, E, sv_t, BLOCK_E)
        a = kf * (_dot(vb, tl.trans(ds_tile), EXACT, False) + dz_vec[None, :])   # dK * K
        w = _load_w(w_ptr, M, E, BLOCK_M, BLOCK_E)                          # (M, E)
        dk = _dot(a, w, False, False) - tl.sum(a, axis=1)[:, None] * kb
        _store_rows(dk_ptr, dk, offs_t, end, E, BLOCK_E)


MAX_DIM = 64  # largest m and e: the (m, e) state tiles live in registers
# (BLOCK_M, BLOCK_E) tiles of the kernels that need every feature of a token (the shift and the denominator are
# over features): the official m=32, e=64 exactly, everything else zero-padded to 64 x 64. Few configs on
# purpose: each costs ~10-30 s of ahead-of-time compilation per target.
TILES = ((32, 64), (64, 64))
# Features per program of the kernels whose features are independent (S, z and their gradients): m = 64
# takes two such programs, since one 64-feature program holds more than the registers (ptxas spills).
FEATURE_BLOCK = 32
# (BLOCK_T, num_warps) per token kernel: the most work per program that ptxas (Triton 3.6-3.9, sm_80 and
# sm_90) fits in registers without spilling; per tile for the kernels that see every feature.
_TOKEN_CONFIGS = {
    (32, 64): {"_fwd_out": (32, 4), "_bwd_q_chunk": (16, 8), "_bwd_kv_chunk": (32, 8)},
    (64, 64): {"_fwd_out": (32, 4), "_bwd_q_chunk": (16, 8), "_bwd_kv_chunk": (16, 8)},
}
_FEATURE_BLOCK_CONFIGS = {"_fwd_kv_chunk": (32, 8), "_bwd_ds_chunk": (16, 4)}
_REDUCE_WARPS = 4
# The masked lanes of a token block form offsets up to BLOCK_T - 1 rows past T.
MAX_BLOCK_T = max(block_t for configs in (*_TOKEN_CONFIGS.values(), _FEATURE_BLOCK_CONFIGS)
                  for block_t, _ in configs.values())
_INT32_MAX = 2 ** 31 - 1


def tile_sizes(m, e):
    """The (BLOCK_M, BLOCK_E) tile of TILES that holds m features and width e (both <= MAX_DIM)."""
    return next((bm, be) for bm, be in TILES if m <= bm and e <= be)


def _unit_e(x):
    """x, or a contiguous copy when its elements along e are not adjacent (the kernels read rows at unit
    stride)."""
    return x if x.stride(2) == 1 or x.shape[2] == 1 else x.contiguous()


def index_limits(shape, strides):
    """Why int32 offsets inside one image cannot address a (B, T, e) operand with these element strides
    (the kernels' index type), or None. Checked by the op before any launch."""
    batch, tokens, width = shape
    if strides[2] != 1 and width != 1:
        strides = (tokens * width, width, 1)  # what :func:`_unit_e` reads
    if max(strides[:2]) > _INT32_MAX:
        return f"a stride of {max(strides[:2])} elements (the kernels index with int32)"
    # Masked lanes form offsets up to MAX_BLOCK_T rows past T and MAX_DIM elements along e; the outputs are
    # contiguous (row stride e).
    span = (tokens + MAX_BLOCK_T) * max(strides[1], width) + MAX_DIM
    if span > _INT32_MAX:
        return f"one image spans {span} elements (the kernels index within an image with int32)"
    if batch * cdiv(tokens, CHUNK) > _INT32_MAX:
        return f"{batch} images of {tokens} tokens need more than 2^31 - 1 programs"
    return None


def _fused_ds(block_m):
    """Whether _bwd_q_chunk also sums dS and dz (one feature block), rather than leaving it to _bwd_ds_chunk."""
    return block_m <= FEATURE_BLOCK


def _options(kernel, tile):
    """Constexprs and launch options of a token kernel at a tile, exactly as compile_specs() lists them."""
    if kernel.__name__ in _FEATURE_BLOCK_CONFIGS:
        (block_t, num_warps), block_m = _FEATURE_BLOCK_CONFIGS[kernel.__name__], FEATURE_BLOCK
    else:
        (block_t, num_warps), block_m = _TOKEN_CONFIGS[tile][kernel.__name__], tile[0]
    options = dict(CHUNK=CHUNK, BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_E=tile[1], num_warps=num_warps,
                   num_stages=NUM_STAGES)
    if kernel is _bwd_q_chunk:
        options["FUSED_DS"] = _fused_ds(block_m)
    return options


def _reduce_options(tile):
    return dict(BLOCK_M=tile[0], BLOCK_E=tile[1], num_warps=_REDUCE_WARPS, num_stages=NUM_STAGES)


def forward(k, q, v, w, eps):
    """Run the forward kernels on validated inputs (k, q, v (B, T, e) of one dtype, w (m, e), m and e <= MAX_DIM,
    int32-addressable per :func:`index_limits`). Returns y (B, T, e) in v's dtype, and per image S' (B, m, e),
    z' (B, m) and the per-feature shift c_k (B, m), float32, which the backward needs."""
    batch, tokens, width = k.shape
    m = w.shape[0]
    dev = k.device
    y = new_output((batch, tokens, width), v.dtype, dev)
    s = new_output((batch, m, width), torch.float32, dev)
    z = new_output((batch, m), torch.float32, dev)
    c_k = new_output((batch, m), torch.float32, dev)
    if batch * tokens == 0:
        return y, s.zero_(), z.zero_(), c_k.zero_()
    k, q, v = _unit_e(k), _unit_e(q), _unit_e(v)
    wf = w.detach().to(torch.float32).contiguous()
    n_chunks = cdiv(tokens, CHUNK)
    s_part = new_output((batch, n_chunks, m, width), torch.float32, dev)
    z_part = new_output((batch, n_chunks, m), torch.float32, dev)
    c_part = new_output((batch, n_chunks, m), torch.float32, dev)
    tile = tile_sizes(m, width)
    with device_guard(k):
        _fwd_kv_chunk[(batch * n_chunks, cdiv(m, FEATURE_BLOCK))](
            k, v, wf, s_part, z_part, c_part, tokens, m, width, *k.stride()[:2], *v.stride()[:2],
            **_options(_fwd_kv_chunk, tile))
        _fwd_kv_reduce[(batch,)](s_part, z_part, c_part, s, z, c_k, m, width, n_chunks, **_reduce_options(tile))
        _fwd_out[(batch * n_chunks,)](q, wf, s, z, c_k, y, tokens, m, width, log_eps_m(eps, m), *q.stride()[:2],
                                      **_options(_fwd_out, tile))
    return y, s, z, c_k


def backward(grad_y, k, q, v, w, s, z, c_k, eps):
    """Run the backward kernels on validated inputs (those of :func:`forward`, its contiguous s, z, c_k, and
    grad_y of k's shape and dtype). Returns dk, dq, dv (B, T, e) contiguous, in the input dtype."""
    batch, tokens, width = k.shape
    m = w.shape[0]
    dev = k.device
    dk, dq, dv = (new_output((batch, tokens, width), k.dtype, dev) for _ in range(3))
    if batch * tokens == 0:
        return dk, dq, dv
    grad_y, k, q, v = _unit_e(grad_y), _unit_e(k), _unit_e(q), _unit_e(v)
    wf = w.detach().to(torch.float32).contiguous()
    n_chunks = cdiv(tokens, CHUNK)
    ds_part = new_output((batch, n_chunks, m, width), torch.float32, dev)
    dz_part = new_output((batch, n_chunks, m), torch.float32, dev)
    ds = new_output((batch, m, width), torch.float32, dev)
    dz = new_output((batch, m), torch.float32, dev)
    tile = tile_sizes(m, width)
    fused = _fused_ds(tile[0])
    stats = ds_part if fused else new_output((batch, tokens, 3), torch.float32, dev)
    grid = (batch * n_chunks,)
    strides = (*grad_y.stride()[:2], *q.stride()[:2])
    with device_guard(k):
        _bwd_q_chunk[grid](grad_y, q, wf, s, z, c_k, dq, ds_part, dz_part, stats, tokens, m, width, log_eps_m(eps, m),
                           *strides, **_options(_bwd_q_chunk, tile))
        if not fused:
            _bwd_ds_chunk[(batch * n_chunks, cdiv(m, FEATURE_BLOCK))](
                grad_y, q, wf, c_k, stats, ds_part, dz_part, tokens, m, width, *strides,
                **_options(_bwd_ds_chunk, tile))
        _bwd_reduce[(batch,)](ds_part, dz_part, ds, dz, m, width, n_chunks, **_reduce_options(tile))
        _bwd_kv_chunk[grid](k, v, wf, c_k, ds, dz, dk, dv, tokens, m, width, *k.stride()[:2], *v.stride()[:2],
                            **_options(_bwd_kv_chunk, tile))
    return dk, dq, dv


_IO_POINTERS = ("k_ptr", "q_ptr", "v_ptr", "gy_ptr", "y_ptr", "dq_ptr", "dk_ptr", "dv_ptr")
_PTR_TYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _signature(kernel, io_type):
    """Signature of ``kernel``: the token operands take io_type, the other pointers are fp32, ``log_eps_m``
    is fp32 and the remaining scalars i32."""
    return kernel_signature(kernel, pointers=dict.fromkeys(_IO_POINTERS, io_type), default_pointer="*fp32",
                            scalars={"log_eps_m": "fp32"})


def compile_specs():
    """Every (kernel, dtype, tile) configuration :func:`forward` and :func:`backward` launch."""
    specs = {}
    for tile in TILES:
        token_kernels = [_fwd_kv_chunk, _fwd_out, _bwd_q_chunk, _bwd_kv_chunk]
        if not _fused_ds(tile[0]):
            token_kernels.append(_bwd_ds_chunk)
        for kernel in token_kernels:
            options = _options(kernel, tile)
            num_warps, num_stages = options.pop("num_warps"), options.pop("num_stages")
            for dtype, ptr in _PTR_TYPES.items():
                name = f"favor{kernel.__name__}_{dtype}_m{options['BLOCK_M']}_e{options['BLOCK_E']}"
                specs[name] = CompileSpec(name=name, kernel=kernel, signature=_signature(kernel, ptr),
                                          constexprs=options, num_warps=num_warps, num_stages=num_stages)
        for kernel in (_fwd_kv_reduce, _bwd_reduce):
            options = _reduce_options(tile)
            num_warps, num_stages = options.pop("num_warps"), options.pop("num_stages")
            name = f"favor{kernel.__name__}_m{tile[0]}_e{tile[1]}"
            specs[name] = CompileSpec(name=name, kernel=kernel, signature=_signature(kernel, "*fp32"),
                                      constexprs=options, num_warps=num_warps, num_stages=num_stages)
    return list(specs.values())
