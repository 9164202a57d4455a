"""``t2t-fast bench``: images/s of the fused T2T-ViT against the eager reference and torch.compile(reference).

    t2t-fast bench --device cpu                        # t2t_vit_14, fp32, batches 1/4/8, 2 threads
    t2t-fast bench --device cuda --model t2t_vit_14,t2t_vit_24 --batch 64,256 --mode both
    t2t-fast bench --device cpu --model t2t_vit_14 --batch 8 --part tokens_to_token --mode both
    t2t-fast bench --device cpu --no-compile --output /tmp/bench

Providers: ``reference`` (``t2t_fast.reference``, eager), ``compiled`` (``torch.compile`` of that same
reference module) and ``fused`` (``t2t_fast.create_model`` with the reference's state_dict). timm model
names (e.g. ``deit_small_patch16_224``, ``resnet50``) run as ``reference`` (eager) and ``compiled``.

How it measures (the same helpers back the pytest-benchmark suite in ``bench/``):

* Inputs are several sets of ``torch.randn`` images (never zeros) used in turn, so caches do not flatter.
* CUDA: CUDA events around each step, after warm-up; CPU: ``time.perf_counter`` with a fixed thread count.
  The providers of one (model, mode, batch) are timed interleaved, round by round, so background load on a
  shared machine hits all of them alike; the median step time is reported.
* Two ceilings are measured in the same run: device copy bandwidth (bytes read + written per second) and a
  large matmul (bf16 on CUDA, the run's dtype on CPU). Every model is reported as % of the matmul ceiling
  from its MACs (inference: 2 x MACs FLOP per image; training: 3x that).
* Training step: AdamW, ``torch.autocast`` at the run's dtype when it is bf16/fp16. CUDA reports the step's
  memory: peak allocated during one step minus what was allocated before it (activations, gradients,
  temporaries; not the weights or optimizer state).

Writes a table to stdout and ``<output>/t2t_fast_bench_<cpu|cuda>.{json,png}`` (default ``bench/out``): the
results with the environment (device, versions, commit, load average, command), and images/s vs batch size
per provider. Exit code 0, or 1 when a provider failed (its row says why).
"""
import argparse
import contextlib
import datetime
import gc
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

# MACs (multiply-accumulates of every matmul/bmm/addmm) of one 224x224 forward, counted with
# torch.utils.flop_counter on the official models (shared/reference/official_state_dicts.json, macs_224).
MACS_224 = {
    "t2t_vit_14": 4_783_468_544,
    "t2t_vit_t_14": 6_088_721_920,
    "t2t_vit_24": 13_661_874_688,
}
# the same count for the tokens_to_token module alone (macs_breakdown of the same file)
T2T_MODULE_MACS_224 = {
    "t2t_vit_14": 298_973_696,
    "t2t_vit_t_14": 1_604_227_072,
    "t2t_vit_24": 313_424_384,
}
PROVIDERS = ("reference", "compiled", "fused")
TIMM_MODELS = ("deit_small_patch16_224", "resnet50")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("infer", "train")
CPU_THREADS = 2  # the CPU protocol of the acceptance benchmarks (issue 6): fp32, 2 threads
NUM_INPUT_SETS = 3


# ----------------------------------------------------------------------------------------------- timing

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
    """FLOP/s of a large square matmul, best of ``reps`` (CUDA: bf16 8192^3; CPU: fp32 2048^3 by default)."""
    cuda = is_cuda(device)
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    size = size or (8192 if cuda else 2048)
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


# ---------------------------------------------------------------------------------------------- models

def is_t2t(name):
    import t2t_fast

    return name in t2t_fast.list_models()


def count_macs(model, example):
    """MACs of one forward of ``model`` on ``example`` per sample (torch.utils.flop_counter FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(example)
    finally:
        model.train(training)
    return counter.get_total_flops() // 2 // example.shape[0]


def model_macs(name, model, img_size, device, part="model"):
    """MACs per image of the model (or of its ``tokens_to_token`` module): the recorded figure for a 224 px
    T2T-ViT, else counted on one image now."""
    recorded = MACS_224 if part == "model" else T2T_MODULE_MACS_224
    if img_size == 224 and name in recorded:
        return recorded[name]
    module = model if part == "model" else model.tokens_to_token
    return count_macs(module, torch.randn(1, 3, img_size, img_size, device=device))


def build_reference(name, img_size, device):
    """The eager reference for ``name`` (a T2T-ViT variant or a timm model), in eval mode, seeded."""
    torch.manual_seed(0)
    if is_t2t(name):
        import t2t_fast.reference

        model = t2t_fast.reference.create_model(name, img_size=img_size)
    else:
        try:
            import timm
        except Exception as exc:  # a broken timm install (torch/torchvision mismatch) is as good as none
            raise RuntimeError(f"{name} needs timm, which cannot be imported here ({exc})") from None
        # ViTs take img_size; convnets (resnet50) take any size and reject the argument
        model = timm.create_model(name, pretrained=False, **({} if img_size == 224 else {"img_size": img_size}))
    return model.to(device).eval()


def build_fused(name, reference, img_size, device, backend=None):
    """The fast model for ``name`` with the reference's weights (strict state_dict load)."""
    if not is_t2t(name):
        raise ValueError(f"the fused provider exists for T2T-ViT models only, not {name}")
    import t2t_fast

    model = t2t_fast.create_model(name, img_size=img_size, backend=backend)
    model.load_state_dict(reference.state_dict())
    return model.to(device).eval()


