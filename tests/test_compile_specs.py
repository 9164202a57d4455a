"""Ahead-of-time compilation of every Triton kernel configuration the package launches, as it launches it.

The interpreter checks numerics but neither whether the GPU compiler accepts a kernel nor what it costs;
``triton.compile`` with an explicit target does, without a GPU. Every entry of
``t2t_fast.kernels.compile_specs()`` is compiled for sm_80 and sm_90 with the specialisation Triton applies at
launch (``CompileSpec.attrs()``: 16-byte-aligned pointers, the ints in ``divisible``), and Triton's own ptxas
call (the ptxas bundled with Triton, Triton's flags) is run again on the PTX with its ``-v`` report kept. Each
spec must produce a cubin, fit the shared memory of an sm_90 block and spill nothing: a spilling kernel moves
registers through local memory on every loop trip. ``test_every_launch_is_a_compiled_spec`` checks that these
are exactly the configurations the package launches.

    python tests/test_compile_specs.py --table                 # registers and spills, markdown, this Triton
    python tests/test_compile_specs.py --table DIR [DIR ...]   # one column pair per Triton installed in DIR

``@triton.jit`` returns interpreter objects when ``TRITON_INTERPRET=1`` (which conftest sets on CPU-only
machines), so the compilation runs in a subprocess without it: this file is also that worker script.
"""
import contextlib
import inspect
import io
import json
import os
import re
import subprocess
import sys

import pytest

SHARED_LIMIT = 232448  # bytes of shared memory per block on sm_90 (227 KiB)
CAPABILITIES = (80, 90)
LAUNCH_OPTIONS = ("num_warps", "num_stages")
TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int32": "i32", "int64": "i64",
                "int8": "i8", "uint8": "u8", "bool": "i1"}  # torch dtype name -> Triton type name


def _ptxas_usage(ptx, target, options):
    """{'registers', 'spill_stores', 'spill_loads'} (bytes per thread) of ``ptx``: Triton's own ptxas step, run
    again with its ``-v`` log printed (so the ptxas binary and flags are those of the installed Triton)."""
    from triton.compiler.compiler import make_backend

    backend = make_backend(target)
    log = io.StringIO()
    previous = os.environ.get("TRITON_DUMP_PTXAS_LOG")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # read by Triton on each use
    try:
        with contextlib.redirect_stdout(log):
            backend.make_cubin(ptx, {}, backend.parse_options(options), target.arch)
    finally:
        if previous is None:
            del os.environ["TRITON_DUMP_PTXAS_LOG"]
        else:
            os.environ["TRITON_DUMP_PTXAS_LOG"] = previous
    text = log.getvalue()
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", text)]
    if not registers:
        raise RuntimeError(f"no register count in the ptxas log:\n{text}")
    return {"registers": max(registers),
            "spill_stores": sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", text)),
            "spill_loads": sum(int(n) for n in re.findall(r"(\d+) bytes spill loads", text))}


def _launch_attrs(spec):
    """``spec.attrs()`` in the form Triton's launcher builds it: every pointer and int argument listed, ``[]``
    where it has no hint. The compiled code is the same; the cache key becomes the launch's, so compiling here
    on a GPU machine fills the kernel cache its launches then read (``bench/gpu_check.sh``)."""
    hints = spec.attrs()
    return {(index,): hints.get((index,), []) for index, kind in enumerate(spec.signature.values())
            if kind.startswith("*") or (kind[0] in "iu" and kind != "i1")}


def _compile_one(job):
    import triton
    from triton.backends.compiler import GPUTarget

    from t2t_fast.kernels import compile_specs

    index, capability = job
    spec = compile_specs()[index]
    result = {"name": spec.name, "capability": capability, "num_warps": spec.num_warps, "error": None}
    try:
        target = GPUTarget("cuda", capability, 32)
        options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
        source = triton.compiler.ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs,
                                           attrs=_launch_attrs(spec))
        with contextlib.redirect_stdout(io.StringIO()):  # stdout carries the JSON answer
            compiled = triton.compile(source, target=target, options=options)
        result.update(cubin=bool(compiled.asm.get("cubin")), shared=compiled.metadata.shared,
                      **_ptxas_usage(compiled.asm["ptx"], target, options))
    except Exception as exc:  # reported per spec by the test below
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


def _worker():
    """Compile every spec for every capability on all cores; print one JSON object."""
    import concurrent.futures
    import multiprocessing

    import triton

    from t2t_fast.kernels import compile_specs

    jobs = [(i, cap) for i in range(len(compile_specs())) for cap in CAPABILITIES]
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count(),
                                                mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(_compile_one, jobs, chunksize=2))
    print(json.dumps({"triton": triton.__version__, "results": results}))


