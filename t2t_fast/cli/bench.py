"""``t2t-fast bench``: images/s of the fused T2T-ViT against the eager reference and torch.compile(reference).

    t2t-fast bench --device cpu                        # t2t_vit_14, fp32, batches 1/4/8, 2 threads
    t2t-fast bench --device cuda --model t2t_vit_14,t2t_vit_24 --batch 64,256 --mode both
    t2t-fast bench --device cpu --model t2t_vit_14 --batch 8 --part tokens_to_token --mode both
    t2t-fast bench --device cpu --no-compile --output /tmp/bench
    t2t-fast bench --device cpu --model t2t_vit_14 --batch 1,8 --openvino --reps 7   # beside OpenVINO

Providers: ``reference`` (``t2t_fast.reference``, eager), ``compiled`` (``torch.compile`` of that same
reference module) and ``fused`` (``t2t_fast.create_model`` with the reference's state_dict). ``--dtype``
bf16/fp16: the reference and compiled providers run under autocast, the fused one for inference as
``t2t_fast.optimize_for_inference`` converts it (bf16/fp16 weights), for training under autocast. timm model
names (e.g. ``deit_small_patch16_224``, ``resnet50``) run as ``reference`` (eager) and ``compiled``.
``--openvino`` (CPU, needs ``openvino``: the ``bench`` extra) also times ``optimize_for_inference`` at fp32 and
bf16 (and compiled, unless ``--no-compile``) against OpenVINO at fp32 and bf16 on the ONNX export of the same
weights, interleaved, in a second table (see :mod:`t2t_fast.bench.openvino`). On a CPU without bf16 matmul
instructions the bf16 rows are left out unless ``--dtype`` asks for a low precision.

Writes a table to stdout and ``<output>/t2t_fast_bench_<cpu|cuda>.{json,png}`` (default ``bench/out``): the
results with the environment (device, versions, commit, load average, command), and images/s vs batch size
per provider. Exit code 0, or 1 when a provider failed (its row says why).

How it measures: see :mod:`t2t_fast.bench`.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import torch

from t2t_fast.backend import cpu_has_fast_matmul
from t2t_fast.bench import (CPU_THREADS, DTYPES, MODES, PROVIDERS, cpu_threads, environment, format_table,
                            is_cuda, is_t2t, keep_freed_memory, log, measure_ceilings, plot, run)
from t2t_fast.bench.openvino import compare as compare_openvino
from t2t_fast.bench.openvino import format_comparison, openvino_version
from t2t_fast.cli._options import DEVICE, NON_NEGATIVE_INT, POSITIVE_INT, CommandParser


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
    p = CommandParser(prog="t2t-fast bench", description=summary.replace("``", ""),
                                epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="model name(s), comma-separated or repeated "
                   "(default: t2t_vit_14 on CPU; t2t_vit_14,t2t_vit_t_14,t2t_vit_24 on CUDA); timm names too")
    p.add_argument("--batch", type=_batches, help="batch sizes, comma-separated (default: 1,4,8 on CPU; "
                   "64,128,256 on CUDA)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="float32 (fp32), bfloat16 (bf16) or float16 (fp16): "
                   "autocast, and low-precision weights for the fused model's inference (default: float32 on CPU, "
                   "bfloat16 on CUDA)")
    p.add_argument("--openvino", action="store_true", help="CPU: also compare with OpenVINO at fp32 and bf16 "
                   "(bf16 where the CPU has bf16 matmul instructions, or with --dtype; the T2T-ViT models; needs "
                   "openvino)")
    p.add_argument("--device", type=DEVICE, default="auto",
                   help="cpu, cuda[:N] or auto (default: cuda when available)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated subset of "
                   f"{','.join(PROVIDERS)} (default: all)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider (saves the "
                   "compile time)")
    p.add_argument("--mode", choices=("infer", "train", "both"), help="inference, training step, or both "
                   "(default: infer on CPU, both on CUDA)")
    p.add_argument("--part", choices=("model", "tokens_to_token"), default="model",
                   help="time the whole model (default) or only its T2T module (T2T-ViT models only)")
    p.add_argument("--img-size", type=POSITIVE_INT, default=224, help="input resolution (default 224)")
    p.add_argument("--threads", type=POSITIVE_INT, default=CPU_THREADS, help=f"CPU threads (default {CPU_THREADS})")
    p.add_argument("--warmup", type=NON_NEGATIVE_INT,
                   help="untimed steps per provider and case (default: 1 CPU, 5 CUDA)")
    p.add_argument("--reps", type=POSITIVE_INT, help="timed rounds per provider and case (default: 5 CPU, 20 CUDA)")
    p.add_argument("--backend", default=None, help="backend of the fused model (auto, triton, cuda, cpp, torch)")
    p.add_argument("--no-ceilings", action="store_true", help="do not measure the copy/matmul ceilings")
    p.add_argument("--output", default=os.path.join("bench", "out"), help="folder for the JSON and PNG "
                   "(default bench/out)")
    return p


def _plan(args):
    """The run ``args`` ask for, defaults resolved; or an error message (str) for impossible requests."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    cuda = is_cuda(device)
    if cuda and not torch.cuda.is_available():
        return "--device cuda but no CUDA device is available"
    models = [m for group in (args.model or []) for m in _csv(group)] or (
        ["t2t_vit_14", "t2t_vit_t_14", "t2t_vit_24"] if cuda else ["t2t_vit_14"])
    if args.part != "model" and not all(is_t2t(m) for m in models):
        return f"--part {args.part} needs T2T-ViT models, got {models}"
    providers = _csv(args.providers)
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown or not providers:
        return f"unknown provider(s) {unknown}; choose from {', '.join(PROVIDERS)}"
    if args.no_compile:
        providers = [p for p in providers if p != "compiled"]
        if not providers:
            return "--no-compile leaves no provider of --providers compiled to time"
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        return f"--output {args.output} is a file, not a folder"
    others = [m for m in models if not is_t2t(m)]
    if others:
        try:
            import timm
        except ImportError:
            return f"{others} are not T2T-ViT variants, and timm, which may know them, is not installed"
        unknown = [m for m in others if not timm.is_model(m)]
        if unknown:
            return f"unknown model(s) {unknown}: T2T-ViT variants or timm model names"
    if args.openvino and (cuda or args.part != "model" or not all(is_t2t(m) for m in models)):
        return "--openvino compares whole T2T-ViT models on CPU (--device cpu, --part model)"
    if args.openvino and openvino_version() is None:
        return "--openvino needs openvino (pip install 't2t_fast[bench]')"
    return argparse.Namespace(
        device=device, cuda=cuda, models=models, providers=providers,
        dtype=DTYPES[args.dtype or ("bf16" if cuda else "fp32")],
        modes={"infer": ["infer"], "train": ["train"], "both": list(MODES)}[args.mode or ("both" if cuda else "infer")],
        batches=args.batch or ([64, 128, 256] if cuda else [1, 4, 8]),
        warmup=args.warmup if args.warmup is not None else (5 if cuda else 1),
        reps=args.reps if args.reps is not None else (20 if cuda else 5))


