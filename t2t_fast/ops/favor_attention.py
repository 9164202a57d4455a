r"""FAVOR+ (Performer) linear attention of the T2T performer layers, fused and overflow-proof.

Per image (T tokens of width e, frozen random matrix w of shape (m, e)):

    phi(u) = exp(u w^T - |u|^2/2) / sqrt(m)        kp = phi(k), qp = phi(q)       (T, m)
    S = kp^T v (m, e),  z = sum_t kp_t (m),  D_t = qp_t . z,  y_t = qp_t S / (D_t + eps)

``favor_attention_ref`` is this computation exactly as the official code does it (u cast to fp32 before
the product with w, |u|^2/2 in the input dtype, everything after in fp32, y cast back). It is not
range-safe: under fp16 autocast (the official AMP training) its einsums run in fp16 and the sums of
features (up to e^{m/2}/sqrt(m) each with the official w) overflow to inf, then inf/inf = NaN; with a w of
larger rows exp() itself overflows fp32; |u|^2 of fp16 inputs overflows above |u| = 256; and large |u|
underflow every feature to 0.

Stabilisation (the ``triton`` and ``torch`` backends; all feature maths in fp32, float64 stays float64).
With a_t = k_t w^T - |k_t|^2/2 and b_t = q_t w^T - |q_t|^2/2 (norms taken in fp32), per image:

    c_k,j = max_t a_tj            (per-image shift, one per feature)     K_t = exp(a_t - c_k)
    c_q,t = max_j (b_tj + c_k,j)  (per-token shift)                      P_t = exp(b_t + c_k - c_q,t)
    S' = sum_t K_t^T v_t,  z' = sum_t K_t,  y_t = P_t S' / (P_t . z' + eps_t)

Since kp_tj = K_tj e^{c_k,j}/sqrt(m) and qp_tj e^{c_k,j} = P_tj e^{c_q,t}/sqrt(m), the numerator and D of
the reference are P_t S' and P_t . z' times e^{c_q,t}/m. Dividing its eps term by the same factor keeps y
identical to the formula above:

    eps_t = eps * m * exp(-c_q,t) = exp(min(log(eps) + log(m) - c_q,t, 80))

computed in log space in fp32, so it neither overflows nor underflows to a wrong answer. Every K and P
is <= 1, each feature's column of K reaches 1 (so z'_j >= 1) and each row of P reaches 1, hence
P_t . z' >= 1: the denominator can neither overflow (<= m T) nor underflow to 0, and |y| <= max |v|.
The clamp at 80 only acts when eps exceeds the unshifted D by e^80 / (m T) or more; y is then 0 to fp32
precision either way (|P_t S'| <= m T max|v| against eps_t >= e^80). On realistic inputs (official w:
orthogonal rows of norm sqrt(m), so logits <= m/2) eps_t is simply the reference's eps rescaled and
fp32 results match the reference to rounding (with eps = 1e-8 it is far below the fp32 resolution of
D' >= 1, exactly as 1e-8 is negligible against the reference's D). eps = 0 is allowed.

Backward (w is frozen: no gradient). y(k, q, v) does not depend on the shifts (it equals the unshifted
formula for every value of c), so its derivative is that of the shifted formula with c_k, c_q held
constant. Per token, with g_t = dL/dy_t, N_t = P_t S', D'_t = P_t . z' + eps_t:

    G_t  = g_t / D'_t                     (dL/dN_t, e)
    r_t  = -G_t . y_t                     (dL/dD'_t)
    dP_t = S' G_t + r_t z'                (m)
    dS'  = sum_t P_t^T G_t   (m, e)       dz' = sum_t r_t P_t   (m)
    dK_t = dS' v_t + dz'                  (m)
    dv_t = K_t dS'                        (e)

and since dP_tj/dq_t = P_tj (w_j - q_t) (likewise for K and k):

    dq_t = (dP_t * P_t) w - sum_j (dP_t * P_t)_j q_t
    dk_t = (dK_t * K_t) w - sum_j (dK_t * K_t)_j k_t

The Triton backward runs this in three kernels: (1) per token chunk, recompute P, N, D', write dq and
the chunk's partial dS', dz'; (2) per image, sum the partials in chunk order; (3) per token chunk,
recompute K with the saved c_k, write dk and dv. The forward saves only S', z' and c_k (per image,
float32) besides its inputs; kp and qp are never written to memory. No float atomics anywhere: the
results are deterministic, run to run.

Backends: ``triton`` (the fused kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``;
float32/float16/bfloat16) and ``torch`` (the same stabilised maths in plain torch ops, so ONNX export and
``torch.export`` can trace it; the CPU path, and the only path for float64).
"""
import contextlib
import math

