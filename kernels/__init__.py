"""Triton kernels of t2t_fast, installed as ``t2t_fast.kernels``.

Every kernel module here defines ``compile_specs()`` returning :class:`CompileSpec` entries: each
(kernel, signature, constexprs, launch options) combination the package can launch. Tests compile
each one ahead of time for sm_80 and sm_90 (``triton.compile`` with an explicit ``GPUTarget``), which
needs no GPU, and check the shared memory it asks for. At launch Triton also specialises arguments
(ints equal to 1 become constants, 16-divisible pointers and ints get alignment hints): the binaries that
run are those variants of the generic signatures compiled in the tests.
"""
import dataclasses
import importlib
import pkgutil


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """One launchable configuration of a ``@triton.jit`` kernel."""

    name: str
    kernel: object  # the @triton.jit function
    signature: dict  # argument name -> Triton type string ("*fp32", "i32", "constexpr", ...)
    constexprs: dict  # constexpr argument name -> value
    num_warps: int = 4
    num_stages: int = 2


def kernel_modules():
    """The kernel modules of this package (every submodule that defines ``compile_specs``)."""
    modules = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "compile_specs"):
            modules.append(module)
    return modules


def compile_specs():
    """Every :class:`CompileSpec` the package can launch, across all kernel modules."""
    return [spec for module in kernel_modules() for spec in module.compile_specs()]
