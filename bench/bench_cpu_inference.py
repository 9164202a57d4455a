"""CPU inference benchmarks: the backbone attention kernels behind :func:`t2t_fast.backend.cpu_attention`, and
:func:`t2t_fast.optimize_for_inference` beside OpenVINO.

* ``test_cpu_attention``: one backbone attention of T2T-ViT-14 (6 heads of 64, 197 tokens) from its (B, T, 3*384)
  qkv projection to the (B, T, 384) heads: the extension's kernel (``cpp-<isa>``: fp32/bf16 inference on
  AVX512-BF16 CPUs, with AMX tiles (``cpp-amx``) and without (``cpp-avx512``)), torch's CPU flash kernel (``sdpa``) and matmul + softmax (``matmul``), fp32 / bf16 / fp16, forward
  without grad (``infer``) and forward + backward (``train``), batch 1 and 8, 2 threads: the measurements the
  choice table is made of.
* ``test_cpu_inference``: T2T-ViT-14 at 224 px, 2 threads, batch 1 and 8: ``optimize_for_inference`` at fp32 and
  bf16 and OpenVINO at f32 and bf16 on the ONNX export of the same weights (skipped without ``openvino``).
  Providers run one after another here; ``t2t-fast bench --device cpu --openvino`` times them interleaved.
* ``test_cpu_t2t_kernels``: the T2T layers' fused C++ kernels (FAVOR+, soft split + LayerNorm) per ISA against
  the torch path, batch 8.
* ``test_cpu_add_layernorm``: a backbone residual add + LayerNorm, the C++ kernel per ISA against torch.
* ``test_cpu_linear``: the backbone's four bf16 linears at batch 1-8, the AMX kernel against oneDNN's primitive.
"""
import functools
import importlib
import itertools
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

import t2t_fast
from t2t_fast import bench
from t2t_fast.bench import openvino as ov_bench

IMG, MODEL, ROUNDS = 224, "t2t_vit_14", 7
HEADS, TOKENS, HEAD_DIM = 6, 197, 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _matmul_attention(qkv):
    q, k, v = t2t_fast.model.split_heads(qkv, HEADS)
    return (((q @ k.transpose(-2, -1)) * HEAD_DIM ** -0.5).softmax(dim=-1) @ v).transpose(1, 2).flatten(2)


def _sdpa_attention(qkv):
    q, k, v = t2t_fast.model.split_heads(qkv, HEADS)
    return F.scaled_dot_product_attention(q, k, v, scale=HEAD_DIM ** -0.5).transpose(1, 2).flatten(2)


def _cpp_attention(qkv):
    return t2t_fast.ops.multihead_attention(qkv, HEADS, HEAD_DIM ** -0.5, backend="cpp")


KERNELS = {"sdpa": _sdpa_attention, "matmul": _matmul_attention}
# the C++ kernel with each instruction set it runs with on this CPU ('amx': its bf16 products on tiles)
KERNELS.update({f"cpp-{isa}": _cpp_attention for isa in t2t_fast._native.native_cpu_isas() if isa in ("amx", "avx512")})


@pytest.mark.parametrize("dtype,mode,batch,kernel", list(itertools.product(DTYPES, ("infer", "train"), (1, 8),
                                                                           KERNELS)))
def test_cpu_attention(benchmark, cpu_threads, timed, dtype, mode, batch, kernel):
    benchmark.group = f"cpu attention {dtype} {mode} B={batch} ({t2t_fast.backend.cpu_class()})"
    grad = mode == "train"
    inputs = [(torch.randn(batch, TOKENS, 3 * HEADS * HEAD_DIM, dtype=DTYPES[dtype], requires_grad=grad),)
              for _ in range(3)]
    if kernel.startswith("cpp"):
        if grad:
            pytest.skip("the C++ kernel is forward-only")
        reason = t2t_fast.ops.multihead_attention_cpp_unsupported(inputs[0][0], HEADS)
        if reason is not None:
            pytest.skip(f"the C++ kernel cannot take this input: {reason}")
    dy = torch.randn(batch, TOKENS, HEADS * HEAD_DIM, dtype=DTYPES[dtype])
    fn = KERNELS[kernel]

    def step(qkv):
        if grad:
            fn(qkv).backward(dy)
        else:
            with torch.inference_mode():
                fn(qkv)

    try:
        t2t_fast.backend.set_cpu_isa(kernel[4:] if kernel.startswith("cpp") else None)
        timed(step, inputs, rounds=40 if batch == 1 else 15, warmup_rounds=3)
    finally:
        t2t_fast.backend.set_cpu_isa(None)
    benchmark.extra_info.update(kernel=kernel, chosen=t2t_fast.backend.cpu_attention(DTYPES[dtype], grad))