import torch

from t2t_fast.backend import requested_backend, select_backend
from t2t_fast.ops._common import check_float_tensor, compute_dtype, new_output

_OP = "favor_attention"
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_EPS_LOG_CLAMP = 80.0
_CHUNK = 256  # tokens per program of every token kernel; partial sums are per chunk (a multiple of BLOCK_T)


def favor_attention_ref(k, q, v, w, eps=1e-8):
    """The official FAVOR+ computation (upstream ``Token_performer.single_attn``), unstabilised.

    Args:
        k, q, v: (B, T, e), any float dtype; may be strided views.
        w: (m, e) random feature matrix.
        eps: added to the denominator ``D``.

    Returns:
        y (B, T, e) in v's dtype. As upstream: u is cast to float32 before the product with w (float64
        stays float64 so this can serve as the float64 oracle), |u|^2/2 is taken in the input dtype, the
        rest runs in float32. Overflows/underflows like the original (see the module docstring).
    """
    m, e = w.shape
    compute = compute_dtype(k.dtype)

    def features(u):
        half_sq_norm = (u * u).sum(dim=-1, keepdim=True).repeat(1, 1, m) / 2
        projected = torch.einsum("bti,mi->btm", u.to(compute), w.to(compute))
        return torch.exp(projected - half_sq_norm) / math.sqrt(m)

    kp, qp = features(k), features(q)                                            # (B, T, m)
    d = torch.einsum("btm,bm->bt", qp, kp.sum(dim=1)).unsqueeze(2)               # (B, T, 1)
    kptv = torch.einsum("bin,bim->bnm", v.to(compute), kp)                       # (B, e, m)
    y = torch.einsum("bti,bni->btn", qp, kptv) / (d.repeat(1, 1, e) + eps)
    return y.to(v.dtype)


def _favor_attention_torch(k, q, v, w, eps):
    """The stabilised computation of the module docstring in plain torch ops (traceable, differentiable)."""
    if k.shape[1] == 0:
        return v.clone()  # no tokens: nothing to attend over (and amax needs a non-empty dim)
    m = w.shape[0]
    compute = compute_dtype(k.dtype)
    kf, qf, vf, wf = k.to(compute), q.to(compute), v.to(compute), w.to(compute)
    a = kf @ wf.t() - 0.5 * (kf * kf).sum(dim=-1, keepdim=True)                 # (B, T, m)
    c_k = a.detach().amax(dim=1, keepdim=True)                                   # (B, 1, m)
    b = qf @ wf.t() - 0.5 * (qf * qf).sum(dim=-1, keepdim=True) + c_k            # (B, T, m)
    c_q = b.detach().amax(dim=2, keepdim=True)                                   # (B, T, 1)
    k_feat = torch.exp(a - c_k)
    q_feat = torch.exp(b - c_q)
    s = k_feat.transpose(1, 2) @ vf                                              # (B, m, e)
    z = k_feat.sum(dim=1, keepdim=True)                                          # (B, 1, m)
    eps_t = torch.exp(torch.clamp(_log_eps_m(eps, m) - c_q, max=_EPS_LOG_CLAMP))  # (B, T, 1)
    den = (q_feat * z).sum(dim=-1, keepdim=True) + eps_t
    return ((q_feat @ s) / den).to(v.dtype)


def _log_eps_m(eps, m):
    """log(eps * m), the eps term of the shifted denominator before its shift (-inf for eps = 0)."""
    return math.log(eps) + math.log(m) if eps > 0 else float("-inf")