def _measure(args, plan, command):
    """Environment, ceilings (or None) and results of the planned run."""
    with cpu_threads(args.threads) if not plan.cuda else contextlib.nullcontext():
        env = environment(plan.device)
        env["command"] = command
        if not plan.cuda:
            env["malloc"] = keep_freed_memory() or "the C library's defaults"
        log(f"t2t-fast bench on {env['device']}: models {plan.models}, batches {plan.batches}, modes {plan.modes}, "
            f"providers {plan.providers}, {_dtype_name(plan.dtype)}, load average {env.get('load_average')}")
        ceilings = None
        if not args.no_ceilings:
            log("measuring ceilings (copy bandwidth, matmul)")
            ceilings = measure_ceilings(plan.device, torch.bfloat16 if plan.cuda else plan.dtype)
            log(_ceilings_text(ceilings))
        begin = time.perf_counter()
        comparison = []
        results = run(plan.models, plan.batches, plan.providers, plan.modes, plan.device, plan.dtype,
                      img_size=args.img_size, warmup=plan.warmup, reps=plan.reps, backend=args.backend,
                      ceilings=ceilings, part=args.part)
        if args.openvino:
            env["openvino"] = openvino_version()
            dtypes = _openvino_dtypes(args, plan, log)
            for name in plan.models:
                comparison += compare_openvino(name, plan.batches, img_size=args.img_size, threads=args.threads,
                                               warmup=max(plan.warmup, 1), reps=plan.reps, dtypes=dtypes,
                                               compile=not args.no_compile, log=log)
        env["wall_seconds"] = round(time.perf_counter() - begin, 1)
        if hasattr(os, "getloadavg"):
            env["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return env, ceilings, results, comparison


def _openvino_dtypes(args, plan, log):
    """fp32 and the low precision of the OpenVINO comparison: ``--dtype`` when it names one, else bf16 where this
    CPU has bf16 matmul instructions (AMX or AVX512-BF16). Without them a bf16 model runs many times slower than fp32 (and OpenVINO
    runs a bf16 hint in f32), so its rows are left out unless asked for."""
    if plan.dtype != torch.float32:
        return (torch.float32, plan.dtype)
    if not cpu_has_fast_matmul(torch.bfloat16):
        log("bf16 rows left out: this CPU has no bf16 matmul instructions, where a bf16 model runs many times "
            "slower than fp32 (--dtype bfloat16 times them anyway)")
        return (torch.float32,)
    return (torch.float32, torch.bfloat16)


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _ceilings_text(ceilings):
    return (f"copy {ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s, {ceilings['matmul_dtype']} matmul "
            f"{ceilings['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s")


def _report(args, plan, env, ceilings, results, comparison):
    """The tables on stdout, the JSON and the plot in ``--output``."""
    cpu = f", CPU class {env['cpu_class']}, kernels {env['cpu_isa']}" if not plan.cuda else ""
    print(f"t2t-fast bench: {env['device']}{cpu}, torch {env['torch']}, {_dtype_name(plan.dtype)}"
          + (f", {env['threads']} threads" if not plan.cuda else "") + f", {args.img_size} px"
          + (f"; {env['malloc']}" if "malloc" in env else ""))
    if ceilings:
        print(f"ceilings: {_ceilings_text(ceilings)}")
    print(format_table(results))
    if comparison:
        print(f"\nbeside OpenVINO {env['openvino']} (ONNX export of the same weights), {args.threads} threads; "
              f"vs openvino = its time / ours at the same dtype; at matmul ceil = 2 x MACs at the measured matmul "
              f"ceiling of the row's dtype / time")
        print(format_comparison(comparison))
    os.makedirs(args.output, exist_ok=True)
    stem = os.path.join(args.output, f"t2t_fast_bench_{plan.device.type}")
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, "ceilings": ceilings, "results": results,
                   **({"openvino": comparison} if comparison else {})}, f, indent=2)
    print(f"wrote {stem}.json")
    try:
        plot(results, stem + ".png", f"t2t-fast bench: {env['device']}, {_dtype_name(plan.dtype)}, "
                                     f"{env['date_utc']}, commit {env['git_commit']}")
        print(f"wrote {stem}.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)


def main(argv=None):
    """Entry point of ``t2t-fast bench``; returns the exit code (1 when a provider failed)."""
    args = parser().parse_args(argv)
    plan = _plan(args)
    if isinstance(plan, str):
        print(f"t2t-fast bench: error: {plan}", file=sys.stderr)
        return 2
    command = "t2t-fast bench " + " ".join(argv if argv is not None else sys.argv[1:])
    env, ceilings, results, comparison = _measure(args, plan, command)
    _report(args, plan, env, ceilings, results, comparison)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