@pytest.fixture(scope="module")
def models():
    """The fused T2T-ViT-14 (reference weights, seeded) and its ONNX export, built once."""
    reference = bench.build_reference(MODEL, IMG, "cpu")
    fused = bench.build_fused(MODEL, reference, IMG, "cpu")
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = None
        if ov_bench.openvino_version() is not None:
            onnx_path = ov_bench.export_onnx(fused, IMG, os.path.join(folder, f"{MODEL}.onnx"))
        yield fused, onnx_path


@functools.lru_cache(maxsize=None)
def _optimized(fused, dtype):
    return t2t_fast.optimize_for_inference(fused, dtype)


@pytest.mark.parametrize("batch,provider,dtype", list(itertools.product((1, 8), ("t2t_fast", "openvino"),
                                                                        ("fp32", "bf16"))))
def test_cpu_inference(benchmark, models, cpu_threads, timed, batch, provider, dtype):
    benchmark.group = f"cpu {MODEL} inference B={batch} {cpu_threads} threads"
    if not t2t_fast.backend.cpu_has_fast_matmul(DTYPES[dtype]):
        pytest.skip(f"this CPU has no {dtype} matmul instructions: a {dtype} model runs many times slower than fp32 "
                    f"(and OpenVINO runs {dtype} in f32)")
    fused, onnx_path = models
    if provider == "openvino":
        if onnx_path is None:
            pytest.skip("openvino is not installed (pip install 't2t_fast[bench]')")
        model = ov_bench.OpenVINOModel(onnx_path, batch, IMG, DTYPES[dtype], cpu_threads)
        benchmark.extra_info.update(openvino=ov_bench.openvino_version(), openvino_precision=model.precision)
    else:
        model = _optimized(fused, DTYPES[dtype])
    seconds = timed(model, bench.make_inputs("infer", batch, IMG, "cpu"), rounds=ROUNDS, warmup_rounds=2)
    if seconds is not None:
        ceiling = bench.measure_matmul_ceiling("cpu", DTYPES[dtype])
        benchmark.extra_info.update(batch=batch, provider=provider, dtype=dtype,
                                    **bench.compute_info(2 * bench.MACS_224[MODEL] * batch, seconds, ceiling))


# The T2T layers' fused CPU kernels at t2t_vit_14's shapes, batch 8 (inference): FAVOR+ on the (B, T, 3e)
# projection's views (T = 3136 and 784, e = 64, m = 32) and the two soft splits + LayerNorm, as the C++ kernels
# on every ISA this CPU runs and as the torch path (FAVOR+: the stabilised torch ops; soft split: the native
# gather, then torch's LayerNorm, the path before the fused kernel).
T2T_CASES = {"favor_3136": 3136, "favor_784": 784, "split_image": None, "split_tokens": (56, 56)}


def _t2t_case(case, dtype):
    batch = 8
    if case.startswith("favor"):
        kqv = torch.randn(batch, T2T_CASES[case], 192).to(dtype)
        w = torch.nn.init.orthogonal_(torch.empty(32, 64)) * 32 ** 0.5
        return [(*kqv.split(64, dim=-1), w)], 4 * 2 * batch * T2T_CASES[case] * 32 * 64
    grid = T2T_CASES[case]
    x = torch.randn(batch, 3, 224, 224) if grid is None else torch.randn(batch, grid[0] * grid[1], 64)
    features = 147 if grid is None else 576
    return [(x.to(dtype), torch.randn(features), torch.randn(features), grid)], None


@pytest.mark.parametrize("case,dtype,provider", list(itertools.product(
    T2T_CASES, ("fp32", "bf16"), [f"cpp-{isa}" for isa in t2t_fast._native.native_vector_isas()] + ["torch"])))
def test_cpu_t2t_kernels(benchmark, cpu_threads, timed, case, dtype, provider):
    benchmark.group = f"cpu T2T kernel {case} {dtype} B=8"
    inputs, flops = _t2t_case(case, DTYPES[dtype])
    if case.startswith("favor"):
        backend = "cpp" if provider.startswith("cpp") else "torch"

        def step(k, q, v, w):
            return t2t_fast.ops.favor_attention(k, q, v, w, backend=backend)
    else:
        split = (7, 4, 2) if T2T_CASES[case] is None else (3, 2, 1)
        ops = importlib.import_module("t2t_fast.ops.soft_split_layernorm")
        restructurize = importlib.import_module("t2t_fast.ops.restructurize_unfold")

        def step(x, weight, bias, grid):
            if provider.startswith("cpp"):
                return ops.soft_split_layernorm(x, *split, weight, bias, grid_size=grid, backend="cpp")
            rows = restructurize.restructurize_unfold_fwd(x, *(grid or (0, 0)), [split[0]] * 2 + [split[1]] * 2
                                                          + [split[2]] * 2)
            return torch.native_layer_norm(rows.float(), (rows.shape[-1],), weight, bias, 1e-5)[0].to(x.dtype)
    try:
        t2t_fast.backend.set_cpu_isa(provider[4:] if provider.startswith("cpp") else None)
        with torch.inference_mode():
            seconds = timed(step, inputs, rounds=15, warmup_rounds=3)
    finally:
        t2t_fast.backend.set_cpu_isa(None)
    benchmark.extra_info.update(case=case, dtype=dtype, provider=provider)
    if seconds is not None and flops is not None:
        ceiling = bench.measure_matmul_ceiling("cpu", torch.float32)
        benchmark.extra_info.update(**bench.compute_info(flops, seconds, ceiling))


