"""Ahead-of-time compilation of every Triton kernel configuration the package can launch.

The interpreter checks numerics but not whether the GPU compiler accepts a kernel; ``triton.compile`` with an
explicit target does, without a GPU. Every entry of ``t2t_fast.kernels.compile_specs()`` is compiled for sm_80
and sm_90; each must produce a cubin and fit the 227 KiB of shared memory an H100 block can use.

``@triton.jit`` returns interpreter objects when ``TRITON_INTERPRET=1`` (which conftest sets on CPU-only
machines), so the compilation runs in one subprocess without it: this file is also that worker script.
"""
import json
import os
import subprocess
import sys

import pytest

SHARED_LIMIT = 232448  # bytes of shared memory per block on sm_90 (227 KiB)
CAPABILITIES = (80, 90)


def _compile_one(job):
    import triton
    from triton.backends.compiler import GPUTarget

    from t2t_fast.kernels import compile_specs

    index, capability = job
    spec = compile_specs()[index]
    try:
        source = triton.compiler.ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        return spec.name, capability, bool(compiled.asm.get("cubin")), compiled.metadata.shared, None
    except Exception as exc:  # reported per spec by the test below
        return spec.name, capability, False, None, f"{type(exc).__name__}: {exc}"


def _worker():
    """Compile every spec for every capability on all cores; print one JSON list."""
    import concurrent.futures
    import multiprocessing

    from t2t_fast.kernels import compile_specs

    jobs = [(i, cap) for i in range(len(compile_specs())) for cap in CAPABILITIES]
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count(),
                                                mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(_compile_one, jobs, chunksize=4))
    print(json.dumps(results))


if __name__ == "__main__":
    _worker()
    sys.exit(0)

pytest.importorskip("triton")
from t2t_fast.kernels import compile_specs  # noqa: E402

SPEC_NAMES = [spec.name for spec in compile_specs()]


@pytest.fixture(scope="module")
def compiled():
    """{(spec name, capability): (has cubin, shared bytes, error)} for every spec, compiled in a subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 keeps the default
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"compile worker failed:\n{proc.stderr[-4000:]}"
    return {(name, cap): (cubin, shared, error) for name, cap, cubin, shared, error in json.loads(proc.stdout)}


def test_specs_are_unique():
    assert len(SPEC_NAMES) == len(set(SPEC_NAMES)), "duplicate CompileSpec names"


@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: f"sm_{c}")
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_compiles(compiled, name, capability):
    cubin, shared, error = compiled[(name, capability)]
    assert error is None, f"{name} does not compile for sm_{capability}: {error}"
    assert cubin, f"{name}: no cubin for sm_{capability}"
    assert shared <= SHARED_LIMIT, f"{name}: {shared} bytes of shared memory > {SHARED_LIMIT} on sm_{capability}"


class _RecordedKernel:
    """Stands in for a @triton.jit kernel: records each launch's keyword arguments, then runs the kernel."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.launches.append((self.kernel, kwargs))
            return launch(*args, **kwargs)
        return run


def _launches_of_the_wrappers(monkeypatch):
    """(kernel, keyword arguments) of every launch the op wrappers make, forward and backward, at the T2T
    widths (147 and 576 features; m = 32, e = 64) and beside them (45 features; m = e = 64)."""
    import torch

    from t2t_fast.kernels import kernel_modules
    from t2t_fast.ops import favor_attention, soft_split_layernorm

    launches = []
    for module in kernel_modules():
        kernels = [spec.kernel for spec in module.compile_specs()]
        for name in dir(module):
            attribute = getattr(module, name)
            if any(attribute is kernel for kernel in kernels):
                monkeypatch.setattr(module, name, _RecordedKernel(attribute, launches))
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # CPU tensors: the interpreter
        for x, kernel, stride, padding, grid in ((torch.randn(1, 3, 12, 12), 7, 4, 2, None),
                                                 (torch.randn(1, 16, 64), 3, 2, 1, (4, 4)),
                                                 (torch.randn(1, 16, 5), 3, 2, 1, (4, 4))):
            features = (x.shape[1] if grid is None else x.shape[2]) * kernel * kernel
            x.requires_grad_()
            weight, bias = torch.randn(features, requires_grad=True), torch.randn(features, requires_grad=True)
            soft_split_layernorm(x, kernel, stride, padding, weight, bias, grid_size=grid,
                                 backend="triton").sum().backward()
        for m, e in ((32, 64), (64, 64)):
            k, q, v = (torch.randn(1, 40, e, requires_grad=True) for _ in range(3))
            favor_attention(k, q, v, torch.randn(m, e), backend="triton").sum().backward()
    return launches


def test_every_launch_is_a_compiled_spec(monkeypatch):
    """The wrappers pass num_warps and num_stages to every launch, and each launch (kernel, constexprs,
    options) is one of compile_specs(): the configurations compiled above are the ones that run on a GPU, up to
    the argument specialisation Triton adds at launch (an int equal to 1 becomes a constant, 16-divisible
    pointers and ints get alignment hints), which the generic i32/pointer signatures compiled here leave out."""
    specs = compile_specs()  # before the kernels are wrapped: compile_specs reads the module globals
    launches = _launches_of_the_wrappers(monkeypatch)
    never_launched = [spec.name for spec in specs if not any(kernel is spec.kernel for kernel, _ in launches)]
    assert not never_launched, f"kernels the wrappers never launched here: {never_launched}"
    for kernel, kwargs in launches:
        assert "num_warps" in kwargs and "num_stages" in kwargs, f"{kernel}: launched with default options"
        constexprs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
        assert any(spec.kernel is kernel and spec.constexprs == constexprs and spec.num_warps == kwargs["num_warps"]
                   and spec.num_stages == kwargs["num_stages"] for spec in specs), (
            f"launch of {kernel} with {kwargs} matches no CompileSpec")
