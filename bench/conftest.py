"""Shared fixtures of the benchmark suite: ``pytest bench/ --benchmark-only``.

Benchmarks measure, they never assert timings. Tests marked ``@pytest.mark.gpu`` are skipped (with the
reason) when no CUDA device is available, so the command exits 0 on a CPU machine. ``--tiny`` runs the
model rows of the GPU check (``bench_models.py::test_check``) on CPU at tiny sizes instead of skipping them
(``bash bench/gpu_check.sh --cpu``).

Ceilings, measured once per pytest run, in the same run as the benchmarks (see :mod:`t2t_fast.bench`):

* ``cuda_ceilings``: dict ``device``, ``copy_bytes_per_s`` (device-to-device copy, bytes read + written
  per second), ``matmul_flops_per_s`` (bf16 8192^3 matmul), ``matmul_dtype``. Skips the test without CUDA.
* ``cpu_ceilings``: the same on CPU at ``CPU_THREADS`` threads (fp32 2048^3 matmul, 256 MiB copy).

Helpers:

* ``cpu_threads``: ``torch.set_num_threads(2)`` for the test (the CPU protocol), restored afterwards; glibc's
  malloc keeps freed memory from then on (``t2t_fast.bench.keep_freed_memory``).
* ``timed(fn, input_sets, rounds, warmup_rounds=1) -> seconds``: pytest-benchmark pedantic over
  ``fn(*input_sets[i % n])`` (use several input sets of fresh random data); CUDA events on CUDA. Returns the
  median seconds per call and records ``median_ms`` / ``timer`` in ``extra_info``.
* ``roofline(seconds, ceilings, bytes=None, flops=None)``: adds achieved GB/s and
  ``pct_of_bandwidth_roofline`` (``bytes`` = bytes read + written by the op) and/or TFLOP/s and
  ``pct_of_matmul_ceiling`` to ``extra_info``.
* ``compare(seconds, provider)``: records the median (and the ``min_ms`` that ``timed`` put in ``extra_info``)
  under the test's ``benchmark.group`` and adds ``speedup_vs_reference`` / ``speedup_vs_compiled`` (medians)
  and ``..._of_min`` (best times: on a shared CPU, load only ever adds time) to ``extra_info`` when those
  providers of the same group ran earlier in the run; the terminal summary prints every group's speedups.

The same functions are importable as ``t2t_fast.bench.{pedantic_timed, bandwidth_info, compute_info,
measure_ceilings}`` (bench files cannot import this conftest).
"""
import os

import pytest
import torch

import t2t_fast
from t2t_fast import bench

_CEILINGS = {}          # device type -> measured ceilings, also written into the JSON's machine_info
_GROUP_SECONDS = {}     # benchmark group -> {provider: median seconds}


def pytest_addoption(parser):
    parser.addoption("--tiny", action="store_true",
                     help="run the GPU check's model rows on CPU at tiny sizes (checks the code, measures nothing)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none available: GPU benchmarks skipped)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _load_average():
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def pytest_report_header(config):
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (GPU groups skipped)"
    return [f"t2t_fast bench: t2t_fast from {os.path.dirname(t2t_fast.__file__)}, torch {torch.__version__}, "
            f"CUDA device: {cuda}, CPU: {bench.cpu_name()}, load average {_load_average()}, "
            f"commit {bench.git_commit(config.rootpath)}"]


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    env = bench.environment("cuda" if torch.cuda.is_available() else "cpu")
    env.pop("threads", None)
    machine_info["t2t_fast"] = env
    machine_info["t2t_fast"]["ceilings"] = dict(_CEILINGS)


def pytest_terminal_summary(terminalreporter):
    if not _GROUP_SECONDS:
        return
    terminalreporter.write_sep("-", "t2t_fast speedups: median (and min) time of reference or compiled / this "
                                    "provider's")
    for group, times in _GROUP_SECONDS.items():
        parts = []
        for provider, (median, best) in times.items():
            ratios = [f"{times[base][0] / median:.2f}x ({times[base][1] / best:.2f}x) vs {base}"
                      for base in ("reference", "compiled") if base in times and base != provider]
            parts.append(f"{provider} {median * 1e3:.1f} ({best * 1e3:.1f}) ms"
                         + (f": {', '.join(ratios)}" if ratios else ""))
        terminalreporter.write_line(f"{group}: " + "; ".join(parts))
    terminalreporter.write_line(f"load average at the end: {_load_average()}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def cpu_threads():
    """The CPU protocol: 2 threads, set for the duration of the test, and malloc keeping freed memory (for the
    rest of the run: :func:`t2t_fast.bench.keep_freed_memory`)."""
    bench.keep_freed_memory()
    with bench.cpu_threads(bench.CPU_THREADS) as count:
        yield count


@pytest.fixture(scope="session")
def cuda_ceilings():
    """Copy bandwidth and bf16 matmul ceiling of the CUDA device, measured once per run."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if "cuda" not in _CEILINGS:
        _CEILINGS["cuda"] = dict(device=torch.cuda.get_device_name(0),
                                 **bench.measure_ceilings("cuda", torch.bfloat16))
    return _CEILINGS["cuda"]


@pytest.fixture(scope="session")
def cpu_ceilings():
    """Copy bandwidth and fp32 matmul ceiling of the CPU at ``CPU_THREADS`` threads, measured once."""
    if "cpu" not in _CEILINGS:
        with bench.cpu_threads(bench.CPU_THREADS) as threads:
            _CEILINGS["cpu"] = dict(device=bench.cpu_name(), threads=threads,
                                    **bench.measure_ceilings("cpu", torch.float32))
    return _CEILINGS["cpu"]


@pytest.fixture
def timed(benchmark):
    def run(fn, input_sets, rounds, warmup_rounds=1):
        return bench.pedantic_timed(benchmark, fn, input_sets, rounds=rounds, warmup_rounds=warmup_rounds)
    return run


@pytest.fixture
def roofline(benchmark):
    def record(seconds, ceilings, bytes=None, flops=None):
        if seconds is None:  # benchmarking disabled
            return
        if bytes is not None:
            benchmark.extra_info.update(bench.bandwidth_info(bytes, seconds, ceilings["copy_bytes_per_s"]))
        if flops is not None:
            benchmark.extra_info.update(bench.compute_info(flops, seconds, ceilings["matmul_flops_per_s"]))
    return record


@pytest.fixture
def compare(benchmark):
    def record(seconds, provider):
        if seconds is None:
            return
        best = benchmark.extra_info.get("min_ms", seconds * 1e3) / 1e3
        group = _GROUP_SECONDS.setdefault(benchmark.group or benchmark.name, {})
        group[provider] = (seconds, best)
        for base in ("reference", "compiled"):
            if base in group and base != provider:
                benchmark.extra_info[f"speedup_vs_{base}"] = round(group[base][0] / seconds, 3)
                benchmark.extra_info[f"speedup_vs_{base}_of_min"] = round(group[base][1] / best, 3)
    return record