def _validate(k, q, v, w, eps):
    for name, tensor in (("k", k), ("q", q), ("v", v), ("w", w)):
        check_float_tensor(name, tensor, _OP)
    for name, tensor in (("k", k), ("q", q), ("v", v)):
        if tensor.dim() != 3:
            raise ValueError(f"{_OP}: {name} must be (B, T, e), got shape {tuple(tensor.shape)}")
    if not (k.shape == q.shape == v.shape):
        raise ValueError(f"{_OP}: k, q, v must have the same shape, got {tuple(k.shape)}, {tuple(q.shape)}, "
                         f"{tuple(v.shape)}")
    if not (k.dtype == q.dtype == v.dtype):
        raise TypeError(f"{_OP}: k, q, v must have the same dtype, got {k.dtype}, {q.dtype}, {v.dtype}")
    if w.dim() != 2 or w.shape[1] != k.shape[2] or w.shape[0] == 0:
        raise ValueError(f"{_OP}: w must be (m, e) with e = {k.shape[2]} and m >= 1, got {tuple(w.shape)}")
    if k.shape[2] == 0:
        raise ValueError(f"{_OP}: the width e must be >= 1")
    for name, tensor in (("q", q), ("v", v), ("w", w)):
        if tensor.device != k.device:
            raise ValueError(f"{_OP}: {name} is on {tensor.device} but k is on {k.device}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 <= eps < float("inf"):
        raise ValueError(f"{_OP}: eps must be a finite number >= 0, got {eps!r}")


def _triton_unsupported(k, w):
    """Why the Triton kernels cannot take these inputs, or None."""
    from t2t_fast.kernels.favor_attention import MAX_DIM

    if k.dtype not in _TRITON_DTYPES:
        return f"dtype {k.dtype} (the Triton kernels take float32, float16 and bfloat16)"
    m, e = w.shape
    if m > MAX_DIM or e > MAX_DIM:
        return f"m = {m}, e = {e} (the Triton kernels hold the (m, e) state in registers: at most {MAX_DIM} each)"
    return None


def favor_attention(k, q, v, w, eps=1e-8, backend=None):
    """Fused FAVOR+ attention ``y = qp (v^T kp)^T / (qp . sum_t kp + eps)`` of the T2T performer layer.

    Args:
        k, q, v: (B, T, e) float32/float16/bfloat16 (float64: torch backend), same dtype and shape. May be
            strided views, e.g. ``kqv.split(e, dim=-1)`` of a (B, T, 3e) projection: read in place.
        w: (m, e) frozen random feature matrix (gets no gradient). m, e <= 64 for the Triton kernels.
        eps: added to the denominator, as in the reference (rescaled consistently with the overflow
            shifts; see the module docstring).
        backend: None/'auto', 'triton' or 'torch' (see :mod:`t2t_fast.backend`).

    Returns:
        y (B, T, e) in the input dtype. Differentiable with respect to k, q and v. All feature maths in
        float32 with per-image (k) and per-token (q) shifts, so fp16/bf16 inputs that overflow the
        reference give finite, correct results.
    """
    _validate(k, q, v, w, eps)
    chosen = select_backend(_OP, k.device, ("triton", "torch"), backend)
    if chosen == "triton":
        reason = _triton_unsupported(k, w)
        if reason is not None:
            if requested_backend(backend) != "auto":
                raise ValueError(f"{_OP}: backend 'triton' does not support {reason}")
            chosen = "torch"
    if chosen == "torch":
        if torch.is_autocast_enabled(k.device.type):
            # Autocast would run the feature matmuls in fp16/bf16: the maths must stay in fp32.
            with torch.autocast(k.device.type, enabled=False):
                return _favor_attention_torch(k, q, v, w, float(eps))
        return _favor_attention_torch(k, q, v, w, float(eps))
    return _fwd_op(k, q, v, w, float(eps))[0]


def _cdiv(a, b):
    return (a + b - 1) // b


def _device_guard(x):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _kernel_out_dtype(dtype, device):
    """Dtype of the buffers the kernels write. The Triton interpreter (CPU tensors) truncates fp32 -> bf16
    instead of rounding to nearest as the GPU does, so there bf16 results are written in fp32 and rounded
    by torch."""
    return torch.float32 if device.type == "cpu" and dtype == torch.bfloat16 else dtype


def favor_attention_fwd(k, q, v, w, eps):
    """Launch the forward kernels: y (B, T, e) in v's dtype, and per image S' (B, m, e), z' (B, m) and the
    per-feature shift c_k (B, m), float32, saved for the backward."""
    from t2t_fast.kernels.favor_attention import (BLOCK_T, NUM_STAGES, NUM_WARPS, _fwd_kv_chunk, _fwd_kv_reduce,
                                                  _fwd_out, tile_sizes)

    batch, tokens, width = k.shape
    m = w.shape[0]
    dev = k.device
    y = new_output((batch, tokens, width), _kernel_out_dtype(v.dtype, dev), dev)
    s = new_output((batch, m, width), torch.float32, dev)
    z = new_output((batch, m), torch.float32, dev)
    c_k = new_output((batch, m), torch.float32, dev)
    if batch * tokens == 0:
        return y.to(v.dtype), s.zero_(), z.zero_(), c_k.zero_()
    wf = w.detach().to(torch.float32).contiguous()
    n_chunks = _cdiv(tokens, _CHUNK)
    s_part = new_output((batch, n_chunks, m, width), torch.float32, dev)
    z_part = new_output((batch, n_chunks, m), torch.float32, dev)
    c_part = new_output((batch, n_chunks, m), torch.float32, dev)
    block_m, block_e = tile_sizes(m, width)
    tiles = dict(BLOCK_M=block_m, BLOCK_E=block_e, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    grid = (batch * n_chunks,)
    with _device_guard(k):
        _fwd_kv_chunk[grid](k, v, wf, s_part, z_part, c_part, tokens, m, width, _CHUNK, n_chunks,
                            *k.stride(), *v.stride(), BLOCK_T=BLOCK_T, **tiles)
        _fwd_kv_reduce[(batch,)](s_part, z_part, c_part, s, z, c_k, m, width, n_chunks, **tiles)
        _fwd_out[grid](q, wf, s, z, c_k, y, tokens, m, width, _CHUNK, n_chunks, _log_eps_m(eps, m),
                       *q.stride(), BLOCK_T=BLOCK_T, **tiles)
    return y.to(v.dtype), s, z, c_k


def favor_attention_bwd(grad_y, k, q, v, w, s, z, c_k, eps):
    """Launch the backward kernels: dk, dq, dv (B, T, e) contiguous, in the input dtype."""
    from t2t_fast.kernels.favor_attention import (BLOCK_T, BWD_NUM_WARPS, NUM_STAGES, NUM_WARPS, _bwd_kv_chunk,
                                                  _bwd_q_chunk, _bwd_reduce, tile_sizes)

    batch, tokens, width = k.shape
    m = w.shape[0]
    dev = k.device
    out_dtype = _kernel_out_dtype(k.dtype, dev)
    dk, dq, dv = (new_output((batch, tokens, width), out_dtype, dev) for _ in range(3))
    if batch * tokens == 0:
        return dk.to(k.dtype), dq.to(k.dtype), dv.to(k.dtype)
    wf = w.detach().to(torch.float32).contiguous()
    n_chunks = _cdiv(tokens, _CHUNK)
    ds_part = new_output((batch, n_chunks, m, width), torch.float32, dev)
    dz_part = new_output((batch, n_chunks, m), torch.float32, dev)
    ds = new_output((batch, m, width), torch.float32, dev)
    dz = new_output((batch, m), torch.float32, dev)
    block_m, block_e = tile_sizes(m, width)
    tiles = dict(BLOCK_M=block_m, BLOCK_E=block_e, num_stages=NUM_STAGES)
    grid = (batch * n_chunks,)
    with _device_guard(k):
        _bwd_q_chunk[grid](grad_y, q, wf, s, z, c_k, dq, ds_part, dz_part, tokens, m, width, _CHUNK, n_chunks,
                           _log_eps_m(eps, m), *grad_y.stride(), *q.stride(), BLOCK_T=BLOCK_T,
                           num_warps=BWD_NUM_WARPS, **tiles)
        _bwd_reduce[(batch,)](ds_part, dz_part, ds, dz, m, width, n_chunks, num_warps=NUM_WARPS, **tiles)
        _bwd_kv_chunk[grid](k, v, wf, c_k, ds, dz, dk, dv, tokens, m, width, _CHUNK, n_chunks,
                            *k.stride(), *v.stride(), BLOCK_T=BLOCK_T, num_warps=BWD_NUM_WARPS, **tiles)
    return dk.to(k.dtype), dq.to(k.dtype), dv.to(k.dtype)


@torch.library.custom_op("t2t_fast::favor_attention_fwd", mutates_args=())
def _fwd_op(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return favor_attention_fwd(k, q, v, w, eps)


@_fwd_op.register_fake
def _(k, q, v, w, eps):
    batch, tokens, width = k.shape
    m = w.shape[0]
    return (v.new_empty((batch, tokens, width)), k.new_empty((batch, m, width), dtype=torch.float32),
            k.new_empty((batch, m), dtype=torch.float32), k.new_empty((batch, m), dtype=torch.float32))


@torch.library.custom_op("t2t_fast::favor_attention_bwd", mutates_args=())
def _bwd_op(grad_y: torch.Tensor, k: torch.Tensor, q: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
            s: torch.Tensor, z: torch.Tensor, c_k: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return favor_attention_bwd(grad_y, k, q, v, w, s, z, c_k, eps)


@_bwd_op.register_fake
def _(grad_y, k, q, v, w, s, z, c_k, eps):
    return k.new_empty(k.shape), q.new_empty(q.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    k, q, v, w, eps = inputs
    _, s, z, c_k = output
    ctx.save_for_backward(k, q, v, w, s, z, c_k)
    ctx.eps = eps
    ctx.mark_non_differentiable(s, z, c_k)


def _backward(ctx, grad_y, _ds, _dz, _dc):
    k, q, v, w, s, z, c_k = ctx.saved_tensors
    dk, dq, dv = _bwd_op(grad_y, k, q, v, w, s, z, c_k, ctx.eps)
    return dk, dq, dv, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
