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
With a_t = k_t w^T - |k_t|^2/2 and h_t = |q_t|^2/2 (norms taken in fp32), per image:

    c_k,j = max_t a_tj             (per-image shift, one per feature)     K_t = exp(a_t - c_k)
    c_q,t = max_j (q_t w_j + c_k,j) (per-token shift)                    P_t = exp(q_t w^T + c_k - c_q,t)
    S' = sum_t K_t^T v_t,  z' = sum_t K_t,  y_t = P_t S' / (P_t . z' + eps_t)

Since kp_tj = K_tj e^{c_k,j}/sqrt(m) and qp_tj e^{c_k,j} = P_tj e^{c_q,t - h_t}/sqrt(m), the numerator and D
of the reference are P_t S' and P_t . z' times e^{c_q,t - h_t}/m. Dividing its eps term by the same factor
keeps y identical to the formula above:

    eps_t = eps * m * exp(h_t - c_q,t) = exp(min(log(eps) + log(m) + h_t - c_q,t, EPS_LOG_CLAMP))

computed in log space in fp32, so it neither overflows nor underflows to a wrong answer; h_t cancels from
P_t exactly. Every K and P is <= 1, each feature's column of K reaches 1 (so z'_j >= 1) and each row of P
reaches 1, hence P_t . z' >= 1: the denominator can neither overflow (<= m T) nor underflow to 0, and
|y| <= max |v|. The clamp (EPS_LOG_CLAMP = 80) only acts when eps exceeds the unshifted D by e^80 / (m T)
or more; y is then 0 to fp32 precision either way (|P_t S'| <= m T max|v| against eps_t >= e^80). On
realistic inputs (official w: orthogonal rows of norm sqrt(m), so logits <= m/2) eps_t is simply the
reference's eps rescaled and fp32 results match the reference to rounding (with eps = 1e-8 it is far below
the fp32 resolution of D' >= 1, exactly as 1e-8 is negligible against the reference's D). eps = 0 is
allowed.

Finite inputs whose |u|^2/2 overflows (fp32 or bf16 rows with |u| above ~1.8e19, where the reference's
features are exp(finite - inf) = 0) get the reference's limit, never inf - inf:

- such a key adds nothing (a_t = -inf, K_t = 0). If no key of an image is finite, c_k = 0 and S' = z' = 0,
  so the denominator is taken as max(P_t . z' + eps_t, 1) (a no-op otherwise, as P_t . z' >= 1): y = 0,
  as the reference gives, for every eps.
