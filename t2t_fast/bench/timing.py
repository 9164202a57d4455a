"""Timing and ceilings: how every benchmark of t2t_fast measures (``t2t-fast bench`` and ``bench/``).

CUDA is timed with CUDA events after warm-up, the CPU with ``time.perf_counter`` at a fixed thread count;
the ceilings (device copy bandwidth, a large matmul) are measured in the same run as the benchmarks."""
import contextlib
import ctypes
import gc
import itertools
import statistics
import time

import torch

from t2t_fast.backend import cpu_has_fast_matmul

CPU_THREADS = 2  # the CPU protocol of the benchmarks: fp32, 2 threads


def is_cuda(where):
    """Whether ``where`` (a device, device string or tensor) is a CUDA device."""
    return (where.device if isinstance(where, torch.Tensor) else torch.device(where)).type == "cuda"


def synchronize(device):
    if is_cuda(device):
        torch.cuda.synchronize(device)


def time_calls(fn, input_sets, device, warmup=1, reps=3):
    """Seconds of each of ``reps`` calls ``fn(*input_sets[i % n])`` after ``warmup`` untimed calls.

    CUDA: CUDA events around each call (the queue is drained first); CPU: ``time.perf_counter``."""
    sets = list(input_sets)
    cycle = itertools.cycle(sets)
    for _ in range(warmup):
        fn(*next(cycle))
    synchronize(device)
    times = []
    cuda = is_cuda(device)
    for _ in range(reps):
        args = next(cycle)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - begin)
    return times


def pedantic_timed(benchmark, fn, input_sets, rounds, warmup_rounds=1):
    """pytest-benchmark in pedantic mode over ``fn(*input_sets[i % n])``, one call per round.

    On CUDA every round is also timed with CUDA events (the round ends with the event synchronized, so
    pytest-benchmark's wall clock covers the GPU work too). Puts ``median_ms``, ``min_ms``, ``timer``, ``rounds``
    into ``benchmark.extra_info`` and returns the median seconds per call (CUDA events on CUDA, else
    pytest-benchmark's own statistics), or None when benchmarking is disabled."""
    sets = list(input_sets)
    cuda = is_cuda(next(t for t in sets[0] if isinstance(t, torch.Tensor)))
    cycle = itertools.cycle(sets)
    event_seconds = []

    def target():
        args = next(cycle)
        if not cuda:
            fn(*args)
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        event_seconds.append(start.elapsed_time(end) / 1e3)

    benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    if getattr(benchmark, "disabled", False) or benchmark.stats is None:
        return None
    if cuda:
        timed_seconds = event_seconds[warmup_rounds:]
        median, best, timer = statistics.median(timed_seconds), min(timed_seconds), "cuda events"
    else:
        median, best, timer = benchmark.stats.stats.median, benchmark.stats.stats.min, "perf_counter"
    benchmark.extra_info.update(median_ms=round(median * 1e3, 4), min_ms=round(best * 1e3, 4), timer=timer,
                                rounds=rounds)
    return median


# glibc's mallopt parameters (malloc.h): keep up to 1 GiB of freed heap; mmap only past 32 MiB (its maximum)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEPT_BYTES, _MMAP_BYTES = 1 << 30, 32 << 20


def keep_freed_memory():
    """Have glibc's malloc keep freed memory in the process instead of returning the top of its heap to the
    kernel after large frees, for the rest of the process (what ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_``
    do from the environment, or another allocator such as jemalloc). By default glibc trims and re-grows its heap
    when the largest activations come and go, and every step then pays page faults on fresh pages for them, or
    not, from one process to the next: the CPU benchmarks switch that off so that every provider in the process
    runs in the same, steady state. Returns a description for the run's environment, or None where the C library
    is not glibc (nothing is changed there)."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    if not (mallopt(_M_TRIM_THRESHOLD, _KEPT_BYTES) and mallopt(_M_MMAP_THRESHOLD, _MMAP_BYTES)):
        return None
    return "glibc malloc keeps freed memory (M_TRIM_THRESHOLD 1 GiB, M_MMAP_THRESHOLD 32 MiB)"


@contextlib.contextmanager
def cpu_threads(count):
    """Run the block with ``torch.set_num_threads(count)`` (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(before)


# -------------------------------------------------------------------------------------------- ceilings

def measure_copy_bandwidth(device, nbytes=None, reps=10):
    """Device copy bandwidth in bytes/s, counting bytes read + written (2 x size per copy), best of ``reps``.

    The default size (1 GiB on CUDA, 256 MiB on CPU) is far beyond the caches."""
    cuda = is_cuda(device)
    nbytes = nbytes or (1 << 30 if cuda else 1 << 28)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = min(time_calls(lambda: dst.copy_(src), [()], device, warmup=2, reps=reps))
    return 2 * src.numel() * src.element_size() / seconds


def measure_matmul_ceiling(device, dtype=None, size=None, reps=10):
    """FLOP/s of a large square matmul, best of ``reps`` (CUDA: bf16 8192^3; CPU: fp32 2048^3 by default, 512^3
    for a dtype the CPU has no matmul instructions for, which runs ~100x slower)."""
    cuda = is_cuda(device)
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    size = size or (8192 if cuda else 2048 if cpu_has_fast_matmul(dtype) else 512)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = min(time_calls(lambda: torch.mm(a, b), [()], device, warmup=2, reps=reps))
    return 2 * size ** 3 / seconds


def measure_ceilings(device, dtype=None):
    """{'copy_bytes_per_s', 'matmul_flops_per_s', 'matmul_dtype'} measured on ``device`` now."""
    matmul_dtype = dtype if dtype is not None else (torch.bfloat16 if is_cuda(device) else torch.float32)
    ceilings = {"copy_bytes_per_s": measure_copy_bandwidth(device),
                "matmul_flops_per_s": measure_matmul_ceiling(device, matmul_dtype),
                "matmul_dtype": str(matmul_dtype).replace("torch.", "")}
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()
    return ceilings


def bandwidth_info(nbytes, seconds, copy_bytes_per_s):
    """extra_info entries of a memory-bound op: achieved GB/s and % of the measured copy bandwidth."""
    achieved = nbytes / seconds
    return {"bytes": int(nbytes), "gb_per_s": round(achieved / 1e9, 2),
            "copy_ceiling_gb_per_s": round(copy_bytes_per_s / 1e9, 2),
            "pct_of_bandwidth_roofline": round(100 * achieved / copy_bytes_per_s, 2)}


def compute_info(flops, seconds, matmul_flops_per_s):
    """extra_info entries of a compute-bound op or model: achieved TFLOP/s and % of the matmul ceiling."""
    achieved = flops / seconds
    return {"flops": int(flops), "tflop_per_s": round(achieved / 1e12, 4),
            "matmul_ceiling_tflop_per_s": round(matmul_flops_per_s / 1e12, 4),
            "pct_of_matmul_ceiling": round(100 * achieved / matmul_flops_per_s, 2)}
