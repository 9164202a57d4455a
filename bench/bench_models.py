"""Model-level benchmarks: the fused T2T-ViT against the eager reference and torch.compile(reference).

Providers: ``reference`` (``t2t_fast.reference``, eager), ``compiled`` (``torch.compile`` of that module),
``fused`` (``t2t_fast.create_model`` loaded with the reference's state_dict). Inputs: several sets of
``torch.randn`` images used in turn. Within a group the providers run one after another (reference first),
and each test records ``speedup_vs_reference`` / ``speedup_vs_compiled`` in ``extra_info``.

* CPU group (any machine; the CPU acceptance protocol): fp32, 2 threads, batch 8, 224 px: eval forward of
  ``t2t_vit_14``, of its ``tokens_to_token`` module and of ``t2t_vit_t_14``, and a train-mode forward+backward
  of ``t2t_vit_14``.
* GPU groups (CUDA only): images/s of inference and of a training step (AdamW, bf16 autocast) at batch 64
  and 256 for ``t2t_vit_14``, ``t2t_vit_t_14``, ``t2t_vit_24`` and, when timm imports, ``deit_small_patch16_224``
  and ``resnet50`` (eager and compiled); peak memory of one step; % of the bf16 matmul ceiling from the MACs;
  the two ceilings themselves.
* ``test_check``: the model rows of ``bench/gpu_check.sh``: T2T-ViT-14, bf16 autocast, inference and training
  step, batch 256 at 224 px on CUDA. With ``--tiny`` they run on CPU at batch 2 and 64 px instead, with
  torch.compile's dynamo-only ``eager`` backend (inductor takes minutes per graph on a CPU): a check of this
  code without a GPU, not a measurement.
"""
import gc
import itertools

import pytest
import torch

from t2t_fast import bench

IMG = 224
CUDA = "cuda"
CPU_BATCH, CPU_ROUNDS = 8, 7
GPU_BATCHES, GPU_ROUNDS, GPU_WARMUP = (64, 256), 20, 3

try:
    import timm  # noqa: F401

    TIMM_SKIP = None
except Exception as exc:  # a broken install (torch/torchvision mismatch) counts as absent
    TIMM_SKIP = f"timm is not importable ({type(exc).__name__}: {exc})".splitlines()[0]


@pytest.fixture(scope="module")
def zoo():
    """``get(name, provider, device, part='model'|'tokens_to_token', img=IMG, compile_backend='inductor')``:
    models built once and shared by the tests of one model name (switching to another name frees the
    previous ones). ``part='tokens_to_token'`` is the model's T2T module (compiled on its own for the
    ``compiled`` provider)."""
    cache = {}

    def get(name, provider, device, part="model", img=IMG, compile_backend="inductor"):
        if any(key[0] != name for key in cache):
            cache.clear()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        key = (name, provider, str(device), part, img, compile_backend)
        if key in cache:
            return cache[key]
        reference_key = (name, "reference", str(device), "model", img, "inductor")
        if reference_key not in cache:
            cache[reference_key] = bench.build_reference(name, img, device)
        reference = cache[reference_key]
        if provider == "compiled" and compile_backend != "inductor":
            cache[key] = torch.compile(reference if part == "model" else reference.tokens_to_token,
                                       backend=compile_backend)
        elif part == "model" or provider == "compiled":
            cache[key] = bench.build_provider(provider, name, reference, img, device, part=part)
        else:
            cache[key] = get(name, provider, device, img=img).tokens_to_token
        return cache[key]

    yield get
    cache.clear()
    gc.collect()


def record_throughput(benchmark, seconds, batch, macs_per_image, mode, ceilings, roofline):
    if seconds is None:
        return
    flops = 2 * macs_per_image * batch * (3 if mode == "train" else 1)
    benchmark.extra_info.update(batch=batch, img_per_s=round(batch / seconds, 2), macs_per_image=macs_per_image)
    roofline(seconds, ceilings, flops=flops)


# ------------------------------------------------------------------------------------------- CPU group

CPU_CASES = {
    # id: (model, part, mode)
    "t2t_vit_14": ("t2t_vit_14", "model", "infer"),
    "t2t_vit_14.tokens_to_token": ("t2t_vit_14", "tokens_to_token", "infer"),
    "t2t_vit_14.train_fwd_bwd": ("t2t_vit_14", "model", "train"),
    "t2t_vit_t_14": ("t2t_vit_t_14", "model", "infer"),
}


@pytest.mark.parametrize("case,provider", [pytest.param(c, p, id=f"{c}-{p}")
                                           for c, p in itertools.product(CPU_CASES, bench.PROVIDERS)])
def test_cpu(benchmark, zoo, cpu_threads, cpu_ceilings, timed, roofline, compare, case, provider):
    name, part, mode = CPU_CASES[case]
    benchmark.group = f"cpu {case} {'train fwd+bwd' if mode == 'train' else 'eval'} fp32 B={CPU_BATCH} " \
                      f"{cpu_threads} threads"
    model = zoo(name, provider, "cpu", part)
    inputs = bench.make_inputs(mode, CPU_BATCH, IMG, "cpu")
    if mode == "train":
        step = bench.training_step(model, "cpu", torch.float32)  # forward + backward, no optimizer
    else:
        step = bench.inference_step(model, "cpu", torch.float32)
    seconds = timed(step, inputs, rounds=CPU_ROUNDS, warmup_rounds=1)
    macs = (bench.T2T_MODULE_MACS_224 if part == "tokens_to_token" else bench.MACS_224)[name]
    record_throughput(benchmark, seconds, CPU_BATCH, macs, mode, cpu_ceilings, roofline)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    compare(seconds, provider)


