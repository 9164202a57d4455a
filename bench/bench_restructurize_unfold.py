"""Re-structurize + unfold: the native kernels against the eager reference (transpose + reshape + F.unfold +
transpose + contiguous).

Shapes (T2T-ViT at 224 px): tokens 56x56x64 -> 28x28x576 and 28x28x64 -> 14x14x576 (k3 s2 p1), and the RGB
image 224x224 -> 56x56x147 (k7 s4 p2). Modes: ``forward`` (the op) and ``backward`` (dx from a fixed dy; the
forward runs outside the timing). One group per shape, batch and mode; providers ``reference`` then the native
kernel, so each native row carries ``speedup_vs_reference``; memory-bound rows also carry GB/s and % of the
measured copy bandwidth (bytes = input + output of the direction timed).

* CPU (any machine): fp32, 2 threads, batch 8 (10 rounds) and 64 (7 rounds: the first write of a fresh B=64
  output, 50-120 MB, costs page faults whose time varies with the state of the OS).
* CUDA (skipped without a GPU): bf16 and fp32, batch 64 and 256.
"""
import itertools

import pytest
import torch

from t2t_fast.ops import restructurize_unfold, restructurize_unfold_ref

CASES = {
    # id: (tokens?, channels, height, width, kernel, stride, padding)
    "tokens56x56x64_k3s2p1": (True, 64, 56, 56, 3, 2, 1),
    "tokens28x28x64_k3s2p1": (True, 64, 28, 28, 3, 2, 1),
    "image224x224x3_k7s4p2": (False, 3, 224, 224, 7, 4, 2),
}
MODES = ("forward", "backward")
CPU_ROUNDS = {8: 10, 64: 7}
CPU_INPUT_SETS = 2
GPU_BATCHES, GPU_DTYPES, GPU_ROUNDS, GPU_WARMUP = (64, 256), (torch.bfloat16, torch.float32), 20, 3


def make_inputs(case, batch, dtype, device, count):
    """``count`` fresh random inputs, the op's keyword arguments, and the bytes one call reads + writes."""
    tokens, channels, height, width, kernel, stride, padding = CASES[case]
    grid = (height, width) if tokens else None
    shape = (batch, height * width, channels) if tokens else (batch, channels, height, width)
    sets = [torch.randn(shape, device=device, dtype=dtype) for _ in range(count)]
    out_elems = (batch * ((height + 2 * padding - kernel) // stride + 1) * ((width + 2 * padding - kernel) // stride + 1)
                 * channels * kernel * kernel)
    nbytes = (sets[0].numel() + out_elems) * sets[0].element_size()
    return sets, dict(grid_size=grid, kernel_size=kernel, stride=stride, padding=padding), nbytes


def timed_call(provider, mode, sets, kwargs):
    """(fn, input_sets) for pytest-benchmark: the forward, or the backward of a forward built here."""
    def forward(x):
        if provider == "reference":
            return restructurize_unfold_ref(x, **kwargs)
        return restructurize_unfold(x, backend=provider, **kwargs)

    if mode == "forward":
        return forward, [(x,) for x in sets]
    backward_sets = []
    for x in sets:
        x = x.requires_grad_()
        y = forward(x)
        backward_sets.append((y, x, torch.randn_like(y)))

    def backward(y, x, dy):
        return torch.autograd.grad(y, x, dy, retain_graph=True)

    return backward, backward_sets


@pytest.mark.parametrize("case,batch,mode,provider", [
    pytest.param(c, b, m, p, id=f"{c}-B{b}-{m}-{p}")
    for c, b, m, p in itertools.product(CASES, CPU_ROUNDS, MODES, ("reference", "cpp"))])
def test_cpu(benchmark, cpu_threads, cpu_ceilings, timed, roofline, compare, case, batch, mode, provider):
    benchmark.group = f"cpu restructurize_unfold {case} {mode} fp32 B={batch} {cpu_threads} threads"
    sets, kwargs, nbytes = make_inputs(case, batch, torch.float32, "cpu", CPU_INPUT_SETS)
    fn, input_sets = timed_call(provider, mode, sets, kwargs)
    seconds = timed(fn, input_sets, rounds=CPU_ROUNDS[batch], warmup_rounds=1)
    roofline(seconds, cpu_ceilings, bytes=nbytes)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    compare(seconds, provider)


@pytest.mark.gpu
@pytest.mark.parametrize("case,batch,dtype,mode,provider", [
    pytest.param(c, b, d, m, p, id=f"{c}-B{b}-{str(d).replace('torch.', '')}-{m}-{p}")
    for c, b, d, m, p in itertools.product(CASES, GPU_BATCHES, GPU_DTYPES, MODES, ("reference", "cuda"))])
def test_cuda(benchmark, cuda_ceilings, timed, roofline, compare, case, batch, dtype, mode, provider):
    dtype_name = str(dtype).replace("torch.", "")
    benchmark.group = f"cuda restructurize_unfold {case} {mode} {dtype_name} B={batch}"
    sets, kwargs, nbytes = make_inputs(case, batch, dtype, "cuda", 2)
    fn, input_sets = timed_call(provider, mode, sets, kwargs)
    seconds = timed(fn, input_sets, rounds=GPU_ROUNDS, warmup_rounds=GPU_WARMUP)
    roofline(seconds, cuda_ceilings, bytes=nbytes)
    compare(seconds, provider)