def compile_all(triton_dir=None):
    """Run the worker in a subprocess without TRITON_INTERPRET (``triton_dir`` first on PYTHONPATH when
    given); returns ``{'triton': version, 'results': [...]}``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_dir:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_dir, env.get("PYTHONPATH")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 keeps the default
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], env=env, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"compile worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _usage(result):
    if result["error"] is not None:
        return "error"
    spills = result["spill_stores"] + result["spill_loads"]
    return f"{result['registers']}" + (f", **spills {result['spill_stores']}/{result['spill_loads']} B**"
                                       if spills else "")


def print_table(triton_dirs):
    """Markdown table: per spec, registers (and spill stores/loads in bytes, when any) per thread on sm_90
    and sm_80, one column pair per Triton."""
    runs = [compile_all(d) for d in (triton_dirs or [None])]
    header = ["spec", "warps"] + [f"Triton {run['triton']} sm_{cap}" for run in runs for cap in (90, 80)]
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    by_key = [{(r["name"], r["capability"]): r for r in run["results"]} for run in runs]
    for first in runs[0]["results"]:
        if first["capability"] != 90:
            continue
        cells = [f"`{first['name']}`", str(first["num_warps"])]
        cells += [_usage(table[(first["name"], cap)]) for table in by_key for cap in (90, 80)]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker()
    elif sys.argv[1:2] == ["--table"]:
        print_table(sys.argv[2:])
    else:
        sys.exit(f"usage: python {sys.argv[0]} --table [TRITON_DIR ...]")
    sys.exit(0)

pytest.importorskip("triton")
from t2t_fast.kernels import compile_specs  # noqa: E402

SPEC_NAMES = [spec.name for spec in compile_specs()]


@pytest.fixture(scope="module")
def compiled():
    """{(spec name, capability): worker result} for every spec, compiled in a subprocess."""
    return {(r["name"], r["capability"]): r for r in compile_all()["results"]}


def test_specs_are_unique():
    assert len(SPEC_NAMES) == len(set(SPEC_NAMES)), "duplicate CompileSpec names"


@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: f"sm_{c}")
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_compiles(compiled, name, capability):
    result = compiled[(name, capability)]
    assert result["error"] is None, f"{name} does not compile for sm_{capability}: {result['error']}"
    assert result["cubin"], f"{name}: no cubin for sm_{capability}"
    assert result["shared"] <= SHARED_LIMIT, (
        f"{name}: {result['shared']} bytes of shared memory > {SHARED_LIMIT} on sm_{capability}")
    assert result["spill_stores"] == 0 and result["spill_loads"] == 0, (
        f"{name} spills on sm_{capability}: {result['spill_stores']} bytes stores, {result['spill_loads']} bytes "
        f"loads per thread ({result['registers']} registers, {result['num_warps']} warps)")


class _RecordedKernel:
    """Stands in for a @triton.jit kernel: records each launch's arguments by name, then runs the kernel;
    other attributes (``__name__``, ``fn``, ...) are the kernel's."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches
        self.arg_names = list(inspect.signature(kernel.fn).parameters)

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            options = {k: v for k, v in kwargs.items() if k in LAUNCH_OPTIONS}
            arguments = dict(zip(self.arg_names, args))
            arguments.update((k, v) for k, v in kwargs.items() if k not in LAUNCH_OPTIONS)
            self.launches.append((self.kernel, arguments, options))
            return launch(*args, **kwargs)
        return run


def _launches_of_the_wrappers(monkeypatch):
    """(kernel, arguments by name, launch options) of every launch the ops make, forward and backward, at the
    T2T widths (147 and 576 features; m = 32, e = 64) and beside them (45 features; m = e = 64)."""
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


def _specialisation_mismatches(spec, arguments):
    """How the runtime arguments of a launch differ from what ``spec`` compiles: argument types, and the
    divisibility hints of ``spec.attrs()`` (a pointer that is not 16-byte aligned, or an int of
    ``spec.divisible`` that is not a multiple of 16, makes Triton compile another variant at launch)."""
    import torch

    problems = []
    for name, kind in spec.signature.items():
        if kind == "constexpr" or name not in arguments:
            continue
        value = arguments[name]
        if isinstance(value, torch.Tensor):
            actual = "*" + TRITON_TYPES.get(str(value.dtype).replace("torch.", ""), str(value.dtype))
            if actual != kind:
                problems.append(f"{name} is {actual}, compiled as {kind}")
            if value.data_ptr() % 16:
                problems.append(f"{name} is not 16-byte aligned")
        elif isinstance(value, bool) or not isinstance(value, int):
            continue
        elif kind == "i32" and not -2 ** 31 <= value < 2 ** 31:
            problems.append(f"{name}={value} does not fit the compiled i32")
        elif name in spec.divisible and value % 16:
            problems.append(f"{name}={value} is not a multiple of 16 (compiled with a divisibility hint)")
    return problems


def test_every_launch_is_a_compiled_spec(monkeypatch):
    """Each launch (kernel, constexprs, num_warps, num_stages) of the ops is one of compile_specs(), passes
    the options explicitly, and has the argument types and alignment the spec compiles (its launch
    specialisation): the configurations compiled above are the ones that run on a GPU. Triton also turns an
    int equal to 1 into a constant at launch; those variants depend on the input shape and are not compiled
    here."""
    specs = compile_specs()  # before the kernels are wrapped: compile_specs reads the module globals
    launches = _launches_of_the_wrappers(monkeypatch)
    never_launched = [spec.name for spec in specs if not any(kernel is spec.kernel for kernel, _, _ in launches)]
    assert not never_launched, f"kernels the ops never launched here: {never_launched}"
    for kernel, arguments, options in launches:
        assert set(options) == set(LAUNCH_OPTIONS), f"{kernel}: launched with default options ({options})"
        matching = [spec for spec in specs if spec.kernel is kernel and spec.num_warps == options["num_warps"]
                    and spec.num_stages == options["num_stages"]
                    and spec.constexprs == {k: arguments.get(k) for k in spec.constexprs}]
        assert matching, f"launch of {kernel} with constexprs/options {arguments} {options} matches no CompileSpec"
        mismatches = {spec.name: _specialisation_mismatches(spec, arguments) for spec in matching}
        assert any(not problems for problems in mismatches.values()), (
            f"launch of {kernel} differs from its CompileSpec: {mismatches}")