# ------------------------------------------------------------------------------------------ GPU groups

GPU_MODELS = ("t2t_vit_14", "t2t_vit_t_14", "t2t_vit_24")


def gpu_params():
    for name in GPU_MODELS + bench.TIMM_MODELS:
        marks = [pytest.mark.skip(reason=TIMM_SKIP)] if name in bench.TIMM_MODELS and TIMM_SKIP else []
        for mode, batch, provider in itertools.product(bench.MODES, GPU_BATCHES, bench.PROVIDERS):
            if provider == "fused" and name in bench.TIMM_MODELS:
                continue
            yield pytest.param(name, mode, batch, provider, id=f"{name}-{mode}-B{batch}-{provider}", marks=marks)


@pytest.mark.gpu
def test_gpu_ceiling_copy(benchmark, cuda_ceilings, timed, roofline):
    """The copy-bandwidth ceiling as its own benchmark row (1 GiB fp32, device to device)."""
    benchmark.group = "cuda ceilings"
    src = torch.randn(1 << 28, device=CUDA)
    dst = torch.empty_like(src)
    seconds = timed(dst.copy_, [(src,)], rounds=20, warmup_rounds=3)
    roofline(seconds, cuda_ceilings, bytes=2 * src.numel() * src.element_size())


@pytest.mark.gpu
def test_gpu_ceiling_matmul(benchmark, cuda_ceilings, timed, roofline):
    """The bf16 matmul ceiling as its own benchmark row (8192^3)."""
    benchmark.group = "cuda ceilings"
    a, b = (torch.randn(8192, 8192, device=CUDA, dtype=torch.bfloat16) for _ in range(2))
    seconds = timed(torch.mm, [(a, b)], rounds=20, warmup_rounds=3)
    roofline(seconds, cuda_ceilings, flops=2 * 8192 ** 3)


def run_model_step(benchmark, zoo, ceilings, timed, roofline, compare, name, mode, batch, provider, device,
                   img=IMG, rounds=GPU_ROUNDS, warmup_rounds=GPU_WARMUP, compile_backend="inductor"):
    """Time one bf16-autocast inference or training step (AdamW) of ``provider`` and record images/s, % of
    the matmul ceiling and, on CUDA, the peak memory of one step; skips on running out of CUDA memory."""
    model = zoo(name, provider, device, img=img, compile_backend=compile_backend)
    inputs = bench.make_inputs(mode, batch, img, device)
    if mode == "train":
        step = bench.training_step(model, device, torch.bfloat16, torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-4))
    else:
        step = bench.inference_step(model, device, torch.bfloat16)
    out_of_memory = None
    try:
        seconds = timed(step, inputs, rounds=rounds, warmup_rounds=warmup_rounds)
        memory = bench.step_memory(step, inputs[0], device)
    except torch.cuda.OutOfMemoryError as exc:
        out_of_memory = str(exc).splitlines()[0]
    if out_of_memory is not None:  # outside the except block, so the traceback's tensors can be freed
        del step, inputs
        gc.collect()
        torch.cuda.empty_cache()
        pytest.skip(f"{provider} {name} {mode} at batch {batch} runs out of CUDA memory: {out_of_memory}")
    macs = bench.model_macs(name, zoo(name, "reference", device, img=img), img, device)
    record_throughput(benchmark, seconds, batch, macs, mode, ceilings, roofline)
    if memory is not None:  # step_memory reset the peak before its step: the peak is that step's
        benchmark.extra_info["step_memory_mb"] = round(memory / 2 ** 20, 1)
        benchmark.extra_info["peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    compare(seconds, provider)


@pytest.mark.gpu
@pytest.mark.parametrize("name,mode,batch,provider", list(gpu_params()))
def test_gpu(benchmark, zoo, cuda_ceilings, timed, roofline, compare, name, mode, batch, provider):
    benchmark.group = f"cuda {name} {mode} bf16 B={batch}"
    run_model_step(benchmark, zoo, cuda_ceilings, timed, roofline, compare, name, mode, batch, provider, CUDA)


# ----------------------------------------------------------------------------- the GPU check's rows

CHECK_MODEL = "t2t_vit_14"


@pytest.fixture(scope="module")
def check_setup(request):
    """Keyword arguments of ``run_model_step`` for the GPU check: CUDA, batch 256, 224 px; with ``--tiny``
    CPU, batch 2, 64 px, two rounds, dynamo-only compile."""
    if request.config.getoption("tiny"):
        return dict(device="cpu", batch=2, img=64, rounds=2, warmup_rounds=1, compile_backend="eager")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (or --tiny: the same rows on CPU at tiny sizes)")
    return dict(device=CUDA, batch=256)


@pytest.mark.parametrize("mode,provider", [pytest.param(m, p, id=f"{m}-{p}")
                                           for m, p in itertools.product(bench.MODES, bench.PROVIDERS)])
def test_check(benchmark, request, zoo, check_setup, timed, roofline, compare, mode, provider):
    device = check_setup["device"]
    ceilings = request.getfixturevalue("cuda_ceilings" if device == CUDA else "cpu_ceilings")
    benchmark.group = (f"check {device} {CHECK_MODEL} {mode} bf16 B={check_setup['batch']} "
                       f"{check_setup.get('img', IMG)}px")
    run_model_step(benchmark, zoo, ceilings, timed, roofline, compare, CHECK_MODEL, mode,
                   provider=provider, **check_setup)
