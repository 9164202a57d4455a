"""The summary table of ``bench/gpu_check.sh``: one row per benchmark group of pytest-benchmark JSON files.

    python bench/gpu_check_summary.py model.json ops.json

Columns: median ms of each provider (``reference``, ``compiled`` and the package's own: ``fused``, or
``cuda``/``cpp`` for the native kernels), then for the package's provider its speedups (medians), images/s or
GB/s with % of the copy bandwidth measured in the same run, and the peak memory of one step.
"""
import json
import os
import sys

BASELINES = ("reference", "compiled")


def _median_ms(benchmark):
    extra = benchmark["extra_info"]
    if "median_ms" in extra:  # CUDA events (t2t_fast.bench.pedantic_timed)
        return extra["median_ms"]
    if "ms" in extra:
        return extra["ms"]
    return benchmark["stats"]["median"] * 1e3


def _ours(extra):
    """The package provider's cells: speedups, throughput, memory."""
    cells = [f"{extra[key]:.2f}x" if key in extra else "" for key in ("speedup_vs_reference", "speedup_vs_compiled")]
    if "img_per_s" in extra:
        cells.append(f"{extra['img_per_s']:.0f} img/s")
    elif "gb_per_s" in extra:
        cells.append(f"{extra['gb_per_s']:.0f} GB/s ({extra['pct_of_bandwidth_roofline']:.0f} % of copy)")
    elif "gbps" in extra:
        cells.append(f"{extra['gbps']:.0f} GB/s ({100 * extra['fraction_of_copy']:.0f} % of copy)")
    else:
        cells.append("")
    cells.append(f"{extra['peak_allocated_mb']:.0f}" if "peak_allocated_mb" in extra else "")
    return cells


def summarize(paths):
    """Markdown lines: the measured ceilings, then the table."""
    lines, groups = [], {}
    for path in paths:
        if not os.path.exists(path):
            lines.append(f"{os.path.basename(path)}: missing (the step did not finish)")
            continue
        with open(path) as f:
            data = json.load(f)
        for device, ceiling in data.get("machine_info", {}).get("t2t_fast", {}).get("ceilings", {}).items():
            lines.append(f"{os.path.basename(path)}: {ceiling.get('device', device)}: copy "
                         f"{ceiling['copy_bytes_per_s'] / 1e9:.0f} GB/s, {ceiling['matmul_dtype']} matmul "
                         f"{ceiling['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s")
        for benchmark in data["benchmarks"]:
            provider = benchmark["params"].get("provider", benchmark["name"])
            groups.setdefault(benchmark["group"], {})[provider] = benchmark
    lines += ["", "| group | reference ms | compiled ms | ours ms | ours vs reference | vs compiled | throughput "
                  "| peak MiB |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for group, providers in groups.items():
        ours = [p for p in providers if p not in BASELINES]
        cells = [f"{_median_ms(providers[p]):.3f}" if p in providers else "" for p in BASELINES]
        if ours:
            cells.append(f"{ours[0]} {_median_ms(providers[ours[0]]):.3f}")
            cells += _ours(providers[ours[0]]["extra_info"])
        else:
            cells += [""] * 5
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    print("\n".join(summarize(sys.argv[1:])))
