"""Benchmark: fused soft split + LayerNorm against F.unfold -> F.layer_norm, eager and torch.compile'd.

T2T-ViT-14 shapes at batch 256 (LayerNorm parameters in fp32, as in the model):
  image-147:  (256, 3, 224, 224) bf16, k7 s4 p2   -> (256, 3136, 147) bf16
  tokens-576: (256, 3136, 64) bf16 on 56x56, k3 s2 p1 -> (256, 784, 576) bf16
  image-147-fp32-in-bf16-out: the first split as the model runs it under bf16 autocast: the fp32 image in,
      bf16 rows out (``out_dtype``), and no gradient for the image
Modes ``fwd`` and ``fwd_bwd``; providers ``reference`` (eager), ``compiled`` (torch.compile of the
reference) and ``fused`` (the Triton kernels). ``extra_info`` holds the time from CUDA events, GB/s over the
compulsory bytes (fwd: read x, write y; bwd: read x and dy, write dx where x needs a gradient), the fraction
of the measured device-to-device copy bandwidth, and for ``fused`` the speedups over the other two providers.
Timings are measured, never asserted.
"""
import pytest
import torch
import triton

from t2t_fast.ops import soft_split_layernorm, soft_split_layernorm_ref

pytestmark = pytest.mark.gpu  # skipped without CUDA by bench/conftest.py

BATCH = 256
# name -> (input shape, kernel, stride, padding, grid_size, input dtype, output dtype, input needs a gradient)
SHAPES = {
    "image-147": ((BATCH, 3, 224, 224), 7, 4, 2, None, torch.bfloat16, torch.bfloat16, True),
    "tokens-576": ((BATCH, 56 * 56, 64), 3, 2, 1, (56, 56), torch.bfloat16, torch.bfloat16, True),
    "image-147-fp32-in-bf16-out": ((BATCH, 3, 224, 224), 7, 4, 2, None, torch.float32, torch.bfloat16, False),
}
PROVIDERS = ("reference", "compiled", "fused")
MODES = ("fwd", "fwd_bwd")
LAUNCHES_PER_ROUND = 10  # launches between synchronisations, so the sync does not distort short timings

_compiled = {}
_times_ms = {}


def _cuda_ms(fn, repeats=20):
    """Median milliseconds per call of ``fn``, by CUDA events around LAUNCHES_PER_ROUND calls."""
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(LAUNCHES_PER_ROUND):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / LAUNCHES_PER_ROUND)
    return sorted(samples)[len(samples) // 2]


@pytest.fixture(scope="module")
def copy_gbps():
    """Device-to-device copy bandwidth (read + write bytes per second), the practical ceiling."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _cuda_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def _inputs(shape_name):
    shape, kernel, stride, padding, grid, dtype, _, input_grad = SHAPES[shape_name]
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=input_grad)
    channels = shape[1] if grid is None else shape[2]
    features = channels * kernel * kernel
    weight = (1 + 0.1 * torch.randn(features, device="cuda")).requires_grad_()
    bias = (0.1 * torch.randn(features, device="cuda")).requires_grad_()
    return x, weight, bias, (kernel, stride, padding), grid


def _forward(provider, shape_name):
    _, kernel, stride, padding, grid, _, out_dtype, _ = SHAPES[shape_name]
    if provider == "fused":
        return lambda x, w, b: soft_split_layernorm(x, kernel, stride, padding, w, b, grid_size=grid,
                                                    backend="triton", out_dtype=out_dtype)
    if provider == "reference":
        return lambda x, w, b: soft_split_layernorm_ref(x, kernel, stride, padding, w, b, grid_size=grid,
                                                        out_dtype=out_dtype)
    if shape_name not in _compiled:
        _compiled[shape_name] = torch.compile(
            lambda x, w, b: soft_split_layernorm_ref(x, kernel, stride, padding, w, b, grid_size=grid,
                                                     out_dtype=out_dtype))
    return _compiled[shape_name]


def _step(provider, shape_name, mode):
    """(callable running one step, the input, a tensor of the output's shape)."""
    x, weight, bias, _, _ = _inputs(shape_name)
    forward = _forward(provider, shape_name)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return forward(x, weight, bias)
        return step, x, forward(x, weight, bias).detach()
    dy = torch.randn_like(forward(x, weight, bias))
    leaves = tuple(t for t in (x, weight, bias) if t.requires_grad)

    def step():
        y = forward(x, weight, bias)
        return torch.autograd.grad(y, leaves, dy)
    return step, x, dy


def _compulsory_bytes(x, y, mode):
    x_bytes, y_bytes = x.numel() * x.element_size(), y.numel() * y.element_size()
    if mode == "fwd":
        return x_bytes + y_bytes
    return 2 * x_bytes + 2 * y_bytes + (x_bytes if x.requires_grad else 0)


def _time(provider, shape_name, mode):
    key = (provider, shape_name, mode)
    if key not in _times_ms:
        step, _, _ = _step(provider, shape_name, mode)
        _times_ms[key] = _cuda_ms(step)
    return _times_ms[key]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_soft_split_layernorm(benchmark, copy_gbps, provider, shape_name, mode):
    benchmark.group = f"soft_split_layernorm-{shape_name}-{mode}"
    step, x, out = _step(provider, shape_name, mode)
    ms = _time(provider, shape_name, mode)
    gbps = _compulsory_bytes(x, out, mode) / ms / 1e6

    def rounds():
        for _ in range(LAUNCHES_PER_ROUND):
            step()
        torch.cuda.synchronize()

    benchmark.pedantic(rounds, rounds=10, warmup_rounds=2)
    benchmark.extra_info.update({
        "provider": provider, "ms": ms, "gbps": gbps, "copy_gbps": copy_gbps, "fraction_of_copy": gbps / copy_gbps,
        "launches_per_round": LAUNCHES_PER_ROUND, "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__,
    })
    if provider == "fused":
        benchmark.extra_info["speedup_vs_reference"] = _time("reference", shape_name, mode) / ms
        benchmark.extra_info["speedup_vs_compiled"] = _time("compiled", shape_name, mode) / ms