@pytest.mark.parametrize("batch,dtype,provider", list(itertools.product(
    (1, 8), ("fp32", "bf16"), [f"cpp-{isa}" for isa in t2t_fast._native.native_vector_isas()] + ["torch"])))
def test_cpu_add_layernorm(benchmark, cpu_threads, timed, batch, dtype, provider):
    """A backbone residual add + the next LayerNorm of T2T-ViT-14 ((B, 197, 384)): the C++ kernel per ISA against
    torch's add then layer_norm."""
    benchmark.group = f"cpu add + LayerNorm {dtype} B={batch}"
    inputs = [(torch.randn(batch, TOKENS, 384).to(DTYPES[dtype]), torch.randn(batch, TOKENS, 384).to(DTYPES[dtype]),
               torch.randn(384), torch.randn(384)) for _ in range(3)]
    backend = "cpp" if provider.startswith("cpp") else "torch"

    def step(x, residual, weight, bias):
        return t2t_fast.ops.add_layernorm(x, residual, weight, bias, backend=backend)
    try:
        t2t_fast.backend.set_cpu_isa(provider[4:] if provider.startswith("cpp") else None)
        with torch.inference_mode():
            timed(step, inputs, rounds=40 if batch == 1 else 15, warmup_rounds=3)
    finally:
        t2t_fast.backend.set_cpu_isa(None)
    benchmark.extra_info.update(batch=batch, dtype=dtype, provider=provider)


# The backbone's four linears of T2T-ViT-14 (qkv, proj, fc1 with its GELU, fc2) at B images of 197 tokens, bf16 and
# fp32: the extension's kernel for a packed weight (bf16 on AMX tiles, fp32 on AVX-512) against oneDNN's primitive
# with the weight reordered once (what t2t_fast.onednn runs otherwise), both called directly: the measurements
# behind t2t_fast.onednn.PACKED_LINEAR_MAX_ROWS (with the whole-model runs of the CPU inference cases above).
LINEARS = {"qkv": (384, 1152, False), "proj": (384, 384, False), "fc1_gelu": (384, 1152, True),
           "fc2": (1152, 384, False)}


@pytest.mark.parametrize("linear,batch,dtype,provider",
                         list(itertools.product(LINEARS, (1, 2, 4, 8), ("bfloat16", "float32"), ("packed", "onednn"))))
def test_cpu_linear(benchmark, cpu_threads, timed, linear, batch, dtype, provider):
    benchmark.group = f"cpu {dtype} linear {linear} B={batch} ({batch * TOKENS} rows)"
    torch_dtype = getattr(torch, dtype)
    in_features, out_features, gelu = LINEARS[linear]
    weight = (torch.randn(out_features, in_features) / in_features ** 0.5).to(torch_dtype)
    bias = torch.randn(out_features).to(torch_dtype)
    inputs = [(torch.randn(batch, TOKENS, in_features).to(torch_dtype),) for _ in range(3)]
    if provider == "packed":
        reason = t2t_fast.ops.packed_linear_cpp_unsupported(inputs[0][0], weight, bias)
        if reason is not None:
            pytest.skip(f"the packed-weight kernel cannot take this input: {reason}")

        def step(x):  # as the logits path calls it: the checks made once, not per call
            return t2t_fast.onednn.run_packed(x, weight, bias, gelu)
    else:
        if not t2t_fast.onednn.takes(inputs[0][0], weight):
            pytest.skip(f"oneDNN's primitive does not take {dtype} here (no {dtype} matmul instructions)")

        def step(x):
            return t2t_fast.onednn.run(x, weight, bias, gelu)
    with torch.inference_mode():
        seconds = timed(step, inputs, rounds=40 if batch == 1 else 15, warmup_rounds=3)
    benchmark.extra_info.update(linear=linear, batch=batch, dtype=dtype, provider=provider)
    if seconds is not None:
        ceiling = bench.measure_matmul_ceiling("cpu", torch_dtype)
        benchmark.extra_info.update(**bench.compute_info(2 * batch * TOKENS * in_features * out_features, seconds,
                                                         ceiling))
