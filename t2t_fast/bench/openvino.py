"""t2t_fast beside OpenVINO on CPU: ``t2t-fast bench --device cpu --openvino`` and ``bench/bench_cpu_inference.py``.

The fused model's fp32 weights are exported to ONNX once (``torch.onnx.export``, the reference-equivalent torch
ops; batch dimension dynamic) and compiled by OpenVINO's CPU plugin per batch size (reshaped to a static
shape) at ``INFERENCE_PRECISION_HINT`` f32 and bf16 (OpenVINO's own default is bf16 wherever the CPU has bf16
instructions, so fp32 must be asked for), ``INFERENCE_NUM_THREADS`` = the run's threads, latency hint, one
stream. Against it: :func:`t2t_fast.optimize_for_inference` of the same weights at fp32 and bf16 (and,
optionally, with ``compile=True``). All providers of one (model, batch) are timed interleaved round by round,
and each row reports its ratio to OpenVINO at the same precision and its fraction of the time at the matmul
ceiling measured at that precision (2 x MACs / ceiling / time).
"""
import os
import statistics
import tempfile

import torch

from t2t_fast.bench.providers import build_fused, build_reference, make_inputs, model_macs
from t2t_fast.bench.timing import measure_matmul_ceiling, time_calls

PRECISIONS = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def openvino_version():
    """The installed OpenVINO's version, or None when ``openvino`` cannot be imported."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__


def export_onnx(model, img_size, path):
    """ONNX file of ``model`` (fp32, eval) for (B, 3, img_size, img_size) images with a dynamic batch."""
    example = torch.randn(2, 3, img_size, img_size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(model.eval(), (example,), path, opset_version=18, input_names=["image"],
                      output_names=["logits"], dynamo=True, dynamic_shapes=({0: batch},))
    return path


class OpenVINOModel:
    """``model(images)`` -> logits (torch) of an ONNX file compiled by OpenVINO's CPU plugin for one batch size."""

    def __init__(self, onnx_path, batch, img_size, dtype, threads):
        import openvino

        core = openvino.Core()
        network = core.read_model(onnx_path)
        network.reshape({network.input(0).get_any_name(): [batch, 3, img_size, img_size]})
        config = {"INFERENCE_PRECISION_HINT": PRECISIONS[str(dtype).replace("torch.", "")],
                  "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        self.compiled = core.compile_model(network, "CPU", config)
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.request = self.compiled.create_infer_request()

    def __call__(self, images):
        self.request.infer({0: images.numpy()})
        return torch.from_numpy(self.request.get_output_tensor(0).data.copy())


def compare(name, batches, img_size=224, threads=2, warmup=2, reps=7, dtypes=(torch.float32, torch.bfloat16),
            compile=False, log=print):
    """Rows for every (provider, dtype, batch): ``t2t_fast`` (:func:`t2t_fast.optimize_for_inference`),
    ``t2t_fast+compile`` (when ``compile``) and ``openvino``, timed interleaved per batch (medians of ``reps``
    rounds). Needs ``openvino``; the caller sets the thread count."""
    version = openvino_version()
    if version is None:
        raise RuntimeError("openvino is not installed (pip install 't2t_fast[bench]')")
    import t2t_fast

    reference = build_reference(name, img_size, "cpu")
    fused = build_fused(name, reference, img_size, "cpu")
    macs = model_macs(name, reference, img_size, "cpu")
    ceilings = {dtype: measure_matmul_ceiling("cpu", dtype) for dtype in dtypes}
    ours = {}
    for dtype in dtypes:
        ours[("t2t_fast", dtype)] = t2t_fast.optimize_for_inference(fused, dtype)
        if compile:
            ours[("t2t_fast+compile", dtype)] = t2t_fast.optimize_for_inference(fused, dtype, compile=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        log(f"[{name}] exporting the fused model to ONNX")
        onnx_path = export_onnx(fused, img_size, os.path.join(folder, f"{name}.onnx"))
        for batch in batches:
            providers = dict(ours)
            for dtype in dtypes:
                providers[("openvino", dtype)] = OpenVINOModel(onnx_path, batch, img_size, dtype, threads)
            inputs = make_inputs("infer", batch, img_size, "cpu")
            with torch.inference_mode():
                expected = fused.eval()(inputs[0][0])
            errors = {key: _relative_error(model(inputs[0][0]), expected) for key, model in providers.items()}
            log(f"[{name} B={batch}] warm-up of {len(providers)} providers")
            for model in providers.values():
                time_calls(model, inputs, "cpu", warmup=warmup, reps=0)
            times = {key: [] for key in providers}
            for round_index in range(reps):
                for key, model in providers.items():
                    times[key] += time_calls(model, [inputs[round_index % len(inputs)]], "cpu", warmup=0, reps=1)
            for (provider, dtype), samples in times.items():
                seconds = statistics.median(samples)
                floor = 2 * macs * batch / ceilings[dtype]
                rows.append({"model": name, "batch": batch, "provider": provider,
                             "dtype": str(dtype).replace("torch.", ""), "img_size": img_size,
                             "ms_per_step": round(seconds * 1e3, 2), "ms_min": round(min(samples) * 1e3, 2),
                             "rounds": len(samples), "matmul_floor_ms": round(floor * 1e3, 2),
                             "fraction_at_matmul_ceiling": round(floor / seconds, 3),
                             "matmul_ceiling_tflop_per_s": round(ceilings[dtype] / 1e12, 3),
                             "rel_error_vs_fp32": float(f"{errors[(provider, dtype)]:.2e}"),
                             "openvino": version})
                if provider == "openvino":
                    rows[-1]["openvino_precision"] = providers[(provider, dtype)].precision
            case = rows[-len(times):]
            for row in case:
                other = next(r for r in case if r["provider"] == "openvino" and r["dtype"] == row["dtype"])
                row["speedup_vs_openvino"] = round(other["ms_per_step"] / row["ms_per_step"], 3)
    return rows


def _relative_error(actual, expected):
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()


def format_comparison(rows):
    """The comparison table: one line per (model, batch, provider, dtype)."""
    header = ("model", "batch", "provider", "dtype", "ms", "min ms", "vs openvino", "at matmul ceil", "rel err")
    lines = [[r["model"], str(r["batch"]), r["provider"], r["dtype"], f"{r['ms_per_step']:.1f}", f"{r['ms_min']:.1f}",
              f"{r['speedup_vs_openvino']:.2f}x", f"{100 * r['fraction_at_matmul_ceiling']:.0f} %",
              f"{r['rel_error_vs_fp32']:.1e}"] for r in rows]
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(header)]
    out = ["  ".join(h.rjust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)
