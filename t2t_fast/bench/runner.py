"""The ``t2t-fast bench`` runner: build the providers of each model, time them interleaved, and report the
results (table, plot) with the environment they were measured in."""
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time

import torch

from t2t_fast.bench.providers import (PROVIDERS, build_provider, build_reference, inference_step, is_t2t,
                                      make_inputs, model_macs, optimized_inference_step, step_memory,
                                      training_step)
from t2t_fast.bench.timing import compute_info, is_cuda, time_calls


def environment(device):
    """Versions, device name, git commit, thread count (CPU: and the CPU's class and kernel ISA) and load average
    recorded with every result."""
    import t2t_fast

    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "t2t_fast": t2t_fast.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "git_commit": git_commit()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if is_cuda(device):
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["driver"] = nvidia_driver()
    else:
        from t2t_fast import backend

        info["device"] = cpu_name()
        info["threads"] = torch.get_num_threads()
        info["cpu_class"] = backend.cpu_class()  # what the kernel choices follow
        info["cpu_isa"] = backend.cpu_isa()  # what the C++ kernels run with
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def nvidia_driver():
    """The NVIDIA driver version from nvidia-smi, or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def git_commit(folder=None):
    """Short commit of the checkout at ``folder`` (default: the installed t2t_fast's source folder, else the
    working directory: a regular install lives in site-packages, outside any checkout), or None."""
    import t2t_fast

    folders = [folder] if folder else [os.path.dirname(os.path.realpath(t2t_fast.__file__)), os.getcwd()]
    for path in folders:
        try:
            out = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return None


_START = time.perf_counter()
# characters of a 9 pt title line that fit the width of one 5-inch panel
_TITLE_CHARS_PER_PANEL = 64


def log(message):
    """Progress on stderr, stamped with seconds since import (stdout keeps the table)."""
    print(f"[{time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


def run(models, batches, providers, modes, device, dtype, img_size=224, warmup=1, reps=3, backend=None,
        ceilings=None, part="model"):
    """Benchmark every (model, mode, batch, provider); returns a list of result dicts.

    ``part='tokens_to_token'`` times the models' T2T modules instead (rows named ``<model>.tokens_to_token``).
    A provider that fails to build or run gets an ``error`` entry instead of numbers."""
    device = torch.device(device)
    results = []
    for name in models:
        label = name if part == "model" else f"{name}.{part}"
        log(f"[{label}] building {', '.join(providers)}")
        reference = build_reference(name, img_size, device)
        macs = model_macs(name, reference, img_size, device, part)
        built, errors = {}, {}
        for provider in providers:
            if provider == "fused" and not is_t2t(name):
                continue
            try:
                built[provider] = build_provider(provider, name, reference, img_size, device, backend, part)
            except Exception as exc:
                errors[provider] = f"{type(exc).__name__}: {exc}"
                log(f"[{label}] {provider}: cannot build: {errors[provider]}")
        for mode in modes:
            for batch in batches:
                results += run_case(label, mode, batch, built, errors, macs, device, dtype, img_size, warmup,
                                    reps, ceilings)
        del built, reference
        gc.collect()
        if is_cuda(device):
            torch.cuda.empty_cache()
    return results


def run_case(name, mode, batch, built, errors, macs, device, dtype, img_size, warmup, reps, ceilings):
    """Time the providers of one (model, mode, batch) interleaved; fill speedups against the reference/compiled."""
    inputs = make_inputs(mode, batch, img_size, device)
    steps = {}
    for provider, model in built.items():
        if mode == "train":
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            steps[provider] = training_step(model, device, dtype, optimizer)
        elif provider == "fused":
            steps[provider] = optimized_inference_step(model, dtype)
        else:
            steps[provider] = inference_step(model, device, dtype)
    times = {p: [] for p in steps}
    failed = dict(errors)
    for provider, step in steps.items():
        log(f"[{name} {mode} B={batch}] warm-up {provider}" + (" (compiling)" if provider == "compiled" else ""))
        try:
            time_calls(step, inputs, device, warmup=warmup, reps=0)
        except Exception as exc:
            failed[provider] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log(f"[{name} {mode} B={batch}] {provider} failed: {failed[provider]}")
    live = [p for p in steps if p not in failed]
    for round_index in range(reps):
        for provider in live:
            times[provider] += time_calls(steps[provider], [inputs[round_index % len(inputs)]], device,
                                          warmup=0, reps=1)
    log(f"[{name} {mode} B={batch}] timed {reps} rounds of {', '.join(live) or 'nothing'}")
    flops_per_image = 2 * macs * (3 if mode == "train" else 1)
    rows = []
    for provider in list(steps) + [p for p in errors if p not in steps]:
        row = {"model": name, "mode": mode, "batch": batch, "provider": provider, "img_size": img_size,
               "dtype": str(dtype).replace("torch.", ""), "macs_per_image": macs}
        if provider in failed:
            row["error"] = failed[provider]
            rows.append(row)
            continue
        seconds = statistics.median(times[provider])
        row.update(ms_per_step=round(seconds * 1e3, 3), ms_min=round(min(times[provider]) * 1e3, 3),
                   rounds=len(times[provider]), img_per_s=round(batch / seconds, 2))
        if ceilings:
            row.update(compute_info(flops_per_image * batch, seconds, ceilings["matmul_flops_per_s"]))
        memory = step_memory(steps[provider], inputs[0], device)
        if memory is not None:
            row["step_memory_mb"] = round(memory / 2 ** 20, 1)
        rows.append(row)
    for row in rows:
        for base in ("reference", "compiled"):
            other = next((r for r in rows if r["provider"] == base and "img_per_s" in r), None)
            if other is not None and "img_per_s" in row:
                row[f"speedup_vs_{base}"] = round(row["img_per_s"] / other["img_per_s"], 3)
    del inputs, steps
    return rows


# ------------------------------------------------------------------------------------------ reporting

def format_table(results):
    """The human-readable table: one line per (model, mode, batch, provider); failures say why."""
    header = ("model", "mode", "batch", "provider", "ms/step", "img/s", "vs ref", "vs compiled", "% matmul ceil",
              "step MB")

    def cell(row, key, spec, suffix=""):
        return format(row[key], spec) + suffix if row.get(key) is not None else "-"

    rows = [(r["model"], r["mode"], str(r["batch"]), r["provider"]) + (
        ("FAILED: " + r["error"],) if "error" in r else
        (cell(r, "ms_per_step", ".1f"), cell(r, "img_per_s", ".1f"), cell(r, "speedup_vs_reference", ".2f", "x"),
         cell(r, "speedup_vs_compiled", ".2f", "x"), cell(r, "pct_of_matmul_ceiling", ".1f"),
         cell(r, "step_memory_mb", ".0f"))) for r in results]
    widths = [max([len(h)] + [len(row[i]) for row in rows if len(row) == len(header)]) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def plot(results, path, title):
    """PNG of img/s vs batch size, one line per provider, one panel per (model, mode). Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["mode"]) for r in results})
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 4), squeeze=False,
                             layout="constrained")  # room for the (wrapped) suptitle, which tight_layout ignores
    for ax, (model, mode) in zip(axes[0], panels):
        for provider in PROVIDERS:
            points = sorted((r["batch"], r["img_per_s"]) for r in results
                            if (r["model"], r["mode"], r["provider"]) == (model, mode, provider) and "img_per_s" in r)
            if points:
                ax.plot(*zip(*points), marker="o", label=provider)
        ax.set_title(f"{model} ({mode})")
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.set_xscale("log", base=2)
        batches = sorted({r["batch"] for r in results if (r["model"], r["mode"]) == (model, mode)})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(textwrap.fill(title, width=_TITLE_CHARS_PER_PANEL * max(len(panels), 1)), fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
