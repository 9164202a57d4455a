"""Benchmark: fused FAVOR+ attention against the official computation, eager and torch.compile'd.

T2T-ViT performer shapes at batch 256 in bf16, e = 64, m = 32 (w in fp32, as in the model); k, q, v are
the strided views of one (B, T, 3e) kqv projection, as in the layer:
  T2T layer 1: T = 3136 (56x56 tokens)      T2T layer 2: T = 784 (28x28)
Modes ``fwd`` (no grad) and ``fwd_bwd`` (grads of k, q, v); providers ``reference`` (favor_attention_ref,
eager), ``compiled`` (torch.compile of it) and ``fused`` (the Triton kernels), run in that order so
``extra_info`` of ``fused`` gets ``speedup_vs_reference`` / ``speedup_vs_compiled``. GB/s is over the
compulsory bytes (fwd: read k, q, v, write y; bwd: also read k, q, v and dy, write dk, dq, dv), against
the measured device-to-device copy bandwidth. Timings are measured, never asserted.
"""
import math

import pytest
import torch

from t2t_fast.ops import favor_attention, favor_attention_ref

BATCH, WIDTH, FEATURES = 256, 64, 32
DTYPE = torch.bfloat16
TOKENS = (3136, 784)
PROVIDERS = ("reference", "compiled", "fused")
MODES = ("fwd", "fwd_bwd")
INPUT_SETS, ROUNDS = 3, 20

_compiled_ref = {}


def _function(provider):
    if provider == "fused":
        return lambda k, q, v, w: favor_attention(k, q, v, w, backend="triton")
    if provider == "reference":
        return favor_attention_ref
    if "fn" not in _compiled_ref:
        _compiled_ref["fn"] = torch.compile(favor_attention_ref)
    return _compiled_ref["fn"]


def _input_sets(tokens, mode):
    w = torch.nn.init.orthogonal_(torch.empty(FEATURES, WIDTH, device="cuda")) * math.sqrt(FEATURES)
    sets = []
    for _ in range(INPUT_SETS):
        kqv = (0.5 * torch.randn(BATCH, tokens, 3 * WIDTH, device="cuda")).to(DTYPE)
        kqv.requires_grad_(mode == "fwd_bwd")
        dy = torch.randn(BATCH, tokens, WIDTH, device="cuda", dtype=DTYPE)
        sets.append((kqv, w, dy))
    return sets


def _step(fn, mode):
    if mode == "fwd":
        def step(kqv, w, dy):
            with torch.no_grad():
                fn(*kqv.split(WIDTH, dim=-1), w)
        return step

    def step(kqv, w, dy):
        k, q, v = kqv.split(WIDTH, dim=-1)
        torch.autograd.grad(fn(k, q, v, w), (k, q, v), dy)
    return step


def _compulsory_bytes(tokens, mode):
    tensor = BATCH * tokens * WIDTH * torch.finfo(DTYPE).bits // 8
    return 4 * tensor if mode == "fwd" else 4 * tensor + 7 * tensor


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_favor_attention(benchmark, cuda_ceilings, timed, roofline, compare, provider, tokens, mode):
    benchmark.group = f"favor_attention-T{tokens}-{mode}-bf16"
    benchmark.extra_info.update(provider=provider, batch=BATCH, tokens=tokens, e=WIDTH, m=FEATURES)
    seconds = timed(_step(_function(provider), mode), _input_sets(tokens, mode), rounds=ROUNDS, warmup_rounds=2)
    roofline(seconds, cuda_ceilings, bytes=_compulsory_bytes(tokens, mode))
    compare(seconds, provider)