def build_provider(provider, name, reference, img_size, device, backend=None, part="model"):
    """The module ``provider`` times: the whole model, or with ``part='tokens_to_token'`` its T2T module
    (for ``compiled``, the reference's T2T module compiled on its own)."""
    if part == "tokens_to_token":
        if provider == "compiled":
            return torch.compile(reference.tokens_to_token)
        return build_provider(provider, name, reference, img_size, device, backend).tokens_to_token
    if part != "model":
        raise ValueError(f"part must be 'model' or 'tokens_to_token', got {part!r}")
    if provider == "reference":
        return reference
    if provider == "compiled":
        return torch.compile(reference)
    if provider == "fused":
        return build_fused(name, reference, img_size, device, backend)
    raise ValueError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")


def autocast(device, dtype):
    """``torch.autocast`` at ``dtype`` for bf16/fp16 runs; a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def inference_step(model, device, dtype):
    """A callable ``step(images)``: one eval-mode forward under ``torch.inference_mode`` (and autocast)."""
    def step(images):
        model.eval()
        with torch.inference_mode(), autocast(device, dtype):
            return model(images)
    return step


def training_step(model, device, dtype, optimizer=None):
    """A callable ``step(images, labels)``: train-mode forward, loss (cross-entropy on logits; the mean square
    of any other output, e.g. the T2T module's tokens), backward, and an optimizer step when ``optimizer`` is
    given (gradients are dropped, not zeroed, so every step allocates them afresh)."""
    def step(images, labels):
        model.train()
        with autocast(device, dtype):
            out = model(images).float()
            loss = F.cross_entropy(out, labels) if out.ndim == 2 else out.square().mean()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        return loss
    return step


def make_inputs(mode, batch, img_size, device, num_classes=1000, count=NUM_INPUT_SETS):
    """``count`` argument tuples of fresh random data: (images,) or (images, labels)."""
    sets = []
    for _ in range(count):
        images = torch.randn(batch, 3, img_size, img_size, device=device)
        if mode == "train":
            sets.append((images, torch.randint(0, num_classes, (batch,), device=device)))
        else:
            sets.append((images,))
    return sets


def step_memory(step, args, device):
    """Bytes a step needs on top of what is allocated before it (CUDA peak), or None off CUDA."""
    if not is_cuda(device):
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(*args)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# ------------------------------------------------------------------------------------------ the runner

def environment(device):
    """Versions, device name, git commit, thread count and load average recorded with every result."""
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
        info["device"] = cpu_name()
        info["threads"] = torch.get_num_threads()
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


def git_commit():
    """Short commit of the t2t_fast source checkout, or None when it is not a git checkout."""
    import t2t_fast

    try:
        out = subprocess.run(["git", "-C", os.path.dirname(os.path.realpath(t2t_fast.__file__)), "rev-parse",
                              "--short", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


_START = time.perf_counter()


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
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 4), squeeze=False)
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
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- CLI

def _csv(text):
    return [item for item in text.split(",") if item]


def _batches(text):
    try:
        values = [int(item) for item in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch takes comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--batch takes comma-separated positive integers, got {text!r}")
    return values


def parser():
    summary, examples = __doc__.split("\n\n")[:2]
    p = argparse.ArgumentParser(prog="t2t-fast bench", description=summary.replace("``", ""),
                                epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="model name(s), comma-separated or repeated "
                   "(default: t2t_vit_14 on CPU; t2t_vit_14,t2t_vit_t_14,t2t_vit_24 on CUDA); timm names too")
    p.add_argument("--batch", type=_batches, help="batch sizes, comma-separated (default: 1,4,8 on CPU; "
                   "64,128,256 on CUDA)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="fp32, or bf16/fp16 autocast (default: fp32 on CPU, "
                   "bf16 on CUDA)")
    p.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto (default: cuda when available)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated subset of "
                   f"{','.join(PROVIDERS)} (default: all)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider (saves the "
                   "compile time)")
    p.add_argument("--mode", choices=("infer", "train", "both"), help="inference, training step, or both "
                   "(default: infer on CPU, both on CUDA)")
    p.add_argument("--part", choices=("model", "tokens_to_token"), default="model",
                   help="time the whole model (default) or only its T2T module (T2T-ViT models only)")
    p.add_argument("--img-size", type=int, default=224, help="input resolution (default 224)")
    p.add_argument("--threads", type=int, default=CPU_THREADS, help=f"CPU threads (default {CPU_THREADS})")
    p.add_argument("--warmup", type=int, help="untimed steps per provider and case (default: 1 CPU, 5 CUDA)")
    p.add_argument("--reps", type=int, help="timed rounds per provider and case (default: 5 CPU, 20 CUDA)")
    p.add_argument("--backend", default=None, help="backend of the fused model (auto, triton, cuda, cpp, torch)")
    p.add_argument("--no-ceilings", action="store_true", help="do not measure the copy/matmul ceilings")
    p.add_argument("--output", default=os.path.join("bench", "out"), help="folder for the JSON and PNG "
                   "(default bench/out)")
    return p


def main(argv=None):
    """Entry point of ``t2t-fast bench``; returns the exit code (1 when a provider failed)."""
    args = parser().parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    cuda = is_cuda(device)
    if cuda and not torch.cuda.is_available():
        print("t2t-fast bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    models = [m for group in (args.model or []) for m in _csv(group)] or (
        ["t2t_vit_14", "t2t_vit_t_14", "t2t_vit_24"] if cuda else ["t2t_vit_14"])
    if args.part != "model" and not all(is_t2t(m) for m in models):
        print(f"t2t-fast bench: --part {args.part} needs T2T-ViT models, got {models}", file=sys.stderr)
        return 2
    providers = _csv(args.providers)
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown or not providers:
        print(f"t2t-fast bench: unknown provider(s) {unknown}; choose from {', '.join(PROVIDERS)}", file=sys.stderr)
        return 2
    if args.no_compile:
        providers = [p for p in providers if p != "compiled"]
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    modes = {"infer": ["infer"], "train": ["train"], "both": list(MODES)}[args.mode or ("both" if cuda else "infer")]
    batches = args.batch or ([64, 128, 256] if cuda else [1, 4, 8])
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    reps = args.reps if args.reps is not None else (20 if cuda else 5)

    with cpu_threads(args.threads) if not cuda else contextlib.nullcontext():
        env = environment(device)
        env["command"] = "t2t-fast bench " + " ".join(argv if argv is not None else sys.argv[1:])
        log(f"t2t-fast bench on {env['device']}: models {models}, batches {batches}, modes {modes}, "
            f"providers {providers}, {str(dtype).replace('torch.', '')}, load average {env.get('load_average')}")
        ceilings = None
        if not args.no_ceilings:
            log("measuring ceilings (copy bandwidth, matmul)")
            ceilings = measure_ceilings(device, torch.bfloat16 if cuda else dtype)
            log(f"copy {ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s, {ceilings['matmul_dtype']} matmul "
                f"{ceilings['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s")
        begin = time.perf_counter()
        results = run(models, batches, providers, modes, device, dtype, img_size=args.img_size, warmup=warmup,
                      reps=reps, backend=args.backend, ceilings=ceilings, part=args.part)
        env["wall_seconds"] = round(time.perf_counter() - begin, 1)
        if hasattr(os, "getloadavg"):
            env["load_average_after"] = [round(x, 2) for x in os.getloadavg()]

    print(f"t2t-fast bench: {env['device']}, torch {env['torch']}, {str(dtype).replace('torch.', '')}"
          + (f", {env.get('threads')} threads" if not cuda else "") + f", {args.img_size} px")
    if ceilings:
        print(f"ceilings: copy {ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s, {ceilings['matmul_dtype']} matmul "
              f"{ceilings['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s")
    print(format_table(results))
    os.makedirs(args.output, exist_ok=True)
    stem = os.path.join(args.output, f"t2t_fast_bench_{device.type}")
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, "ceilings": ceilings, "results": results}, f, indent=2)
    print(f"wrote {stem}.json")
    try:
        plot(results, stem + ".png", f"t2t-fast bench: {env['device']}, {str(dtype).replace('torch.', '')}, "
                                     f"{env['date_utc']}, commit {env['git_commit']}")
        print(f"wrote {stem}.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