- such a query is scaled by 2^-64 (exactly) before its product with w, and P_t is evaluated as
  exp((s q_t w^T + s c_k - s c_q,t) / s) with s = 2^-64 (s = 1 on every other row), the same P without
  overflow; h_t enters eps_t capped at HALF_NORM_CAP = 2^100, which is past the clamp either way. So
  y_t = 0 to fp32 precision for eps > 0 (the reference's 0), and the P-weighted limit for eps = 0.

v is summed as given: values near the fp32 maximum can still overflow S'. NaN is kept as the reference keeps it:
a key with a NaN element makes S' and z', so every y of its image, NaN; a query with one its own row of y.

Backward (w is frozen: a call that would need its gradient, w.requires_grad under grad mode, raises
ValueError on every backend). y(k, q, v) does not depend on the shifts (it equals the unshifted formula for
every value of c), so its derivative is that of the shifted formula with c_k, c_q held constant. Per token,
with g_t = dL/dy_t, N_t = P_t S', D'_t = P_t . z' + eps_t:

    G_t  = g_t / D'_t                     (dL/dN_t, e)
    r_t  = -G_t . y_t                     (dL/dD'_t)
    dP_t = S' G_t + r_t z'                (m)
    dS'  = sum_t P_t^T G_t   (m, e)       dz' = sum_t r_t P_t   (m)
    dK_t = dS' v_t + dz'                  (m)
    dv_t = K_t dS'                        (e)

and since dP_tj/dq_t = P_tj w_j, d eps_t/dq_t = eps_t q_t (0 where the clamp acts) and
dK_tj/dk_t = K_tj (w_j - k_t):

    dq_t = (dP_t * P_t) w + r_t eps_t q_t
    dk_t = (dK_t * K_t) w - sum_j (dK_t * K_t)_j k_t

(the q-term equals -sum_j (dP_t * P_t)_j q_t, without that sum's cancellation). The Triton backward runs
this in three steps: (1) per token chunk, recompute P, N, D', write dq and the chunk's partial dS', dz' (for
m > 32, a second pass per block of 32 features forms those partials from the per-token shift, D' and r that
the first saved); (2) per image, sum the partials in chunk order; (3) per token chunk, recompute K with the
saved c_k, write dk and dv. The forward saves only S', z' and c_k (per image, float32) besides its inputs; kp
and qp are never written to memory. No float atomics anywhere: the results are deterministic, run to run.

Backends: ``triton`` (the fused kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``;
float32/float16/bfloat16; m, e <= 64) and ``torch`` (the same stabilised maths in plain torch ops, so ONNX
export and ``torch.export`` can trace it; the CPU path, and the only path for float64). The registered
ops ``torch.ops.t2t_fast.favor_attention_fwd`` / ``_bwd`` (the Triton path) validate their arguments as
the wrapper does before any kernel runs.
"""
import math

import torch

from t2t_fast._native import native_module
from t2t_fast.backend import autocast_enabled, cpu_isa, requested_backend, select_backend, unavailable_reason
from t2t_fast.ops._common import (CPU_KERNEL_DTYPES, DTYPE_CODES, backend_cannot_take, check_float_tensor,
                                  compute_dtype, differentiable_backward, direct_calls_allowed, new_output,
                                  storage_extent)

_OP = "favor_attention"
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS_LOG_CLAMP = 80.0  # largest log of the shifted eps term (see the module docstring)
HALF_NORM_CAP = 2.0 ** 100  # |q|^2/2 enters eps_t capped here: finite, and past the clamp either way
ROW_SCALE = 2.0 ** -64  # exact scale of the queries whose |q|^2/2 overflows


def _positive_features(u: torch.Tensor, w: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """phi(u) of :func:`favor_attention_ref`: |u|^2/2 in u's dtype, the projection in ``compute``."""
    m = w.shape[0]
    half_sq_norm = (u * u).sum(dim=-1, keepdim=True).repeat(1, 1, m) / 2
    projected = torch.einsum("bti,mi->btm", u.to(compute), w.to(compute))
    return torch.exp(projected - half_sq_norm) / math.sqrt(m)


def favor_attention_ref(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                        eps: float = 1e-8) -> torch.Tensor:
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
    e = w.shape[1]
    compute = compute_dtype(k.dtype)
    kp, qp = _positive_features(k, w, compute), _positive_features(q, w, compute)  # (B, T, m)
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
    inf = float("inf")
    half_k = 0.5 * (kf * kf).sum(dim=-1, keepdim=True)                           # (B, T, 1)
    a = torch.where(half_k == inf, -inf, kf @ wf.t() - half_k)                    # (B, T, m); NaN stays NaN
    c_k = a.detach().amax(dim=1, keepdim=True)                                   # (B, 1, m)
    c_k = torch.where(c_k > -inf, c_k, 0.0)                                      # no finite key: K = 0
    k_feat = torch.exp(a - c_k)
    s = k_feat.transpose(1, 2) @ vf                                              # (B, m, e)
    z = k_feat.sum(dim=1, keepdim=True)                                          # (B, 1, m)
    half_q = 0.5 * (qf * qf).sum(dim=-1, keepdim=True)                           # (B, T, 1)
    in_range = half_q < inf
    scale = torch.where(in_range, 1.0, ROW_SCALE).to(compute)
    u = (qf * scale) @ wf.t() + scale * c_k                                      # (B, T, m)
    c_q = u.detach().amax(dim=2, keepdim=True)                                   # (B, T, 1)
    q_feat = torch.exp((u - c_q) * torch.where(in_range, 1.0, 1.0 / ROW_SCALE).to(compute))
    eps_log = log_eps_m(eps, m) + half_q.clamp(max=HALF_NORM_CAP) - c_q
    eps_t = torch.exp(eps_log.clamp(max=EPS_LOG_CLAMP))                          # (B, T, 1)
    den = (q_feat * z).sum(dim=-1, keepdim=True) + eps_t
    den = torch.where(den >= 1.0, den, 1.0)  # max(den, 1), with den's gradient where den = 1 (clamp gives 0)
    return ((q_feat @ s) / den).to(v.dtype)


def log_eps_m(eps, m):
    """log(eps * m), the eps term of the shifted denominator before its shift (-inf for eps = 0)."""
    return math.log(eps) + math.log(m) if eps > 0 else float("-inf")


def _validate(k, q, v, w, eps):
    """Raise TypeError/ValueError unless k, q, v, w, eps are valid inputs of FAVOR+ on any backend (shared by
    the wrapper and the registered ops; shapes, dtypes and devices only: no host sync)."""
    op = _OP
    for name, tensor in (("k", k), ("q", q), ("v", v), ("w", w)):
        check_float_tensor(name, tensor, op)
    for name, tensor in (("k", k), ("q", q), ("v", v)):
        if tensor.dim() != 3:
            raise ValueError(f"{op}: {name} must be (B, T, e), got shape {tuple(tensor.shape)}")
    if not (k.shape == q.shape == v.shape):
        raise ValueError(f"{op}: k, q, v must have the same shape, got {tuple(k.shape)}, {tuple(q.shape)}, "
                         f"{tuple(v.shape)}")
    if not (k.dtype == q.dtype == v.dtype):
        raise TypeError(f"{op}: k, q, v must have the same dtype, got {k.dtype}, {q.dtype}, {v.dtype}")
    if w.dim() != 2 or w.shape[1] != k.shape[2] or w.shape[0] == 0:
        raise ValueError(f"{op}: w must be (m, e) with e = {k.shape[2]} and m >= 1, got {tuple(w.shape)}")
    if k.shape[2] == 0:
        raise ValueError(f"{op}: the width e must be >= 1")
    for name, tensor in (("q", q), ("v", v), ("w", w)):
        if tensor.device != k.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but k is on {k.device}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 <= eps < float("inf"):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")


def _check_w_frozen(w, needs_grad):
    """Raise ValueError when a gradient of w is needed: no backend computes one."""
    if needs_grad:
        raise ValueError(f"{_OP}: w is the frozen random feature matrix and gets no gradient, but it requires "
                         "grad; register it as a buffer or nn.Parameter(..., requires_grad=False), or pass "
                         "w.detach()")


def _triton_unsupported(k, q, v, w, grad_y=None):
    """Why the Triton kernels cannot take these (validated) inputs, or None."""
    reason = unavailable_reason("triton", k.device.type)
    if reason is not None:
        return reason
    from t2t_fast.kernels.favor_attention import MAX_DIM, index_limits

    if k.dtype not in _TRITON_DTYPES:
        return f"dtype {k.dtype} (the Triton kernels take float32, float16 and bfloat16)"
    m, e = w.shape
    if m > MAX_DIM or e > MAX_DIM:
        return f"m = {m}, e = {e} (the Triton kernels hold the (m, e) state in registers: at most {MAX_DIM} each)"
    for name, tensor in (("k", k), ("q", q), ("v", v), ("grad_y", grad_y)):
        if tensor is not None:
            reason = index_limits(tuple(tensor.shape), tensor.stride())
            if reason is not None:
                return f"{name}: {reason}"
    return None


def _validate_fwd_op(k, q, v, w, eps):
    """The checks of ``t2t_fast::favor_attention_fwd`` (the Triton path): the wrapper's, then the kernels'
    limits (as a forced 'triton' backend reports them)."""
    _validate(k, q, v, w, eps)
    reason = _triton_unsupported(k, q, v, w)
    if reason is not None:
        backend_cannot_take(_OP, "triton", reason)


def _validate_bwd_op(grad_y, k, q, v, w, s, z, c_k, eps):
    """The checks of ``t2t_fast::favor_attention_bwd``: those of the forward, grad_y like y, and the
    forward's saved float32 state s (B, m, e), z (B, m), c_k (B, m)."""
    _validate(k, q, v, w, eps)
    check_float_tensor("grad_y", grad_y, _OP)
    if grad_y.shape != k.shape:
        raise ValueError(f"{_OP}: grad_y must have the shape of y {tuple(k.shape)}, got {tuple(grad_y.shape)}")
    if grad_y.dtype != k.dtype:
        raise TypeError(f"{_OP}: grad_y must have the dtype of y ({k.dtype}), got {grad_y.dtype}")
    batch, _, width = k.shape
    m = w.shape[0]
    for name, tensor, shape in (("grad_y", grad_y, None), ("s", s, (batch, m, width)), ("z", z, (batch, m)),
                                ("c_k", c_k, (batch, m))):
        if shape is not None:
            check_float_tensor(name, tensor, _OP, dtypes=(torch.float32,))
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{_OP}: {name} must be {shape} (the forward's saved state for these inputs), "
                                 f"got {tuple(tensor.shape)}")
        if tensor.device != k.device:
            raise ValueError(f"{_OP}: {name} is on {tensor.device} but k is on {k.device}")
    reason = _triton_unsupported(k, q, v, w, grad_y)
    if reason is not None:
        backend_cannot_take(_OP, "triton", reason)


def favor_attention(k, q, v, w, eps=1e-8, backend=None):
    """Fused FAVOR+ attention ``y = qp (v^T kp)^T / (qp . sum_t kp + eps)`` of the T2T performer layer.

    Args:
        k, q, v: (B, T, e) float32/float16/bfloat16 (float64: torch backend), same dtype and shape. May be
            strided views, e.g. ``kqv.split(e, dim=-1)`` of a (B, T, 3e) projection: read in place (the
            Triton kernels copy a view whose elements along e are not adjacent).
        w: (m, e) frozen random feature matrix: gets no gradient, so it must not require grad while grad
            mode is on (a buffer, or ``nn.Parameter(..., requires_grad=False)``). m, e <= 64 for the
            Triton kernels.
        eps: added to the denominator, as in the reference (rescaled consistently with the overflow
            shifts; see the module docstring).
        backend: None/'auto', 'triton', 'cpp' or 'torch' (see :mod:`t2t_fast.backend`). 'cpp' (the default
            on CPU) runs the fused C++ forward for float32/bfloat16 inputs when no gradient is needed; training,
            float16 and float64 run the torch path.

    Returns:
        y (B, T, e) in the input dtype. Differentiable with respect to k, q and v. All feature maths in
        float32 with per-image (k) and per-token (q) shifts, so finite inputs that overflow the reference
        give finite, correct results (its limit where its features overflow or underflow).

    Raises:
        TypeError, ValueError: invalid inputs, or w requiring grad under grad mode.
        BackendUnavailableError: a forced backend that cannot run here or cannot take these inputs.
    """
    _validate(k, q, v, w, eps)
    _check_w_frozen(w, w.requires_grad and torch.is_grad_enabled())
    chosen = select_backend(_OP, k.device, ("triton", "cpp", "torch"), backend)
    if chosen == "cpp":
        if _cpp_takes(k, q, v):
            return (run_cpp if direct_calls_allowed(k) else _cpp_op)(k, q, v, w, float(eps))[0]
        chosen = "torch"
    if chosen == "triton":
        reason = _triton_unsupported(k, q, v, w)
        if reason is not None:
            if requested_backend(backend) != "auto":
                backend_cannot_take(_OP, "triton", reason)
            chosen = "torch"
    if chosen == "torch":
        if autocast_enabled(k.device.type):
            # Autocast would run the feature matmuls in fp16/bf16: the maths must stay in fp32.
            with torch.autocast(k.device.type, enabled=False):
                return _favor_attention_torch(k, q, v, w, float(eps))
        return _favor_attention_torch(k, q, v, w, float(eps))
    return _fwd_op(k, q, v, w, float(eps))[0]


@torch.library.custom_op("t2t_fast::favor_attention_fwd", mutates_args=())
def _fwd_op(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from t2t_fast.kernels.favor_attention import forward

    _validate_fwd_op(k, q, v, w, eps)
    return forward(k, q, v, w, eps)


def _forward_outputs(k, w, allocate):
    """The forwards' outputs from ``allocate(shape, dtype)``: y (B, T, e) in k's dtype and the float32 state
    s (B, m, e), z (B, m), c_k (B, m)."""
    batch, tokens, width = k.shape
    m = w.shape[0]
    return (allocate((batch, tokens, width), k.dtype), allocate((batch, m, width), torch.float32),
            allocate((batch, m), torch.float32), allocate((batch, m), torch.float32))


def _new_empty(like):
    return lambda shape, dtype: like.new_empty(shape, dtype=dtype)


@_fwd_op.register_fake
def _(k, q, v, w, eps):
    _validate_fwd_op(k, q, v, w, eps)
    return _forward_outputs(k, w, _new_empty(k))


@torch.library.custom_op("t2t_fast::favor_attention_bwd", mutates_args=())
def _bwd_op(grad_y: torch.Tensor, k: torch.Tensor, q: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
            s: torch.Tensor, z: torch.Tensor, c_k: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from t2t_fast.kernels.favor_attention import backward

    _validate_bwd_op(grad_y, k, q, v, w, s, z, c_k, eps)
    return backward(grad_y, k, q, v, w, s.contiguous(), z.contiguous(), c_k.contiguous(), eps)


@_bwd_op.register_fake
def _(grad_y, k, q, v, w, s, z, c_k, eps):
    _validate_bwd_op(grad_y, k, q, v, w, s, z, c_k, eps)
    return k.new_empty(k.shape), q.new_empty(q.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    k, q, v, w, eps = inputs
    _check_w_frozen(w, ctx.needs_input_grad[3])
    _, s, z, c_k = output
    ctx.save_for_backward(k, q, v, w, s, z, c_k)
    ctx.eps = eps
    ctx.mark_non_differentiable(s, z, c_k)


def _backward(ctx, grad_y, _ds, _dz, _dc):
    k, q, v, w, s, z, c_k = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiated, through the reference
        dk, dq, dv = differentiable_backward(lambda k, q, v: _favor_attention_torch(k, q, v, w, ctx.eps), (k, q, v),
                                             ctx.needs_input_grad[:3], grad_y)
        return dk, dq, dv, None, None
    dk, dq, dv = _bwd_op(grad_y, k, q, v, w, s, z, c_k, ctx.eps)
    return dk, dq, dv, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------- C++ (CPU)

def _cpp_takes(k, q, v):
    """Whether the C++ forward takes these (validated) CPU inputs: float32/bfloat16, and no gradient needed
    (it has no backward: training runs the torch path, whose autograd is the backward)."""
    if k.dtype not in CPU_KERNEL_DTYPES:
        return False
    return not (torch.is_grad_enabled() and (k.requires_grad or q.requires_grad or v.requires_grad))


def _validate_cpp_op(k, q, v, w, eps):
    """The checks of ``t2t_fast::favor_attention_cpp``: the wrapper's, then the C++ kernel's (CPU tensors in
    float32/bfloat16)."""
    _validate(k, q, v, w, eps)
    reason = unavailable_reason("cpp", k.device.type)
    if reason is None and k.dtype not in CPU_KERNEL_DTYPES:
        reason = f"dtype {k.dtype} (the C++ kernel takes float32 and bfloat16)"
    if reason is not None:
        backend_cannot_take(_OP, "cpp", reason)


def _operand(tensor):
    """(address, extent, batch stride, token stride) of k, q or v; copied when its elements along e are not
    adjacent (the kernel reads rows of e)."""
    if tensor.stride(2) != 1 and tensor.shape[2] > 1:
        tensor = tensor.contiguous()
    return tensor, (tensor.data_ptr(), storage_extent(tensor), tensor.stride(0), tensor.stride(1))


def _buffer(tensor):
    return tensor.data_ptr(), storage_extent(tensor)


@torch.library.custom_op("t2t_fast::favor_attention_cpp", mutates_args=())
def _cpp_op(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused C++ forward: y and the state the Triton forward saves (s, z, c_k: float32, the same
    definitions). Forward only: no autograd is registered."""
    _validate_cpp_op(k, q, v, w, eps)
    return run_cpp(k, q, v, w, eps)


def run_cpp(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The C++ forward on inputs that the wrapper validated and the kernel takes, without the dispatcher (eager
    CPU inference with no dispatch mode or transform to see the call; the extension still checks every buffer it
    reads or writes)."""
    batch, tokens, width = k.shape
    m = w.shape[0]
    y, s, z, c_k = _forward_outputs(k, w, lambda shape, dtype: new_output(shape, dtype, k.device))
    if batch == 0 or tokens == 0:  # no keys: S' = z' = 0 and c_k = 0, as the torch path
        return y, s.zero_(), z.zero_(), c_k.zero_()
    padded = -(-m // 16) * 16
    w_t = torch.zeros((width, padded), dtype=torch.float32)
    w_t[:, :m] = w.detach().t()
    (k, k_op), (q, q_op), (v, v_op) = _operand(k), _operand(q), _operand(v)  # keep any copies alive
    native_module().favor_attention_forward_cpu(
        k_op, q_op, v_op, DTYPE_CODES[k.dtype], batch, tokens, width, m, _buffer(w_t), log_eps_m(eps, m),
        _buffer(y), _buffer(s), _buffer(z), _buffer(c_k), cpu_isa(), torch.get_num_threads())
    return y, s, z, c_k


@_cpp_op.register_fake
def _(k, q, v, w, eps):
    _validate_cpp_op(k, q, v, w, eps)
    return _forward_outputs(k, w, _new_empty(k))
